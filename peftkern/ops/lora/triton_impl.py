"""Triton launchers of the LoRA ops: allocate outputs, choose blocks, launch (kernels: triton_kernels.py).

The registered ops have the signatures and return conventions of torch_impl.py. The per-kernel launchers
(:func:`shrink`, :func:`fwd`, :func:`bwd_dh`, :func:`bwd_dB`, :func:`bwd_dA`, :func:`bwd_dx`) take optional
``out=`` buffers so tests can hand them NaN-poisoned ones. float64 inputs are served by torch_impl (the kernels
accumulate in fp32). ``AOT_SCENARIOS`` are the launches ``peftkern kernels`` compiles (``peftkern._aot``).
"""
from __future__ import annotations

import functools

import torch
import triton

from ...backend import register
from ..triton_launch import (block_config, dot_dtype, dropout_args, keep_mask_grouped, launch_opts, lora_rank_chunk,
                             lora_rank_tile, out_buffer, precision, programs_wanted, staged, torch_fallback, unstage)
from . import torch_impl
from .triton_kernels import (lora_bwd_dh_kernel, lora_bwd_dx_kernel, lora_bwd_wgrad_kernel, lora_dropout_mask_kernel,
                             lora_fwd_kernel, lora_shrink_kernel)

# GPU defaults, chosen spill-free on sm_80 and sm_90 (peftkern._aot). Base GEMMs: 128x128x32 tiles, 8 warps,
# 3 stages (Triton's matmul tutorial config) with the LoRA epilogue; with dropout the dgrad epilogue also holds
# the Philox mask tile and a second accumulator, so its tile is 128x64. Rank-sized kernels: 64-row tiles, 4 warps;
# dA and dB (wgrad) reduce over rows with a 32-row step. BLOCK_R (the rank chunk of the GEMM epilogues):
# triton_launch.lora_rank_chunk; the shrink, dh, dA and dB hold the whole rank (triton_launch.lora_rank_tile shrinks
# their other tile sides for it).
_GPU = {
    "fwd": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    "bwd_dx": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    "bwd_dx_dropout": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    "shrink": dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
    "bwd_dh": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "wgrad": dict(BLOCK_M=32, BLOCK_C=64, num_warps=4, num_stages=2),
    "mask": dict(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=1),
}
# fp32 x / W (an fp32 base; its dots on FMA units at ``precision()`` "ieee", operands in registers) spill the shrink
# (8 B on sm_80) and the dropout dgrad (8-16 B) at the tiles above: half their K or N side there.
_GPU_FP32 = {"shrink": dict(_GPU["shrink"], BLOCK_K=32), "bwd_dx_dropout": dict(_GPU["bwd_dx_dropout"], BLOCK_N=32)}
# The interpreter runs each program as numpy ops: small tiles still exercise every mask and loop.
_SMALL = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
_INTERPRET = {
    "fwd": _SMALL, "bwd_dx": _SMALL, "bwd_dx_dropout": _SMALL, "shrink": _SMALL, "bwd_dh": _SMALL,
    "wgrad": dict(BLOCK_M=32, BLOCK_C=32), "mask": dict(BLOCK_M=32, BLOCK_K=32),
}


def _cfg(name: str, dtype: torch.dtype | None = None) -> dict:
    """The configuration of kernel ``name`` whose x or W (the larger operand) is of ``dtype``."""
    gpu = _GPU_FP32.get(name, _GPU[name]) if dtype == torch.float32 else _GPU[name]
    return block_config(gpu, _INTERPRET[name])


# ------------------------------------------------------------------------------------------------ launchers


def shrink(x, lora_A, dropout_p: float, seed, *, out=None) -> torch.Tensor:
    """h [N, r] = drop(x) A^T in promote(x, A)'s dtype."""
    N, K = x.shape
    R = lora_A.shape[0]
    h = out_buffer(out, (N, R), torch_impl.lora_dtype(x, lora_A), x.device)
    cfg = _cfg("shrink", x.dtype)
    block_r, block_m, block_k = lora_rank_tile(R, h.dtype, cfg["BLOCK_M"], cfg["BLOCK_K"])
    seed_, threshold, keep_scale, dropout = dropout_args(dropout_p, seed)
    grid = (triton.cdiv(N, block_m), triton.cdiv(R, block_r))
    h_buf = staged(h)
    lora_shrink_kernel[grid](
        x, lora_A, h_buf, N, K, R, x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), seed_, threshold,
        keep_scale, DROPOUT=dropout, MASK_GROUPED=keep_mask_grouped(K), LORA_DOT_DTYPE=dot_dtype(h.dtype),
        PRECISION=precision(), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, **launch_opts(cfg))
    return unstage(h, h_buf)


