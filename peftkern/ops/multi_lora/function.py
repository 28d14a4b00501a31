"""Multi-adapter LoRA ops registered with torch.library (autograd + fake tensors), and the functional API."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ... import _validate as V
from ...backend import get_backend, run
from ..custom_op import custom_op
from . import torch_impl


def _check_ids_range(adapter_ids: Tensor, n: int) -> None:
    """adapter_ids in [-1, n): checked on the real tensor, before any kernel (a host sync for CUDA ids; skipped while
    a CUDA graph is being captured, where no sync is allowed)."""
    if adapter_ids.numel() == 0:
        return
    if adapter_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = torch.aminmax(adapter_ids)
    lo, hi = int(lo), int(hi)
    if lo < -1 or hi >= n:
        bad = lo if lo < -1 else hi
        raise ValueError(f"adapter_ids must lie in [-1, {n}) (-1 = base layer only, n = {n} adapters in lora_A), "
                         f"got {bad}")


@custom_op("peftkern::multi_lora_forward")
def multi_lora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                       scalings: Tensor, adapter_ids: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """x [B, S, in] -> (y [B, S, out], h [B, S, r]); adapter_ids [B] on the CPU or x's device."""
    _check_ids_range(adapter_ids, lora_A.shape[0])
    return run("multi_lora_forward", backend, x.device, x, weight, bias, lora_A, lora_B, scalings, adapter_ids)


@multi_lora_forward.register_fake
def _(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, backend):
    B, S, _ = x.shape
    return (x.new_empty(B, S, weight.shape[0]),
            x.new_empty(B, S, lora_A.shape[1], dtype=torch_impl.lora_dtype(x, lora_A)))


@custom_op("peftkern::multi_lora_backward")
def multi_lora_backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scalings: Tensor,
                        adapter_ids: Tensor, h: Tensor, compute_dx: bool,
                        compute_dlora: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dx, dA, dB = run("multi_lora_backward", backend, x.device, grad_y.contiguous(), x, weight, lora_A, lora_B,
                     scalings, adapter_ids, h, compute_dx, compute_dlora)
    # custom ops return tensors only: empty ones stand for "not computed"
    return (dx if dx is not None else x.new_empty(0), dA if dA is not None else lora_A.new_empty(0),
            dB if dB is not None else lora_B.new_empty(0))


@multi_lora_backward.register_fake
def _(grad_y, x, weight, lora_A, lora_B, scalings, adapter_ids, h, compute_dx, compute_dlora, backend):
    return (x.new_empty(x.shape) if compute_dx else x.new_empty(0),
            torch.empty_like(lora_A) if compute_dlora else lora_A.new_empty(0),
            torch.empty_like(lora_B) if compute_dlora else lora_B.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ctx.backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, scalings, adapter_ids, output[1])


def _backward(ctx, grad_y, _grad_h):
    x, weight, lora_A, lora_B, scalings, adapter_ids, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    compute_dx, compute_dlora = bool(need[0]), bool(need[3] or need[4])
    dx = dA = dB = None
    if compute_dx or compute_dlora:
        dx, dA, dB = multi_lora_backward(grad_y, x, weight, lora_A, lora_B, scalings, adapter_ids, h, compute_dx,
                                         compute_dlora, ctx.backend)
    db = grad_y.sum((0, 1)) if need[2] else None
    return (dx if need[0] else None, None, db, dA if need[3] else None, dB if need[4] else None, None, None, None)


multi_lora_forward.register_autograd(_backward, setup_context=_setup_context)
multi_lora_forward.register_autocast(("x", "weight", "bias", "lora_A", "lora_B"))


def _scalings_tensor(scalings, n: int, x: Tensor, dtype: torch.dtype) -> Tensor:
    if isinstance(scalings, Tensor):
        V.tensor("scalings", scalings, ndim=1)
        V.shape("scalings", scalings, (n,), "[n], one scaling per adapter")
        if scalings.device.type != "cpu" and scalings.device != x.device:
            raise ValueError(f"scalings is on {scalings.device} but x is on {x.device}")
        return scalings.detach()
    if not isinstance(scalings, (list, tuple)):
        raise TypeError(f"scalings must be a torch.Tensor or a list of floats, got {type(scalings).__name__}")
    if len(scalings) != n:
        raise ValueError(f"scalings must hold one value per adapter ({n}, from lora_A [n, r, in]), got {len(scalings)}")
    for i, s in enumerate(scalings):
        V.number(f"scalings[{i}]", s)
    return torch.tensor([float(s) for s in scalings], dtype=dtype)


