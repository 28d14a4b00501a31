"""Sparse diff ops registered with torch.library (autograd + fake tensors), and the functional API."""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from ... import _native
from ... import _validate as V
from ...backend import get_backend, resolve, run
from .. import custom_op as custom_ops
from ..custom_op import custom_op, rows, unrows
from . import torch_impl


@custom_op("peftkern::sparse_diff_forward")
def sparse_diff_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], indices: Tensor, values: Tensor,
                        backend: str) -> Tensor:
    """x [..., in] -> y [..., out]."""
    check_index_values(indices, weight.numel())  # data-dependent: on the real tensor, before any kernel
    return unrows(run("sparse_diff_forward", backend, x.device, rows(x), weight, bias, indices, values), x)


@sparse_diff_forward.register_fake
def _(x, weight, bias, indices, values, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@custom_op("peftkern::sparse_masked_grad")
def sparse_masked_grad(grad_out: Tensor, x: Tensor, indices: Tensor, in_features: int, backend: str) -> Tensor:
    return run("sparse_masked_grad", backend, x.device, rows(grad_out).contiguous(), rows(x), indices, in_features)


@sparse_masked_grad.register_fake
def _(grad_out, x, indices, in_features, backend):
    return x.new_empty(indices.shape[0], dtype=torch.promote_types(grad_out.dtype, torch.float32))


@custom_op("peftkern::sparse_diff_dgrad")
def sparse_diff_dgrad(grad_out: Tensor, weight: Tensor, indices: Tensor, values: Tensor, backend: str) -> Tensor:
    """grad_out [..., out] -> dx [..., in]."""
    dx = run("sparse_diff_dgrad", backend, grad_out.device, rows(grad_out).contiguous(), weight, indices, values)
    return unrows(dx, grad_out)


@sparse_diff_dgrad.register_fake
def _(grad_out, weight, indices, values, backend):
    return grad_out.new_empty(*grad_out.shape[:-1], weight.shape[1])


def _setup_context(ctx, inputs, output):
    x, weight, bias, indices, values, ctx.backend = inputs
    ctx.save_for_backward(x, weight, indices, values)


def _backward(ctx, grad_y):
    x, weight, indices, values = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = sparse_diff_dgrad(grad_y, weight, indices, values, ctx.backend) if need[0] else None
    db = rows(grad_y).sum(0) if need[2] else None
    dv = sparse_masked_grad(grad_y, x, indices, weight.shape[1], ctx.backend).to(values.dtype) if need[4] else None
    return dx, None, db, None, dv, None


sparse_diff_forward.register_autograd(_backward, setup_context=_setup_context)
# values keep their dtype: the op takes fp32 values over a half-precision weight
sparse_diff_forward.register_autocast(("x", "weight", "bias"))


def check_index_tensor(indices, name: str = "indices") -> None:
    """1-D int64/int32."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32 flat positions, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-D [nnz], got shape {tuple(indices.shape)}")


_checked: dict[int, tuple] = {}  # id(indices) -> (weak reference, version, numel) of the tensors found valid


def check_index_values(indices: Tensor, numel: int, name: str = "indices") -> None:
    """Strictly increasing (sorted, unique) and inside [0, numel): a host sync, so the ops run it on real tensors,
    once per tensor and version (a layer's fixed indices are not re-checked every step; inference tensors, which
    keep no version, every call)."""
    if indices.numel() == 0:
        return
    cached = not indices.is_inference()
    seen = _checked.get(id(indices))
    if cached and seen is not None and seen[0]() is indices and seen[1:] == (indices._version, numel):
        return
    lo, hi = int(indices[0]), int(indices[-1])
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(f"{name} must be sorted and unique (strictly increasing)")
    if lo < 0 or hi >= numel:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must lie in [0, {numel}) (flat positions into the weight), got {bad}")
    if not cached:
        return
    key = id(indices)
    _checked[key] = (weakref.ref(indices, lambda _, key=key: _checked.pop(key, None)), indices._version, numel)


def check_indices(indices, numel: int, name: str = "indices") -> None:
    check_index_tensor(indices, name)
    check_index_values(indices, numel, name)


def _check(x, weight, bias, indices, values) -> Optional[str]:
    V.tensor("x", x, min_ndim=1)
    V.tensor("weight", weight, ndim=2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight expects {weight.shape[1]} "
                         f"([out, in] = {tuple(weight.shape)})")
    V.same_dtype("x", x, autocast=True, weight=weight, bias=bias)
    if bias is not None:
        V.tensor("bias", bias, ndim=1)
        V.shape("bias", bias, (weight.shape[0],), "[out]")
    check_index_tensor(indices)  # the values of indices are checked inside the op (torch.compile traces this)
    V.tensor("values", values, ndim=1)
    if values.dtype not in (torch.float32, torch.float64, weight.dtype):
        raise TypeError(f"values must be float32 or weight's dtype {weight.dtype}, got {values.dtype}")
    if values.shape[0] != indices.shape[0]:
        raise ValueError(f"values has {values.shape[0]} entries but indices has {indices.shape[0]}")
    V.same_device("x", x, weight=weight, bias=bias, indices=indices, values=values)
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError("weight must be frozen (requires_grad=False): only values get a gradient")
    return _cpu_path(x, weight, indices, values)


def sparse_diff_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], indices: Tensor, values: Tensor) -> Tensor:
    """``y = x (W + scatter(values at indices))^T + b`` with W frozen; gradients reach x, values (only at the indices:
    an SDDMM, never a dense dW) and a trainable bias. ``indices`` are sorted unique flat int64/int32 positions."""
    return _sparse_diff_linear(x, weight, bias, indices, values, V.checked(_check, x, weight, bias, indices, values))


def _sparse_diff_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], indices: Tensor, values: Tensor,
                        path: Optional[str]) -> Tensor:
    """y of checked arguments, ``path`` what their check returned."""
    backend = get_backend()
    if path is not None and backend == "auto" and custom_ops.eager(x):
        plan = torch_impl.cached(_valid_plans, indices, weight.shape, _check_and_plan)
        if path == "token":
            return torch_impl.token_forward(x, weight, bias, plan, values)
        if path == "composite":
            x2 = rows(x)
            nodes = _native.TORCH_NODES.module()
            if nodes is not None:
                return unrows(nodes.sparse_small(x2, weight, bias, plan.structure.rows, plan.structure.cols, values), x)
            # W^T + scatter(values) [in, out] as addmm takes it (F.linear's transpose would be one more autograd node);
            # put is one node (take in its backward)
            merged_t = weight.t().put(plan.flat_t, values, accumulate=True)
            return unrows(torch.mm(x2, merged_t) if bias is None else torch.addmm(bias, x2, merged_t), x)
        return unrows(torch_impl.forward_as(path, rows(x), weight, bias, plan, values), x)
    return sparse_diff_forward(x, weight, bias, indices, values, backend)


_valid_plans: dict[int, tuple] = {}  # the eager CPU path's index check and plan, in one cached lookup


def small_call(weight: Tensor, fan_in_fan_out: bool, bias: Optional[Tensor], indices: Tensor, values: Tensor):
    """csrc/torch's ``SmallLayer`` for a layer's state (``weight`` as stored, [in, out] where ``fan_in_fan_out``)
    whose check chose the "composite" path for an eager call: the node straight from its later calls while nothing
    the check read changes. None where the extension is not built, or for inference-mode indices (no version to
    watch)."""
    nodes = _native.TORCH_NODES.module()
    if nodes is None or indices.is_inference():
        return None
    shape = tuple(weight.shape[::-1] if fan_in_fan_out else weight.shape)
    plan = torch_impl.cached(_valid_plans, indices, shape, _check_and_plan)
    tokens = torch_impl.small_tokens(indices.numel(), shape, weight.element_size())
    s = plan.structure
    return nodes.SmallLayer(weight, fan_in_fan_out, bias, s.rows, s.cols, values, indices, tokens.start,
                            tokens.stop - 1)


def _check_and_plan(indices: Tensor, shape: tuple[int, int]) -> "torch_impl.Plan":
    """:func:`check_index_values` and the indices' :class:`torch_impl.Plan` (kept in ``_valid_plans`` once per tensor
    and version, as each alone)."""
    check_index_values(indices, shape[0] * shape[1])
    return torch_impl.plan(indices, tuple(shape))


def _cpu_path(x: Tensor, weight: Tensor, indices: Tensor, values: Tensor) -> Optional[str]:
    """The shortest path of an eager call on the CPU under "auto" (whose backend there is torch), from what
    :func:`V.checked` keys on (shapes, dtypes, device, grad and autocast modes), so it is chosen once per signature:

    * the torch forward's form ("small", "merged", "gather", "csr": :func:`torch_impl.forward_form`) without grad:
      that form itself (no autograd node, no backend lookup); ``"token"`` for one token (decode) in one precision or
      under fp32 values: :func:`torch_impl.token_forward`;
    * ``"composite"`` for a small layer in one precision (:func:`torch_impl.small`): csrc/torch's C++ autograd node,
      whose forward and backward are the functions the registered op's torch implementation calls there; without
      that extension ``addmm(b, x, W^T + scatter(values))`` under PyTorch's own autograd, which computes what the op's
      torch forms then compute. Either way the op's bits, without a Python backward;
    * None: the registered op.

    Why: at decode and 16-token sizes the Python around the arithmetic was most of a call (a Python autograd node
    alone costs about as much as a small GEMM)."""
    cpu = custom_ops.cpu_form(x)
    if cpu is None:
        return None
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if cpu == "direct":
        if tokens == 1 and (x.dtype == values.dtype in (torch.float32, torch.float64) or values.dtype == torch.float32):
            return "token"
        return torch_impl.forward_form(x, weight, values, indices.numel())
    if values.dtype == weight.dtype and torch_impl.small(tokens, indices.numel(), tuple(weight.shape),
                                                         weight.element_size()):
        return "composite"  # x in fp32 / fp64 (cpu_form), weight and values in x's dtype
    return None


def masked_weight_grad(grad_out: Tensor, x: Tensor, indices: Tensor) -> Tensor:
    """``(grad_out^T x)`` at the flat ``indices`` of an [out, in] weight, fp32 [nnz]: the SDDMM alone."""
    V.tensor("grad_out", grad_out, min_ndim=1)
    V.tensor("x", x, min_ndim=1)
    if grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} must share their leading dims")
    out_f, in_f = grad_out.shape[-1], x.shape[-1]
    check_indices(indices, out_f * in_f)
    V.same_device("x", x, grad_out=grad_out, indices=indices)
    return sparse_masked_grad(grad_out.reshape(-1, out_f), x.reshape(-1, in_f), indices, in_f, get_backend())


def _check_merge(weight, indices, values) -> None:
    V.tensor("weight", weight)
    check_indices(indices, weight.numel())
    V.tensor("values", values, ndim=1)
    if values.shape[0] != indices.shape[0]:
        raise ValueError(f"values has {values.shape[0]} entries but indices has {indices.shape[0]}")
    V.same_device("weight", weight, indices=indices, values=values)


@torch.no_grad()
def merge(weight: Tensor, indices: Tensor, values: Tensor, alpha: float = 1.0) -> Tensor:
    """``weight.view(-1)[indices] += alpha * values`` in place (the sum rounded once to weight's dtype). Returns the
    nnz entries it overwrote: :func:`unmerge` with them restores ``weight`` exactly."""
    _check_merge(weight, indices, values)
    V.number("alpha", alpha)
    flat = weight.view(-1)
    previous = resolve("sparse_gather", weight.device)[1](flat, indices)
    _, impl = resolve("sparse_scatter_add", weight.device)
    impl(flat, indices, values, float(alpha))
    return previous


@torch.no_grad()
def unmerge(weight: Tensor, indices: Tensor, values: Tensor, alpha: float = 1.0, *,
            previous: Optional[Tensor] = None) -> Tensor:
    """Undo :func:`merge`: exactly when given the ``previous`` entries it returned, else by subtracting
    ``alpha * values`` (exact only where the merge's rounding was). Returns weight."""
    _check_merge(weight, indices, values)
    if previous is None:
        merge(weight, indices, values, -float(alpha))
        return weight
    V.shape("previous", previous, tuple(indices.shape), "the entries merge returned")
    weight.view(-1)[indices.long()] = previous.to(weight.dtype)
    return weight
