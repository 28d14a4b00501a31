"""LoRA ops registered with torch.library (autograd + fake tensors), and the functional API."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
from torch import Tensor

from ... import _validate as V
from ...backend import get_backend, run
from .. import custom_op as custom_ops
from ..custom_op import cpu_inference, custom_op, rows, unrows
from . import torch_impl


@custom_op("peftkern::lora_forward")
def lora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 rank_scale: Optional[Tensor], scaling: float, dropout_p: float,
                 seed: Optional[Tensor], promote_output: bool, backend: str) -> tuple[Tensor, Tensor]:
    """x [..., in] -> (y [..., out], h [N, r]) for the N rows of x."""
    y, h = run("lora_forward", backend, x.device, rows(x), weight, bias, lora_A, lora_B, rank_scale, scaling,
               dropout_p, seed_int(seed), promote_output)
    return unrows(y, x), h


@lora_forward.register_fake
def _(x, weight, bias, lora_A, lora_B, rank_scale, scaling, dropout_p, seed, promote_output, backend):
    ldt = torch_impl.lora_dtype(x, lora_A)
    return (x.new_empty(*x.shape[:-1], weight.shape[0], dtype=ldt if promote_output else x.dtype),
            x.new_empty(math.prod(x.shape[:-1]), lora_A.shape[0], dtype=ldt))


@custom_op("peftkern::lora_backward")
def lora_backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                  rank_scale: Optional[Tensor], h: Tensor, scaling: float, dropout_p: float,
                  seed: Optional[Tensor], compute_dx: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dA, dB, de = run("lora_backward", backend, x.device, rows(grad_y).contiguous(), rows(x), weight, lora_A,
                         lora_B, rank_scale, h, scaling, dropout_p, seed_int(seed), compute_dx)
    # custom ops return tensors only: empty ones stand for "not computed"
    return (unrows(dx, x) if dx is not None else x.new_empty(0), dA, dB,
            de if de is not None else lora_A.new_empty(0))


@lora_backward.register_fake
def _(grad_y, x, weight, lora_A, lora_B, rank_scale, h, scaling, dropout_p, seed, compute_dx, backend):
    return (torch.empty_like(x) if compute_dx else x.new_empty(0), torch.empty_like(lora_A),
            torch.empty_like(lora_B), torch.empty_like(rank_scale) if rank_scale is not None else lora_A.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, rank_scale, scaling, dropout_p, seed, _, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, rank_scale, output[1], seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend


def _backward(ctx, grad_y, _grad_h):
    x, weight, lora_A, lora_B, rank_scale, h, seed = ctx.saved_tensors
    dx, dA, dB, de = lora_backward(grad_y, x, weight, lora_A, lora_B, rank_scale, h, ctx.scaling,
                                   ctx.dropout_p, seed, ctx.needs_input_grad[0], ctx.backend)
    db = rows(grad_y).sum(0) if ctx.needs_input_grad[2] else None
    return (dx if ctx.needs_input_grad[0] else None, None, db, dA, dB,
            de if ctx.needs_input_grad[5] else None, None, None, None, None, None)


lora_forward.register_autograd(_backward, setup_context=_setup_context)
lora_forward.register_autocast(("x", "weight", "bias", "lora_A", "lora_B", "rank_scale"))


def seed_int(seed: Optional[Tensor]) -> Optional[int]:
    return None if seed is None else int(seed.item())


def new_seed() -> Tensor:
    """A 31-bit dropout seed from torch's CPU generator (``torch.manual_seed`` reproduces it)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


def _check_lora_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, rank_scale):
    V.tensor("x", x, min_ndim=1)
    V.tensor("weight", weight, ndim=2)
    V.same_dtype("x", x, autocast=True, weight=weight)
    V.same_device("x", x, weight=weight)
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError("weight must be frozen (requires_grad=False): the fused LoRA op computes no weight gradient")
    check_adapter_args(x, tuple(weight.shape), bias, lora_A, lora_B, scaling, dropout_p, rank_scale)
    return cpu_inference(x)


