"""Triton launchers of the NF4 ops: allocate outputs, choose blocks, launch (kernels: triton_kernels.py).

The registered ops have the signatures and return conventions of torch_impl.py. ``AOT_SCENARIOS`` are the launches
``peftkern kernels`` compiles (``peftkern._aot``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton

from ...backend import interpret_mode, register
from ..lora import triton_impl as lora_triton
from ..triton_launch import (TL_DTYPES, dot_dtype, dropout_args, keep_mask_grouped, launch_opts, lora_rank_chunk,
                             out_buffer, precision, staged, torch_fallback, unstage)
from .torch_impl import NESTED_BLOCKSIZE, dynamic_code, nf4_code
from .triton_kernels import (nf4_dequantize_kernel, nf4_gemv_kernel, nf4_matmul_kernel, nf4_quantize_absmax_kernel,
                             nf4_quantize_kernel)

# GPU defaults: element-wise kernels 1-4K elements per program, 4 warps; the matmul with in-register dequantization
# uses 128x128 tiles with a 32-deep reduction step (the decode of a [32, 128] W tile rides along), 8 warps (128x64
# with QLoRA's dropout epilogue, which holds the mask and a second accumulator: 128x128 spills); the
# GEMV serves up to 4 token rows with 16 output features x 256 inputs per program (wider tiles spill).
_GPU = {
    "dequantize": dict(BLOCK=1024, num_warps=4, num_stages=1),
    "quantize_elements": 2048,
    "quantize": dict(num_warps=4, num_stages=1),
    "absmax": dict(num_warps=4, num_stages=1),
    "matmul": dict(BLOCK_M=128, BLOCK_C=128, BLOCK_R=32, GROUP_M=8, num_warps=8, num_stages=3),
    "matmul_dropout": dict(BLOCK_M=128, BLOCK_C=64, BLOCK_R=32, GROUP_M=8, num_warps=8, num_stages=3),
    "gemv": dict(BLOCK_C=16, BLOCK_R=256, num_warps=4, num_stages=2),
    "gemv_rows": 4,
}
# The interpreter runs each program as numpy ops: small tiles still exercise every mask and loop.
_INTERPRET = {
    "dequantize": dict(BLOCK=256), "quantize_elements": 256, "quantize": {}, "absmax": {},
    "matmul": dict(BLOCK_M=16, BLOCK_C=32, BLOCK_R=32, GROUP_M=2),
    "matmul_dropout": dict(BLOCK_M=16, BLOCK_C=32, BLOCK_R=32, GROUP_M=2), "gemv": dict(BLOCK_C=16, BLOCK_R=32),
    "gemv_rows": 4,
}


def _cfg(name: str):
    return (_INTERPRET if interpret_mode() else _GPU)[name]


def quantize_absmax_blocks(w, blocksize: int, code, *, out=None, out_absmax=None):
    """(packed uint8 [ceil(n/2), 1], absmax fp32 [blocks]) in one pass over w."""
    n = w.numel()
    blocks = triton.cdiv(n, blocksize)
    packed = out_buffer(out, ((n + 1) // 2, 1), torch.uint8, w.device)
    absmax = out_buffer(out_absmax, (blocks,), torch.float32, w.device)
    rows = max(1, _cfg("quantize_elements") // blocksize)
    nf4_quantize_kernel[(triton.cdiv(blocks, rows),)](w.reshape(-1), code, packed, absmax, n, BLOCKSIZE=blocksize,
                                                        ROWS=rows, **launch_opts(_cfg("quantize")))
    return packed, absmax


@register("nf4_quantize", "triton")
def quantize(w, blocksize: int, code):
    return quantize_absmax_blocks(w.contiguous(), blocksize, code)


@register("nf4_quantize_absmax", "triton")
def quantize_absmax(absmax, code8):
    """(q uint8 [blocks], absmax2 fp32 [ceil(blocks/256)], offset): offset is torch's mean, as bitsandbytes'."""
    offset = absmax.mean()
    blocks = absmax.numel()
    q = torch.empty(blocks, dtype=torch.uint8, device=absmax.device)
    absmax2 = torch.empty(triton.cdiv(blocks, NESTED_BLOCKSIZE), dtype=torch.float32, device=absmax.device)
    nf4_quantize_absmax_kernel[(absmax2.numel(),)](absmax, offset, code8, q, absmax2, blocks,
                                                   NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, **launch_opts(_cfg("absmax")))
    return q, absmax2, offset


def dequantize_into(q, dtype: torch.dtype, *, out=None) -> torch.Tensor:
    """q's weight in ``dtype`` (bitsandbytes' values), one launch, the nested absmax decoded on the fly."""
    w = out_buffer(out, tuple(q.shape), dtype, q.device)
    n = q.numel()
    cfg = _cfg("dequantize")
    buf = staged(w)
    dq = q.double_quant
    first = q.packed  # stands in for the pointers a variant does not read
    nf4_dequantize_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](
        q.packed, first if dq else q.absmax, q.qabsmax if dq else first, q.absmax2 if dq else first,
        q.offset if dq else first, q.code, q.code8 if dq else q.code, buf, n, BLOCKSIZE=q.blocksize,
        NESTED_BLOCKSIZE=q.nested_blocksize, DOUBLE_QUANT=dq, BLOCK=cfg["BLOCK"],
        enable_fp_fusion=False, **launch_opts(cfg))  # code8[q] * absmax2 + offset rounds twice, as bitsandbytes'
    return unstage(w, buf)


@register("nf4_dequantize", "triton")
def dequantize(q) -> torch.Tensor:
    return dequantize_into(q, q.dtype)


class LoRATerm(NamedTuple):
    """QLoRA's term in the matmul's epilogue: ``alpha * (lhs * scale) @ rhs`` with lhs [M, RL] (unit column stride),
    scale [RL] or None, rhs [RL, C] read through (stride_r, stride_c); a dropout mask on the product (dgrad) from
    the seed. ``dtype`` is the LoRA path's, promote(x, A)."""
    lhs: torch.Tensor
    scale: Optional[torch.Tensor]
    rhs: torch.Tensor
    stride_r: int
    stride_c: int
    alpha: float
    dtype: torch.dtype
    dropout_p: float = 0.0
    seed: Optional[int] = None


