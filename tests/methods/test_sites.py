"""Where methods attach (peftkern.methods.sites) on 13 transformers families, on an unknown family and on a model
whose sites must be named; the methods that place modules by site on GPT-2, T5, DistilBERT, GPT-NeoX and Phi-3;
transformers' Conv1D (GPT-2) through the fused ops and PEFT's ``fan_in_fan_out`` layout; QLoRA's full-precision
modules as transformers' 4-bit loading keeps them."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import peft
import pytest
import torch
from torch import nn

import peftkern as pk
from peftkern.methods import sites as S
from peftkern.methods.unipelt import GatedLoRALinear
from peftkern.nn import LoRALinear, QLoRALinear, RowDiffLinear, SparseDiffLinear
from peftkern.methods.selective import DiffPruningLinear
from peftkern.ops.lora.reference import dora_linear_reference, lora_linear_reference
from tests._helpers import (DEVICE, TINY_FAMILIES, assert_close, backends, randomize_trainable_, tiny_batch,
                            tiny_model)

ENCODER_DECODER = {"t5", "bart"}
ENCODER_ONLY = {"bert", "roberta", "distilbert"}
FUSED = {"gpt2": "blocks", "gpt_neox": "heads", "phi3": "blocks"}  # q, k and v in one projection
GATED_FFN = {"llama", "qwen2", "mistral", "gemma"}  # two FFN input linears (gate, up)


def _conv1d():
    from transformers.pytorch_utils import Conv1D
    return Conv1D


# --------------------------------------------------------------------------------------------------- the sites
_SEEN = []


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _SEEN.append((module, value))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _record_attention(model):
    """Make ``model``'s attention record (module, value states) of every call, then run SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("peftkern_tests_recording", _recording_attention)
    AttentionMaskInterface.register("peftkern_tests_recording", sdpa_mask)
    model.set_attn_implementation("peftkern_tests_recording")
    _SEEN.clear()


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_sites_per_family(family):
    """Per layer: q / k / v / output projections and the FFN's linears are the model's own (counts, kinds, roles);
    the attention module is the one whose attention call the model makes, and its v projection (the v slice of a
    fused one) produces exactly the value states that call receives, also for cross-attention."""
    model = tiny_model(family)
    layers = S.find_layers(model)
    roles = [layer.role for layer in layers]
    if family in ENCODER_DECODER:
        assert roles == ["encoder"] * 2 + ["decoder"] * 2
    else:
        assert roles == ["encoder" if family in ENCODER_ONLY else "decoder"] * 2
    assert [layer.index for layer in layers] == [0, 1] * (len(layers) // 2)
    modules = dict(model.named_modules())
    for layer in layers:
        att = layer.attention
        assert att.fused == (family in FUSED)
        assert (layer.cross_attention is not None) == (layer.role == "decoder" and family in ENCODER_DECODER)
        assert len(layer.ffn_in) == (2 if family in GATED_FFN else 1)
        for name in [att.q.name, att.k.name, att.v.name, att.out.name, *layer.ffn_in, layer.ffn_out]:
            assert name.startswith(layer.name + ".") and S.is_linear(modules[name]), name
        kinds = {type(modules[n]) for n in [att.q.name, att.out.name, layer.ffn_out]}
        assert kinds == ({_conv1d()} if family == "gpt2" else {nn.Linear})
        if att.fused:  # the slices partition the fused outputs: q, then k, then v (per head for GPT-NeoX)
            rows = torch.cat([att.q.indices(), att.k.indices(), att.v.indices()])
            out = S.linear_features(modules[att.q.name])[1]
            assert sorted(rows.tolist()) == list(range(out))
            assert (rows[1:] > rows[:-1]).all() == (FUSED[family] == "blocks")
        else:
            assert att.q.rows is None and len({att.q.name, att.k.name, att.v.name}) == 3
    outputs = {}
    for layer in layers:
        for att in filter(None, (layer.attention, layer.cross_attention)):
            modules[att.v.name].register_forward_hook(lambda m, a, out, n=att.v.name: outputs.__setitem__(n, out))
    _record_attention(model)
    model(**tiny_batch(model))
    calls = {id(module): value for module, value in _SEEN}
    for layer in layers:
        for att in filter(None, (layer.attention, layer.cross_attention)):
            value = calls[id(modules[att.module])]  # [B, Hkv, S, D]
            v = outputs[att.v.name]
            v = v if att.v.rows is None else v[..., att.v.indices()]
            b, h, s, d = value.shape
            assert torch.equal(v.view(b, s, h, d).transpose(1, 2), value), att.module


def test_attention_modules_for_prefix_methods():
    """Self-attention modules per layer (encoder's and decoder's), cross-attention apart: what prefix methods need."""
    model = tiny_model("t5")
    own = [m for n, m in model.named_modules() if n.endswith("SelfAttention")]
    cross = [m for n, m in model.named_modules() if n.endswith("EncDecAttention")]
    assert [m for _, m in S.attention_modules(model)] == own and len(own) == 4
    assert [m for _, m in S.attention_modules(model, cross=True)] == cross and len(cross) == 2
    assert [layer.role for layer, _ in S.attention_modules(model, cross=True)] == ["decoder"] * 2


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "phi3", "distilbert", "t5", "bart", "bert"])
def test_an_unknown_family_is_read_structurally(family):
    """The same model under a model_type the table lacks: the structural reading finds the same sites (BERT's FFN
    input module aside: it takes intermediate.dense, whose input is the same). GPT-NeoX is in the table because its
    fused qkv interleaves heads, which no name tells."""
    model = tiny_model(family)
    known = S.find_layers(model)
    model.config.model_type = "a_new_family"
    found = S.find_layers(model)
    if family == "bert":
        assert [f.ffn for f in found] == [k.ffn_in[0] for k in known]
        found = [dataclasses.replace(f, ffn=k.ffn) for f, k in zip(found, known)]
    assert found == known


