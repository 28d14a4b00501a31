"""The bottleneck adapter op registered with torch.library (autograd + fake tensors), and the functional API."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ... import _validate as V
from ...backend import get_backend, run
from .. import custom_op as custom_ops
from ..custom_op import cpu_form, custom_op, rows, unrows
from . import torch_impl
from .reference import ACTIVATIONS

ALIASES = {"swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


@custom_op("peftkern::adapter_forward")
def adapter_forward(h: Tensor, w_down: Tensor, b_down: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
                    activation: str, residual: bool, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    """h [..., D] -> (y [..., D], z [N, M]) for the N rows of h."""
    y, z = run("adapter_forward", backend, h.device, rows(h), w_down, b_down, w_up, b_up, activation, residual, scale)
    return unrows(y, h), z


@adapter_forward.register_fake
def _(h, w_down, b_down, w_up, b_up, activation, residual, scale, backend):
    return (torch.empty_like(h, memory_format=torch.contiguous_format),
            h.new_empty(math.prod(h.shape[:-1]), w_down.shape[0]))


@custom_op("peftkern::adapter_backward")
def adapter_backward(grad_y: Tensor, h: Tensor, z: Tensor, w_down: Tensor, w_up: Tensor, activation: str,
                     residual: bool, scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # grad_y in its own layout, as autograd hands it to the eager composite path (Triton's makes it contiguous)
    dh, *grads = run("adapter_backward", backend, h.device, rows(grad_y), rows(h), z, w_down, w_up, activation,
                     residual, scale)
    return unrows(dh, h), *grads


@adapter_backward.register_fake
def _(grad_y, h, z, w_down, w_up, activation, residual, scale, backend):
    return (torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(w_down),
            w_down.new_empty(w_down.shape[0]), torch.empty_like(w_up), w_up.new_empty(w_up.shape[0]))


def _setup_context(ctx, inputs, output):
    h, w_down, _, w_up, _, activation, residual, scale, backend = inputs
    ctx.save_for_backward(h, output[1], w_down, w_up)
    ctx.activation, ctx.residual, ctx.scale, ctx.backend = activation, residual, scale, backend


def _backward(ctx, grad_y, _grad_z):
    h, z, w_down, w_up = ctx.saved_tensors
    dh, dwd, dbd, dwu, dbu = adapter_backward(grad_y, h, z, w_down, w_up, ctx.activation, ctx.residual, ctx.scale,
                                                 ctx.backend)
    need = ctx.needs_input_grad
    return (dh if need[0] else None, dwd if need[1] else None, dbd if need[2] else None,
            dwu if need[3] else None, dbu if need[4] else None, None, None, None, None)


adapter_forward.register_autograd(_backward, setup_context=_setup_context)
adapter_forward.register_autocast(("h", "w_down", "b_down", "w_up", "b_up"))


def activation_name(activation: str) -> str:
    """The canonical name of ``activation`` (aliases: swish, gelu_new, gelu_pytorch_tanh); ValueError otherwise."""
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, got {type(activation).__name__}")
    name = ALIASES.get(activation.lower(), activation.lower())
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS) + sorted(ALIASES)}, got {activation!r}")
    return name


def bottleneck_adapter(h: Tensor, w_down: Tensor, b_down: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
                       activation: str = "relu", residual: bool = True, scale: float = 1.0) -> Tensor:
    """``[h +] scale * (act(h W_d^T + b_d) W_u^T + b_u)``: W_d [M, D], W_u [D, M], h [..., D]; one fused op whose
    autograd keeps only z = h W_d^T + b_d [..., M] beside h (README.md).

    An eager call on the CPU under "auto" takes the shortest path that computes the op's y and gradients bit for bit
    (:func:`_cpu_form`): with neither autograd nor autocast torch's implementation itself; with autograd at small
    sizes, that implementation under PyTorch's own autograd (:func:`torch_impl.composes`)."""
    name, form = V.checked(_check, h, w_down, b_down, w_up, b_up, activation, residual, scale)
    backend = get_backend()
    if form is not None and backend == "auto" and custom_ops.eager(h) and (form == "direct" or
                                                                          torch_impl.composes(h, w_down, w_up)):
        y = torch_impl.forward(rows(h), w_down, b_down, w_up, b_up, name, residual, float(scale))[0]
        return unrows(y, h)
    return adapter_forward(h, w_down, b_down, w_up, b_up, name, residual, float(scale), backend)[0]


def _cpu_form(h: Tensor, scale) -> Optional[str]:
    """:func:`cpu_form`, without ``"composite"`` where the scale is not 1 (scaling a gradient before or after a product
    rounds differently). From what :func:`V.checked` keys on, so decided once per signature."""
    form = cpu_form(h)
    return None if form == "composite" and scale != 1.0 else form


def _check(h, w_down, b_down, w_up, b_up, activation, residual, scale) -> tuple[str, Optional[str]]:
    """The checks of :func:`bottleneck_adapter`; the activation's canonical name and the eager CPU form of the call's
    signature (:func:`_cpu_form`)."""
    V.tensor("h", h, min_ndim=1)
    V.tensor("w_down", w_down, ndim=2)
    V.tensor("w_up", w_up, ndim=2)
    M, D = w_down.shape
    if M == 0:
        raise ValueError("w_down has 0 rows: the bottleneck must be at least 1 wide")
    if h.shape[-1] != D:
        raise ValueError(f"h has {h.shape[-1]} features in its last dim but w_down [M, D] expects D={D}")
    V.shape("w_up", w_up, (D, M), "[D, M]")
    for name, b, n in (("b_down", b_down, M), ("b_up", b_up, D)):
        if b is not None:
            V.tensor(name, b, ndim=1)
            V.shape(name, b, (n,), f"[{'M' if n == M else 'D'}]")
    V.same_dtype("h", h, autocast=True, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up)
    V.same_device("h", h, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up)
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
    V.number("scale", scale)
    return activation_name(activation), _cpu_form(h, scale)