def check_adapter_args(x, weight_shape, bias, lora_A, lora_B, scaling, dropout_p, rank_scale):
    """The checks of everything but the base weight, whose [out, in] shape is ``weight_shape``."""
    V.tensor("x", x, min_ndim=1)
    V.tensor("lora_A", lora_A, ndim=2)
    V.tensor("lora_B", lora_B, ndim=2)
    out_f, in_f = weight_shape
    r = lora_A.shape[0]
    if r == 0:
        raise ValueError("lora_A has rank r=0; the rank must be >= 1")
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight expects {in_f} "
                         f"([out, in] = {tuple(weight_shape)})")
    V.shape("lora_A", lora_A, (r, in_f), "[r, in]")
    V.shape("lora_B", lora_B, (out_f, r), "[out, r]")
    V.same_dtype("x", x, autocast=True, bias=bias)
    V.same_dtype("lora_A", lora_A, autocast=True, lora_B=lora_B, rank_scale=rank_scale)
    V.same_device("x", x, bias=bias, lora_A=lora_A, lora_B=lora_B, rank_scale=rank_scale)
    if bias is not None:
        V.tensor("bias", bias, ndim=1)
        V.shape("bias", bias, (out_f,), "[out]")
    if rank_scale is not None:
        V.tensor("rank_scale", rank_scale)
        if rank_scale.dim() == 2 and rank_scale.shape[1] == 1:
            raise ValueError(f"rank_scale must be 1-D [r]={r}, got shape {tuple(rank_scale.shape)} (use .view(-1))")
        V.shape("rank_scale", rank_scale, (r,), "[r], one scale per rank")
    V.number("scaling", scaling)
    V.number("dropout_p", dropout_p, low=0.0, high=1.0)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                *, dropout_p: float = 0.0, training: bool = False, rank_scale: Optional[Tensor] = None) -> Tensor:
    """``y = x W^T + b + scaling * (dropout(x) A^T * rank_scale) B^T`` (PEFT layouts: A [r, in], B [out, r]).

    x has any leading shape; W is frozen; dropout applies only when ``training``; ``rank_scale`` [r] is
    AdaLoRA's per-rank scale and gets a gradient.
    """
    direct = V.checked(_check_lora_args, x, weight, bias, lora_A, lora_B, scaling, dropout_p, rank_scale)
    return _lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, rank_scale, False, direct)


def _lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, rank_scale, promote_output,
                 direct=False):
    """The op's output y; ``direct``: what :func:`cpu_inference` said of x's signature."""
    p = float(dropout_p) if training else 0.0
    seed = new_seed() if p > 0.0 else None
    backend = get_backend()
    if direct and backend == "auto" and custom_ops.eager(x):
        y = torch_impl.lora_forward(rows(x), weight, bias, lora_A, lora_B, rank_scale, float(scaling), p,
                                    seed_int(seed), promote_output, need_h=False)[0]
        return unrows(y, x)
    return lora_forward(x, weight, bias, lora_A, lora_B, rank_scale, float(scaling), p, seed, promote_output,
                        backend)[0]


def _check_dora_args(x, weight, lora_A, lora_B, scaling, magnitude, dropout_p) -> None:
    _check_lora_args(x, weight, None, lora_A, lora_B, scaling, dropout_p, None)
    V.tensor("magnitude", magnitude, ndim=1)
    V.shape("magnitude", magnitude, (weight.shape[0],), "[out]")


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                     weight_sq_norm: Optional[Tensor] = None) -> Tensor:
    """||W + s B A|| per output row, without materializing B A ([out], detached as in PEFT), in fp32 or fp64 (autocast
    off: the norm of a bf16-rounded B A would move every output's scale)."""
    # entered only where autocast is on: torch.autocast costs ~2 us a call
    off = torch.autocast(weight.device.type, enabled=False) if torch._C._is_any_autocast_enabled() else nullcontext()
    with torch.no_grad(), off:
        return torch_impl.dora_weight_norm(weight, lora_A, lora_B, float(scaling), weight_sq_norm)


def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                magnitude: Tensor, *, dropout_p: float = 0.0, training: bool = False,
                weight_sq_norm: Optional[Tensor] = None) -> Tensor:
    """DoRA: ``y = (magnitude / ||W + s B A||) * (x W^T + s drop(x) A^T B^T) + b``, the norm detached (PEFT).

    y is in x's dtype, or under ``torch.autocast`` in its dtype (as ``F.linear``'s); the norm is fp32.
    """
    V.checked(_check_dora_args, x, weight, lora_A, lora_B, scaling, magnitude, dropout_p)
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sq_norm)
    # the rescale happens in the LoRA dtype (fp32 adapters over a half base): its gradient reaches A, B unrounded
    y = _lora_linear(x, weight, None, lora_A, lora_B, scaling, dropout_p, training, None, True)
    y = (y * (magnitude / norm)).to(V.cast_dtype(x))
    return y if bias is None else y + bias.to(y.dtype)
