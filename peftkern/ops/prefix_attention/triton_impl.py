"""Triton launchers of prefix attention: allocate, choose blocks, launch (kernels: triton_kernels.py).

The registered ops have the signatures and return conventions of torch_impl.py. ``AOT_SCENARIOS`` are the launches
``peftkern kernels`` compiles (``peftkern._aot``).
"""
from __future__ import annotations

import functools

import torch
import triton

from ...backend import fallback, register
from ..triton_launch import (block_config, dot_dtype, launch_opts, precision, programs_wanted, staged, torch_fallback,
                             unstage)
from .triton_kernels import (prefix_attention_bwd_delta_kernel, prefix_attention_bwd_dkdv_kernel,
                             prefix_attention_bwd_dq_kernel, prefix_attention_fwd_kernel)

# GPU defaults per kernel by head dim, spill-free on sm_80/sm_90 as the JIT specializes them (peftkern._aot; also
# for MHA and per-batch prefixes). Forward: 64x64 tiles, 4 warps up to D = 64; at 128, 128 queries a program (half
# the key/value reads of 64) by 32 keys, 8 warps (128x64 spills on sm_80); 2 stages. dq holds q, do and its
# accumulator beside the recomputed p and dp: 64x32, 4 warps (64x64 spills 64 B on sm_80 at D = 64, 8-76 B at 128),
# a third stage at D = 128. dk/dv holds two [BLOCK_N, D] accumulators beside the recomputed tiles: 64x32 with
# 8 warps up to D = 64 (4 warps and one stage spill on sm_80 over a shared prefix), 32x64 with 8 warps up to 128.
# The prefix's dk/dv loops over batch rows too, which costs registers: at D = 128 32x32 tiles (a prefix of 32 keys
# in one tile), 4 warps and no prefetch stage (2 stages, or 8 warps at 64x32, spill 50-400 B). delta: ~4K elements
# a program.
_GPU = {"fwd": [(64, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
                (128, dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2))],
        "dq": [(64, dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)),
               (128, dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3))],
        "dkdv": [(64, dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)),
                 (128, dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2))],
        "dkdv_prefix": [(64, dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)),
                        (128, dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1))],
        "delta": [(64, dict(BLOCK_M=64, num_warps=4, num_stages=1)),
                  (128, dict(BLOCK_M=32, num_warps=4, num_stages=1))]}
# fp32 inputs (the dots on FMA units, ``precision()`` "ieee" by default, their operands in registers): the tiles
# above spill 1-60 KB there, so smaller ones, one stage but for the D = 64 forward. Spill-free on sm_80/sm_90 at
# 68-231 registers, also for MHA, per-batch prefixes, no padding, non-causal (some 16-32 wide tiles spill 8-16 B
# there). The prefix's dk/dv at D = 128: 16 queries by 64 keys, 8 warps (32x32 spills 0.2-1.7 KB).
_GPU_FP32 = {"fwd": [(64, dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)),
                     (128, dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1))],
             "dq": [(64, dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)),
                    (128, dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1))],
             "dkdv": [(64, dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1)),
                      (128, dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1))],
             "dkdv_prefix": [(64, dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)),
                             (128, dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=1))],
             "delta": _GPU["delta"]}
_INTERPRET = {"fwd": dict(BLOCK_M=16, BLOCK_N=16), "dq": dict(BLOCK_M=16, BLOCK_N=16),
              "dkdv": dict(BLOCK_M=16, BLOCK_N=16), "dkdv_prefix": dict(BLOCK_M=16, BLOCK_N=16),
              "delta": dict(BLOCK_M=16)}
MAX_HEAD_DIM = 128  # wider heads spill the dk/dv kernel's two [BLOCK_N, D] accumulators: the torch path serves them


