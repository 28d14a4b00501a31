"""Bad input to the LoRA API: a ValueError/TypeError naming the argument, before any kernel runs."""
import pytest
import torch

import peftkern as pk
from tests._helpers import DEVICE, on_device


def _args(**over):
    a = dict(x=torch.randn(3, 8), weight=torch.randn(6, 8), bias=torch.randn(6), lora_A=torch.randn(2, 8),
             lora_B=torch.randn(6, 2), scaling=1.0)
    a.update(over)
    return on_device(a)


def _call(kw=None, **over):
    a = _args(**over)
    return pk.lora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["scaling"],
                          **on_device(kw or {}))


@pytest.mark.parametrize("over, exc, match", [
    (dict(x=torch.randn(3, 7)), ValueError, "x has 7 features"),
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(3, 8, dtype=torch.int64)), TypeError, "x must be float"),
    (dict(weight=torch.randn(6, 8, 1)), ValueError, "weight must be 2-D"),
    (dict(lora_A=torch.randn(2, 9)), ValueError, "lora_A must have shape"),
    (dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B must have shape"),
    (dict(lora_B=torch.randn(5, 2)), ValueError, "lora_B must have shape"),
    (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), ValueError, "r=0"),
    (dict(bias=torch.randn(5)), ValueError, "bias must have shape"),
    (dict(bias=torch.randn(6, dtype=torch.float64)), TypeError, "bias has dtype"),
    (dict(weight=torch.randn(6, 8, dtype=torch.bfloat16)), TypeError, "weight has dtype"),
    (dict(lora_B=torch.randn(6, 2, dtype=torch.float64)), TypeError, "lora_B has dtype"),
    (dict(lora_A=torch.randn(2, 8, device="meta")), ValueError, "lora_A is on meta"),
    (dict(scaling="2"), TypeError, "scaling must be a number"),
    (dict(scaling=float("nan")), ValueError, "scaling must not be NaN"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_outside_unit_interval(p):
    with pytest.raises(ValueError, match="dropout_p"):
        _call(dict(dropout_p=p, training=True))


@pytest.mark.parametrize("rank_scale, match", [
    (torch.randn(3), "rank_scale must have shape"),
    (torch.randn(2, 1), "rank_scale must be 1-D"),
    (torch.randn(2, dtype=torch.float64), "rank_scale has dtype"),
])
def test_rank_scale_length(rank_scale, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _call(dict(rank_scale=rank_scale))


def test_trainable_weight_refused():
    with pytest.raises(ValueError, match="weight must be frozen"):
        _call(weight=torch.randn(6, 8, requires_grad=True))


def test_module_arguments():
    with pytest.raises(ValueError, match="r must be a positive int"):
        pk.nn.LoRALinear(8, 6, r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        pk.nn.LoRALinear(8, 6, r=2, lora_dropout=1.0)
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        pk.nn.LoRALinear.from_linear(torch.nn.Conv1d(3, 3, 1))
    x, w, A, B, magnitude = (torch.randn(*shape, device=DEVICE) for shape in ((3, 8), (6, 8), (2, 8), (6, 2), (5,)))
    with pytest.raises(ValueError, match="magnitude must have shape"):
        pk.dora_linear(x, w, None, A, B, 1.0, magnitude)
