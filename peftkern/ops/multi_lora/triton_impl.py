"""Triton launchers of multi-adapter LoRA (SGMV): plan, allocate, choose blocks, launch (kernels: triton_kernels.py).

The registered ops have the signatures and return conventions of torch_impl.py. :func:`plan` groups the rows by
adapter on the device (no host sync); the per-kernel launchers (:func:`shrink`, :func:`forward_gemm`,
:func:`grad_shrink`, :func:`grad_b`, :func:`grad_a`, :func:`dgrad`) take a plan and, for the outputs the kernels fill
row by row, optional ``out=`` buffers so tests can hand them NaN-poisoned ones. float64 tensors are served by
torch_impl (the kernels accumulate in fp32). ``AOT_SCENARIOS`` are the launches ``peftkern kernels`` compiles
(``peftkern._aot``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from ...backend import register
from ..triton_launch import (block_config, dot_dtype, launch_opts, out_buffer, precision, programs_wanted, rank_chunk,
                             staged, torch_fallback, unstage)
from . import torch_impl
from .triton_kernels import (multi_lora_gemm_kernel, multi_lora_grad_shrink_kernel, multi_lora_segment_grad_kernel,
                             multi_lora_shrink_kernel)

# GPU defaults. BLOCK_M is the row block of the SGMV table (shared by the row-block kernels): 64 rows, so an adapter
# with few tokens wastes little of a block (Punica uses 16-64). Base GEMMs with the LoRA epilogue (forward, dgrad):
# 64x128 tiles, K step 64 for 16-bit (32 for fp32), 8 warps (4 spill on sm_90 with the LoRA accumulator), 3 stages.
# Rank-sized kernels: K step 64, 4 warps. dB / dA: 64-row chunks of an adapter's segment into 64-wide tiles.
# BLOCK_R caps the rank chunk held in registers (64; 32 for fp32 LoRA math, whose FMA dots spill at 64 in the dgrad
# epilogue); larger ranks loop (epilogues) or add grid columns. Spill-free on sm_80/sm_90 per ``peftkern._aot``.
_GPU = {
    "block_m": 64,
    "gemm": dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    "gemm_fp32": dict(BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    "rank": dict(BLOCK_K=64, num_warps=4, num_stages=3),
    "reduce": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "max_block_r": 64,
    "max_block_r_fp32": 32,
}
# The interpreter runs each program as numpy ops: 16-wide tiles make small test shapes span several blocks per
# adapter, several tiles and several K steps, so every mask and loop runs.
_INTERPRET = {
    "block_m": 16,
    "gemm": dict(BLOCK_N=16, BLOCK_K=16),
    "gemm_fp32": dict(BLOCK_N=16, BLOCK_K=16),
    "rank": dict(BLOCK_K=16),
    "reduce": dict(BLOCK_M=16, BLOCK_N=16),
    "max_block_r": 16,
    "max_block_r_fp32": 16,
}


def _configs() -> dict:
    return block_config(_GPU, _INTERPRET)


def _gemm_config(dtype: torch.dtype) -> dict:
    return _configs()["gemm_fp32" if dtype == torch.float32 else "gemm"]


def _block_r(r: int, lora_dtype: torch.dtype) -> int:
    """Rank chunk: the next power of two >= 16, capped (32 for fp32 LoRA math, whose FMA dots spill past that)."""
    cap = _configs()["max_block_r"]
    if lora_dtype == torch.float32:
        cap = min(cap, _configs()["max_block_r_fp32"])
    return rank_chunk(r, cap)


# ---------------------------------------------------------------------------------------------------- the plan


class Plan(NamedTuple):
    """Rows grouped by adapter, all on the device. ``perm`` [N] int32: sorted position -> row of x; ``table``
    [blocks, 3] int32: (start, end, adapter) of each row block of at most ``block_m`` sorted rows, inside one
    adapter's segment (start == end past the real count); ``segs`` [n, 2] int32: each adapter's [start, end) in
    sorted positions (empty when unused)."""
    perm: torch.Tensor
    table: torch.Tensor
    segs: torch.Tensor
    blocks: int
    block_m: int


def plan(adapter_ids: torch.Tensor, seq_len: int, n: int, device: torch.device, block_m: int | None = None) -> Plan:
    """Sort the B sequences by adapter (stable), expand them to their ``seq_len`` rows, cut segments into blocks.

    Torch ops on the device, no host sync (so a CUDA graph can capture it): the groups are counted by a binary search
    in the sorted ids, not ``torch.bincount`` (whose CUDA kernel reads min and max back to the host); the grid is
    sized by the bound ``N // block_m + n + 1`` on the number of blocks (each of the n + 1 groups, base included,
    adds at most one partly filled block).
    """
    block_m = block_m or _configs()["block_m"]
    ids = adapter_ids.to(device=device, dtype=torch.int64, non_blocking=True).view(-1)
    B = ids.numel()
    N = B * seq_len
    order = torch.argsort(ids, stable=True)
    if seq_len == 1:
        perm = order
    else:
        perm = (order[:, None] * seq_len + torch.arange(seq_len, device=device)).view(-1)
    # group g (ids g - 1; group 0 the base-only rows) is [bounds[g], bounds[g + 1]) of the sorted rows
    bounds = torch.searchsorted(ids[order], torch.arange(-1, n + 1, device=device)) * seq_len
    starts, ends = bounds[:-1], bounds[1:]
    counts = ends - starts
    nblk = (counts + block_m - 1) // block_m
    cum = nblk.cumsum(0)
    blocks = N // block_m + n + 1
    j = torch.arange(blocks, device=device)
    group = torch.searchsorted(cum, j, right=True)
    active = group <= n
    g = group.clamp(max=n)
    start = starts[g] + (j - (cum[g] - nblk[g])) * block_m
    end = torch.minimum(start + block_m, ends[g])
    zero = torch.zeros_like(start)
    table = torch.stack([torch.where(active, start, zero), torch.where(active, end, zero), g - 1], 1)
    segs = torch.stack([starts[1:], ends[1:]], 1)
    return Plan(perm.to(torch.int32), table.to(torch.int32).contiguous(), segs.to(torch.int32).contiguous(),
                blocks, block_m)


# ----------------------------------------------------------------------------------------------- launchers


def shrink(x, lora_A, p: Plan, *, out=None) -> torch.Tensor:
    """h [N, r] = x[rows] A_a^T per block, in promote(x, A)'s dtype; 0 for the rows of base-only sequences."""
    N, K = x.shape
    R = lora_A.shape[1]
    h = out_buffer(out, (N, R), torch_impl.lora_dtype(x, lora_A), x.device)
    cfg, block_r = _configs()["rank"], _block_r(R, h.dtype)
    grid = (p.blocks, triton.cdiv(R, block_r))
    h_buf = staged(h)
    multi_lora_shrink_kernel[grid](
        x, lora_A, h_buf, p.perm, p.table, K, R,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), h_buf.stride(0),
        h_buf.stride(1),
        BLOCK_M=p.block_m, BLOCK_R=block_r, BLOCK_K=cfg["BLOCK_K"], LORA_DOT_DTYPE=dot_dtype(h.dtype),
        PRECISION=precision(), **launch_opts(cfg))
    return unstage(h, h_buf)