class _Attention(nn.Module):
    def __init__(self, d, names):
        super().__init__()
        self.names = names
        for n in names:
            setattr(self, n, nn.Linear(d, d))

    def forward(self, x):
        q, k, v, o = (getattr(self, n) for n in self.names)
        att = torch.softmax(q(x) @ k(x).transpose(-1, -2) / math.sqrt(x.shape[-1]), -1)
        return o(att @ v(x))


class _FeedForward(nn.Module):
    def __init__(self, d, names):
        super().__init__()
        self.names = names
        for n, shape in zip(names, [(d, 2 * d), (2 * d, d), (d, 2 * d)]):
            setattr(self, n, nn.Linear(*shape))

    def forward(self, x):
        up = getattr(self, self.names[0])(x)
        if len(self.names) == 3:
            up = nn.functional.silu(up) * getattr(self, self.names[2])(x)
        return getattr(self, self.names[1])(up)


class _Block(nn.Module):
    def __init__(self, d, attention, ffn, names):
        super().__init__()
        setattr(self, attention[0], _Attention(d, attention[1]))
        setattr(self, ffn[0], _FeedForward(d, ffn[1]))
        self.order = (attention[0], ffn[0])

    def forward(self, x):
        for child in self.order:
            x = x + getattr(self, child)(x)
        return x


class _TinyLM(nn.Module):
    """A model of no known family: Meta's original Llama names (attention.wq/wk/wv/wo, feed_forward.w1/w2/w3), or
    names that say nothing."""

    def __init__(self, attention=("attention", ("wq", "wk", "wv", "wo")), ffn=("feed_forward", ("w1", "w2", "w3"))):
        super().__init__()
        torch.manual_seed(0)
        self.tok_embeddings = nn.Embedding(100, 32)
        self.layers = nn.ModuleList(_Block(32, attention, ffn, None) for _ in range(2))
        self.output = nn.Linear(32, 100)

    def forward(self, input_ids):
        x = self.tok_embeddings(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.output(x)


def _train_step(model, loss_fn):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model)
    loss.backward()
    assert all(p.grad is not None for p in params)
    torch.optim.SGD(params, lr=0.1).step()
    return loss