def _adapter_ids_tensor(adapter_ids, batch: int, n: int, x: Tensor) -> Tensor:
    if isinstance(adapter_ids, Tensor):
        dt = adapter_ids.dtype
        if dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise TypeError(f"adapter_ids must be an integer tensor (int64/int32/...), got {adapter_ids.dtype}")
        if adapter_ids.dim() != 1:
            raise ValueError(f"adapter_ids must be 1-D [batch], got shape {tuple(adapter_ids.shape)}")
        if adapter_ids.device.type != "cpu" and adapter_ids.device != x.device:
            raise ValueError(f"adapter_ids is on {adapter_ids.device} but x is on {x.device}")
        ids = adapter_ids
    elif isinstance(adapter_ids, (list, tuple)):
        for i, a in enumerate(adapter_ids):
            if isinstance(a, bool) or not isinstance(a, numbers.Integral):
                raise TypeError(f"adapter_ids must hold ints, got {type(a).__name__} at position {i}")
            if not -1 <= int(a) < n:
                raise ValueError(f"adapter_ids must lie in [-1, {n}) (-1 = base layer only, n = {n} adapters in "
                                 f"lora_A), got {int(a)} at position {i}")
        ids = torch.tensor([int(a) for a in adapter_ids], dtype=torch.int64)
    else:
        raise TypeError(f"adapter_ids must be an integer torch.Tensor or a list of ints, "
                        f"got {type(adapter_ids).__name__}")
    if ids.numel() != batch:
        raise ValueError(f"adapter_ids must hold one id per sequence: x has batch {batch}, "
                         f"adapter_ids has {ids.numel()}")
    return ids


def _check_args(x, weight, bias, lora_A, lora_B, scalings, adapter_ids) -> tuple[Tensor, Tensor]:
    """The checks of :func:`multi_lora_linear`; scalings and adapter_ids as tensors."""
    V.checked(_check_tensors, x, weight, bias, lora_A, lora_B)
    sdt = torch.float64 if torch_impl.lora_dtype(x, lora_A) == torch.float64 else torch.float32
    n = lora_A.shape[0]
    return _scalings_tensor(scalings, n, x, sdt), _adapter_ids_tensor(adapter_ids, x.shape[0], n, x)


def _check_tensors(x, weight, bias, lora_A, lora_B) -> None:
    V.tensor("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [batch, seq, in] or [batch, in], got shape {tuple(x.shape)}")
    V.tensor("weight", weight, ndim=2)
    V.tensor("lora_A", lora_A, ndim=3)
    V.tensor("lora_B", lora_B, ndim=3)
    out_f, in_f = weight.shape
    n, r = lora_A.shape[0], lora_A.shape[1]
    if n == 0:
        raise ValueError("lora_A holds no adapter (n = 0); stack at least one: [n, r, in]")
    if r == 0:
        raise ValueError("lora_A has rank r=0; the rank must be >= 1")
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight expects {in_f} "
                         f"([out, in] = {tuple(weight.shape)})")
    V.shape("lora_A", lora_A, (n, r, in_f), "[n, r, in]")
    V.shape("lora_B", lora_B, (n, out_f, r), "[n, out, r]")
    if bias is not None:
        V.tensor("bias", bias, ndim=1)
        V.shape("bias", bias, (out_f,), "[out]")
    V.same_dtype("x", x, autocast=True, weight=weight, bias=bias)
    V.same_dtype("lora_A", lora_A, autocast=True, lora_B=lora_B)
    V.same_device("x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError("weight must be frozen (requires_grad=False): the multi-LoRA op computes no weight gradient")


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                      scalings: Union[Tensor, Sequence[float]], adapter_ids: Union[Tensor, Sequence[int]]) -> Tensor:
    """Several LoRA adapters over one frozen linear layer, one adapter per sequence (Punica/S-LoRA SGMV).

    ``y_b = x_b W^T + b + scalings[a] * (x_b lora_A[a]^T) lora_B[a]^T`` with ``a = adapter_ids[b]``; ``a = -1``
    means the base layer alone. x [batch, seq, in] or [batch, in]; weight [out, in] (frozen); bias [out] or None;
    lora_A [n, r, in]; lora_B [n, out, r]; scalings [n] (tensor or floats, no gradient); adapter_ids [batch] ints
    in [-1, n) (a CPU tensor or list avoids a device sync for the range check). Gradients flow to x, lora_A, lora_B
    (an adapter gets only its own sequences' gradient, zero when unused) and a trainable bias. Adapters may be fp32
    over a half-precision base (the LoRA path then runs in fp32, the output is in x's dtype).
    """
    scal, ids = _check_args(x, weight, bias, lora_A, lora_B, scalings, adapter_ids)
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    y, _ = multi_lora_forward(x3, weight, bias, lora_A, lora_B, scal, ids, get_backend())
    return y if x.dim() == 3 else y.squeeze(1)