def fwd(x, weight, bias, h, rank_scale, lora_B, scaling: float, *, out=None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [N, out] = x W^T + bias + scaling (h * e) B^T, one write of y in ``out_dtype`` (default x's dtype)."""
    N, K = x.shape
    O, R = lora_B.shape
    y = out_buffer(out, (N, O), out_dtype or x.dtype, x.device)
    cfg = _cfg("fwd")
    grid = (triton.cdiv(N, cfg["BLOCK_M"]) * triton.cdiv(O, cfg["BLOCK_N"]),)
    y_buf = staged(y)
    lora_fwd_kernel[grid](
        x, weight, bias if bias is not None else y, h, rank_scale if rank_scale is not None else h, lora_B, y_buf,
        N, K, O, R, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_B.stride(0),
        lora_B.stride(1), float(scaling),
        HAS_BIAS=bias is not None, HAS_RANK_SCALE=rank_scale is not None, DOT_DTYPE=dot_dtype(x.dtype),
        LORA_DOT_DTYPE=dot_dtype(h.dtype), PRECISION=precision(), BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=lora_rank_chunk(R, h.dtype), GROUP_M=cfg["GROUP_M"],
        **launch_opts(cfg))
    return unstage(y, y_buf)


def bwd_dh(grad_y, lora_B, h, rank_scale, scaling: float, *, out_dh=None):
    """One pass over g: (dh [N, r] fp32, d_rank_scale [r] fp32 or None).

    dh is a column slice of an [N, r rounded up to 16] buffer: aligned rows load vectorized in the later kernels
    (an odd row stride such as r = 8 costs registers and spills bwd_dx on sm_80). d_rank_scale: one row of partial
    sums per row block, then one sum.
    """
    N, O = grad_y.shape
    R = h.shape[1]
    if out_dh is None:
        out_dh = torch.empty((N, triton.cdiv(R, 16) * 16), dtype=torch.float32, device=h.device)[:, :R]
    if tuple(out_dh.shape) != (N, R) or out_dh.dtype != torch.float32 or out_dh.stride(1) != 1:
        raise ValueError(f"out_dh must be an fp32 [{N}, {R}] tensor with unit column stride")
    dh = out_dh
    cfg = _cfg("bwd_dh")
    block_r, block_m, block_n = lora_rank_tile(R, h.dtype, cfg["BLOCK_M"], cfg["BLOCK_N"])
    grid = (triton.cdiv(N, block_m), triton.cdiv(R, block_r))
    de = torch.empty((grid[0], R), dtype=torch.float32, device=h.device) if rank_scale is not None else None
    lora_bwd_dh_kernel[grid](
        grad_y, lora_B, h, rank_scale if rank_scale is not None else h, dh, de if de is not None else dh,
        N, O, R, grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1), dh.stride(0), float(scaling),
        HAS_RANK_SCALE=rank_scale is not None, LORA_DOT_DTYPE=dot_dtype(h.dtype), PRECISION=precision(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, **launch_opts(cfg))
    return dh, de.sum(0) if de is not None else None


def _wgrad(lhs, rank_scale, rhs, alpha: float, lora_dtype: torch.dtype, transposed: bool, splits: int | None,
           dropout=(0, 0, False)) -> torch.Tensor:
    """alpha (lhs e)^T drop(rhs) in fp32, [r, C] (or [C, r] when ``transposed``) for lhs [N, r], rhs [N, C].

    The rows are split to fill the device (``splits``: how many, default from the device); each split's sum goes
    to its slice of a [splits, ...] workspace (at most a few programs per SM times a [BLOCK_R, BLOCK_C] tile), then
    one sum over the splits. ``dropout``: (seed, threshold, DROPOUT) of a mask on rhs.
    """
    N, C = rhs.shape
    R = lhs.shape[1]
    cfg = _cfg("wgrad")
    block_r, block_c, block_m = lora_rank_tile(R, lora_dtype, cfg["BLOCK_C"], cfg["BLOCK_M"])
    row_blocks = triton.cdiv(N, block_m)
    if splits is None:
        splits = triton.cdiv(programs_wanted(rhs.device), triton.cdiv(C, block_c) * triton.cdiv(R, block_r))
    rows_per_split = triton.cdiv(row_blocks, max(1, min(splits, row_blocks))) * block_m
    splits = triton.cdiv(N, rows_per_split)
    ws = torch.empty((splits, C, R) if transposed else (splits, R, C), dtype=torch.float32, device=rhs.device)
    stride_or, stride_oc = (ws.stride(2), ws.stride(1)) if transposed else (ws.stride(1), ws.stride(2))
    seed, threshold, drop = dropout
    grid = (triton.cdiv(C, block_c), triton.cdiv(R, block_r), splits)
    lora_bwd_wgrad_kernel[grid](
        lhs, rank_scale if rank_scale is not None else lhs, rhs, ws, N, C, R, lhs.stride(0), rhs.stride(0),
        rhs.stride(1), ws.stride(0), stride_or, stride_oc, rows_per_split, float(alpha), seed, threshold,
        HAS_RANK_SCALE=rank_scale is not None, DROPOUT=drop, MASK_GROUPED=keep_mask_grouped(C),
        LORA_DOT_DTYPE=dot_dtype(lora_dtype), PRECISION=precision(), BLOCK_M=block_m, BLOCK_C=block_c,
        BLOCK_R=block_r, **launch_opts(cfg))
    return ws[0] if splits == 1 else ws.sum(0)


def bwd_dB(grad_y, h, rank_scale, scaling: float, *, splits: int | None = None) -> torch.Tensor:
    """dB [out, r] fp32 = s g^T (h e): rows split to fill the device, each split's sum stored, then one sum."""
    return _wgrad(h, rank_scale, grad_y, scaling, h.dtype, True, splits)


def bwd_dA(dh, x, lora_dtype: torch.dtype, dropout_p: float, seed, *, splits: int | None = None) -> torch.Tensor:
    """dA [r, in] fp32 = dh^T drop(x), the mask regenerated from the seed; rows split as in :func:`bwd_dB`."""
    seed_, threshold, keep_scale, dropout = dropout_args(dropout_p, seed)
    return _wgrad(dh, None, x, keep_scale, lora_dtype, False, splits, (seed_, threshold, dropout))


def bwd_dx(grad_y, weight, dh, lora_A, lora_dtype: torch.dtype, dropout_p: float, seed, *, out=None) -> torch.Tensor:
    """dx [N, in] = g W + (dh A) * mask / (1-p) in W's (= x's) dtype; g W runs in W's dtype, as torch_impl's."""
    N, O = grad_y.shape
    K = weight.shape[1]
    R = lora_A.shape[0]
    dx = out_buffer(out, (N, K), weight.dtype, grad_y.device)
    seed_, threshold, keep_scale, dropout = dropout_args(dropout_p, seed)
    cfg = _cfg("bwd_dx_dropout" if dropout else "bwd_dx", weight.dtype)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"]),)
    dx_buf = staged(dx)
    lora_bwd_dx_kernel[grid](
        grad_y, weight, dh, lora_A, dx_buf, N, K, O, R, grad_y.stride(0), grad_y.stride(1), weight.stride(0),
        weight.stride(1), dh.stride(0), lora_A.stride(0), lora_A.stride(1), seed_, threshold, keep_scale,
        DROPOUT=dropout, MASK_GROUPED=keep_mask_grouped(K), DOT_DTYPE=dot_dtype(weight.dtype),
        LORA_DOT_DTYPE=dot_dtype(lora_dtype), PRECISION=precision(), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], BLOCK_R=lora_rank_chunk(R, lora_dtype), GROUP_M=cfg["GROUP_M"], **launch_opts(cfg))
    return unstage(dx, dx_buf)


# ------------------------------------------------------------------------------------------- registered ops


@register("lora_dropout_mask", "triton")
def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device) -> torch.Tensor:
    """keep[i, j]: the mask the Triton LoRA kernels draw for x of ``shape`` (``triton_blocks.lora_keep_mask``)."""
    N, K = shape
    keep = torch.empty((N, K), dtype=torch.bool, device=device)
    if keep.numel() == 0:
        return keep
    cfg = _cfg("mask")
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]))
    seed_, threshold = dropout_args(p, seed)[:2]
    lora_dropout_mask_kernel[grid](keep, N, K, seed_, threshold, MASK_GROUPED=keep_mask_grouped(K),
                                   BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], **launch_opts(cfg))
    return keep


