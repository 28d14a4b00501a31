"""fuse() on PEFT's own 4-bit models: the QLoRA recipe as users run it (a tiny Llama saved, reloaded by transformers
with ``BitsAndBytesConfig`` NF4 + double quantization, ``get_peft_model`` on every linear layer, which PEFT wraps in
``lora.bnb.Linear4bit``) runs every LoRA layer on ``qlora_linear``, with logits and every LoRA gradient within 2x
PEFT + bitsandbytes' own error against exact NF4 math in fp64; ``save_pretrained`` is unchanged; bitsandbytes' CPU
inference layout is read as it is; 8-bit bases and DoRA over 4-bit keep PEFT's forward, logged once.
In dims are multiples of 64 so that NF4 blocks are whole rows (bitsandbytes' CPU dequantize is wrong otherwise)."""
from __future__ import annotations

import logging

import peft
import pytest
import torch
import transformers

import peftkern as pk
from peftkern.integrations.peft import _nf4_base

from .._helpers import DEVICE, assert_close, max_err, next_token_logits, tiny_llama, token_kernel_calls
from .test_autocast_models import _assert_within_peers, _loss_and_grads

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
LAYERS = 14  # 2 decoder layers x q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny Llama with biases on q, k, v, o (random, so that the bias dtype matters) in a checkpoint."""
    config = tiny_llama(hidden=64).config
    config.attention_bias = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


def _load(path, device=DEVICE, **quantization):
    transformers.utils.logging.disable_progress_bar()
    config = transformers.BitsAndBytesConfig(**quantization) if quantization else None
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map=device)


def _peft(model, **lora):
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **{"target_modules": "all-linear", **lora}))
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return pm


