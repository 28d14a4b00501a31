"""Eager PyTorch implementation of the LoRA ops: the CPU path, and any device without Triton."""
from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F

from ... import _native
from ...backend import register
from ..custom_op import as_dtype

_LEVELS = 1 << 16  # the mask compares uniform 16-bit integers with round(p * 2^16)


@register("lora_dropout_mask", "torch")
def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device) -> torch.Tensor:
    """keep[i, j] = v[i, j] >= round(p * 2^16) - 2^15, v uniform int16 from a generator seeded with ``seed``.

    Same seed, same mask. One 64-bit draw of the generator gives four elements: a quarter of the draws of
    ``torch.rand(shape) >= p`` (a CPU generator is serial, and its draws dominate dropout on a CPU).
    P(keep) = 1 - round(p * 2^16) / 2^16, within 2^-17 of 1 - p.
    """
    n = math.prod(shape)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None, generator=gen)
    return words.view(torch.int16)[:n].view(shape) >= round(p * _LEVELS) - _LEVELS // 2


def _masked(x: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``x * keep`` in ``dtype``, unscaled: the ops put 1/(1-p) on the skinny [N, r] / [r, in] side.

    ``torch.where`` reads the bool mask as is; ``x * keep`` would first copy it to x's dtype (a CPU
    TensorIterator casts mixed-dtype inputs into temporaries), about 1.5-4x slower on this CPU.
    """
    if keep is None:
        return as_dtype(x, dtype)
    return as_dtype(torch.where(keep, x, 0), dtype)


def _dropped(x: torch.Tensor, p: float, seed: int | None, dtype: torch.dtype) -> torch.Tensor:
    """The literal dropped ``x * keep / (1 - p)`` in ``dtype`` (the ops below never form it)."""
    if p == 0.0:
        return x.to(dtype)
    return _masked(x, dropout_keep_mask(seed, tuple(x.shape), p, x.device), dtype).mul_(1.0 / (1.0 - p))


def lora_dtype(x: torch.Tensor, lora_A: torch.Tensor) -> torch.dtype:
    dt = x.dtype
    return dt if dt == lora_A.dtype else torch.promote_types(dt, lora_A.dtype)


@register("lora_forward", "torch")
def lora_forward(x, weight, bias, lora_A, lora_B, rank_scale, scaling: float, dropout_p: float, seed,
                 promote_output: bool = False, need_h: bool = True):
    """(y [N, out], h [N, r]) for x [N, in]; h = drop(x) A^T before the rank scale.

    y is in x's dtype, or in the LoRA dtype promote(x, A) when ``promote_output`` (DoRA rescales it there). Without
    ``need_h`` (a call that keeps nothing for backward) h may be None.
    """
    xdt = x.dtype
    ldt = xdt if xdt == lora_A.dtype else torch.promote_types(xdt, lora_A.dtype)  # lora_dtype(x, lora_A)
    if x.shape[0] == 1 and not dropout_p and (xdt == torch.float32 or not promote_output):
        out = lora_token(x, weight, bias, lora_A, lora_B, rank_scale, scaling, need_h)
        if out is not None:
            return out
    if dropout_p:
        keep = dropout_keep_mask(seed, tuple(x.shape), dropout_p, x.device)
        h = F.linear(_masked(x, keep, ldt), lora_A).mul_(1.0 / (1.0 - dropout_p))  # the scale on [N, r], not [N, in]
    else:
        h = F.linear(as_dtype(x, ldt), lora_A)
    he = h if rank_scale is None else h * rank_scale
    y = F.linear(x, weight, bias)  # addmm(bias, x, W^T) or x @ W^T, the transpose taken in C++
    if ldt == xdt:
        return y.addmm_(he, lora_B.t(), alpha=scaling), h
    # fp32 adapters over a half base: the sum is formed in ldt and rounded once to x's dtype. (An in-place
    # mixed-dtype y.add_(fp32) would save the ldt copy of y but runs a scalar casting loop on a CPU, ~5x slower.)
    y = y.to(ldt).addmm_(he, lora_B.to(ldt).t(), alpha=scaling)
    return (y if promote_output else y.to(x.dtype)), h


_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_LORA_TOKEN = [_P, _P, ctypes.c_int, _P, ctypes.c_int, _P, _P, _P, ctypes.c_float, _I64, _I64, _I64, _P, _P]


def lora_token(x, weight, bias, lora_A, lora_B, rank_scale, scaling: float, need_h: bool = True, out=None):
    """(y [1, out] in x's dtype, h [1, r] fp32 or None without ``need_h``) of one token without dropout by csrc/cpu's
    kernel (README.md's forward in one call; x, W and b in fp32, fp16 or bf16, the adapters in fp32, as PEFT keeps
    them over a half base: the torch path's roundings, its base rounded to x's dtype then the fp32 LoRA term added
    and rounded once), or None where it does not apply: the library missing, a weight over
    ``_native.TOKEN_MAX_WEIGHT`` or in another layout, other dtypes, tensors not packed. ``out``: the (y, h) to write
    (tests poison them)."""
    fn = _native.cpu_function(x, "pk_lora_token", _LORA_TOKEN)
    dtype = _native.CPU_DTYPES.get(x.dtype)
    layout = None if fn is None or dtype is None else _native.token_weight_layout(weight)
    packed = _native.packed
    if (layout is None or weight.dtype != x.dtype or not (packed(x, x.dtype) and packed(bias, x.dtype))
            or not (packed(lora_A) and packed(lora_B) and packed(rank_scale))):
        return None
    (o, i), r = weight.shape, lora_A.shape[0]
    y, h = out if out is not None else (x.new_empty(1, o), lora_A.new_empty(1, r) if need_h else None)
    ptr = _native.ptr
    if fn(x.data_ptr(), weight.data_ptr(), layout, ptr(bias), dtype, lora_A.data_ptr(), lora_B.data_ptr(),
          ptr(rank_scale), scaling, i, o, r, y.data_ptr(), ptr(h)) != 0:
        raise RuntimeError("pk_lora_token refused its arguments")
    return y, h


@register("lora_backward", "torch")
def lora_backward(grad_y, x, weight, lora_A, lora_B, rank_scale, h, scaling: float, dropout_p: float, seed,
                  compute_dx: bool):
    """(dx or None, dA, dB, d_rank_scale or None).

    The mask is regenerated once and applied unscaled to the [N, in] operands; 1/(1-p) goes on dh [N, r].
    ``addmm(t, a, b, beta=0, alpha=s)`` forms ``s * (a @ b)`` in one op (with beta=0 the values of t, of its shape,
    are not read): a scalar ``mul_`` after an ``mm`` costs as much as the small mm itself on a CPU.
    """
    ldt = h.dtype
    g = as_dtype(grad_y, ldt)
    he = h if rank_scale is None else h * rank_scale
    B = as_dtype(lora_B, ldt)
    dB = as_dtype(torch.addmm(B, g.t(), he, beta=0, alpha=scaling), lora_B.dtype)
    dhe = torch.addmm(h, g, B, beta=0, alpha=scaling)
    d_rank_scale = None if rank_scale is None else (dhe * h).sum(0).to(rank_scale.dtype)
    dh = dhe if rank_scale is None else dhe.mul_(rank_scale)
    keep = None
    if dropout_p:
        keep = dropout_keep_mask(seed, tuple(x.shape), dropout_p, x.device)
        dh.mul_(1.0 / (1.0 - dropout_p))
    dA = as_dtype(torch.mm(dh.t(), _masked(x, keep, ldt)), lora_A.dtype)
    dx = None
    if compute_dx:
        t = dh @ as_dtype(lora_A, ldt)
        if keep is not None:
            t = torch.where(keep, t, 0)
        if ldt == x.dtype:
            dx = t.addmm_(grad_y, weight)  # in place: no copy of t into a fresh output
        else:
            # summed in ldt, rounded once to x's dtype (same-dtype add: mixed-dtype in-place adds are slow on a CPU)
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
