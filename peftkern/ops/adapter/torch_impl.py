"""Eager PyTorch implementation of the bottleneck adapter (any device): two addmm's per direction, the activation's
derivative recomputed from z (README.md). Registered as the "torch" backend."""
from __future__ import annotations

import torch
from torch import Tensor

from ...backend import register
from .reference import ACTIVATIONS


def _affine(x: Tensor, w: Tensor, b) -> Tensor:
    return x @ w.t() if b is None else torch.addmm(b, x, w.t())


@register("adapter_forward", "torch")
def forward(h, w_down, b_down, w_up, b_up, activation, residual, scale):
    """(y [N, D], z [N, M])."""
    z = _affine(h, w_down, b_down)
    up = _affine(ACTIVATIONS[activation](z), w_up, b_up)
    y = torch.add(h, up, alpha=scale) if residual else up * scale
    return y, z


def _act_backward(da: Tensor, z: Tensor, a: Tensor, activation: str) -> Tensor:
    """da * act'(z) with PyTorch's fused activation-backward kernels (a = act(z))."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(da, z, 0)
    if activation in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(da, z, approximate="none" if activation == "gelu" else "tanh")
    if activation == "silu":
        return torch.ops.aten.silu_backward(da, z)
    return torch.ops.aten.tanh_backward(da, a)


@register("adapter_backward", "torch")
def backward(g, h, z, w_down, w_up, activation, residual, scale):
    """(dh, dW_d, db_d, dW_u, db_u) for y's gradient g; act(z) is recomputed, not saved."""
    a = ACTIVATIONS[activation](z)
    dz = _act_backward((g @ w_up) * scale, z, a, activation)
    dh = torch.addmm(g, dz, w_down) if residual else dz @ w_down
    return dh, dz.t() @ h, dz.sum(0), (g.t() @ a) * scale, g.sum(0) * scale