def _lora_layers(pm) -> list:
    return [m for m in pm.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def _reference(path, pm, weights=None):
    """The fp64 twin of ``pm``: each 4-bit base replaced by its exact NF4 decode (``pk.nf4.dequantize`` of the codes
    bitsandbytes holds, or ``weights[name]``), the rest of the checkpoint and the LoRA tensors as they are."""
    model = _load(path, device=next(pm.parameters()).device)
    for name, module in pm.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            base = module.get_base_layer()
            w = weights[name] if weights else pk.nf4.NF4Tensor.from_bnb(base.weight.data, base.weight.quant_state)
            model.get_submodule(name.removeprefix("base_model.model.")).weight.data = pk.nf4.dequantize(w)
    ref = peft.get_peft_model(model.double(), pm.peft_config["default"])
    result = ref.load_state_dict({n: p for n, p in pm.named_parameters() if "lora_" in n}, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    return ref


def _batch():
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return {"input_ids": ids, "labels": ids}


def _count_qlora(monkeypatch) -> list:
    """The NF4 weights qlora_linear is called with, from now on."""
    weights = []
    real = pk.integrations.peft.qlora_linear
    monkeypatch.setattr(pk.integrations.peft, "qlora_linear",
                        lambda x, q, *a, **k: weights.append(q) or real(x, q, *a, **k))
    return weights


def _peftkern_records(caplog) -> list:
    return [r for r in caplog.records if r.name == "peftkern"]


@pytest.mark.parametrize("compute_dtype,autocast,prepare", [
    (torch.bfloat16, False, True),  # the QLoRA recipe: prepare_model_for_kbit_training, bf16 compute
    (torch.float32, False, False),
    (torch.bfloat16, True, False),
    (torch.float32, True, True),
], ids=["bf16-recipe", "fp32", "bf16-autocast", "fp32-autocast-recipe"])
def test_qlora_recipe_runs_our_kernel(saved, compute_dtype, autocast, prepare, monkeypatch, caplog):
    model = _load(saved, **NF4, bnb_4bit_compute_dtype=compute_dtype)
    pm = _peft(peft.prepare_model_for_kbit_training(model) if prepare else model).train()
    layers = _lora_layers(pm)
    assert len(layers) == LAYERS and all(type(m).__name__ == "Linear4bit" for m in layers)  # lora.bnb.Linear4bit
    batch = _batch()
    peer = _loss_and_grads(pm, batch, autocast)
    ref64 = _loss_and_grads(_reference(saved, pm).train(), batch, False)
    weights = _count_qlora(monkeypatch)
    with caplog.at_level(logging.INFO, logger="peftkern"):
        assert pk.integrations.peft.fuse(pm) == LAYERS
    assert not _peftkern_records(caplog)  # nothing left to PEFT
    ours = _loss_and_grads(pm, batch, autocast)
    assert {id(q) for q in weights} == {id(_nf4_base(m)) for m in layers}  # every layer, on bitsandbytes' codes
    if autocast:
        _assert_within_peers(ours, peer, ref64)  # bf16 noise: the criterion of the other autocast tests
        return
    (_, logits, grads), (_, logits_p, grads_p), (_, logits64, grads64) = ours, peer, ref64
    assert logits.dtype == logits_p.dtype
    assert max_err(logits, logits64) <= 2 * max_err(logits_p, logits64) + 1e-6
    assert set(grads) == set(grads64) and len(grads) == 2 * LAYERS
    for k in grads64:
        assert grads[k].dtype == grads_p[k].dtype
        assert max_err(grads[k], grads64[k]) <= 2 * max_err(grads_p[k], grads64[k]) + 1e-7, k


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batch_one_generate_runs_the_token_kernel(saved, compute_dtype, monkeypatch):
    """Decoding a 4-bit model on the CPU as users load it (``BitsAndBytesConfig`` NF4 + double quantization,
    ``get_peft_model`` on every linear layer, fused): each one-token step of every layer goes through csrc/cpu's NF4
    kernel on bitsandbytes' own codes and nested scales; a step's logits within twice PEFT + bitsandbytes' error
    against the fp64 twin (exact NF4 decode), and in fp32 greedy generate gives the twin's tokens."""
    from peftkern.ops.nf4 import torch_impl

    pm = _peft(_load(saved, **NF4, bnb_4bit_compute_dtype=compute_dtype)).eval()
    ref64 = _reference(saved, pm).eval()
    ids = _batch()["input_ids"][:1, :5]
    with torch.no_grad():
        peer, ref = next_token_logits(pm, ids), next_token_logits(ref64, ids)
    assert pk.integrations.peft.fuse(pm) == LAYERS
    taken = token_kernel_calls(monkeypatch, torch_impl, "nf4_token")
    with torch.no_grad():
        ours = next_token_logits(pm, ids)
    assert len(taken) == LAYERS  # every layer, in the activations' dtype
    assert max_err(ours, ref) <= 2 * max_err(peer, ref) + 1e-6 * ref.abs().max().item()
    if compute_dtype == torch.float32:
        greedy = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        for m in (pm, ref64):
            m.generation_config.eos_token_id = None
        with torch.no_grad():
            assert torch.equal(pm.generate(input_ids=ids, **greedy), ref64.generate(input_ids=ids, **greedy))


def test_save_pretrained_unchanged(saved, tmp_path):
    pm = _peft(_load(saved, **NF4, bnb_4bit_compute_dtype=torch.bfloat16))
    pm.save_pretrained(tmp_path / "before")
    assert pk.integrations.peft.fuse(pm) == LAYERS
    _loss_and_grads(pm, _batch(), autocast=False)
    pm.save_pretrained(tmp_path / "after")
    files = sorted(p.name for p in (tmp_path / "before").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "after").iterdir()) and "adapter_model.safetensors" in files
    for name in files:
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes(), name


def test_bnb_cpu_inference_layout_read_as_it_is(saved, monkeypatch):
    """An inference forward of Linear4bit on an AVX512-bf16 CPU repacks its codes in place and keeps absmax in bf16
    (``packing_format_for_cpu``). fuse() reads that layout: the same codes, the absmax bitsandbytes now holds."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    pm = _peft(_load(saved, device="cpu", **NF4, bnb_4bit_compute_dtype=torch.float32)).eval()
    before = {name: _nf4_base(m) for name, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    ids = _batch()["input_ids"].cpu()
    with torch.no_grad():
        pm(input_ids=ids)
    for name in before:
        base = pm.get_submodule(name).get_base_layer()
        if not getattr(base.weight.quant_state, "packing_format_for_cpu", False):  # a CPU without AVX512-bf16
            base.weight.data, base.weight.quant_state = _convert_weight_packed_for_cpu(base.weight.data,
                                                                                       base.weight.quant_state)
    weights = {}
    for name, q in before.items():
        absmax = q.block_absmax().to(torch.bfloat16).float()
        weights[name] = pk.nf4.NF4Tensor(q.packed, q.shape, q.dtype, q.blocksize, absmax=absmax)
        read = _nf4_base(pm.get_submodule(name))
        assert read.dtype == q.dtype and torch.equal(read.dequantize(), weights[name].dequantize()), name
    used = _count_qlora(monkeypatch)
    assert pk.integrations.peft.fuse(pm) == LAYERS
    with torch.no_grad():
        logits = pm(input_ids=ids).logits
        logits64 = _reference(saved, pm, weights).eval()(input_ids=ids).logits
    assert len(used) == LAYERS
    assert_close(logits, logits64, name="logits")


@pytest.mark.parametrize("case", ["8-bit", "dora", "lora_bias", "embedding"])
def test_left_to_peft_and_logged(saved, case, caplog):
    if case == "8-bit":
        pm = _peft(_load(saved, load_in_8bit=True))
    else:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
        lora = {"dora": {"use_dora": True}, "lora_bias": {"lora_bias": True}}.get(case, {"target_modules": targets})
        pm = _peft(_load(saved, **NF4, bnb_4bit_compute_dtype=torch.float32), **lora)
    pm.eval()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    with caplog.at_level(logging.INFO, logger="peftkern"):
        fused = pk.integrations.peft.fuse(pm)
    assert fused == (LAYERS if case == "embedding" else 0)
    records = _peftkern_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    left = {"8-bit": "14 of 14 PEFT LoRA layers left to PEFT's forward: 8-bit base (bitsandbytes Linear8bitLt): "
                     "model.layers.{0-1}.self_attn.q_proj, model.layers.{0-1}.self_attn.k_proj",
            "dora": "14 of 14 PEFT LoRA layers left to PEFT's forward: DoRA over a 4-bit base: "
                    "model.layers.{0-1}.self_attn.q_proj",
            "lora_bias": "14 of 14 PEFT LoRA layers left to PEFT's forward: lora_bias=True: "
                         "model.layers.{0-1}.self_attn.q_proj",
            "embedding": "1 of 15 PEFT LoRA layers left to PEFT's forward: PEFT lora.layer.Embedding layer: "
                         "model.embed_tokens"}[case]
    assert left in message, message
    assert len(message) < 500, message
    if case != "embedding":
        with torch.no_grad():
            assert torch.equal(pm(input_ids=ids).logits, ref)  # PEFT's own forward, untouched