def matmul(a, packed, absmax, code, blocksize: int, shape, weight_dtype, transpose_w: bool, bias=None,
           lora: Optional[LoRATerm] = None, *, out=None) -> torch.Tensor:
    """``a deq(W)^T + bias`` or ``a deq(W)`` (+ ``lora``), W decoded tile by tile in registers; the GEMV for a few
    rows of a plain forward."""
    out_f, in_f = shape
    M = a.shape[0]
    C, R = (out_f, in_f) if transpose_w else (in_f, out_f)
    y = out_buffer(out, (M, C), a.dtype, a.device)
    if M == 0:
        return y
    buf = staged(y)
    dtypes = dict(W_DTYPE=TL_DTYPES[weight_dtype], X_DTYPE=TL_DTYPES[a.dtype], HAND_BF16=interpret_mode())
    bias_arg = bias if bias is not None else buf
    if transpose_w and lora is None and M <= _cfg("gemv_rows"):
        cfg = _cfg("gemv")
        nf4_gemv_kernel[(M, triton.cdiv(C, cfg["BLOCK_C"]))](
            a, packed, absmax, code, bias_arg, buf, M, C, R, a.stride(0), a.stride(1), HAS_BIAS=bias is not None,
            BLOCKSIZE=blocksize, BLOCK_C=cfg["BLOCK_C"], BLOCK_R=cfg["BLOCK_R"], **dtypes, **launch_opts(cfg))
        return unstage(y, buf)
    stride_wr, stride_wc = (1, in_f) if transpose_w else (in_f, 1)
    if lora is None:
        lora_args, rl, lora_dt = (buf, buf, buf, 0, 0, 0, 0, 0.0), 16, a.dtype
        seed, threshold, keep_scale, dropout = 0, 0, 1.0, False
    else:
        rl, lora_dt = lora.lhs.shape[1], lora.dtype
        lora_args = (lora.lhs, lora.scale if lora.scale is not None else lora.lhs, lora.rhs, rl, lora.lhs.stride(0),
                     lora.stride_r, lora.stride_c, float(lora.alpha))
        seed, threshold, keep_scale, dropout = dropout_args(lora.dropout_p, lora.seed)
    cfg = _cfg("matmul_dropout" if dropout else "matmul")
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(C, cfg["BLOCK_C"]),)
    nf4_matmul_kernel[grid](
        a, packed, absmax, code, bias_arg, buf, M, C, R, a.stride(0), a.stride(1), stride_wr, stride_wc, *lora_args,
        seed, threshold, keep_scale, HAS_BIAS=bias is not None, BLOCKSIZE=blocksize, DOT_DTYPE=dot_dtype(a.dtype),
        PRECISION=precision(), HAS_LORA=lora is not None, HAS_LORA_SCALE=lora is not None and lora.scale is not None,
        LORA_DROPOUT=dropout, MASK_GROUPED=keep_mask_grouped(C), LORA_DOT_DTYPE=dot_dtype(lora_dt), BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
        BLOCK_R=cfg["BLOCK_R"], BLOCK_RL=lora_rank_chunk(rl, lora_dt), GROUP_M=cfg["GROUP_M"], **dtypes,
        **launch_opts(cfg))
    return unstage(y, buf)