def test_meta_style_names_are_found_and_adapters_train():
    model = _TinyLM()
    layers = S.find_layers(model)
    assert [(l.attention.q.name, l.attention.out.name, l.ffn, l.ffn_in, l.ffn_out) for l in layers] == [
        (f"layers.{i}.attention.wq", f"layers.{i}.attention.wo", f"layers.{i}.feed_forward",
         (f"layers.{i}.feed_forward.w1", f"layers.{i}.feed_forward.w3"), f"layers.{i}.feed_forward.w2")
        for i in range(2)]
    pk.patch(model, "adapter_houlsby", reduction_factor=4)
    assert all(hasattr(model.get_submodule(n), "adapter") for l in layers for n in (l.attention.out.name, l.ffn_out))
    ids = torch.randint(0, 100, (2, 6))
    _train_step(model, lambda m: m(ids).logsumexp(-1).mean())


def test_blocks_outside_a_module_list_are_found_by_no_split_modules():
    """Layers held otherwise than in an nn.ModuleList: the classes transformers' _no_split_modules names."""
    model = _TinyLM()
    model.layers = nn.Sequential(*model.layers)
    with pytest.raises(ValueError, match="no transformer layers found"):
        S.find_layers(model)
    model._no_split_modules = ["_Block"]
    assert [l.attention.v.name for l in S.find_layers(model)] == ["layers.0.attention.wv", "layers.1.attention.wv"]


_UNNAMED = dict(attention=("mixer", ("a", "b", "c", "d")), ffn=("mlp", ("up", "down")))
_UNNAMED_SITES = {"q": r"mixer\.a", "k": r"mixer\.b", "v": r"mixer\.c", "attn_out": r"mixer\.d", "ffn": "mlp",
                  "ffn_in": r"mlp\.up", "ffn_out": r"layers\.\d+\.mlp\.down"}  # a full name works too


def test_sites_that_cannot_be_found_raise_and_can_be_named():
    model = _TinyLM(**_UNNAMED)
    for call in (lambda: S.find_layers(model), lambda: pk.patch(model, "adapter_pfeiffer")):
        with pytest.raises(ValueError, match=r"(?s)no transformer layer.*target_modules=.*sites=\{"):
            call()
    with pytest.raises(ValueError, match="no transformer layers found.*sites="):
        S.find_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    layers = S.find_layers(model, _UNNAMED_SITES)
    assert [(l.attention.v.name, l.ffn_out) for l in layers] == [(f"layers.{i}.mixer.c", f"layers.{i}.mlp.down")
                                                                 for i in range(2)]
    pk.patch(model, "adapter_houlsby", reduction_factor=4, sites=_UNNAMED_SITES)
    assert all(hasattr(model.get_submodule(n), "adapter") for l in layers for n in (l.attention.out.name, l.ffn_out))
    assert model.peftkern_config["options"]["sites"] == _UNNAMED_SITES


@pytest.mark.parametrize("sites, message", [({"attn": "x"}, "unknown key"), ({"q": "("}, r"sites\['q'\]"),
                                            (["q"], "sites must be a dict"), ({"q": r"mixer\.[ab]"}, "need one")])
def test_bad_sites_name_the_argument(sites, message):
    with pytest.raises(ValueError, match=message):
        S.find_layers(_TinyLM(**_UNNAMED), {**_UNNAMED_SITES, **sites} if isinstance(sites, dict) else sites)


# --------------------------------------------------------------------------------------------------- methods by site
FAMILIES = ["gpt2", "t5", "distilbert", "gpt_neox", "phi3"]
METHODS = {"lora": dict(r=4), "dora": dict(r=4), "qlora": dict(r=4), "adapter_pfeiffer": dict(reduction_factor=4),
           "adapter_houlsby": dict(reduction_factor=4), "unipelt": dict(r=4, num_virtual_tokens=3, reduction_factor=4),
           "bitfit": {}, "far": dict(fraction=0.25)}
NO_BIAS = {"t5", "phi3"}  # BitFit refuses these (their linears and norms have no bias)
CASES = [(f, m) for f in FAMILIES for m in sorted(METHODS)]


