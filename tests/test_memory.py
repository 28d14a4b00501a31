"""Bytes autograd keeps for backward: LoRALinear vs PEFT's LoRA, measured with saved-tensor hooks (parameters excluded).

Ours keeps x, h [N, r] and a seed; PEFT keeps a dropped copy of x and the dropout noise (fp32 on a CPU), and an
fp32 copy of x when fp32 adapters sit over a bf16 base. Every bound compares two measurements; nothing is
hard-coded, so a regression (a saved mask, a dropped copy, an upcast x) fails.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import peft

import peftkern as pk
from peftkern import peers
from peftkern.measure import SavedBytes, saved_bytes_of_forward
from tests._helpers import backends

DTYPES = {"fp32": (torch.float32, True), "bf16+fp32A": (torch.bfloat16, True), "bf16": (torch.bfloat16, False)}
NAMES = ("query", "key", "value")


class _Holder(nn.Module):
    def __init__(self, linears):
        super().__init__()
        self.names = list(linears)
        for n, m in linears.items():
            setattr(self, n, m)

    def forward(self, x):
        return [getattr(self, n)(x) for n in self.names]


class _Ours(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleDict(layers)

    def forward(self, x):
        return [m(x) for m in self.layers.values()]


def _pair(n_proj, in_f, out_f, r, p, dtype, seed=0):
    """PEFT (get_peft_model) and LoRALinear on copies of the same linears, same adapters, training mode."""
    base_dtype, fp32_adapters = DTYPES[dtype]
    torch.manual_seed(seed)
    names = NAMES[:n_proj]
    linears = {n: nn.Linear(in_f, out_f).to(base_dtype) for n in names}
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=list(names))
    pm = peft.get_peft_model(_Holder(copy.deepcopy(linears)), cfg, autocast_adapter_dtype=fp32_adapters)
    ours = {}
    for n in names:
        layer = pm.base_model.model.get_submodule(n)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            B.normal_(0, 0.1)
        m = pk.nn.LoRALinear.from_linear(linears[n], r=r, lora_alpha=2 * r, lora_dropout=p, adapter_dtype=A.dtype)
        with torch.no_grad():
            m.lora_A.copy_(A)
            m.lora_B.copy_(B)
        ours[n] = m
    ours = _Ours(ours)
    pm.train()
    ours.train()
    return pm, ours


def _x(n_tok, in_f, dtype, leading=()):
    return torch.randn(*leading, n_tok, in_f, dtype=DTYPES[dtype][0], requires_grad=True)


def _measure(module, x, *, include_x=True):
    """Unique bytes saved by one forward of ``module`` on ``x``; parameters excluded, and x too unless include_x."""
    exclude = list(module.parameters()) + ([] if include_x else [x])
    with SavedBytes(exclude=exclude) as c:
        out = module(x)
    # the forward really builds a graph that reaches x (else nothing would be saved and every bound is vacuous)
    assert all(o.requires_grad for o in out)
    return c.total


def _backward_ok(module, x):
    out = module(x)
    torch.autograd.backward(out, [torch.randn_like(o) for o in out])
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_layer_adds_at_most_half_of_peft_with_dropout(backend, dtype):
    """Per layer, what it keeps beyond its input x: ours h + seed, PEFT dropped x + noise + h."""
    pm, ours = _pair(1, 96, 80, 8, 0.1, dtype)
    x = _x(64, 96, dtype)
    with pk.use_backend(backend):
        added_ours = _measure(ours, x, include_x=False)
        all_ours = _measure(ours, x)
        _backward_ok(ours, x)
    added_peft = _measure(pm, x, include_x=False)
    assert added_ours > 0 and added_peft > 0
    assert added_ours <= 0.5 * added_peft, (added_ours, added_peft)
    # and in total (x included) ours is not above PEFT's either
    assert all_ours <= _measure(pm, x), (all_ours, _measure(pm, x))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_shared_input_projections_at_most_half_of_peft_with_dropout(backend, dtype):
    """query/key/value on one x, all unique storages incl. x: ours x + 3h, PEFT 3 x (dropped copy + noise) + 3h."""
    pm, ours = _pair(3, 64, 64, 8, 0.1, dtype)
    x = _x(48, 64, dtype, leading=(2,))
    with pk.use_backend(backend):
        b_ours = _measure(ours, x)
    b_peft = _measure(pm, x)
    assert b_ours <= 0.5 * b_peft, (b_ours, b_peft)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n_proj", [1, 3])
def test_not_above_peft_without_dropout(backend, dtype, n_proj):
    pm, ours = _pair(n_proj, 64, 72, 8, 0.0, dtype)
    x = _x(40, 64, dtype)
    with pk.use_backend(backend):
        all_ours, added_ours = _measure(ours, x), _measure(ours, x, include_x=False)
    assert all_ours <= _measure(pm, x)
    assert added_ours <= _measure(pm, x, include_x=False)


def _input_sized(module, x):
    """(storage pointer, shape, dtype) of each storage saved by a forward of ``module`` that holds a tensor with
    at least x's number of elements; parameters excluded."""
    with SavedBytes(exclude=module.parameters()) as saved:
        module(x)
    return [(ptr, shape, dtype) for ptr, (_, shape, dtype) in saved.storages.items() if math.prod(shape) >= x.numel()]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_no_input_sized_tensor_saved_besides_x(backend, dtype, p):
    """Our layer keeps no mask, no dropped or upcast copy of x: the only x-sized saved tensor is x itself."""
    pm, ours = _pair(1, 64, 48, 4, p, dtype)
    x = _x(32, 64, dtype, leading=(3,))
    x_ptr = x.untyped_storage().data_ptr()
    with pk.use_backend(backend):
        big = _input_sized(ours, x)
    assert big, "x itself must be saved (dA needs it)"
    assert all(ptr == x_ptr for ptr, _, _ in big), [(shape, dtype) for ptr, shape, dtype in big if ptr != x_ptr]
    # the same check catches PEFT's copies whenever it makes one (the check can fail)
    if p > 0 or DTYPES[dtype][0] != torch.float32 and DTYPES[dtype][1]:
        assert any(ptr != x_ptr for ptr, _, _ in _input_sized(pm, x))


# ------------------------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def minilm_batch():
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (4, 24))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("p", [0.1, 0.0])
def test_minilm_whole_model_vs_peft(minilm_batch, p):
    """all-MiniLM-L6-v2, LoRA on its 36 projections (x shared by query/key/value), one training forward.

    Totals include BERT's own activations (attention, GELU, LayerNorm, its dropouts), which no LoRA kernel
    removes; the floor measures them (training the 36 projection weights instead keeps each one's input and
    nothing else). What the LoRA layers add on top of that floor: ours at most half of PEFT's with dropout.
    """
    ours = peers.load_classifier(seed=0)
    names = peers.apply_lora(ours, r=8, lora_alpha=16, lora_dropout=p)
    assert len(names) == 36
    peft_model = peers.apply_peft(peers.load_classifier(seed=0), r=8, lora_alpha=16, lora_dropout=p)
    floor_model = peers.projections_trainable(peers.load_classifier(seed=0))
    b_ours, b_peft, b_floor = (saved_bytes_of_forward(m, minilm_batch).total for m in (ours, peft_model, floor_model))
    assert b_floor <= b_ours  # LoRA keeps at least what training the weights keeps (x of each projection)
    assert b_ours <= b_peft, (b_ours, b_peft)
    if p > 0:
        assert b_ours < b_peft
        assert b_ours - b_floor <= 0.5 * (b_peft - b_floor), (b_ours, b_peft, b_floor)