@register("nf4_matmul", "triton")
def nf4_matmul(a, packed, absmax, code, blocksize: int, shape, weight_dtype, transpose_w: bool, bias=None):
    impl = torch_fallback("nf4_matmul", a)
    if impl is not None:
        return impl(a, packed, absmax, code, blocksize, shape, weight_dtype, transpose_w, bias)
    return matmul(a, packed, absmax, code, blocksize, shape, weight_dtype, transpose_w, bias)


@register("qlora_forward", "triton")
def qlora_forward(x, packed, absmax, code, blocksize: int, shape, weight_dtype, bias, lora_A, lora_B, rank_scale,
                  scaling: float, dropout_p: float, seed):
    """(y, h): the shrink kernel, then the NF4 matmul with bias and the LoRA expand in its epilogue."""
    impl = torch_fallback("qlora_forward", x, lora_A)
    if impl is not None:
        return impl(x, packed, absmax, code, blocksize, shape, weight_dtype, bias, lora_A, lora_B, rank_scale,
                    scaling, dropout_p, seed)
    h = lora_triton.shrink(x, lora_A, dropout_p, seed)
    term = LoRATerm(h, rank_scale, lora_B, lora_B.stride(1), lora_B.stride(0), scaling, h.dtype)
    return matmul(x, packed, absmax, code, blocksize, shape, weight_dtype, True, bias, term), h


@register("qlora_backward", "triton")
def qlora_backward(grad_y, x, packed, absmax, code, blocksize: int, shape, weight_dtype, lora_A, lora_B, rank_scale,
                   h, scaling: float, dropout_p: float, seed, compute_dx: bool):
    """The LoRA family's dB, dh and dA kernels, then the NF4 dgrad with drop'(dh A) in its epilogue."""
    impl = torch_fallback("qlora_backward", x, lora_A)
    if impl is not None:
        return impl(grad_y, x, packed, absmax, code, blocksize, shape, weight_dtype, lora_A, lora_B, rank_scale, h,
                    scaling, dropout_p, seed, compute_dx)
    dB = lora_triton.bwd_dB(grad_y, h, rank_scale, scaling)
    dh, de = lora_triton.bwd_dh(grad_y, lora_B, h, rank_scale, scaling)
    dA = lora_triton.bwd_dA(dh, x, h.dtype, dropout_p, seed)
    dx = None
    if compute_dx:
        term = LoRATerm(dh, None, lora_A, lora_A.stride(0), lora_A.stride(1), 1.0, h.dtype, dropout_p, seed)
        dx = matmul(grad_y, packed, absmax, code, blocksize, shape, weight_dtype, False, None, term)
    return dx, dA.to(lora_A.dtype), dB.to(lora_B.dtype), de.to(rank_scale.dtype) if de is not None else None


# ------------------------------------------------------------------------------------ ahead-of-time listing


def _aot_step() -> None:
    """QLoRA's kernels on a bf16 4096 x 4096 weight (blocksize 64, double quantization): quantize, dequantize, the
    NF4 matmul's forward with bias and dgrad at 1024 tokens, the GEMV of one decode token, and a QLoRA step with
    fp32 adapters of rank 16 and dropout."""
    from .function import NF4Tensor

    N, K, r, seed = 1024, 4096, 16, 12345
    code, code8 = nf4_code(), dynamic_code()
    w = torch.empty(K, K, dtype=torch.bfloat16)
    packed, absmax = quantize(w, 64, code)
    qabsmax, absmax2, offset = quantize_absmax(absmax, code8)
    q = NF4Tensor(packed, w.shape, w.dtype, 64, qabsmax=qabsmax, absmax2=absmax2, offset=offset, code=code,
                  code8=code8)
    dequantize_into(q, w.dtype)
    x, g, bias = torch.empty(N, K, dtype=w.dtype), torch.empty(N, K, dtype=w.dtype), torch.empty(K, dtype=w.dtype)
    nf4 = (packed, absmax, code, 64, (K, K), w.dtype)
    nf4_matmul(x, *nf4, True, bias)
    nf4_matmul(g, *nf4, False)
    nf4_matmul(x[:1], *nf4, True, bias)
    lora_A, lora_B = torch.empty(r, K), torch.empty(K, r)
    _, h = qlora_forward(x, *nf4, None, lora_A, lora_B, None, 2.0, 0.1, seed)
    qlora_backward(g, x, *nf4, lora_A, lora_B, None, h, 2.0, 0.1, seed, True)


AOT_SCENARIOS = {"bf16 weight, blocksize 64, double quant; QLoRA fp32 r16, dropout": _aot_step}  # peftkern._aot