def _cfg(D: int, kernel: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tiles and launch options of ``kernel`` (a key of ``_GPU``) at head dim D for inputs of ``dtype``
    (``_GPU_FP32`` for fp32; the interpreter's tiles are the same for every dtype)."""
    table = _GPU_FP32 if dtype == torch.float32 else _GPU
    return block_config(next(cfg for limit, cfg in table[kernel] if D <= limit), _INTERPRET[kernel])


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _prefix4(t: torch.Tensor) -> torch.Tensor:
    """[Hkv, P, D] (shared: batch stride 0) or [B, Hkv, P, D], feature stride 1."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.unsqueeze(0) if t.dim() == 3 else t


def _common(q, k, v, prefix_k, prefix_v, key_padding_mask):
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    pk, pv = _prefix4(prefix_k), _prefix4(prefix_v)
    kpm = key_padding_mask if key_padding_mask is not None else q.new_zeros(1, 1, dtype=torch.bool)
    shared = prefix_k.dim() == 3
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], 0 if shared else pk.stride(0), *pk.stride()[1:3],
               0 if shared else pv.stride(0), *pv.stride()[1:3], kpm.stride(0))
    return q, k, v, pk, pv, kpm, strides


def _too_wide(op: str, q, k):
    impl = torch_fallback(op, q)
    if impl is None and q.shape[-1] > MAX_HEAD_DIM:
        impl = fallback(op, f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} (the Triton kernels' limit)", ValueError)
    return impl


@register("prefix_attention_forward", "triton")
def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal: bool, scale: float):
    impl = _too_wide("prefix_attention_forward", q, k)
    if impl is not None:
        return impl(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
    B, Hq, S, D = q.shape
    q, k, v, pk, pv, kpm, strides = _common(q, k, v, prefix_k, prefix_v, key_padding_mask)
    o = torch.empty((B, Hq, S, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    cfg = _cfg(D, "fwd", q.dtype)
    o_buf = staged(o)
    prefix_attention_fwd_kernel[(triton.cdiv(S, cfg["BLOCK_M"]), B * Hq)](
        q, k, v, pk, pv, kpm, o_buf, lse, S, pk.shape[2], D, Hq, Hq // k.shape[1], float(scale), *strides,
        CAUSAL=causal, HAS_PAD=key_padding_mask is not None, DOT_DTYPE=dot_dtype(q.dtype), PRECISION=precision(),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_block_d(D), **launch_opts(cfg))
    return unstage(o, o_buf), lse


def prefix_splits(units: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(parts, units a part) of a dk/dv reduction over ``units`` (batch row, query block) pairs whose grid has
    ``tiles`` programs a part: enough parts to fill the device (``programs_wanted``), none empty. The workspace
    of the parts' fp32 sums is then at most a few programs per SM times a [BLOCK_N, D] tile pair."""
    parts = max(1, min(units, triton.cdiv(programs_wanted(device), tiles)))
    per_part = triton.cdiv(units, parts)
    return triton.cdiv(units, per_part), per_part


def _dkdv(q, keys, values, key_strides, kpm, do, lse, delta, dk, dv, groups: int, per_group: int, prefix: bool,
          scale: float, cfg: dict, flags: dict) -> None:
    """dk / dv [groups, Hkv, L, D] of ``keys`` / ``values`` [*, Hkv, L, D] (``key_strides``: their batch, head and
    key strides), each group of ``per_group`` batch rows summed; a prefix's reduction split over query blocks into
    a workspace of parts (:func:`prefix_splits`), then one sum."""
    B, Hq, S, D = q.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    tiles = triton.cdiv(L, cfg["BLOCK_N"]) * Hkv
    units = per_group * triton.cdiv(S, cfg["BLOCK_M"])
    splits, per_split = prefix_splits(units, tiles * groups, q.device) if prefix else (1, units)
    if splits == 1:
        bufs = staged(dk), staged(dv)
    else:
        bufs = [torch.empty((groups, splits, Hkv, L, D), dtype=torch.float32, device=q.device) for _ in range(2)]
    prefix_attention_bwd_dkdv_kernel[(triton.cdiv(L, cfg["BLOCK_N"]), Hkv, groups * splits)](
        q, keys, values, kpm, do, lse, delta, *bufs, S, L, D, Hq, Hq // Hkv, per_group, splits, per_split,
        float(scale), *q.stride()[:3], *key_strides, kpm.stride(0), PREFIX=prefix, **flags,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **launch_opts(cfg))
    for t, buf in zip((dk, dv), bufs):
        if splits == 1:
            unstage(t, buf)
        else:
            t.copy_(buf.sum(1))


def _delta(do: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """rowsum(do * o) [B, Hq, S] fp32 of contiguous do and o."""
    D = o.shape[-1]
    delta = torch.empty(o.shape[:-1], dtype=torch.float32, device=o.device)
    cfg = _cfg(D, "delta", o.dtype)
    prefix_attention_bwd_delta_kernel[(triton.cdiv(delta.numel(), cfg["BLOCK_M"]),)](
        do, o, delta, delta.numel(), D, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=_block_d(D), **launch_opts(cfg))
    return delta


@register("prefix_attention_backward", "triton")
def backward(grad_o, q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, causal: bool, scale: float):
    impl = _too_wide("prefix_attention_backward", q, k)
    if impl is not None:
        return impl(grad_o, q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, causal, scale)
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    P = prefix_k.shape[-2]
    shared = prefix_k.dim() == 3
    q, k, v, pk, pv, kpm, strides = _common(q, k, v, prefix_k, prefix_v, key_padding_mask)
    do, o, lse = grad_o.contiguous(), o.contiguous(), lse.contiguous()
    cfg = _cfg(D, "dq", q.dtype)
    flags = dict(CAUSAL=causal, HAS_PAD=key_padding_mask is not None, DOT_DTYPE=dot_dtype(q.dtype),
                 PRECISION=precision(), BLOCK_D=_block_d(D))
    dq = torch.empty((B, Hq, S, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, S, D), dtype=k.dtype, device=q.device)
    dv = torch.empty_like(dk)
    nb = 1 if shared else B
    dpk = torch.empty((nb, Hkv, P, D), dtype=prefix_k.dtype, device=q.device)
    dpv = torch.empty_like(dpk)
    if dq.numel():
        delta = _delta(do, o)
        dq_buf = staged(dq)
        prefix_attention_bwd_dq_kernel[(triton.cdiv(S, cfg["BLOCK_M"]), B * Hq)](
            q, k, v, pk, pv, kpm, do, lse, delta, dq_buf, S, P, D, Hq, Hq // Hkv, float(scale), *strides, **flags,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **launch_opts(cfg))
        unstage(dq, dq_buf)
        _dkdv(q, k, v, (*k.stride()[:3], *v.stride()[:3]), kpm, do, lse, delta, dk, dv, B, 1, False, scale,
              _cfg(D, "dkdv", q.dtype), flags)
        if dpk.numel():
            _dkdv(q, pk, pv, (strides[9], *pk.stride()[1:3], strides[12], *pv.stride()[1:3]), kpm, do, lse, delta,
                  dpk, dpv, nb, B if shared else 1, True, scale, _cfg(D, "dkdv_prefix", q.dtype), flags)
    else:
        for t in (dq, dk, dv, dpk, dpv):
            t.zero_()
    return dq, dk, dv, (dpk[0] if shared else dpk), (dpv[0] if shared else dpv)


# ------------------------------------------------------------------------------------ ahead-of-time listing


def _aot_step(dtype: torch.dtype, D: int) -> None:
    """Forward and backward of one layer of a Llama-like model in ``dtype`` (32 query / 8 key-value heads, head dim
    D, 2 x 1024 tokens with padding, causal), q/k/v in transformers' [B, H, S, D] views of [B, S, H, D], a shared
    prefix of 32 keys."""
    B, Hq, Hkv, S, P = 2, 32, 8, 1024, 32
    q = torch.empty(B, S, Hq, D, dtype=dtype).transpose(1, 2)
    k, v = (torch.empty(B, S, Hkv, D, dtype=dtype).transpose(1, 2) for _ in range(2))
    pk, pv = (torch.empty(Hkv, P, D, dtype=dtype) for _ in range(2))
    pad = torch.zeros(B, S, dtype=torch.bool)
    o, lse = forward(q, k, v, pk, pv, pad, True, D ** -0.5)
    backward(torch.empty_like(o), q, k, v, pk, pv, pad, o, lse, True, D ** -0.5)


# representative launches for peftkern._aot: one per tile configuration
AOT_SCENARIOS = {f"{name} GQA 32/8 heads, D{D}, shared prefix, causal, padding":
                 functools.partial(_aot_step, dtype, D)
                 for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)) for D in (64, 128)}
