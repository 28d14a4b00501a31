"""Triton launchers of the NF4 ops: allocate outputs, choose blocks, launch (kernels: triton_kernels.py).

The registered ops have the signatures and return conventions of torch_impl.py. ``AOT_SCENARIOS`` are the launches
``peftkern kernels`` compiles (``peftkern._aot``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton

from ...backend import register
from ..lora import triton_impl as lora_triton
from ..triton_launch import (TL_DTYPES, bf16_cast_truncates, block_config, dot_dtype, dropout_args, keep_mask_grouped,
                             launch_opts, lora_rank_chunk, out_buffer, precision, staged, torch_fallback, unstage)
from .torch_impl import NESTED_BLOCKSIZE, dynamic_code, nf4_code
from .triton_kernels import (nf4_dequantize_kernel, nf4_gemv_kernel, nf4_matmul_kernel, nf4_quantize_absmax_kernel,
                             nf4_quantize_kernel)

# Above this many rows of activations W is dequantized once (the dequantize kernel) and multiplied by a dense
# GEMM: cuBLAS for a plain NF4 matmul, the LoRA family's fused kernels for QLoRA; below, W is decoded in registers
# tile by tile (README.md "Roofline": a decode pass over W costs ~11 instructions a weight, once per 32-row tile;
# dequantizing costs 2.56 bytes of traffic a weight and the dense GEMM reads 2 more: equal near 128 rows).
DEQUANTIZE_ROWS = 128
# GPU defaults: element-wise kernels 1-4K elements per program, 4 warps. The in-register matmul: 16 or 32 rows
# (BLOCK_M from the rows; more rows take more row tiles, each decoding W again: 64-row tiles spill or, as the dot's
# second dimension, make the warps split it and each decode all of W); its products run transposed (W the dot's
# first operand) with 32 of W's rows per step in that slot (the forward's output features; the dgrad's even or odd
# half of 64 input features), so the 2 warps split W between them, and 64 (32 in the dgrad) reduction steps: 128
# programs on a 4096-wide layer, ~11 (8) PTX instructions a decoded weight. The GEMV serves up to 4 token rows in
# one program per 16 output features x 256 inputs (256 programs on a 4096-wide layer, ~11 instructions a weight).
_GPU = {
    "dequantize": dict(BLOCK=1024, num_warps=4, num_stages=1),
    "quantize_elements": 2048,
    "quantize": dict(num_warps=4, num_stages=1),
    "absmax": dict(num_warps=4, num_stages=1),
    "matmul": dict(BLOCK_C=32, BLOCK_R=64, GROUP_M=8, num_warps=2, num_stages=3),
    "matmul_dgrad": dict(BLOCK_C=64, BLOCK_R=32, GROUP_M=8, num_warps=2, num_stages=3),
    "matmul_rows": 32,
    "gemv": dict(BLOCK_C=16, BLOCK_R=256, num_warps=4, num_stages=2),
    "gemv_rows": 4,
}
# fp32 activations (the dots on FMA units at ``precision()`` "ieee", operands in registers): the dgrad with QLoRA's
# LoRA term spills 52-100 B at 2 warps on sm_80/sm_90; 4 warps hold it in 128 registers.
_GPU_FP32 = {"matmul_dgrad": dict(_GPU["matmul_dgrad"], num_warps=4)}
# The interpreter runs each program as numpy ops: small tiles still exercise every mask and loop (64-wide tiles
# of W's columns span two 32-blocks, so both absmax paths of nf4_tile run).
_INTERPRET = {
    "dequantize": dict(BLOCK=256), "quantize_elements": 256, "quantize": {}, "absmax": {},
    "matmul": dict(BLOCK_C=32, BLOCK_R=64, GROUP_M=2), "matmul_dgrad": dict(BLOCK_C=64, BLOCK_R=32, GROUP_M=2),
    "matmul_rows": 32, "gemv": dict(BLOCK_C=16, BLOCK_R=64), "gemv_rows": 4,
}


def _cfg(name: str, dtype: torch.dtype | None = None):
    """The configuration ``name`` for activations of ``dtype``."""
    return block_config(dict(_GPU, **_GPU_FP32) if dtype == torch.float32 else _GPU, _INTERPRET)[name]


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


def _dequantize(w, packed, code, blocksize: int, *, absmax=None, nested=None) -> torch.Tensor:
    """w (contiguous, any shape, its dtype) <- the NF4 weight, one launch: ``absmax`` fp32 per block, or ``nested`` =
    (qabsmax, absmax2, offset, code8, nested_blocksize) decoded on the fly."""
    n = w.numel()
    cfg = _cfg("dequantize")
    buf = staged(w)
    first = packed  # stands in for the pointers a variant does not read
    qabsmax, absmax2, offset, code8, nested_bs = nested if nested is not None else (first, first, first, code,
                                                                                     NESTED_BLOCKSIZE)
    nf4_dequantize_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](
        packed, absmax if absmax is not None else first, qabsmax, absmax2, offset, code, code8, buf, n,
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_bs, DOUBLE_QUANT=nested is not None, BLOCK=cfg["BLOCK"],
        enable_fp_fusion=False, **launch_opts(cfg))  # code8[q] * absmax2 + offset rounds twice, as bitsandbytes'
    return unstage(w, buf)


def dequantize_into(q, dtype: torch.dtype, *, out=None) -> torch.Tensor:
    """q's weight in ``dtype`` (bitsandbytes' values), one launch, the nested absmax decoded on the fly."""
    w = out_buffer(out, tuple(q.shape), dtype, q.device)
    if q.double_quant:
        return _dequantize(w, q.packed, q.code, q.blocksize,
                           nested=(q.qabsmax, q.absmax2, q.offset, q.code8, q.nested_blocksize))
    return _dequantize(w, q.packed, q.code, q.blocksize, absmax=q.absmax)


def dense_weight(packed, absmax, code, blocksize: int, shape, weight_dtype: torch.dtype,
                 dtype: torch.dtype) -> torch.Tensor:
    """W [out, in] dequantized to ``weight_dtype`` (bitsandbytes' values), then cast to the compute ``dtype``: the
    transient operand of the dense GEMM above ``DEQUANTIZE_ROWS`` rows (as the torch path and bitsandbytes do)."""
    w = torch.empty(tuple(shape), dtype=weight_dtype, device=packed.device)
    return _dequantize(w, packed, code, blocksize, absmax=absmax).to(dtype)


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
    """``a deq(W)^T + bias`` or ``a deq(W)`` (+ ``lora``), W decoded tile by tile in registers (the ops send more
    than ``DEQUANTIZE_ROWS`` rows to :func:`dense_weight` and a dense GEMM); the GEMV for a few rows of a plain
    forward."""
    out_f, in_f = shape
    M = a.shape[0]
    C, R = (out_f, in_f) if transpose_w else (in_f, out_f)
    y = out_buffer(out, (M, C), a.dtype, a.device)
    if M == 0:
        return y
    buf = staged(y)
    decode = dict(BLOCKSIZE=blocksize, ALIGNED=in_f % blocksize == 0, W_DTYPE=TL_DTYPES[weight_dtype],
                  X_DTYPE=TL_DTYPES[a.dtype], HAND_BF16=bf16_cast_truncates())
    bias_arg = bias if bias is not None else buf
    if transpose_w and lora is None and M <= _cfg("gemv_rows"):
        cfg = _cfg("gemv")
        nf4_gemv_kernel[(triton.cdiv(C, cfg["BLOCK_C"]),)](
            a, packed, absmax, code, bias_arg, buf, M, C, R, a.stride(0), a.stride(1), HAS_BIAS=bias is not None,
            ROWS=triton.next_power_of_2(M), BLOCK_C=cfg["BLOCK_C"], BLOCK_R=cfg["BLOCK_R"], **decode,
            **launch_opts(cfg))
        return unstage(y, buf)
    if lora is None:
        lora_args, rl, lora_dt = (buf, buf, buf, 0, 0, 0, 0, 0.0), 16, a.dtype
        seed, threshold, keep_scale, dropout = 0, 0, 1.0, False
    else:
        rl, lora_dt = lora.lhs.shape[1], lora.dtype
        lora_args = (lora.lhs, lora.scale if lora.scale is not None else lora.lhs, lora.rhs, rl, lora.lhs.stride(0),
                     lora.stride_r, lora.stride_c, float(lora.alpha))
        seed, threshold, keep_scale, dropout = dropout_args(lora.dropout_p, lora.seed)
    cfg = _cfg("matmul" if transpose_w else "matmul_dgrad", a.dtype)
    block_m = min(max(16, triton.next_power_of_2(M)), _cfg("matmul_rows"))
    block_rl = min(lora_rank_chunk(rl, lora_dt), 32)  # 64-rank chunks spill the 2-warp programs
    grid = (triton.cdiv(M, block_m) * triton.cdiv(C, cfg["BLOCK_C"]),)
    nf4_matmul_kernel[grid](
        a, packed, absmax, code, bias_arg, buf, M, C, R, a.stride(0), a.stride(1), *lora_args, seed, threshold,
        keep_scale, HAS_BIAS=bias is not None, TRANSPOSE_W=transpose_w, DOT_DTYPE=dot_dtype(a.dtype),
        PRECISION=precision(), HAS_LORA=lora is not None, HAS_LORA_SCALE=lora is not None and lora.scale is not None,
        LORA_DROPOUT=dropout, MASK_GROUPED=keep_mask_grouped(C), LORA_DOT_DTYPE=dot_dtype(lora_dt), BLOCK_M=block_m,
        BLOCK_C=cfg["BLOCK_C"], BLOCK_R=cfg["BLOCK_R"], BLOCK_RL=block_rl, GROUP_M=cfg["GROUP_M"], **decode,
        **launch_opts(cfg))
    return unstage(y, buf)


@register("nf4_matmul", "triton")
def nf4_matmul(a, packed, absmax, code, blocksize: int, shape, weight_dtype, transpose_w: bool, bias=None):
    impl = torch_fallback("nf4_matmul", a)
    if impl is not None:
        return impl(a, packed, absmax, code, blocksize, shape, weight_dtype, transpose_w, bias)
    if a.shape[0] > DEQUANTIZE_ROWS:
        w = dense_weight(packed, absmax, code, blocksize, shape, weight_dtype, a.dtype)
        return F.linear(a, w, bias) if transpose_w else a @ w
    return matmul(a, packed, absmax, code, blocksize, shape, weight_dtype, transpose_w, bias)


@register("qlora_forward", "triton")
def qlora_forward(x, packed, absmax, code, blocksize: int, shape, weight_dtype, bias, lora_A, lora_B, rank_scale,
                  scaling: float, dropout_p: float, seed):
    """(y, h): the shrink kernel, then the NF4 matmul with bias and the LoRA expand in its epilogue (above
    ``DEQUANTIZE_ROWS`` rows the LoRA family's forward kernel on the dequantized weight)."""
    impl = torch_fallback("qlora_forward", x, lora_A)
    if impl is not None:
        return impl(x, packed, absmax, code, blocksize, shape, weight_dtype, bias, lora_A, lora_B, rank_scale,
                    scaling, dropout_p, seed)
    h = lora_triton.shrink(x, lora_A, dropout_p, seed)
    if x.shape[0] > DEQUANTIZE_ROWS:
        w = dense_weight(packed, absmax, code, blocksize, shape, weight_dtype, x.dtype)
        return lora_triton.fwd(x, w, bias, h, rank_scale, lora_B, scaling), h
    term = LoRATerm(h, rank_scale, lora_B, lora_B.stride(1), lora_B.stride(0), scaling, h.dtype)
    return matmul(x, packed, absmax, code, blocksize, shape, weight_dtype, True, bias, term), h


@register("qlora_backward", "triton")
def qlora_backward(grad_y, x, packed, absmax, code, blocksize: int, shape, weight_dtype, lora_A, lora_B, rank_scale,
                   h, scaling: float, dropout_p: float, seed, compute_dx: bool):
    """The LoRA family's dB, dh and dA kernels, then the NF4 dgrad with drop'(dh A) in its epilogue (above
    ``DEQUANTIZE_ROWS`` rows the LoRA family's dgrad kernel on the dequantized weight)."""
    impl = torch_fallback("qlora_backward", x, lora_A)
    if impl is not None:
        return impl(grad_y, x, packed, absmax, code, blocksize, shape, weight_dtype, lora_A, lora_B, rank_scale, h,
                    scaling, dropout_p, seed, compute_dx)
    dB = lora_triton.bwd_dB(grad_y, h, rank_scale, scaling)
    dh, de = lora_triton.bwd_dh(grad_y, lora_B, h, rank_scale, scaling)
    dA = lora_triton.bwd_dA(dh, x, h.dtype, dropout_p, seed)
    dx = None
    if compute_dx and grad_y.shape[0] > DEQUANTIZE_ROWS:
        w = dense_weight(packed, absmax, code, blocksize, shape, weight_dtype, grad_y.dtype)
        dx = lora_triton.bwd_dx(grad_y, w, dh, lora_A, h.dtype, dropout_p, seed)
    elif compute_dx:
        term = LoRATerm(dh, None, lora_A, lora_A.stride(0), lora_A.stride(1), 1.0, h.dtype, dropout_p, seed)
        dx = matmul(grad_y, packed, absmax, code, blocksize, shape, weight_dtype, False, None, term)
    return dx, dA.to(lora_A.dtype), dB.to(lora_B.dtype), de.to(rank_scale.dtype) if de is not None else None


# ------------------------------------------------------------------------------------ ahead-of-time listing


def _aot_step() -> None:
    """QLoRA's kernels on a bf16 4096 x 4096 weight (blocksize 64, double quantization): quantize, dequantize, the
    in-register NF4 matmul's forward with bias and dgrad at 128 tokens (its largest row tile), the GEMV of 3 decode
    tokens (its largest row count), and QLoRA steps with fp32 adapters of rank 16 and dropout at 128 tokens
    (in-register, the LoRA epilogue) and 1024 tokens (the weight dequantized, the LoRA family's kernels)."""
    from .function import NF4Tensor

    K = 4096
    code, code8 = nf4_code(), dynamic_code()
    w = torch.empty(K, K, dtype=torch.bfloat16)
    packed, absmax = quantize(w, 64, code)
    qabsmax, absmax2, offset = quantize_absmax(absmax, code8)
    q = NF4Tensor(packed, w.shape, w.dtype, 64, qabsmax=qabsmax, absmax2=absmax2, offset=offset, code=code,
                  code8=code8)
    dequantize_into(q, w.dtype)
    bias = torch.empty(K, dtype=w.dtype)
    nf4 = (packed, absmax, code, 64, (K, K), w.dtype)
    x, g = torch.empty(DEQUANTIZE_ROWS, K, dtype=w.dtype), torch.empty(DEQUANTIZE_ROWS, K, dtype=w.dtype)
    nf4_matmul(x, *nf4, True, bias)
    nf4_matmul(g, *nf4, False)
    nf4_matmul(x[:3], *nf4, True, bias)
    for n in (DEQUANTIZE_ROWS, 1024):
        _aot_qlora(nf4, n)


def _aot_qlora(nf4: tuple, n: int) -> None:
    """A QLoRA step on ``n`` tokens in the weight's dtype over ``nf4`` (packed, absmax, code, blocksize, shape,
    weight dtype), fp32 adapters of rank 16 and dropout."""
    K, r, seed = nf4[4][1], 16, 12345
    lora_A, lora_B = torch.empty(r, K), torch.empty(nf4[4][0], r)
    x, g = torch.empty(n, K, dtype=nf4[5]), torch.empty(n, nf4[4][0], dtype=nf4[5])
    _, h = qlora_forward(x, *nf4, None, lora_A, lora_B, None, 2.0, 0.1, seed)
    qlora_backward(g, x, *nf4, lora_A, lora_B, None, h, 2.0, 0.1, seed, True)


def _aot_fp32_step() -> None:
    """An fp32 model's QLoRA step at 128 tokens (in-register, fp32 activations: _GPU_FP32's tiles)."""
    w, code = torch.empty(4096, 4096), nf4_code()
    _aot_qlora((*quantize(w, 64, code), code, 64, tuple(w.shape), w.dtype), DEQUANTIZE_ROWS)


AOT_SCENARIOS = {"bf16 weight, blocksize 64, double quant; QLoRA fp32 r16, dropout": _aot_step,  # peftkern._aot
                 "fp32 weight and activations, QLoRA fp32 r16, dropout": _aot_fp32_step}