@register("lora_forward", "triton")
def lora_forward(x, weight, bias, lora_A, lora_B, rank_scale, scaling: float, dropout_p: float, seed,
                 promote_output: bool = False):
    """(y [N, out], h [N, r]) for x [N, in]; h = drop(x) A^T before the rank scale.

    y is in x's dtype, or in the LoRA dtype promote(x, A) when ``promote_output`` (DoRA rescales it there).
    """
    impl = torch_fallback("lora_forward", x, lora_A, empty=x.shape[0] == 0)
    if impl is not None:
        return impl(x, weight, bias, lora_A, lora_B, rank_scale, scaling, dropout_p, seed, promote_output)
    h = shrink(x, lora_A, dropout_p, seed)
    y = fwd(x, weight, bias, h, rank_scale, lora_B, scaling, out_dtype=h.dtype if promote_output else None)
    return y, h


@register("lora_backward", "triton")
def lora_backward(grad_y, x, weight, lora_A, lora_B, rank_scale, h, scaling: float, dropout_p: float, seed,
                  compute_dx: bool):
    """(dx or None, dA, dB, d_rank_scale or None)."""
    impl = torch_fallback("lora_backward", x, lora_A, empty=x.shape[0] == 0)
    if impl is not None:
        return impl(grad_y, x, weight, lora_A, lora_B, rank_scale, h, scaling, dropout_p, seed, compute_dx)
    dB = bwd_dB(grad_y, h, rank_scale, scaling)
    dh, de = bwd_dh(grad_y, lora_B, h, rank_scale, scaling)
    dA = bwd_dA(dh, x, h.dtype, dropout_p, seed)
    dx = bwd_dx(grad_y, weight, dh, lora_A, h.dtype, dropout_p, seed) if compute_dx else None
    return (dx, dA.to(lora_A.dtype), dB.to(lora_B.dtype),
            de.to(rank_scale.dtype) if de is not None else None)


