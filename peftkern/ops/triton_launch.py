"""Helpers shared by the families' Triton launchers (``ops/<family>/triton_impl.py``): dtypes, precision,
launch options, output buffers. Torch-side only; no kernel bodies here."""
from __future__ import annotations

import functools

import torch
import triton.language as tl

from ..backend import interpret_mode

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_dtype(dtype: torch.dtype):
    """tl.dot operand dtype for tensors of ``dtype``: itself, except bf16 under the interpreter (wrong there)."""
    if dtype == torch.bfloat16 and interpret_mode():
        return tl.float32
    return TL_DTYPES[dtype]


def precision() -> str:
    """fp32 tl.dot precision: TF32 only where PyTorch's own matmuls would use it."""
    matmul = torch.backends.cuda.matmul
    if not interpret_mode() and (matmul.allow_tf32 or getattr(matmul, "fp32_precision", None) == "tf32"):
        return "tf32"
    return "ieee"


def launch_opts(cfg: dict) -> dict:
    """The ``num_warps`` / ``num_stages`` of a config (the interpreter's configs carry none)."""
    return {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programs_wanted(device: torch.device) -> int:
    """How many programs fill the device: 4 per SM on a GPU; 2 under the interpreter, to exercise splitting."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2


def out_buffer(out, shape, dtype, device) -> torch.Tensor:
    """A new contiguous output, or the caller's ``out`` (tests pass NaN-poisoned ones) after checking it."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != torch.device(device) \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def staged(out: torch.Tensor) -> torch.Tensor:
    """The buffer a kernel writes ``out`` through: ``out`` itself, except bf16 under the interpreter, whose
    fp32 -> bf16 cast truncates (GPUs round to nearest even): there an fp32 copy of ``out`` (so poison in
    ``out`` survives where a kernel misses), copied back by :func:`unstage` with torch's rounding."""
    return out.to(torch.float32) if out.dtype == torch.bfloat16 and interpret_mode() else out


def unstage(out: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    return out if buf is out else out.copy_(buf)
