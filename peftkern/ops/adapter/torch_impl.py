"""Eager PyTorch implementation of the bottleneck adapter (any device): two addmm's per direction, the activation's
derivative recomputed from z (README.md). Registered as the "torch" backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...backend import register
from .reference import ACTIVATIONS

FOLD_MIN = 1 << 16  # elements of h from which b_u folds into W_u's GEMMs (_folds)
NATIVE_GELU_MAX = 1 << 14  # elements of z below which GELU and its derivative run ATen's own kernel (_native_gelu)
COMPOSITE_MAX = 1 << 13  # elements of h up to which eager CPU calls with grad run under PyTorch's autograd (composes)


def _scaled(t: Tensor, scale: float) -> Tensor:
    """``t * scale``, ``t`` itself for a scale of 1 (exact either way; at the smallest shapes a scalar multiply costs
    as much as a matmul)."""
    return t if scale == 1.0 else t * scale


def _folds(h: Tensor) -> bool:
    """Whether b_u rides in W_u's GEMMs as a column against ones (``[a | 1] [W_u | b_u]^T``): the forward adds h, b_u
    and the product in one addmm, the backward gets db_u with dW_u, each a pass over [N, D] less (bf16 2048 x 768,
    M 48, here: forward 2.6 -> 2.1 ms, dW_u + db_u 1.5 -> 1.3 ms). Below FOLD_MIN elements of h the few extra small
    ops cost more than the pass."""
    return h.numel() >= FOLD_MIN


def _with_ones(a: Tensor) -> Tensor:
    """[a | 1]: [N, M + 1]."""
    out = a.new_empty(a.shape[0], a.shape[1] + 1)
    out[:, -1] = 1
    out[:, :-1] = a
    return out


def _native_gelu(z: Tensor) -> bool:
    """Whether exact GELU on ``z`` [N, M] runs through :func:`_strided`: ATen hands a contiguous fp32 / bf16 CPU
    GELU and its backward to oneDNN, whose per-call setup dominates small ones (1 x 16: 7.1 us, ATen's own
    vectorized kernel 1.2 us; backward 16 x 8: 15 vs 4 us, here), and takes its own kernel for a strided tensor. From
    NATIVE_GELU_MAX elements on oneDNN is faster (2048 x 48: 59 vs 76 us). Either computes the exact erf form."""
    return z.device.type == "cpu" and z.numel() < NATIVE_GELU_MAX and z.shape[1] > 1


def _strided(fn, *ts: Tensor) -> Tensor:
    """``fn(*ts)`` of [N, M] tensors computed on strided views of them: transposed ([M, N], the result transposed
    back), or for one row broadcast to two (the first row of the result)."""
    if ts[0].shape[0] == 1:
        return fn(*(t.expand(2, -1) for t in ts))[:1]
    return fn(*(t.t() for t in ts)).t()


def _activation(z: Tensor, activation: str) -> Tensor:
    if activation == "gelu" and _native_gelu(z):
        return _strided(F.gelu, z)
    return ACTIVATIONS[activation](z)


@register("adapter_forward", "torch")
def forward(h, w_down, b_down, w_up, b_up, activation, residual, scale):
    """(y [N, D], z [N, M])."""
    z = F.linear(h, w_down, b_down)  # addmm(b, h, W^T) or h @ W^T, the transpose taken in C++
    a = _activation(z, activation)
    if residual and b_up is not None and _folds(h):
        return torch.addmm(h, _with_ones(a), torch.cat([w_up, b_up[:, None]], 1).t(), alpha=scale), z
    if residual and b_up is None:
        return torch.addmm(h, a, w_up.t(), alpha=scale), z
    up = F.linear(a, w_up, b_up)
    y = torch.add(h, up, alpha=scale) if residual else _scaled(up, scale)
    return y, z


def _act_backward(da: Tensor, z: Tensor, a: Tensor, activation: str) -> Tensor:
    """da * act'(z) with PyTorch's fused activation-backward kernels (a = act(z))."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(da, z, 0)
    if activation == "gelu" and _native_gelu(z):
        return _strided(torch.ops.aten.gelu_backward.default, da, z)
    if activation in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(da, z, approximate="none" if activation == "gelu" else "tanh")
    if activation == "silu":
        return torch.ops.aten.silu_backward(da, z)
    return torch.ops.aten.tanh_backward(da, a)


def composes(h: Tensor, w_down: Tensor, w_up: Tensor) -> bool:
    """Whether an eager fp32 / fp64 CPU call on h [..., D] with grad, scale 1 and no autocast under "auto" runs
    :func:`forward` under PyTorch's own autograd instead of the op: its backward nodes then call the kernels
    :func:`backward` calls on the same tensors (mm, the activation's backward, sums), so the gradients are the op's
    bit for bit, without a Python autograd node (a layer's fwd + bwd at 16 x 64, M 8: 119 vs 158 us here). Autograd
    then keeps a = act(z) [N, M] too: up to COMPOSITE_MAX elements of h (:func:`_small`), where that is little and
    the call's overhead much. Contiguous h and row-major weights only (strides exactly (in, 1): a [D, 1] weight is
    contiguous in either layout): autograd's matmul backwards choose their products by the operands' layouts, and
    for column-major weights choose others than the op's."""
    return (_small(h) and h.is_contiguous() and w_down.stride() == (w_down.shape[1], 1)
            and w_up.stride() == (w_up.shape[1], 1))


def _small(h: Tensor) -> bool:
    return h.numel() <= COMPOSITE_MAX


def _dgrad(g: Tensor, dz: Tensor, w_down: Tensor, h: Tensor, residual: bool) -> Tensor:
    """dh = [g +] dz W_d: at the sizes :func:`composes` serves, the product and then the sum, as autograd adds the
    residual's gradient (one addmm may round differently); above, one addmm."""
    if not residual:
        return torch.mm(dz, w_down)
    return torch.mm(dz, w_down).add_(g) if _small(h) else torch.addmm(g, dz, w_down)


@register("adapter_backward", "torch")
def backward(g, h, z, w_down, w_up, activation, residual, scale):
    """(dh, dW_d, db_d, dW_u, db_u) for y's gradient g; act(z) is recomputed, not saved."""
    a = _activation(z, activation)
    dz = _act_backward(_scaled(torch.mm(g, w_up), scale), z, a, activation)
    dh = _dgrad(g, dz, w_down, h, residual)
    if _folds(h):
        both = torch.mm(g.t(), _with_ones(a))  # [D, M + 1]: dW_u / s and db_u / s
        dw_up, db_up = both[:, :-1], both[:, -1]
        return dh, torch.mm(dz.t(), h), dz.sum(0), dw_up * scale, db_up * scale  # copies: no output aliases another
    return dh, torch.mm(dz.t(), h), dz.sum(0), _scaled(torch.mm(g.t(), a), scale), _scaled(g.sum(0), scale)