def _gemm(lhs, rhs_t, bias, lora_lhs, lora_rhs_t, scalings, out_dtype, p: Plan, out=None) -> torch.Tensor:
    """out [N, C] = lhs rhs_t^T (+ (s_a) lora_lhs lora_rhs_t[a]^T unless adapter -1) (+ bias) in ``out_dtype``;
    rhs_t [C, K] and lora_rhs_t [n, C, r] are read transposed through their strides."""
    N, K = lhs.shape
    C = rhs_t.shape[0]
    R = lora_lhs.shape[1]
    res = out_buffer(out, (N, C), out_dtype, lhs.device)
    cfg = _gemm_config(lhs.dtype)
    grid = (p.blocks, triton.cdiv(C, cfg["BLOCK_N"]))
    buf = staged(res)
    multi_lora_gemm_kernel[grid](
        lhs, rhs_t, bias if bias is not None else buf, lora_lhs, lora_rhs_t,
        scalings if scalings is not None else buf, buf, p.perm, p.table, C, K, R,
        lhs.stride(0), lhs.stride(1), rhs_t.stride(1), rhs_t.stride(0), lora_lhs.stride(0), lora_lhs.stride(1),
        lora_rhs_t.stride(0), lora_rhs_t.stride(2), lora_rhs_t.stride(1), buf.stride(0), buf.stride(1),
        HAS_BIAS=bias is not None, HAS_SCALE=scalings is not None, BLOCK_M=p.block_m, BLOCK_C=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], BLOCK_R=_block_r(R, lora_lhs.dtype), DOT_DTYPE=dot_dtype(lhs.dtype),
        LORA_DOT_DTYPE=dot_dtype(lora_lhs.dtype), PRECISION=precision(), **launch_opts(cfg))
    return unstage(res, buf)


