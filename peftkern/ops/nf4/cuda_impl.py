"""ctypes calls into the CUDA library (csrc/cuda/nf4.cu): the "cuda" backend of the NF4 ops.

The signatures and return conventions are torch_impl.py's. Each launcher runs on torch's current stream.
"""
from __future__ import annotations

import ctypes

import torch

from ... import _native
from ...backend import fallback, register
from .function import NF4Tensor
from .torch_impl import NESTED_BLOCKSIZE

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
GEMV_ROWS = 4  # the CUDA GEMV serves decode: up to this many token rows
_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_SIGNATURES = {
    "pk_nf4_quantize_cuda": [_P, _I32, _I64, _I64, _P, _P, _P],
    "pk_nf4_quantize_absmax_cuda": [_P, _I64, _P, _P, _P, _P],
    "pk_nf4_dequantize_cuda": [_P, _P, _P, _P, _P, _P, _I64, _P, _I64, _I64, _P, _I32],
    "pk_nf4_gemv_cuda": [_P, _I32, _I64, _I64, _P, _P, _P, _I64, _I64, _I64, _I32, _P, _P],
}


def _call(name: str, *args) -> None:
    _native.cuda_call(name, _SIGNATURES[name], *args)


def _ptr(t):
    return None if t is None else t.data_ptr()


@register("nf4_quantize", "cuda")
def quantize(w, blocksize: int, code):
    w = w.contiguous()
    n = w.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    _call("pk_nf4_quantize_cuda", w.data_ptr(), _DTYPES[w.dtype], n, blocksize, code.data_ptr(), packed.data_ptr(),
          absmax.data_ptr())
    return packed, absmax


@register("nf4_quantize_absmax", "cuda")
def quantize_absmax(absmax, code8):
    offset = absmax.mean()  # torch's mean, as bitsandbytes'
    blocks = absmax.numel()
    q = torch.empty(blocks, dtype=torch.uint8, device=absmax.device)
    absmax2 = torch.empty(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32, device=absmax.device)
    _call("pk_nf4_quantize_absmax_cuda", absmax.data_ptr(), blocks, offset.data_ptr(), code8.data_ptr(),
          q.data_ptr(), absmax2.data_ptr())
    return q, absmax2, offset


@register("nf4_dequantize", "cuda")
def dequantize(q: NF4Tensor) -> torch.Tensor:
    out = torch.empty(tuple(q.shape), dtype=q.dtype, device=q.device)
    offset = q.offset.reshape(1).float() if q.double_quant else None
    _call("pk_nf4_dequantize_cuda", q.packed.data_ptr(), _ptr(q.absmax), _ptr(q.qabsmax), _ptr(q.absmax2),
          _ptr(q.code8), _ptr(offset), q.nested_blocksize, q.code.data_ptr(), q.numel(), q.blocksize,
          out.data_ptr(), _DTYPES[q.dtype])
    return out


@register("nf4_matmul", "cuda")
def nf4_matmul(a, packed, absmax, code, blocksize: int, shape, weight_dtype, transpose_w: bool, bias=None):
    """The decode GEMV ``a deq(W)^T + bias`` for up to GEMV_ROWS rows of fp32/fp16/bf16 ``a``."""
    if not transpose_w or a.shape[0] > GEMV_ROWS or a.dtype not in _DTYPES:
        return fallback("nf4_matmul", f"the CUDA library's NF4 matmul is a forward GEMV for at most {GEMV_ROWS} "
                                      f"rows of fp32/fp16/bf16 (got {a.shape[0]} rows of {a.dtype}, "
                                      f"transpose_w={transpose_w})", ValueError, after="cuda", device=a.device)(
            a, packed, absmax, code, blocksize, shape, weight_dtype, transpose_w, bias)
    out_f, in_f = shape
    out = torch.empty((a.shape[0], out_f), dtype=a.dtype, device=a.device)
    if a.shape[0] == 0:
        return out
    a = a if a.stride(1) == 1 else a.contiguous()
    bias = None if bias is None else bias.contiguous()
    _call("pk_nf4_gemv_cuda", a.data_ptr(), _DTYPES[a.dtype], a.shape[0], a.stride(0), packed.data_ptr(),
          absmax.contiguous().data_ptr(), code.data_ptr(), blocksize, out_f, in_f, _DTYPES[weight_dtype], _ptr(bias),
          out.data_ptr())
    return out
