"""SparseDiffLinear: a frozen nn.Linear plus trainable values at fixed weight positions (Diff Pruning, FISH Mask)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.sparse import merge, sparse_diff_linear, unmerge
from ..ops.sparse.function import check_indices


class SparseDiffLinear(nn.Module):
    """``y = x (W + scatter(values at indices))^T + b``; only ``values`` [nnz] train (fp32 by default, as PEFT keeps
    adapters over a half base). :meth:`diff_state_dict` holds what a task adds: indices, values and the shape."""

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], indices: torch.Tensor,
                 values: Optional[torch.Tensor] = None, values_dtype: Optional[torch.dtype] = None):
        super().__init__()
        check_indices(indices, weight.numel())
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.weight.requires_grad_(False)
        self.bias = bias
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
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, indices, values, values_dtype)

    @property
    def merged(self) -> bool:
        return self._previous is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return sparse_diff_linear(x, self.weight, self.bias, self.indices, self.values)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the values into ``weight`` in place (the overwritten nnz entries are kept: unmerge is exact)."""
        if not self.merged:
            self._previous = merge(self.weight, self.indices, self.values)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            unmerge(self.weight, self.indices, self.values, previous=self._previous)
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
    ``dx += g[:, rows] delta`` (plain autograd on k-row tensors); :meth:`merge` adds it back by rows."""

    def __init__(self, linear: nn.Linear, rows: torch.Tensor):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        check_indices(rows, linear.out_features, "rows")
        self.linear = linear
        for p in linear.parameters():
            p.requires_grad_(False)
        self.register_buffer("rows", rows.to(device=linear.weight.device, dtype=torch.int64))
        dtype = torch.float32 if linear.weight.dtype in (torch.float16, torch.bfloat16) else linear.weight.dtype
        self.delta = nn.Parameter(torch.zeros(rows.numel(), linear.in_features, device=linear.weight.device,
                                              dtype=dtype))
        self._previous: Optional[torch.Tensor] = None

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
            w = self.linear.weight
            self._previous = w[self.rows].clone()
            w[self.rows] = (w[self.rows].to(self.delta.dtype) + self.delta).to(w.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._previous is not None:
            self.linear.weight[self.rows] = self._previous
            self._previous = None
