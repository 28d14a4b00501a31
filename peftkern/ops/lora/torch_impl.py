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
def lora_forward(x, weight, bias, lora_A, lora_B, rank_scale, scaling: float, dropout_p: float, seed,
                 promote_output: bool = False):
    """(y [N, out], h [N, r]) for x [N, in]; h = drop(x) A^T before the rank scale.

    y is in x's dtype, or in the LoRA dtype promote(x, A) when ``promote_output`` (DoRA rescales it there).
    """
    ldt = lora_dtype(x, lora_A)
    h = _dropped(x, dropout_p, seed, ldt) @ lora_A.t()
    he = h if rank_scale is None else h * rank_scale
    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    if ldt == x.dtype:
        return y.addmm_(he, lora_B.t(), alpha=scaling), h
    y = torch.addmm(y.to(ldt), he, lora_B.to(ldt).t(), alpha=scaling)
    return (y if promote_output else y.to(x.dtype)), h


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
            dx = (grad_y.to(weight.dtype) @ weight).to(ldt).add_(t).to(x.dtype)
    return dx, dA, dB, d_rank_scale


def dora_weight_norm(weight, lora_A, lora_B, scaling: float, weight_sq_norm=None, rows_per_chunk: int = 4096):
    """Row norms of W + s B A without forming B A: ||W||^2 + 2s rowsum((W A^T) B) + s^2 rowsum((B A A^T) B).

    Computed in fp32 (or fp64) whatever W's dtype, upcasting W a chunk of rows at a time.
    """
    dt = torch.promote_types(lora_A.dtype, torch.float32)
    A, B = lora_A.to(dt), lora_B.to(dt)
    sq, cross = [], []
    for w, b in zip(weight.split(rows_per_chunk), B.split(rows_per_chunk)):
        w = w.to(dt)
        cross.append(((w @ A.t()) * b).sum(1))
        if weight_sq_norm is None:
            sq.append(w.square().sum(1))
    sq = weight_sq_norm.to(dt) if weight_sq_norm is not None else torch.cat(sq)
    quad = ((B @ (A @ A.t())) * B).sum(1)
    return (sq + 2.0 * scaling * torch.cat(cross) + scaling * scaling * quad).clamp_min(0).sqrt()
