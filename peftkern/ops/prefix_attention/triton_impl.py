"""Triton launchers of prefix attention: allocate, choose blocks, launch (kernels: triton_kernels.py).

The registered ops have the signatures and return conventions of torch_impl.py. ``AOT_SCENARIOS`` are the launches
``peftkern kernels`` compiles (``peftkern._aot``).
"""
from __future__ import annotations

import functools

import torch
import triton

from ...backend import fallback, interpret_mode, register
from ..triton_launch import dot_dtype, launch_opts, precision, staged, torch_fallback, unstage
from .triton_kernels import (prefix_attention_bwd_dkdv_kernel, prefix_attention_bwd_dq_kernel,
                             prefix_attention_fwd_kernel)

# GPU defaults per kernel by head dim, spill-free on sm_80/sm_90 as the JIT specializes them (peftkern._aot; also
# for MHA and per-batch prefixes). Forward: 64x64 tiles up to D = 64, 64x32 up to 128; 4 warps, 2 stages. dq
# holds q, do and its accumulator beside the recomputed p and dp: 64x32 (64x64 spills 64 B on sm_80 at D = 64).
# dk/dv holds two [BLOCK_N, D] accumulators beside the recomputed tiles: 64x32 with 8 warps up to D = 64 (4 warps
# and one stage spill on sm_80 over a shared prefix), 32x64 with 8 warps up to 128. The interpreter takes 16x16
# tiles (small shapes still cross several blocks).
_GPU = {"fwd": [(64, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
                (128, dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2))],
        "dq": [(128, dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2))],
        "dkdv": [(64, dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)),
                 (128, dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2))]}
MAX_HEAD_DIM = 128  # wider heads spill the dk/dv kernel's two [BLOCK_N, D] accumulators: the torch path serves them
_INTERPRET = dict(BLOCK_M=16, BLOCK_N=16)


def _cfg(D: int, kernel: str) -> dict:
    """Tiles and launch options of ``kernel`` ("fwd", "dq" or "dkdv") at head dim D."""
    if interpret_mode():
        return _INTERPRET
    return next(cfg for limit, cfg in _GPU[kernel] if D <= limit)


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
    cfg = _cfg(D, "fwd")
    o_buf = staged(o)
    prefix_attention_fwd_kernel[(triton.cdiv(S, cfg["BLOCK_M"]), B * Hq)](
        q, k, v, pk, pv, kpm, o_buf, lse, S, pk.shape[2], D, Hq, Hq // k.shape[1], float(scale), *strides,
        CAUSAL=causal, HAS_PAD=key_padding_mask is not None, DOT_DTYPE=dot_dtype(q.dtype), PRECISION=precision(),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_block_d(D), **launch_opts(cfg))
    return unstage(o, o_buf), lse


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
    do = grad_o.contiguous()
    lse = lse.contiguous()
    delta = (do.float() * o.float()).sum(-1).contiguous()  # [B, Hq, S]
    cfg, cfg_kv = _cfg(D, "dq"), _cfg(D, "dkdv")
    flags = dict(CAUSAL=causal, HAS_PAD=key_padding_mask is not None, DOT_DTYPE=dot_dtype(q.dtype),
                 PRECISION=precision(), BLOCK_D=_block_d(D))
    common = dict(flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **launch_opts(cfg))
    common_kv = dict(flags, BLOCK_M=cfg_kv["BLOCK_M"], BLOCK_N=cfg_kv["BLOCK_N"], **launch_opts(cfg_kv))
    dq = torch.empty((B, Hq, S, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, S, D), dtype=k.dtype, device=q.device)
    dv = torch.empty_like(dk)
    nb = 1 if shared else B
    dpk = torch.empty((nb, Hkv, P, D), dtype=prefix_k.dtype, device=q.device)
    dpv = torch.empty_like(dpk)
    bufs = [staged(t) for t in (dq, dk, dv, dpk, dpv)]
    if dq.numel():
        prefix_attention_bwd_dq_kernel[(triton.cdiv(S, cfg["BLOCK_M"]), B * Hq)](
            q, k, v, pk, pv, kpm, do, lse, delta, bufs[0], S, P, D, Hq, Hq // Hkv, float(scale), *strides, **common)
        prefix_attention_bwd_dkdv_kernel[(triton.cdiv(S, cfg_kv["BLOCK_N"]), Hkv, B)](
            q, k, v, kpm, do, lse, delta, bufs[1], bufs[2], S, S, D, Hq, Hq // Hkv, 1, float(scale), *q.stride()[:3],
            *k.stride()[:3], *v.stride()[:3], kpm.stride(0), PREFIX=False, **common_kv)
    if dpk.numel():
        prefix_attention_bwd_dkdv_kernel[(triton.cdiv(P, cfg_kv["BLOCK_N"]), Hkv, nb)](
            q, pk, pv, kpm, do, lse, delta, bufs[3], bufs[4], S, P, D, Hq, Hq // Hkv, B if shared else 1,
            float(scale), *q.stride()[:3], strides[9], *pk.stride()[1:3], strides[12], *pv.stride()[1:3],
            kpm.stride(0), PREFIX=True, **common_kv)
    elif P == 0 or S == 0:
        for t in bufs[3:]:
            t.zero_()
    dq, dk, dv, dpk, dpv = (unstage(t, buf) for t, buf in zip((dq, dk, dv, dpk, dpv), bufs))
    return dq, dk, dv, (dpk[0] if shared else dpk), (dpv[0] if shared else dpv)


# ------------------------------------------------------------------------------------ ahead-of-time listing


def _aot_step(D: int) -> None:
    """Forward and backward of one layer of a Llama-like model in bf16 (32 query / 8 key-value heads, head dim D,
    2 x 1024 tokens with padding, causal), q/k/v in transformers' [B, H, S, D] views of [B, S, H, D], a shared
    prefix of 32 keys."""
    B, Hq, Hkv, S, P = 2, 32, 8, 1024, 32
    q = torch.empty(B, S, Hq, D, dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.empty(B, S, Hkv, D, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    pk, pv = (torch.empty(Hkv, P, D, dtype=torch.bfloat16) for _ in range(2))
    pad = torch.zeros(B, S, dtype=torch.bool)
    o, lse = forward(q, k, v, pk, pv, pad, True, D ** -0.5)
    backward(torch.empty_like(o), q, k, v, pk, pv, pad, o, lse, True, D ** -0.5)


# representative launches for peftkern._aot: one per tile configuration
AOT_SCENARIOS = {f"bf16 GQA 32/8 heads, D{D}, shared prefix, causal, padding": functools.partial(_aot_step, D)
                 for D in (64, 128)}
