"""Eager PyTorch implementation of the bottleneck adapter (any device): two addmm's per direction, the activation's
derivative recomputed from z (README.md). Registered as the "torch" backend."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...backend import register
from .reference import ACTIVATIONS

_K = math.sqrt(2.0 / math.pi)


def activation_grad(z: Tensor, activation: str) -> Tensor:
    """act'(z), computed in fp32 for half inputs."""
    z = _wide(z)
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":
        return 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if activation == "gelu_tanh":
        t = torch.tanh(_K * (z + 0.044715 * z ** 3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _K * (1.0 + 3 * 0.044715 * z * z)
    if activation == "silu":
        sig = torch.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))
    t = torch.tanh(z)
    return 1.0 - t * t


def _wide(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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
