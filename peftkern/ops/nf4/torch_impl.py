"""Eager PyTorch implementation of the NF4 ops (README.md): the CPU path, and any device without Triton.

On a CPU, quantize and dequantize run the C++ kernels of csrc/cpu when they are built (``peftkern._native.CPU``);
elsewhere, or without them, the vectorized PyTorch code below (the same bits either way).
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from ... import _native
from ...backend import register
from ..lora import torch_impl as lora_torch

# bitsandbytes' NF4 table (QLoRA: quantiles of N(0, 1), sorted, 0 at index 7)
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
NESTED_BLOCKSIZE = 256


def _cpu_library(t: torch.Tensor):
    """The csrc/cpu kernels for a CPU tensor, or None (not built, switched off, or another device)."""
    if not _native.USE_CPU_LIBRARY or t.device.type != "cpu" or _native.CPU.load_error() is not None:
        return None
    lib = _native.CPU.handle()
    if lib.pk_nf4_quantize_cpu.argtypes is None:
        p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        lib.pk_nf4_quantize_cpu.argtypes = [p, i32, i64, i64, p, p, p]
        lib.pk_nf4_dequantize_cpu.argtypes = [p, p, p, p, p, ctypes.c_float, i64, p, i64, i64, p, i32]
    return lib


@functools.lru_cache(maxsize=None)
def nf4_code(device: torch.device = torch.device("cpu")) -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def dynamic_code(device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map: for e = 0..6 the midpoints of 2^e + 1 linear steps over [0.1, 1]
    times 10^(e-6), both signs, then 0 and 1; sorted (256 values)."""
    values = [0.0, 1.0]
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (e - 6)) * means).tolist() + (-(10 ** (e - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _scaled_blocks(f: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s [blocks * blocksize] = clamp(f * (1 / absmax), -1, 1), zero past n; absmax [blocks] fp32) of flat fp32 f."""
    n = f.numel()
    blocks = -(-n // blocksize)
    x = F.pad(f, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = x.abs().amax(1)
    inv = torch.reciprocal(absmax.clamp_min(1e-38))  # rounded to fp32 before the product, as CUDA does
    return x.mul_(inv[:, None]).clamp_(-1.0, 1.0).view(-1), absmax


@register("nf4_quantize", "torch")
def quantize(w: torch.Tensor, blocksize: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [ceil(n/2), 1], absmax fp32 [ceil(n/blocksize)]) of any-shape w."""
    lib = _cpu_library(w)
    if lib is not None:
        w = w.contiguous()
        n = w.numel()
        packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
        absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
        code = code.contiguous()
        if lib.pk_nf4_quantize_cpu(w.data_ptr(), _native.CPU_DTYPES[w.dtype], n, blocksize, code.data_ptr(),
                                   packed.data_ptr(), absmax.data_ptr()) != 0:
            raise RuntimeError("pk_nf4_quantize_cpu refused its arguments")
        return packed, absmax
    f = w.reshape(-1).float() if w.dtype != torch.float32 else w.reshape(-1).clone()
    n = f.numel()
    s, absmax = _scaled_blocks(f, blocksize)
    mids = (code[:-1] + code[1:]) / 2
    # an odd count packs one more code: its s is the padding's 0 (blocksizes are even, so a padded block exists)
    q = torch.bucketize(s[: n + n % 2], mids, out_int32=True).to(torch.uint8).view(-1, 2)
    return (q[:, 0] << 4).bitwise_or_(q[:, 1]).view(-1, 1), absmax


@register("nf4_quantize_absmax", "torch")
def quantize_absmax(absmax: torch.Tensor, code8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (q uint8 [blocks], absmax2 fp32 [ceil(blocks/256)], offset fp32 0-d)."""
    offset = absmax.mean()
    n = absmax.numel()
    s, absmax2 = _scaled_blocks(absmax - offset, NESTED_BLOCKSIZE)
    s = s[:n]
    j = (torch.searchsorted(code8, s, right=True) - 1).clamp_(0, code8.numel() - 2)
    d_lo, d_hi = s - code8[j], code8[j + 1] - s
    tie = j + (j & 1)  # exact ties go to the even index
    q = torch.where(d_hi < d_lo, j + 1, torch.where(d_lo < d_hi, j, tie))
    return q.to(torch.uint8), absmax2, offset


def dequantize_absmax(q: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, code8: torch.Tensor,
                      nested_blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """absmax [blocks] fp32 = fp32(code8[q] * absmax2) + offset (two roundings)."""
    return _times_block_scale(code8[q.reshape(-1).long()], absmax2, nested_blocksize).add_(offset)


def _times_block_scale(v: torch.Tensor, scale: torch.Tensor, blocksize: int) -> torch.Tensor:
    """v [n] fp32 times scale[i // blocksize], in place where the blocks tile v exactly."""
    n = v.numel()
    full = n - n % blocksize
    out = v
    out[:full].view(-1, blocksize).mul_(scale[: full // blocksize, None])
    if full < n:
        out[full:].mul_(scale[full // blocksize])
    return out


def _byte_table(code: torch.Tensor) -> torch.Tensor:
    """[256, 2] fp32: the two code values (high nibble, low nibble) of every byte, built where ``code`` lives (reading
    the code back to key a cache would wait on the GPU every call)."""
    values = code.to(torch.float32)
    byte = torch.arange(256, device=code.device)
    return torch.stack([values[byte >> 4], values[byte & 0xF]], 1)


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, code: torch.Tensor, shape: tuple,
               dtype: torch.dtype) -> torch.Tensor:
    """w [shape] in dtype = dtype(fp32(code[q] * absmax[i // blocksize]))."""
    n = 1
    for d in shape:
        n *= d
    lib = _cpu_library(packed)
    if lib is not None:
        out = torch.empty(shape, dtype=dtype)
        packed, absmax, code = packed.contiguous(), absmax.contiguous(), code.contiguous()
        if lib.pk_nf4_dequantize_cpu(packed.data_ptr(), absmax.data_ptr(), None, None, None, 0.0, 0, code.data_ptr(),
                                     n, blocksize, out.data_ptr(), _native.CPU_DTYPES[dtype]) != 0:
            raise RuntimeError("pk_nf4_dequantize_cpu refused its arguments")
        return out
    table = _byte_table(code.to(packed.device))
    v = table[packed.reshape(-1).long()].view(-1)[:n]
    return _times_block_scale(v, absmax, blocksize).to(dtype).view(shape)


@register("nf4_dequantize", "torch")
def dequantize_nf4(q) -> torch.Tensor:
    """The weight an NF4Tensor stands for, in its dtype (the C++ kernel decodes a nested absmax on the fly)."""
    lib = _cpu_library(q.packed)
    if lib is None or not q.double_quant:
        return dequantize(q.packed, q.block_absmax(), q.blocksize, q.code, tuple(q.shape), q.dtype)
    out = torch.empty(tuple(q.shape), dtype=q.dtype)
    t = [x.contiguous() for x in (q.packed, q.qabsmax, q.absmax2, q.code8, q.code)]
    if lib.pk_nf4_dequantize_cpu(t[0].data_ptr(), None, t[1].data_ptr(), t[2].data_ptr(), t[3].data_ptr(),
                                 float(q.offset), q.nested_blocksize, t[4].data_ptr(), q.numel(), q.blocksize,
                                 out.data_ptr(), _native.CPU_DTYPES[q.dtype]) != 0:
        raise RuntimeError("pk_nf4_dequantize_cpu refused its arguments")
    return out


def _weight(packed, absmax, code, blocksize: int, shape, weight_dtype: torch.dtype, dtype: torch.dtype):
    """The dequantized weight in ``weight_dtype`` (bitsandbytes' values), then cast to the compute ``dtype``."""
    return dequantize(packed, absmax, blocksize, code, tuple(shape), weight_dtype).to(dtype)


_P, _I64, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_NF4_TOKEN = [_P, _P, _P, _P, _P, _P, _FLOAT, _I64, _P, _I64, _INT, _INT, _P, _P, _P, _P, _FLOAT, _I64, _I64, _I64,
              _INT, _P, _P]


def nf4_token(x, packed, absmax, code, blocksize: int, shape, weight_dtype: torch.dtype, bias, lora=None, *,
              nested=None, need_h: bool = True, out=None):
    """One token x [1, in] (fp32, fp16 or bf16, as its bias) through the NF4 weight and, given ``lora`` = (A, B,
    rank_scale, scaling) in fp32, its LoRA term, by csrc/cpu's kernel: y [1, out] in x's dtype (without ``lora``) or
    (y, h [1, r] fp32 or None without ``need_h``); None where it does not apply (the library missing, other dtypes,
    tensors not packed). Each row is decoded beside its dot product: the dequantized weight is never formed, and y's
    bits are those of :func:`peftkern.ops.lora.torch_impl.lora_token` over it (cast to x's dtype). ``nested`` =
    (qabsmax, absmax2, offset, code8, nested_blocksize) instead of ``absmax``: the block scales decoded inside.
    ``out``: the y (with ``lora``: the (y, h)) to write (tests poison them)."""
    fn = _native.cpu_function(x, "pk_nf4_token", _NF4_TOKEN)
    xdtype = _native.CPU_DTYPES.get(x.dtype)
    is_packed = _native.packed
    A, B, rank_scale, scaling = lora if lora is not None else (None, None, None, 0.0)
    if (fn is None or xdtype is None or not packed.is_contiguous()
            or not (is_packed(x, x.dtype) and is_packed(bias, x.dtype))
            or not (is_packed(A) and is_packed(B) and is_packed(rank_scale) and is_packed(code))):
        return None
    if nested is None:
        if not is_packed(absmax):
            return None
        qabsmax = absmax2 = code8 = None
        offset, nested_bs = 0.0, 0
    else:
        qabsmax, absmax2, offset, code8, nested_bs = nested
        if not (qabsmax.is_contiguous() and is_packed(absmax2) and is_packed(code8)):
            return None
        offset = float(offset)
    (o, i), r = shape, 0 if A is None else A.shape[0]
    if out is None:
        y, h = x.new_empty(1, o), A.new_empty(1, r) if A is not None and need_h else None
    else:
        y, h = (out, None) if lora is None else out
    ptr = _native.ptr
    if fn(x.data_ptr(), packed.data_ptr(), ptr(absmax), ptr(qabsmax), ptr(absmax2), ptr(code8), offset, nested_bs,
          code.data_ptr(), blocksize, _native.CPU_DTYPES[weight_dtype], xdtype, ptr(bias), ptr(A), ptr(B),
          ptr(rank_scale), scaling, i, o, r, torch.get_num_threads(), y.data_ptr(), ptr(h)) != 0:
        raise RuntimeError("pk_nf4_token refused its arguments")
    return y if lora is None else (y, h)


@register("nf4_matmul", "torch")
def nf4_matmul(a, packed, absmax, code, blocksize: int, shape, weight_dtype: torch.dtype, transpose_w: bool,
               bias=None):
    """``a deq(W)^T + bias`` ([N, in] -> [N, out]) when ``transpose_w``, else ``a deq(W)`` ([N, out] -> [N, in]);
    W [out, in] dequantized transiently (the CPU path: one dense GEMM beats dequantizing per tile here; one
    token: :func:`nf4_token`)."""
    if transpose_w and a.shape[0] == 1:
        y = nf4_token(a, packed, absmax, code, blocksize, shape, weight_dtype, bias)
        if y is not None:
            return y
    w = _weight(packed, absmax, code, blocksize, shape, weight_dtype, a.dtype)
    if not transpose_w:
        return a @ w
    return torch.nn.functional.linear(a, w, bias)


@register("qlora_forward", "torch")
def qlora_forward(x, packed, absmax, code, blocksize: int, shape, weight_dtype, bias, lora_A, lora_B, rank_scale,
                  scaling: float, dropout_p: float, seed):
    """(y, h) of LoRA over the NF4 base: the LoRA family's torch path on the transiently dequantized weight (one
    token without dropout: :func:`nf4_token`)."""
    if x.shape[0] == 1 and not dropout_p:
        out = nf4_token(x, packed, absmax, code, blocksize, shape, weight_dtype, bias,
                        (lora_A, lora_B, rank_scale, scaling))
        if out is not None:
            return out
    w = _weight(packed, absmax, code, blocksize, shape, weight_dtype, x.dtype)
    return lora_torch.lora_forward(x, w, bias, lora_A, lora_B, rank_scale, scaling, dropout_p, seed)


@register("qlora_backward", "torch")
def qlora_backward(grad_y, x, packed, absmax, code, blocksize: int, shape, weight_dtype, lora_A, lora_B, rank_scale,
                   h, scaling: float, dropout_p: float, seed, compute_dx: bool):
    """(dx or None, dA, dB, d_rank_scale or None); W is dequantized only when dx is needed."""
    w = _weight(packed, absmax, code, blocksize, shape, weight_dtype, x.dtype) if compute_dx else None
    return lora_torch.lora_backward(grad_y, x, w, lora_A, lora_B, rank_scale, h, scaling, dropout_p, seed, compute_dx)