def forward_gemm(x, weight, bias, h, lora_B, scalings, p: Plan, *, out=None) -> torch.Tensor:
    """y [N, out] = x W^T + bias + s_a h B_a^T (no LoRA term for adapter -1), in x's dtype, one write of y."""
    return _gemm(x, weight, bias, h, lora_B, scalings, x.dtype, p, out)


def grad_shrink(grad_y, lora_B, scalings, lora_dtype: torch.dtype, p: Plan) -> torch.Tensor:
    """dh [N, r] = s_a g B_a in the LoRA dtype; rows of base-only sequences are left unwritten (never read)."""
    N, O = grad_y.shape
    R = lora_B.shape[2]
    dh = torch.empty((N, R), dtype=lora_dtype, device=grad_y.device)
    cfg, block_r = _configs()["rank"], _block_r(R, lora_dtype)
    grid = (p.blocks, triton.cdiv(R, block_r))
    dh_buf = staged(dh)
    multi_lora_grad_shrink_kernel[grid](
        grad_y, lora_B, scalings, dh_buf, p.perm, p.table, O, R,
        grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
        dh_buf.stride(0), dh_buf.stride(1),
        BLOCK_M=p.block_m, BLOCK_R=block_r, BLOCK_K=cfg["BLOCK_K"], LORA_DOT_DTYPE=dot_dtype(lora_dtype),
        PRECISION=precision(), **launch_opts(cfg))
    return unstage(dh, dh_buf)


def _splits(device, tiles: int, rows: int, block_m: int, splits: int | None) -> int:
    if splits is None:
        splits = triton.cdiv(programs_wanted(device), tiles)
    return max(1, min(splits, triton.cdiv(rows, block_m)))


def _segment_grad(lhs, rhs, scalings, out_shape, transposed: bool, n: int, p: Plan, splits: int | None):
    """[n, *out_shape] fp32: per adapter, (s_a) lhs^T rhs over its rows ([C, R]; stored as [R, C] when
    ``transposed``), rows split to fill the device, the splits' partial sums added here."""
    N, C = lhs.shape
    R = rhs.shape[1]
    cfg, block_r = _configs()["reduce"], _block_r(R, rhs.dtype)
    tiles = triton.cdiv(C, cfg["BLOCK_N"]) * triton.cdiv(R, block_r)
    splits = _splits(lhs.device, n * tiles, N, cfg["BLOCK_M"], splits)
    ws = torch.empty((splits, n, *out_shape), dtype=torch.float32, device=lhs.device)
    stride_wc, stride_wr = (ws.stride(3), ws.stride(2)) if transposed else (ws.stride(2), ws.stride(3))
    multi_lora_segment_grad_kernel[(n, tiles, splits)](
        lhs, rhs, scalings if scalings is not None else ws, ws, p.perm, p.segs, C, R, splits,
        lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1), ws.stride(0), ws.stride(1), stride_wc, stride_wr,
        HAS_SCALE=scalings is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_N"], BLOCK_R=block_r,
        LORA_DOT_DTYPE=dot_dtype(rhs.dtype), PRECISION=precision(), **launch_opts(cfg))
    return ws[0] if splits == 1 else ws.sum(0)


def grad_b(grad_y, h, scalings, n: int, p: Plan, *, splits: int | None = None) -> torch.Tensor:
    """dB [n, out, r] fp32: s_a g^T h over each adapter's rows (zero for unused adapters)."""
    return _segment_grad(grad_y, h, scalings, (grad_y.shape[1], h.shape[1]), False, n, p, splits)