@pytest.mark.parametrize("family, method", CASES)
def test_method_patches_and_trains_only_its_parameters(family, method):
    model = tiny_model(family)
    batch = tiny_batch(model)
    calibration = [batch] if pk.patching.METHODS[method].calibrated else None
    if method == "bitfit" and family in NO_BIAS:
        with pytest.raises(ValueError, match="no bias terms"):
            pk.patch(model, method)
        return
    # the base's parameter objects, kept alive (a freed one's id could be reused), and their values
    before = {id(p): (n, p, p.detach().clone()) for n, p in model.named_parameters()}
    pk.patch(model, method, calibration_data=calibration, **METHODS[method])
    record = model.peftkern_config
    heads = {f"{h}.{n}" for h in record["heads"] for n, _ in model.get_submodule(h).named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(record["added"]) | heads | set(record.get("biases", ()))
    assert trainable - heads
    frozen = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]
              if not t.requires_grad}
    model.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = _train_step(model, lambda m: m(**batch).loss)
    assert torch.isfinite(loss)
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(now[n], t) for n, t in frozen.items())
    assert any(not torch.equal(now[n], t) for n, t in params.items())
    kept = [(before[id(p)], p) for p in model.parameters() if id(p) in before and not p.requires_grad]
    assert len(kept) > 4 and all(torch.equal(p, old) for (_, _, old), p in kept)  # the base's bits, after patch
    _check_placement(model, family, method)


def _check_placement(model, family, method):
    """The method's modules are where the model's sites are."""
    layers = S.find_layers(model)
    modules = dict(model.named_modules())
    if method in ("adapter_pfeiffer", "adapter_houlsby"):
        outs = [l.ffn_out for l in layers] + ([l.attention.out.name for l in layers] if "houlsby" in method else [])
        assert all(hasattr(modules[n], "adapter") for n in outs) and len(layers) == (4 if family == "t5" else 2)
    if method == "unipelt":
        for layer in layers:
            att = layer.attention
            gated = [modules[n] for n in dict.fromkeys([att.q.name, att.v.name])]
            assert all(isinstance(m, GatedLoRALinear) for m in gated) and not isinstance(modules[att.out.name],
                                                                                         GatedLoRALinear)
            if att.fused:
                assert torch.equal(gated[0].lora_rows, torch.cat([att.q.indices(), att.v.indices()]))
    if method == "far":
        assert {n for n, m in modules.items() if isinstance(m, RowDiffLinear)} == {
            n for l in layers for n in (*l.ffn_in, l.ffn_out)}
    if method in ("lora", "dora", "qlora"):
        lora = {n: m for n, m in modules.items() if isinstance(m, (LoRALinear, QLoRALinear))}
        assert S.find_layers(model)[0].attention.q.name in lora and "lm_head" not in lora
        if family == "gpt2" and method != "qlora":
            assert all(m.fan_in_fan_out and isinstance(m.weight, nn.Parameter) for m in lora.values())
        if method == "qlora":
            full = {n for n, m in lora.items() if not isinstance(m, QLoRALinear)}
            assert full == ({n for n in lora if n.endswith(".wo")} if family == "t5" else set())


# --------------------------------------------------------------------------------------------------- UniPELT, fused
def test_gated_lora_on_slices_of_a_fused_projection_fp64():
    """A rank-r LoRA per slice (q, v of a fused qkv) under one per-token gate, against its literal math in fp64."""
    torch.manual_seed(0)
    base = nn.Linear(16, 48, dtype=torch.float64)
    q, v = torch.arange(0, 16), torch.arange(32, 48)
    layer = GatedLoRALinear.from_linear(base, r=3, lora_alpha=6, slices=[q, v])
    assert layer.lora_A.shape == (6, 16) and layer.lora_B.shape == (32, 3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    gate = torch.sigmoid(layer.gate(x))
    expected = base(x)
    (Aq, Av), (Bq, Bv) = layer.lora_A.split(3), layer.lora_B.split(16)
    expected[..., q] += gate * 2.0 * (x @ Aq.t() @ Bq.t())
    expected[..., v] += gate * 2.0 * (x @ Av.t() @ Bv.t())
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="slices"):
        GatedLoRALinear.from_linear(base, r=3, slices=[q, q])