# ------------------------------------------------------------------------------------ ahead-of-time listing


def _aot_step(lora_dtype: torch.dtype, r: int, dropout_p: float, rank_scale: bool,
              dtype: torch.dtype = torch.bfloat16) -> None:
    """Forward and backward (dx too) of a LoRA layer over a 4096 x 4096 base in ``dtype`` with bias, 1024 tokens;
    the dropout mask's own kernel where dropout is on."""
    N, K = 1024, 4096
    x, g = (torch.empty(N, K, dtype=dtype) for _ in range(2))
    weight, bias = torch.empty(K, K, dtype=dtype), torch.empty(K, dtype=dtype)
    lora_A, lora_B = torch.empty(r, K, dtype=lora_dtype), torch.empty(K, r, dtype=lora_dtype)
    e = torch.empty(r, dtype=lora_dtype) if rank_scale else None
    seed = 12345  # dropout seeds are random 31-bit ints: most are not multiples of 16
    y, h = lora_forward(x, weight, bias, lora_A, lora_B, e, 2.0, dropout_p, seed)
    lora_backward(g, x, weight, lora_A, lora_B, e, h, 2.0, dropout_p, seed, True)
    if dropout_p:
        dropout_keep_mask(seed, (N, K), dropout_p, x.device)


# representative launches for peftkern._aot: PEFT's defaults (fp32 adapters, r = 8: h's rows are not 16-aligned)
# with dropout (and the dropout tile configs), bf16 adapters at the largest rank chunk with AdaLoRA's rank
# scale, and an fp32 model (its own tiles, _GPU_FP32); QLoRA's scenario (nf4) launches the rank kernels at r = 16
AOT_SCENARIOS = {
    "bf16 base, fp32 adapters r8, dropout": functools.partial(_aot_step, torch.float32, 8, 0.1, False),
    "bf16 base, bf16 adapters r64, rank scale": functools.partial(_aot_step, torch.bfloat16, 64, 0.0, True),
    "fp32 base, fp32 adapters r16, dropout": functools.partial(_aot_step, torch.float32, 16, 0.1, False,
                                                               torch.float32),
}
