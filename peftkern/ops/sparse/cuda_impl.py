"""ctypes calls into the CUDA library (csrc/cuda/sparse.cu): the "cuda" backend of the sparse merge ops.

The signatures and return conventions are torch_impl.py's. Each launcher runs on torch's current stream.
"""
from __future__ import annotations

import ctypes

import torch

from ... import _native
from ...backend import fallback, register

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_SIGNATURES = {
    "pk_sparse_scatter_add_cuda": [_P, _I32, _P, _P, _I64, ctypes.c_float],
    "pk_sparse_gather_cuda": [_P, _I32, _P, _I64, _P],
}


def _call(name: str, *args) -> None:
    _native.cuda_call(name, _SIGNATURES[name], *args)


@register("sparse_scatter_add", "cuda")
def scatter_add_(flat, indices, values, alpha: float) -> None:
    if flat.dtype not in _DTYPES or values.dtype == torch.float64:
        return fallback("sparse_scatter_add", f"{flat.dtype} weights or {values.dtype} values (the CUDA kernel "
                                              f"takes fp32/fp16/bf16 weights, values read as fp32)",
                        after="cuda", device=flat.device)(flat, indices, values, alpha)
    idx = indices.to(torch.int64).contiguous()
    vals = values.to(torch.float32).contiguous()
    _call("pk_sparse_scatter_add_cuda", flat.data_ptr(), _DTYPES[flat.dtype], idx.data_ptr(), vals.data_ptr(),
          idx.numel(), float(alpha))
    return None


@register("sparse_gather", "cuda")
def gather(flat, indices):
    if flat.element_size() not in (2, 4):
        return fallback("sparse_gather", f"{flat.dtype} (the CUDA kernel copies 2- or 4-byte elements)",
                        after="cuda", device=flat.device)(flat, indices)
    idx = indices.to(torch.int64).contiguous()
    out = torch.empty(idx.numel(), dtype=flat.dtype, device=flat.device)
    _call("pk_sparse_gather_cuda", flat.data_ptr(), flat.element_size(), idx.data_ptr(), idx.numel(),
          out.data_ptr())
    return out