def grad_a(dh, x, n: int, p: Plan, *, splits: int | None = None) -> torch.Tensor:
    """dA [n, r, in] fp32: dh^T x over each adapter's rows (zero for unused adapters)."""
    return _segment_grad(x, dh, None, (dh.shape[1], x.shape[1]), True, n, p, splits)


def dgrad(grad_y, weight, dh, lora_A, p: Plan, *, out=None) -> torch.Tensor:
    """dx [N, in] = g W + dh A_a (no LoRA term for adapter -1), in g's dtype."""
    return _gemm(grad_y, weight.t(), None, dh, lora_A.transpose(1, 2), None, grad_y.dtype, p, out)


# ---------------------------------------------------------------------------------------------- registered ops


def _scalings(scalings, device) -> torch.Tensor:
    return scalings.to(device=device, dtype=torch.float32, non_blocking=True).contiguous()


@register("multi_lora_forward", "triton")
def multi_lora_forward(x, weight, bias, lora_A, lora_B, scalings, adapter_ids):
    """(y [B, S, out], h [B, S, r]) for x [B, S, in]; h is 0 for the rows of base-only sequences."""
    impl = torch_fallback("multi_lora_forward", x, lora_A, empty=x.numel() == 0)
    if impl is not None:
        return impl(x, weight, bias, lora_A, lora_B, scalings, adapter_ids)
    B, S, K = x.shape
    n = lora_A.shape[0]
    x2 = x.reshape(B * S, K)
    p = plan(adapter_ids, S, n, x.device)
    h = shrink(x2, lora_A, p)
    y = forward_gemm(x2, weight, bias, h, lora_B, _scalings(scalings, x.device), p)
    return y.view(B, S, -1), h.view(B, S, -1)


@register("multi_lora_backward", "triton")
def multi_lora_backward(grad_y, x, weight, lora_A, lora_B, scalings, adapter_ids, h, compute_dx: bool,
                        compute_dlora: bool):
    """(dx [B, S, in] or None, dA [n, r, in] or None, dB [n, out, r] or None); unused adapters get zeros."""
    impl = torch_fallback("multi_lora_backward", x, lora_A, empty=x.numel() == 0)
    if impl is not None:
        return impl(grad_y, x, weight, lora_A, lora_B, scalings, adapter_ids, h, compute_dx, compute_dlora)
    B, S, K = x.shape
    n = lora_A.shape[0]
    x2 = x.reshape(B * S, K)
    g2 = grad_y.reshape(B * S, -1)
    h2 = h.reshape(B * S, -1)
    scal = _scalings(scalings, x.device)
    p = plan(adapter_ids, S, n, x.device)
    dh = grad_shrink(g2, lora_B, scal, h.dtype, p)
    dA = dB = dx = None
    if compute_dlora:
        dB = grad_b(g2, h2, scal, n, p).to(lora_B.dtype)
        dA = grad_a(dh, x2, n, p).to(lora_A.dtype)
    if compute_dx:
        dx = dgrad(g2, weight, dh, lora_A, p).view(B, S, K)
    return dx, dA, dB


# ------------------------------------------------------------------------------------- ahead-of-time listing


def _aot_step() -> None:
    """Forward and backward (dx and adapter gradients) of a mixed batch over a bf16 4096 x 4096 base with bias:
    8 sequences of 256 tokens over 4 fp32 adapters of rank 16 and the base alone (id -1)."""
    B, S, K, n, r = 8, 256, 4096, 4, 16
    x, g = (torch.empty(B, S, K, dtype=torch.bfloat16) for _ in range(2))
    weight, bias = torch.empty(K, K, dtype=torch.bfloat16), torch.empty(K, dtype=torch.bfloat16)
    lora_A, lora_B = torch.empty(n, r, K), torch.empty(n, K, r)
    scalings, ids = torch.full((n,), 2.0), torch.arange(B) % (n + 1) - 1
    y, h = multi_lora_forward(x, weight, bias, lora_A, lora_B, scalings, ids)
    multi_lora_backward(g, x, weight, lora_A, lora_B, scalings, ids, h, True, True)


AOT_SCENARIOS = {"bf16 base, 4 fp32 adapters r16 and the base": _aot_step}  # representative launches (peftkern._aot)