# --------------------------------------------------------------------------------------------------- Conv1D
class _Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.lin = layer

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_over_conv1d_matches_peft_fan_in_fan_out(backend, dora):
    """LoRALinear over a Conv1D reads its [in, out] weight through a transposed view (the same parameter, no copy):
    output and gradients against fp64 math and PEFT's fan_in_fan_out layer."""
    torch.manual_seed(0)
    conv = _conv1d()(29, 37).to(DEVICE)  # nf=29 outputs, nx=37 inputs
    with torch.no_grad():
        conv.bias.normal_()
    pm = peft.get_peft_model(_Holder(copy.deepcopy(conv)), peft.LoraConfig(r=4, lora_alpha=9, target_modules=["lin"],
                                                                           fan_in_fan_out=True, use_dora=dora))
    theirs = pm.base_model.model.lin
    ours = LoRALinear.from_linear(conv, r=4, lora_alpha=9, use_dora=dora)
    assert ours.weight is conv.weight and ours.base_weight.data_ptr() == conv.weight.data_ptr()
    assert (ours.in_features, ours.out_features) == (37, 29)
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_(0, 0.1)
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
        if dora:
            ours.lora_magnitude.copy_(theirs.lora_magnitude_vector["default"].weight)
    params = [ours.lora_A, ours.lora_B] + ([ours.lora_magnitude] if dora else [])
    x = torch.randn(3, 5, 37, device=DEVICE, requires_grad=True)
    g = torch.randn(3, 5, 29, device=DEVICE)
    with pk.use_backend(backend):
        y = ours(x)
        grads = torch.autograd.grad(y, [x, *params], g)
    x64 = x.detach().double().requires_grad_(True)
    p64 = [p.detach().double().requires_grad_(True) for p in params]
    w64, b64 = conv.weight.detach().double().t(), conv.bias.detach().double()
    y64 = (dora_linear_reference(x64, w64, b64, *p64[:2], ours.scaling, p64[2]) if dora
           else lora_linear_reference(x64, w64, b64, *p64, ours.scaling))
    grads64 = torch.autograd.grad(y64, [x64, *p64], g.double())
    assert_close(y, y64, name="y")
    assert_close(theirs(x).detach(), y64, name="peft y")
    for name, got, ref in zip(["dx", "dA", "dB", "dmagnitude"], grads, grads64):
        assert_close(got, ref, name=name)
    merged64 = w64 + ours.scaling * p64[1].detach() @ p64[0].detach()
    if dora:
        merged64 = merged64 * (p64[2].detach() / merged64.norm(dim=1))[:, None]
    w = conv.weight.detach().clone()
    ours.merge()
    assert_close(ours.weight.t(), merged64, name="merged")
    ours.unmerge()
    assert torch.equal(conv.weight, w)


def test_sparse_row_and_gated_diffs_over_conv1d_fp64():
    """SparseDiffLinear / RowDiffLinear / DiffPruningLinear over a Conv1D: indices and rows count in [out, in] (the
    layout nn.Linear's give), forward against the dense math, merge adds into the stored [in, out] weight and
    unmerge restores its bits."""
    torch.manual_seed(0)
    conv = _conv1d()(6, 5).double()  # 6 outputs, 5 inputs
    w = conv.weight.detach().clone()
    x = torch.randn(4, 5, dtype=torch.float64)
    idx = torch.tensor([0, 3, 7, 11, 29])
    values = torch.randn(5, dtype=torch.float64)
    dense = torch.zeros(6 * 5, dtype=torch.float64).index_add(0, idx, values).view(6, 5)
    sparse = SparseDiffLinear.from_linear(conv, idx, values)
    rows = RowDiffLinear(conv, torch.tensor([1, 4]))
    with torch.no_grad():
        rows.delta.normal_()
    row_dense = torch.zeros(6, 5, dtype=torch.float64).index_copy(0, rows.rows, rows.delta.detach())
    gated = DiffPruningLinear(conv)
    with torch.no_grad():
        gated.diff.normal_()
    for layer, diff in ((sparse, dense), (rows, row_dense), (gated, None)):
        diff = gated.eval_diff().double() if diff is None else diff
        ref = x @ (w.t() + diff).t() + conv.bias
        torch.testing.assert_close(layer.eval()(x), ref, rtol=1e-12, atol=1e-12)
        if layer is gated:
            torch.testing.assert_close(gated.merged_weight(), w + diff.t(), rtol=0, atol=1e-15)
            continue
        layer.merge()
        torch.testing.assert_close(conv.weight, w + diff.t(), rtol=0, atol=1e-15)
        torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
        layer.unmerge()
        assert torch.equal(conv.weight, w)


