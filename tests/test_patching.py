"""``pk.patch`` / ``pk.save_adapter`` / ``pk.load_adapter``: what is trainable, the frozen base untouched, and
adapters moving both ways between peftkern and PEFT (LoRA, DoRA, QLoRA, prompt, P-Tuning, prefix, P-Tuning v2)."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import peft
from safetensors.torch import load_file

import peftkern as pk
from peftkern.nn import NF4Linear
from tests._helpers import randomize_trainable_, tiny_bert, tiny_llama

LORA_LIKE = ["lora", "dora", "qlora"]
PROMPT_LIKE = ["prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2"]
ADAPTER_LIKE = ["adapter_houlsby", "adapter_pfeiffer", "adapter_drop", "mam", "unipelt"]
SELECTIVE = ["adalora", "bitfit", "diff_pruning", "fish_mask", "far"]
ALL = LORA_LIKE + PROMPT_LIKE + ADAPTER_LIKE + SELECTIVE
OPTIONS = {"lora": dict(r=4, lora_alpha=8), "dora": dict(r=4, lora_alpha=8), "qlora": dict(r=4, lora_alpha=8),
           "prompt_tuning": dict(num_virtual_tokens=5), "p_tuning": dict(num_virtual_tokens=5, encoder="lstm"),
           "prefix_tuning": dict(num_virtual_tokens=5), "p_tuning_v2": dict(num_virtual_tokens=5),
           "adapter_houlsby": dict(reduction_factor=4), "adapter_pfeiffer": dict(reduction_factor=4),
           "adapter_drop": dict(reduction_factor=4, skip_layers=1), "mam": dict(num_virtual_tokens=5),
           "unipelt": dict(r=4, num_virtual_tokens=5, reduction_factor=4),
           "adalora": dict(init_r=4, target_r=2, total_step=8), "bitfit": {}, "diff_pruning": {},
           "fish_mask": dict(density=0.02), "far": dict(fraction=0.25)}


def _patch(model, method):
    """pk.patch with the test options (and calibration batches where the method needs them)."""
    calibration = None
    if pk.patching.METHODS[method].calibrated is True:
        calibration = [{**_batch(seed), "labels": torch.tensor([0, 1, 2])} for seed in (11, 12)]
    return pk.patch(model, method, calibration_data=calibration, **OPTIONS[method])


def _bert(seed=0, hidden=32):
    return tiny_bert(seed, hidden)


def _llama(seed=0):
    return tiny_llama(seed)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _seq(logits):
    """The sequence positions' logits (a causal LM with prompt tuning also returns the virtual tokens')."""
    return logits[:, -_batch()["input_ids"].shape[1]:] if logits.dim() == 3 else logits


_randomize_ = randomize_trainable_


def _peft(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def _peft_from(model, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(model, str(directory)).eval()


@pytest.mark.parametrize("method", ALL)
def test_only_the_methods_parameters_train_and_the_base_stays_bit_identical(method):
    model = _bert()
    # the parameter objects are kept alive: a freed one's id could be reused by a new parameter
    before = {id(p): (n, p, p.detach().clone()) for n, p in model.named_parameters()}
    patched = _patch(model, method)
    assert patched.peftkern_config["method"] == method
    trainable = {n for n, p in patched.named_parameters() if p.requires_grad}
    heads = {n for n in trainable if ".classifier." in f".{n}"}
    assert heads and all(p.requires_grad for n, p in patched.named_parameters() if ".classifier." in f".{n}")
    assert trainable - heads, "the method added no trainable parameter"
    base_trainable = {n for n, p in patched.named_parameters() if p.requires_grad and id(p) in before}
    assert all("classifier" in n or (method == "bitfit" and n.endswith(".bias")) for n in base_trainable)
    frozen = {n: t.detach().clone() for n, t in [*patched.named_parameters(), *patched.named_buffers()]
              if not t.requires_grad}
    opt = torch.optim.AdamW([p for p in patched.parameters() if p.requires_grad], lr=1e-2)
    batch = {**_batch(), "labels": torch.tensor([0, 1, 2])}
    patched.train()
    losses = []
    for _ in range(8):
        loss = patched(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for p in model.parameters():  # the base's weights: the same bits (QLoRA's projections became NF4 codes)
        if id(p) in before and not p.requires_grad:
            n, _, old = before[id(p)]
            assert torch.equal(p, old), n
    assert sum(id(p) in before and not p.requires_grad for p in model.parameters()) > 10
    now = dict([*patched.named_parameters(), *patched.named_buffers()])
    assert all(torch.equal(now[n], t) for n, t in frozen.items())  # nothing frozen moved while training
    if method == "qlora":
        assert all(not isinstance(m, torch.nn.Linear) or "classifier" in n or "pooler" in n
                   for n, m in model.named_modules())


@pytest.mark.parametrize("method", ALL)
def test_save_load_round_trip(method, tmp_path):
    ours = _patch(_bert(), method)
    _randomize_(ours)
    ours.eval()
    batch = _batch()
    ref = ours(**batch).logits
    path = pk.save_adapter(ours, tmp_path)
    saved = load_file(str(path))
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    if method not in PROMPT_LIKE:  # exactly the method's parameters and the head (prompt methods: the folded table)
        structure = sum(v.numel() for k, v in saved.items() if k.endswith((".indices", ".rows")))
        assert sum(v.numel() for v in saved.values()) - structure == trainable
    added = {f"base_model.model.{n}" for n in ours.peftkern_config["added"]}
    biases = {f"base_model.model.{n}" for n in ours.peftkern_config.get("biases", [])}
    assert all(k.endswith(("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", ".indices", ".rows"))
               or "classifier" in k or k == "prompt_embeddings" or k in added | biases for k in saved)
    loaded = pk.load_adapter(_bert(), tmp_path).eval()  # an unpatched model: patched from the saved config
    assert loaded.peftkern_config["method"] == method
    torch.testing.assert_close(loaded(**batch).logits, ref, rtol=1e-5, atol=1e-5)


PEFT_CONFIGS = {
    "lora": lambda t: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], task_type=t),
    "dora": lambda t: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True,
                                      task_type=t),
    "rslora": lambda t: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "query", "value"],
                                        use_rslora=True, task_type=t),
    "prompt_tuning": lambda t: peft.PromptTuningConfig(num_virtual_tokens=5, task_type=t),
    "p_tuning": lambda t: peft.PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=16, task_type=t),
    "prefix_tuning": lambda t: peft.PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True, task_type=t),
}


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_peft_adapter_loads_into_peftkern(kind, arch, tmp_path):
    build, task = (_bert, "SEQ_CLS") if arch == "bert" else (_llama, "CAUSAL_LM")
    base = build()
    config = PEFT_CONFIGS[kind](task)
    if arch == "llama" and isinstance(config, peft.LoraConfig):
        config.target_modules = {"q_proj", "v_proj", "down_proj"}
    pm = _peft(copy.deepcopy(base), config)
    _randomize_(pm)
    pm.save_pretrained(str(tmp_path))
    pm = _peft_from(copy.deepcopy(base), tmp_path)
    ours = pk.load_adapter(copy.deepcopy(base), tmp_path).eval()
    batch = _batch()
    keep = batch["attention_mask"].bool() if arch == "llama" else slice(None)
    torch.testing.assert_close(_seq(ours(**batch).logits)[keep], _seq(pm(**batch).logits)[keep], rtol=1e-5, atol=1e-5)
    if kind == "lora" and arch == "bert":  # into a model patched beforehand with the same shapes
        patched = pk.patch(copy.deepcopy(base), "lora", r=4, lora_alpha=8, target_modules=["query", "value", "dense"])
        patched = pk.load_adapter(patched, tmp_path).eval()
        torch.testing.assert_close(patched(**batch).logits, pm(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_peftkern_adapter_loads_into_peft(method, arch, tmp_path):
    build = _bert if arch == "bert" else _llama
    base = build()
    ours = pk.patch(copy.deepcopy(base), method, **OPTIONS[method])
    _randomize_(ours)
    ours.eval()
    pk.save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] == ("SEQ_CLS" if arch == "bert" else "CAUSAL_LM")
    pm = _peft_from(copy.deepcopy(base), tmp_path)
    batch = _batch()
    keep = batch["attention_mask"].bool() if arch == "llama" else slice(None)
    torch.testing.assert_close(_seq(pm(**batch).logits)[keep], _seq(ours(**batch).logits)[keep], rtol=1e-5, atol=1e-5)


def test_qlora_adapter_loads_into_peft_over_bitsandbytes(tmp_path):
    """Our QLoRA adapter on PEFT + bitsandbytes' Linear4bit holding the same NF4 codes (bnb quantizes bit-identically),
    and a PEFT adapter trained there loaded back onto our NF4 layers (``method="qlora"``)."""
    base = _bert(hidden=64)  # bitsandbytes' CPU 4-bit matmul needs in_features >= its blocksize
    ours = pk.patch(copy.deepcopy(base), "qlora", r=4, lora_alpha=8, target_modules=["query", "value"])
    _randomize_(ours)
    ours.eval()
    pk.save_adapter(ours, tmp_path / "ours")
    bnb_base = copy.deepcopy(base)
    for name in ours.peftkern_config["targets"]:
        parent, _, child = name.rpartition(".")
        setattr(bnb_base.get_submodule(parent), child, NF4Linear.from_linear(base.get_submodule(name)).to_bnb())
    pm = _peft_from(bnb_base, tmp_path / "ours")
    exact_base = copy.deepcopy(base).double()  # the same NF4 values as plain fp64 weights
    with torch.no_grad():
        for name in ours.peftkern_config["targets"]:
            exact_base.get_submodule(name).weight.copy_(ours.get_submodule(name).dequantized_weight())
    exact = _peft_from(exact_base, tmp_path / "ours")
    batch = _batch()
    ref = exact(**batch).logits
    out, peer = ours(**batch).logits, pm(**batch).logits
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # bitsandbytes' CPU matmul rounds the scales to bf16: we must be at least as close to the exact math
    assert (out.double() - ref).abs().max() <= 2 * (peer.double() - ref).abs().max() + 1e-6

    pm.save_pretrained(str(tmp_path / "peft"))
    back = pk.load_adapter(copy.deepcopy(base), tmp_path / "peft", method="qlora").eval()
    assert isinstance(back.get_submodule(ours.peftkern_config["targets"][0]), pk.nn.QLoRALinear)
    torch.testing.assert_close(back(**batch).logits, out, rtol=1e-5, atol=1e-5)


def test_diff_pruning_with_calibration_projects_to_sparse_diffs(tmp_path):
    """The L0 stage runs on the calibration batches, then the top entries train as sparse diffs; the file keeps them."""
    model = _bert()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("query.weight")}
    batches = [{**_batch(seed), "labels": torch.tensor([0, 1, 2])} for seed in (11, 12)]
    patched = pk.patch(model, "diff_pruning", calibration_data=batches, density=0.01, steps=2)
    layers = [m for m in patched.modules() if isinstance(m, pk.nn.SparseDiffLinear)]
    assert layers and all(m.values.requires_grad and m.values.abs().max() > 0 for m in layers)
    total = sum(m.weight.numel() for m in layers)
    assert abs(sum(m.values.numel() for m in layers) - 0.01 * total) <= len(layers)
    now = dict(patched.named_parameters())
    assert all(torch.equal(now[n], w) for n, w in weights.items())  # the diff lives beside the frozen weight
    patched.eval()
    pk.save_adapter(patched, tmp_path)
    again = pk.load_adapter(_bert(), tmp_path).eval()
    assert sum(isinstance(m, pk.nn.SparseDiffLinear) for m in again.modules()) == len(layers)
    torch.testing.assert_close(again(**_batch()).logits, patched(**_batch()).logits)


def test_qlora_patches_a_bitsandbytes_model_without_requantizing():
    base = _bert()
    q = NF4Linear.from_linear(base.bert.encoder.layer[0].attention.self.query)
    base.bert.encoder.layer[0].attention.self.query = q.to_bnb()
    pk.patch(base, "qlora", target_modules=["query"])
    layer = base.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, pk.nn.QLoRALinear) and torch.equal(layer.nf4.packed, q.nf4.packed)


def test_bad_calls_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="method must be one of .*lora"):
        pk.patch(_bert(), "no_such_method")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\].*valid options"):
        pk.patch(_bert(), "lora", rank=4)
    with pytest.raises(TypeError, match="model"):
        pk.patch("bert", "lora")
    with pytest.raises(ValueError, match="matched no linear"):
        pk.patch(_bert(), "lora", target_modules=["nothing_here"])
    with pytest.raises(ValueError, match="not torch.nn.Linear"):
        pk.patch(_bert(), "lora", target_modules=["attention"])
    with pytest.raises(ValueError, match="calibration_data"):
        pk.patch(_bert(), "lora", calibration_data=[{}])
    patched = pk.patch(_bert(), "lora", r=4)
    with pytest.raises(ValueError, match="already patched"):
        pk.patch(patched, "lora")
    with pytest.raises(ValueError, match="not patched"):
        pk.save_adapter(_bert(), tmp_path)
    with pytest.raises(ValueError, match="must hold adapter_model.safetensors"):
        pk.load_adapter(_bert(), tmp_path / "missing")
    pk.save_adapter(patched, tmp_path)
    with pytest.raises(ValueError, match="shapes do not match"):
        pk.load_adapter(pk.patch(_bert(), "lora", r=8), tmp_path)
    with pytest.raises(ValueError, match="does not fit the model: missing"):
        pk.load_adapter(pk.patch(_bert(), "lora", r=4, target_modules=["query", "key"]), tmp_path)
    with pytest.raises(ValueError, match="does not match the model"):
        pk.load_adapter(pk.patch(_bert(), "lora", r=4), tmp_path, method="dora")


@pytest.mark.parametrize("method", ALL)
def test_added_names_what_the_method_added(method):
    """``peftkern_config["added"]`` names every trainable parameter the method brought and nothing of the base (the
    base's objects are held here, so no id() is reused; a base wrapped by a layer is renamed, a qlora base swapped for
    NF4 codes keeps its name)."""
    model = _bert()
    base = {id(p): p for p in model.parameters()}
    patched = _patch(model, method)
    params = dict(patched.named_parameters())
    added = patched.peftkern_config["added"]
    assert not any(id(params[n]) in base for n in added)
    assert not any(n.endswith(".weight") and ".lora_" not in n and params[n].dtype == torch.uint8 for n in added)
    assert {n for n, p in params.items() if p.requires_grad and id(p) not in base} <= set(added)
    if method in LORA_LIKE:
        assert {n for n in params if ".lora_" in n} <= set(added)
