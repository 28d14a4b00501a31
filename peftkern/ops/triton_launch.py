"""Helpers shared by the families' Triton launchers (``ops/<family>/triton_impl.py``): dtypes, precision,
launch options, output buffers, rank chunks, dropout arguments, and what the kernels leave to another backend.
Torch-side only; the shared kernel bodies are in ``triton_blocks.py``."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backend import fallback, interpret_mode, registered

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# The rank chunk of ``lora_rank_expand`` (triton_blocks.py) per LoRA dtype on a GPU, spill-free on sm_80 / sm_90
# (peftkern._aot): fp32 LoRA dots run on FMA units and need the 16-wide chunk. The interpreter takes 16 for all.
LORA_MAX_BLOCK_R = {torch.float32: 16, torch.float16: 64, torch.bfloat16: 64}
LORA_RANK_TILE_MAX = 256  # the largest rank one program of the shrink, dA and dB kernels holds (lora_rank_tile)
FLOAT64 = "float64 tensors (the Triton kernels accumulate in fp32)"


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


def block_config(gpu, interpreter):
    """The launch configuration in force: ``gpu``, a family's tiles, warps and stages for a GPU (spill-free on
    sm_80 / sm_90 per ``peftkern._aot``), or ``interpreter`` under TRITON_INTERPRET: small tiles (the interpreter
    runs each program as numpy ops; at small test shapes they still cross several blocks, so every mask and loop
    runs), no warps or stages. The one place a launcher's configuration depends on the interpreter: the
    launchers pass both and carry no interpreter branch."""
    return interpreter if interpret_mode() else gpu


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


def bf16_cast_truncates() -> bool:
    """Whether the kernels' fp32 -> bf16 casts truncate: the interpreter's do (GPUs round to nearest even), so a
    kernel whose bf16 results must round as torch's does rounds by hand there (NF4's HAND_BF16) or writes
    through :func:`staged`."""
    return interpret_mode()


def staged(out: torch.Tensor) -> torch.Tensor:
    """The buffer a kernel writes ``out`` through: ``out`` itself, except bf16 under the interpreter, whose
    fp32 -> bf16 cast truncates (GPUs round to nearest even): there an fp32 copy of ``out`` (so poison in
    ``out`` survives where a kernel misses), copied back by :func:`unstage` with torch's rounding."""
    return out.to(torch.float32) if out.dtype == torch.bfloat16 and interpret_mode() else out


def unstage(out: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    return out if buf is out else out.copy_(buf)


def rank_chunk(r: int, cap: int) -> int:
    """Rank chunk a kernel holds in registers: a power of two >= 16 (tl.dot's minimum) covering ``r``, at most
    ``cap`` (larger ranks loop over chunks or add grid columns)."""
    return min(max(16, triton.next_power_of_2(r)), cap)


def lora_rank_chunk(r: int, lora_dtype: torch.dtype) -> int:
    """The BLOCK_R of a LoRA epilogue (``lora_rank_expand``) and of the LoRA rank kernels, capped per LoRA dtype."""
    return rank_chunk(r, 16 if interpret_mode() else LORA_MAX_BLOCK_R[lora_dtype])


def lora_rank_tile(r: int, lora_dtype: torch.dtype, tile: int, step: int) -> tuple[int, int, int]:
    """(BLOCK_R, tile, step) of the kernels that hold all of the rank in one accumulator, [tile, BLOCK_R] or
    [BLOCK_R, tile], reducing ``step`` rows or columns at a time (the shrink, dA and dB).

    BLOCK_R is the rank rounded up to a power of two >= 16, at most ``LORA_RANK_TILE_MAX`` (256; 32 under the
    interpreter, to exercise the grid's rank columns); the tile shrinks from ``tile`` to keep ``tile * BLOCK_R <=
    4096`` fp32 accumulators (32 a thread at 4 warps), and fp32 dots (FMA units, their operands in registers) also
    keep ``tile * BLOCK_R * step <= 65536``: spill-free on sm_80 / sm_90 up to rank 256 (peftkern._aot). One program
    then reads each x element once and draws its dropout mask once, where a grid over rank chunks draws it once per
    chunk."""
    block_r = rank_chunk(r, 32 if interpret_mode() else LORA_RANK_TILE_MAX)
    tile = max(16, min(tile, 4096 // block_r))
    if lora_dtype == torch.float32 and not interpret_mode():
        step = max(16, min(step, 65536 // (tile * block_r)))
    return block_r, tile, step


def dropout_args(p: float, seed) -> tuple[int, int, float, bool]:
    """(seed, threshold, keep scale, DROPOUT) kernel arguments of LoRA dropout with probability ``p``: an element is
    kept where its 16-bit draw is >= threshold = round(p * 2**16) (``triton_blocks.lora_keep_mask``), so
    P(keep) = 1 - threshold / 2**16, within 2**-17 of 1 - p (the torch path's rule)."""
    if p <= 0.0:
        return 0, 0, 1.0, False
    if seed is None:
        raise ValueError("dropout_p > 0 needs a seed")
    return int(seed), round(float(p) * (1 << 16)), 1.0 / (1.0 - float(p)), True


def keep_mask_grouped(n_cols: int) -> bool:
    """The GROUPED argument of ``lora_keep_mask`` for x with ``n_cols`` columns: one Philox call per 8 elements of a
    tile (rows of 8-aligned width), else one per element."""
    return n_cols % 8 == 0


def torch_fallback(op: str, *tensors, empty: bool = False):
    """The implementation serving ``op`` where the Triton kernels do not, else None: torch_impl's for an ``empty``
    problem (nothing to launch) and, for float64 ``tensors`` (None entries skipped), the next backend when "auto"
    chose (a backend named explicitly raises): the kernels accumulate in fp32."""
    if empty:
        return registered(op)["torch"]
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return fallback(op, FLOAT64)
    return None