def test_qlora_quantizes_conv1d_as_transformers_does():
    """A Conv1D's weight is quantized as [out, in]: the codes of nn.Linear holding W^T, bit for bit."""
    torch.manual_seed(0)
    conv = _conv1d()(96, 64)
    linear = nn.Linear(64, 96)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
    ours, ref = QLoRALinear.from_linear(conv, r=4), pk.nn.NF4Linear.from_linear(linear)
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.dequantized_weight(), ref.dequantized_weight())
    assert ours.bias is conv.bias


def _gpt2(seed=0):
    return tiny_model("gpt2", seed).double()


def _peft_load(model, directory):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(model, str(directory)).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    return loaded


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_gpt2_peft_adapter_loads_into_peftkern_fp64(use_dora, tmp_path):
    base = _gpt2()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                             use_dora=use_dora, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_trainable_(pm)
    pm.save_pretrained(str(tmp_path))
    pm = _peft_load(copy.deepcopy(base), tmp_path)
    ours = pk.load_adapter(copy.deepcopy(base), tmp_path).eval()
    batch = tiny_batch(base)
    del batch["labels"]
    torch.testing.assert_close(ours(**batch).logits, pm(**batch).logits, rtol=1e-10, atol=1e-10)
    assert sum(isinstance(m, LoRALinear) and m.fan_in_fan_out for m in ours.modules()) == 8


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_gpt2_peftkern_adapter_loads_into_peft_fp64(use_dora, tmp_path):
    base = _gpt2()
    ours = pk.patch(copy.deepcopy(base), "dora" if use_dora else "lora", r=4, lora_alpha=8)
    randomize_trainable_(ours)
    ours.eval()
    pk.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and len(config["target_modules"]) == 8
    pm = _peft_load(copy.deepcopy(base), tmp_path)
    batch = tiny_batch(base)
    del batch["labels"]
    torch.testing.assert_close(pm(**batch).logits, ours(**batch).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["lora", "dora", "far", "fish_mask", "diff_pruning"])
def test_gpt2_merge_keeps_conv1d_and_the_outputs_fp64(method):
    model = _gpt2()
    batch = tiny_batch(model)
    calibration = [batch] if pk.patching.METHODS[method].calibrated is True else None
    pk.patch(model, method, calibration_data=calibration, **({"density": 0.05} if method == "fish_mask" else {}))
    randomize_trainable_(model)
    model.eval()
    del batch["labels"]
    ref = model(**batch).logits
    merged = pk.merge(model)
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in merged.modules())
    assert isinstance(merged.transformer.h[0].attn.c_attn, _conv1d())
    torch.testing.assert_close(merged(**batch).logits, ref, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------- QLoRA's 4 bits
@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_qlora_quantizes_what_transformers_4bit_loading_quantizes(family, tmp_path):
    """The modules QLoRA puts in NF4 are those transformers' bitsandbytes loading makes Linear4bit (T5's wo, in
    _keep_in_fp32_modules, and lm_head stay in full precision), and their weights answer dtype, shape and device as
    bitsandbytes' Params4bit does; T5, which casts its FFN input to wo.weight.dtype, trains."""
    import bitsandbytes as bnb
    from transformers import AutoModelForSeq2SeqLM, AutoModelForCausalLM, BitsAndBytesConfig

    model = tiny_model(family)
    model.save_pretrained(str(tmp_path))
    auto = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    loaded = auto.from_pretrained(str(tmp_path), quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))
    theirs = {n: m for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    target = ["c_attn", "c_proj", "c_fc", "lm_head"] if family == "gpt2" else ["q", "k", "v", "o", "wi", "wo",
                                                                               "lm_head"]
    pk.patch(model, "qlora", r=4, target_modules=target)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    assert set(ours) == set(theirs) and ours
    assert {n for n, m in model.named_modules() if type(m) is LoRALinear} == (
        {"lm_head"} | ({n for n, _ in model.named_modules() if n.endswith(".wo")} if family == "t5" else set()))
    for n, m in ours.items():
        w = theirs[n].weight
        assert (m.weight.dtype, m.weight.shape, m.weight.device) == (w.dtype, w.shape, w.device), n
    batch = tiny_batch(model)
    model.train()
    assert torch.isfinite(_train_step(model, lambda m: m(**batch).loss))
