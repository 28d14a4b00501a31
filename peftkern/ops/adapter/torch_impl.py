"""Eager PyTorch implementation of the bottleneck adapter (any device): two addmm's per direction, the activation's
derivative recomputed from z (README.md). Registered as the "torch" backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...backend import register
from .reference import ACTIVATIONS


def _scaled(t: Tensor, scale: float) -> Tensor:
    """``t * scale``, ``t`` itself for a scale of 1 (exact either way; at the smallest shapes a scalar multiply costs
    as much as a matmul)."""
    return t if scale == 1.0 else t * scale


@register("adapter_forward", "torch")
def forward(h, w_down, b_down, w_up, b_up, activation, residual, scale):
    """(y [N, D], z [N, M])."""
    z = F.linear(h, w_down, b_down)  # addmm(b, h, W^T) or h @ W^T, the transpose taken in C++
    up = F.linear(ACTIVATIONS[activation](z), w_up, b_up)
    y = torch.add(h, up, alpha=scale) if residual else _scaled(up, scale)
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
    dz = _act_backward(_scaled(torch.mm(g, w_up), scale), z, a, activation)
    dh = torch.addmm(g, dz, w_down) if residual else torch.mm(dz, w_down)
    return dh, torch.mm(dz.t(), h), dz.sum(0), _scaled(torch.mm(g.t(), a), scale), _scaled(g.sum(0), scale)
