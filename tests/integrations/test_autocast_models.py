"""Mixed precision on the user's path: a transformers model, a PEFT LoRA / DoRA adapter, ``torch.autocast(bf16)``.
Ours (``pk.load_adapter`` of PEFT's file, and PEFT's model under ``fuse``) against PEFT under the same autocast on the
same weights: logits and every adapter gradient within 2x PEFT's error against an fp64 run, and the loss within 2x
PEFT's logits error (a scalar mean's own error is luck: its rounding errors cancel or not)."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import peftkern as pk

from .._helpers import DEVICE, tiny_bert, tiny_llama

DEVICE_TYPE = torch.device(DEVICE).type
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "bert": ["query", "key", "value", "dense"]}


def _model(family):
    return (tiny_llama() if family == "llama" else tiny_bert()).to(DEVICE)


def _batch(family):
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (2, 11), device=DEVICE)
    labels = ids if family == "llama" else torch.tensor([0, 2], device=DEVICE)
    return {"input_ids": ids, "labels": labels}


def _peft_model(family, use_dora):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], use_dora=use_dora)
    pm = peft.get_peft_model(_model(family), config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return pm.eval()


def _loss_and_grads(model, batch, autocast: bool):
    """(loss, logits, the adapter gradients keyed ``<module>.lora_A`` etc.: PEFT's and ours alike)."""
    model.zero_grad()
    with torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch)
    out.loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad and "lora_" in n:
            key = n.removeprefix("base_model.model.").replace(".default.weight", "").replace(".default", "")
            key = key.replace("lora_magnitude_vector", "lora_magnitude")
            grads[key] = p.grad.detach().clone()
    return out.loss.detach(), out.logits.detach(), grads


def _err(a, ref):
    return (a.double() - ref).abs().max().item()


def _rel(grads, grads64, keys):
    """The relative (Frobenius) error of the gradients ``keys`` taken as one vector."""
    num = sum(((grads[k].double() - grads64[k]) ** 2).sum() for k in keys)
    return (num / sum((grads64[k] ** 2).sum() for k in keys)).sqrt().item()


def _assert_within_peers(ours, peers, ref64):
    """Logits within 2x PEFT's max error; the adapter gradients, as one vector, within 2x PEFT's relative error, and
    each tensor within 2x the worst of PEFT's per-tensor relative errors (a tensor's own error at bf16 is noise:
    ours / PEFT's spreads 0.2-3.6x around a median of 1 over a model's tensors)."""
    (loss, logits, grads), (loss_p, logits_p, grads_p), (loss64, logits64, grads64) = ours, peers, ref64
    assert set(grads) == set(grads_p) == set(grads64) and grads
    assert logits.dtype == logits_p.dtype
    assert _err(logits, logits64) <= 2 * _err(logits_p, logits64) + 1e-6
    assert _err(loss, loss64) <= 2 * _err(logits_p, logits64), (loss.item(), loss_p.item(), loss64.item())
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert _rel(grads, grads64, grads64) <= 2 * _rel(grads_p, grads64, grads64)
    worst_peer = max(_rel(grads_p, grads64, [k]) for k in grads64)
    for k in grads64:
        assert _rel(grads, grads64, [k]) <= 2 * worst_peer, k


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_loaded_adapter_under_autocast(family, variant, tmp_path):
    pm = _peft_model(family, variant == "dora")
    pm.save_pretrained(tmp_path)
    base = _model(family)
    ours = pk.load_adapter(base.eval(), tmp_path)
    batch = _batch(family)
    peers = _loss_and_grads(pm, batch, autocast=True)
    ref64 = _loss_and_grads(copy.deepcopy(pm).double(), batch, autocast=False)
    result = _loss_and_grads(ours, batch, autocast=True)
    _assert_within_peers(result, peers, ref64)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_fused_peft_model_runs_our_kernels_under_autocast(variant, monkeypatch):
    pm = _peft_model("llama", variant == "dora")
    batch = _batch("llama")
    peers = _loss_and_grads(pm, batch, autocast=True)
    ref64 = _loss_and_grads(copy.deepcopy(pm).double(), batch, autocast=False)
    calls = []
    for name in ("lora_linear", "dora_linear"):
        real = getattr(pk.integrations.peft, name)
        monkeypatch.setattr(pk.integrations.peft, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    assert pk.integrations.peft.fuse(pm) == 14
    result = _loss_and_grads(pm, batch, autocast=True)
    assert len(calls) == 14
    _assert_within_peers(result, peers, ref64)
