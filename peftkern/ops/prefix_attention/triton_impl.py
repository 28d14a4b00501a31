"""Triton launchers of prefix attention: allocate, choose blocks, launch (kernels: triton_kernels.py).

The registered ops have the signatures and return conventions of torch_impl.py. ``KERNELS`` lists every kernel in
its GPU default configuration for ahead-of-time compilation (``peftkern._aot``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._aot import KernelSpec
from ...backend import fallback, interpret_mode, register
from ..triton_launch import dot_dtype, launch_opts, precision, staged, unstage
from .triton_kernels import (prefix_attention_bwd_dkdv_kernel, prefix_attention_bwd_dq_kernel,
                             prefix_attention_fwd_kernel)

# GPU defaults by head dim (spill-free on sm_80/sm_90, peftkern._aot): forward and dq 64x64 tiles up to D = 64,
# 64x32 up to 128; 4 warps, 2 stages. The interpreter takes 16x16 tiles (small shapes still cross
# several blocks).
_GPU = [(64, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
        (128, dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2))]
MAX_HEAD_DIM = 128  # wider heads spill the dk/dv kernel's two [BLOCK_N, D] accumulators: the torch path serves them
# The dk/dv kernel holds two [BLOCK_N, D] accumulators beside the recomputed tiles: 64x32 with one stage up to
# D = 64 (more stages or wider tiles spill on sm_80), 32x64 with 8 warps up to 128.
_GPU_DKDV = [(64, dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)),
             (128, dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2))]
_INTERPRET = dict(BLOCK_M=16, BLOCK_N=16)


def _cfg(D: int, dkdv: bool = False) -> dict:
    if interpret_mode():
        return _INTERPRET
    return _cfg_gpu(D, dkdv)


def _cfg_gpu(D: int, dkdv: bool = False) -> dict:
    return next(cfg for limit, cfg in (_GPU_DKDV if dkdv else _GPU) if D <= limit)


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
    if q.dtype == torch.float64:
        return fallback(op, "float64 tensors (the Triton kernels accumulate in fp32)")
    if q.shape[-1] > MAX_HEAD_DIM:
        return fallback(op, f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} (the Triton kernels' limit)", ValueError)
    return None


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
    cfg = _cfg(D)
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
    cfg, cfg_kv = _cfg(D), _cfg(D, dkdv=True)
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


def _kernel_specs() -> list[KernelSpec]:
    """bf16, causal, padding, GQA, a shared prefix; head dims 64 and 128 (one per configuration)."""
    specs = []
    ptr = "*bf16"
    strides_fwd = ["stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks", "stride_vb",
                   "stride_vh", "stride_vs", "stride_pkh", "stride_pkp", "stride_pvh", "stride_pvp", "stride_mb"]
    for D in (64, 128):
        cfg = _cfg_gpu(D)
        consts = dict(CAUSAL=True, HAS_PAD=True, DOT_DTYPE=tl.bfloat16, PRECISION="ieee", BLOCK_M=cfg["BLOCK_M"],
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_D=D)
        opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        base = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, pk_ptr=ptr, pv_ptr=ptr, kpm_ptr="*i1", S="i32", P="i32",
                    D="i32", Hq="i32", G="i32", scale="fp32", **{s: "i32" for s in strides_fwd})
        aligned = ("q_ptr", "k_ptr", "v_ptr", "pk_ptr", "pv_ptr", "D", "stride_qs", "stride_ks", "stride_vs",
                   "stride_pkp", "stride_pvp")
        shared = dict(stride_pkb=0, stride_pvb=0)
        specs.append(KernelSpec(prefix_attention_fwd_kernel, dict(base, o_ptr=ptr, lse_ptr="*fp32"),
                                dict(consts, **shared), aligned=aligned + ("o_ptr",), variant=f"bf16 D{D}", **opts))
        specs.append(KernelSpec(prefix_attention_bwd_dq_kernel,
                                dict(base, do_ptr=ptr, lse_ptr="*fp32", delta_ptr="*fp32", dq_ptr=ptr),
                                dict(consts, **shared), aligned=aligned + ("do_ptr", "dq_ptr"), variant=f"bf16 D{D}",
                                **opts))
        dkdv = dict(q_ptr=ptr, key_ptr=ptr, val_ptr=ptr, kpm_ptr="*i1", do_ptr=ptr, lse_ptr="*fp32",
                    delta_ptr="*fp32", dk_ptr=ptr, dv_ptr=ptr, S="i32", L="i32", D="i32", Hq="i32", G="i32",
                    B_PER_PROGRAM="i32", scale="fp32", stride_qb="i32", stride_qh="i32", stride_qs="i32",
                    stride_keyh="i32", stride_keyl="i32", stride_valh="i32", stride_vall="i32", stride_mb="i32")
        kv = _cfg_gpu(D, dkdv=True)
        consts_kv = dict(consts, BLOCK_M=kv["BLOCK_M"], BLOCK_N=kv["BLOCK_N"])
        opts_kv = dict(num_warps=kv["num_warps"], num_stages=kv["num_stages"])
        for prefix in (False, True):
            batch = dict(stride_keyb=0, stride_valb=0) if prefix else {}
            sig = dkdv if prefix else dict(dkdv, stride_keyb="i32", stride_valb="i32")
            specs.append(KernelSpec(prefix_attention_bwd_dkdv_kernel, sig, dict(consts_kv, PREFIX=prefix, **batch),
                                    aligned=("q_ptr", "key_ptr", "val_ptr", "do_ptr", "dk_ptr", "dv_ptr", "D",
                                             "stride_qs", "stride_keyl", "stride_vall"),
                                    variant=f"bf16 D{D}, {'shared prefix' if prefix else 'sequence'} keys",
                                    **opts_kv))
    return specs


KERNELS: list[KernelSpec] = _kernel_specs()
