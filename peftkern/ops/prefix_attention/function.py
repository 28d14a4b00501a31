"""Prefix attention registered with torch.library (autograd + fake tensors), and the functional API."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _validate as V
from ...backend import get_backend, run
from .. import custom_op as custom_ops
from ..custom_op import cpu_form, custom_op
from . import torch_impl


@custom_op("peftkern::prefix_attention_forward")
def prefix_attention_forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                             key_padding_mask: Optional[Tensor], causal: bool,
                             scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return run("prefix_attention_forward", backend, q.device, q, k, v, prefix_k, prefix_v, key_padding_mask, causal,
               scale)


@prefix_attention_forward.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch_impl.compute_dtype(q))


@custom_op("peftkern::prefix_attention_backward")
def prefix_attention_backward(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                              key_padding_mask: Optional[Tensor], o: Tensor, lse: Tensor, causal: bool,
                              scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return run("prefix_attention_backward", backend, q.device, grad_o.contiguous(), q, k, v, prefix_k, prefix_v,
               key_padding_mask, o, lse, causal, scale)


@prefix_attention_backward.register_fake
def _(grad_o, q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, causal, scale, backend):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(prefix_k),
            torch.empty_like(prefix_v))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend


def _backward(ctx, grad_o, _grad_lse):
    q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse = ctx.saved_tensors
    grads = prefix_attention_backward(grad_o, q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, ctx.causal,
                                      ctx.scale, ctx.backend)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None, None, None)


prefix_attention_forward.register_autograd(_backward, setup_context=_setup_context)
prefix_attention_forward.register_autocast(("q", "k", "v", "prefix_k", "prefix_v"))


def _check(q, k, v, prefix_k, prefix_v, key_padding_mask, softmax_scale) -> tuple[float, Optional[str]]:
    """The checks of :func:`prefix_attention`; the softmax scale and the eager CPU form of the call's signature
    (:func:`cpu_form`; its composite is :func:`torch_impl.composite`, where :func:`torch_impl.composes`)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        V.tensor(name, t, ndim=4)
    B, Hq, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise ValueError(f"k must be [B, Hkv, S, D] = [{B}, Hkv, {S}, {D}] to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    V.shape("v", v, tuple(k.shape), "the shape of k")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q's {Hq} heads must be a multiple of k's {Hkv} heads (grouped-query attention)")
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        V.tensor(name, t)
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must be [Hkv, P, D] (shared) or [B, Hkv, P, D], got shape {tuple(t.shape)}")
    P = prefix_k.shape[-2]
    expected = (Hkv, P, D) if prefix_k.dim() == 3 else (B, Hkv, P, D)
    V.shape("prefix_k", prefix_k, expected, "[Hkv, P, D] or [B, Hkv, P, D]")
    V.shape("prefix_v", prefix_v, tuple(prefix_k.shape), "the shape of prefix_k")
    V.same_dtype("q", q, autocast=True, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    V.same_device("q", q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, key_padding_mask=key_padding_mask)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor [B, S] (True = padding), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        V.shape("key_padding_mask", key_padding_mask, (B, S), "[B, S], True = padding")
    if softmax_scale is not None:
        softmax_scale = V.number("softmax_scale", softmax_scale, low=0.0, low_open=True, high=None)
    return (D ** -0.5 if softmax_scale is None else softmax_scale), cpu_form(q)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, *, causal: bool = True,
                     key_padding_mask: Optional[Tensor] = None, softmax_scale: Optional[float] = None) -> Tensor:
    """Attention of q over P learned prefix keys/values followed by the S sequence keys, without concatenating them.

    q [B, Hq, S, D]; k, v [B, Hkv, S, D] (Hq a multiple of Hkv: GQA); prefix_k, prefix_v [Hkv, P, D] shared by the
    batch or [B, Hkv, P, D]. Query i sees every prefix key and, when ``causal``, the sequence keys j <= i;
    ``key_padding_mask`` [B, S] (True = padding) hides sequence keys. Gradients reach q, k, v and the prefix (a shared
    prefix's summed over the batch). What autograd keeps is O(B H S D): never the [S, P + S] attention matrix.
    An eager call on the CPU under "auto" takes the shortest path that computes the op's o and gradients bit for bit
    (:func:`cpu_form`): with neither autograd nor autocast torch's implementation itself; with autograd, at the
    sizes that concatenate, that path as PyTorch ops under PyTorch's own autograd (:func:`torch_impl.composite`).
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale, form = V.checked(_check, q, k, v, prefix_k, prefix_v, key_padding_mask, softmax_scale)
    backend = get_backend()
    if form is not None and backend == "auto" and custom_ops.eager(q):
        if form == "direct":
            return torch_impl.forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)[0]
        if torch_impl.composes(q, prefix_k.shape[-2]):
            return torch_impl.composite(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
    o, _ = prefix_attention_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, backend)
    return o
