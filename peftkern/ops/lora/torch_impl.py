"""Eager PyTorch implementation of the LoRA ops: the CPU path, and any device without Triton."""
from __future__ import annotations

import torch

from ...backend import register


@register("lora_dropout_mask", "torch")
def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device) -> torch.Tensor:
    """keep[i, j] = u[i, j] >= p, u drawn from a generator seeded with ``seed`` (same seed, same mask)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= p


def _dropped(x: torch.Tensor, p: float, seed: int | None, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    if p == 0.0:
        return x
    keep = dropout_keep_mask(seed, tuple(x.shape), p, x.device)
    return x * keep.to(dtype).mul_(1.0 / (1.0 - p))


def lora_dtype(x: torch.Tensor, lora_A: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, lora_A.dtype)


@register("lora_forward", "torch")
def lora_forward(x, weight, bias, lora_A, lora_B, rank_scale, scaling: float, dropout_p: float, seed):
    """(y [N, out], h [N, r]) for x [N, in]; h = drop(x) A^T before the rank scale."""
    ldt = lora_dtype(x, lora_A)
    h = _dropped(x, dropout_p, seed, ldt) @ lora_A.t()
    he = h if rank_scale is None else h * rank_scale
    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    if ldt == x.dtype:
        return y.addmm_(he, lora_B.t(), alpha=scaling), h
    return torch.addmm(y.to(ldt), he, lora_B.to(ldt).t(), alpha=scaling).to(x.dtype), h


@register("lora_backward", "torch")
def lora_backward(grad_y, x, weight, lora_A, lora_B, rank_scale, h, scaling: float, dropout_p: float, seed,
                  compute_dx: bool):
    """(dx or None, dA, dB, d_rank_scale or None)."""
    ldt = h.dtype
    g = grad_y.to(ldt)
    he = h if rank_scale is None else h * rank_scale
    dB = torch.mm(g.t(), he).mul_(scaling).to(lora_B.dtype)
    dhe = torch.mm(g, lora_B.to(ldt)).mul_(scaling)
    d_rank_scale = None if rank_scale is None else (dhe * h).sum(0).to(rank_scale.dtype)
    dh = dhe if rank_scale is None else dhe * rank_scale
    xd = _dropped(x, dropout_p, seed, ldt)
    dA = torch.mm(dh.t(), xd).to(lora_A.dtype)
    dx = None
    if compute_dx:
        t = dh @ lora_A.to(ldt)
        if dropout_p:
            keep = dropout_keep_mask(seed, tuple(x.shape), dropout_p, x.device)
            t.mul_(keep.to(ldt)).mul_(1.0 / (1.0 - dropout_p))
        if ldt == x.dtype:
            dx = torch.addmm(t, grad_y, weight)
        else:
            dx = (grad_y @ weight).to(ldt).add_(t).to(x.dtype)
    return dx, dA, dB, d_rank_scale


def dora_weight_norm(weight, lora_A, lora_B, scaling: float, weight_sq_norm=None):
    """Row norms of W + s B A without forming B A: ||W||^2 + 2s rowsum((W A^T) B) + s^2 rowsum((B A A^T) B)."""
    dt = torch.promote_types(lora_A.dtype, torch.float32)
    A, B = lora_A.to(dt), lora_B.to(dt)
    if weight_sq_norm is None:
        weight_sq_norm = weight.to(dt).square().sum(1)
    cross = ((weight @ lora_A.to(weight.dtype).t()).to(dt) * B).sum(1)
    quad = ((B @ (A @ A.t())) * B).sum(1)
    return (weight_sq_norm.to(dt) + 2.0 * scaling * cross + scaling * scaling * quad).clamp_min(0).sqrt()
