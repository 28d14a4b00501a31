"""SparseDiffLinear: a frozen nn.Linear plus trainable values at fixed weight positions (Diff Pruning, FISH Mask)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _validate as V
from ..backend import get_backend
from ..ops import custom_op as custom_ops
from ..ops.sparse import merge, unmerge
from ..ops.sparse.function import _check, _sparse_diff_linear, check_indices, small_call
from .lora import _check_linear, is_conv1d, linear_features, out_in


class SparseDiffLinear(V.ChecksPerState, nn.Module):
    """``y = x (W + scatter(values at indices))^T + b``; only ``values`` [nnz] train (fp32 by default, as PEFT keeps
    adapters over a half base). :meth:`diff_state_dict` holds what a task adds: indices, values and the shape.

    ``fan_in_fan_out``: ``weight`` is stored [in, out] (a transformers ``Conv1D``'s own parameter); the ops read it
    through a transposed view and ``indices`` still count in the [out, in] layout."""

    _per_state = (*V.ChecksPerState._per_state, "_small_call")

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], indices: torch.Tensor,
                 values: Optional[torch.Tensor] = None, values_dtype: Optional[torch.dtype] = None, *,
                 fan_in_fan_out: bool = False):
        super().__init__()
        check_indices(indices, weight.numel())
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.out_features, self.in_features = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.weight.requires_grad_(False)
        self.register_parameter("bias", bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias))
        if bias is not None:
            self.bias.requires_grad_(False)
        self.register_buffer("indices", indices.to(device=weight.device, dtype=torch.int64))
        dtype = values_dtype or (torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype)
        init = torch.zeros(indices.numel(), dtype=dtype, device=weight.device) if values is None else values
        if init.shape != (indices.numel(),):
            raise ValueError(f"values must have shape ({indices.numel()},) (one per index), got {tuple(init.shape)}")
        self.values = nn.Parameter(init.to(device=weight.device, dtype=dtype).clone())
        self._previous: Optional[torch.Tensor] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, indices: torch.Tensor, values: Optional[torch.Tensor] = None,
                    values_dtype: Optional[torch.dtype] = None) -> "SparseDiffLinear":
        """Over an ``nn.Linear`` or a transformers ``Conv1D`` (its weight and bias shared); ``indices`` into the
        [out, in] weight."""
        _check_linear(linear)
        return cls(linear.weight, linear.bias, indices, values, values_dtype, fan_in_fan_out=is_conv1d(linear))

    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen weight as [out, in] (a transposed view where it is stored [in, out])."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    @property
    def merged(self) -> bool:
        return self._previous is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and custom_ops.eager(x) and get_backend() == "auto":
            small = self.__dict__.get("_small_call")  # csrc/torch's SmallLayer for this state, if its calls run it
            y = None if small is None else small(x)
            if y is not None:
                return y
        params = self._parameters
        stored, bias, values = params["weight"], params["bias"], params["values"]
        weight = stored.t() if self.fan_in_fan_out else stored
        if self._previous is not None:
            return nn.functional.linear(x, weight, bias)
        indices = self._buffers["indices"]
        path = self.checked(_check, x, weight, bias, indices, values)
        if path == "composite" and get_backend() == "auto" and custom_ops.eager(x):  # a first call, or a stale one
            self.__dict__["_small_call"] = small_call(stored, self.fan_in_fan_out, bias, indices, values)
        return _sparse_diff_linear(x, weight, bias, indices, values, path)

    def _stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted flat positions of the indices in ``weight`` as stored, the values in that order)."""
        if not self.fan_in_fan_out:
            return self.indices, self.values
        stored = self.indices % self.in_features * self.out_features + self.indices // self.in_features
        order = stored.argsort()
        return stored[order], self.values[order]

    @torch.no_grad()
    def merge(self) -> None:
        """Add the values into ``weight`` in place (the overwritten nnz entries are kept: unmerge is exact)."""
        if not self.merged:
            self._previous = merge(self.weight, *self._stored())

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            unmerge(self.weight, *self._stored(), previous=self._previous)
            self._previous = None

    def diff_state_dict(self) -> dict:
        return {"indices": self.indices.clone(), "values": self.values.detach().clone(),
                "shape": torch.tensor([self.out_features, self.in_features])}

    def extra_repr(self) -> str:
        density = self.indices.numel() / (self.out_features * self.in_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.indices.numel()} "
                f"({100 * density:.3g}%), merged={self.merged}")


class RowDiffLinear(nn.Module):
    """FAR's structured variant: ``y = x (W + scatter_rows(delta))^T + b`` with the selected rows' (nodes') diff
    ``delta`` [k, in] trained as one small dense block: ``y[:, rows] += x delta^T``, ``d delta = g[:, rows]^T x``,
    ``dx += g[:, rows] delta`` (plain autograd on k-row tensors); :meth:`merge` adds it back by rows. ``linear``:
    an ``nn.Linear`` or a transformers ``Conv1D`` (whose rows are the columns of its stored weight)."""

    def __init__(self, linear: nn.Module, rows: torch.Tensor):
        super().__init__()
        _check_linear(linear)
        in_features, out_features = linear_features(linear)
        check_indices(rows, out_features, "rows")
        self.linear = linear
        for p in linear.parameters():
            p.requires_grad_(False)
        self.register_buffer("rows", rows.to(device=linear.weight.device, dtype=torch.int64))
        dtype = torch.float32 if linear.weight.dtype in (torch.float16, torch.bfloat16) else linear.weight.dtype
        self.delta = nn.Parameter(torch.zeros(rows.numel(), in_features, device=linear.weight.device, dtype=dtype))
        self._previous: Optional[torch.Tensor] = None

    @property
    def weight(self) -> nn.Parameter:
        """The frozen base weight, as stored (model code reads it: T5 casts its FFN input to ``wo.weight.dtype``)."""
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self._previous is not None:
            return y
        extra = (x.to(self.delta.dtype) @ self.delta.t()).to(y.dtype)  # [..., k]
        return y.index_add(-1, self.rows, extra)

    @torch.no_grad()
    def merge(self) -> None:
        """W[rows] += delta in place (the previous rows are kept: unmerge is exact)."""
        if self._previous is None:
            w = out_in(self.linear)
            self._previous = w[self.rows].clone()
            w[self.rows] = (w[self.rows].to(self.delta.dtype) + self.delta).to(w.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._previous is not None:
            out_in(self.linear)[self.rows] = self._previous
            self._previous = None
