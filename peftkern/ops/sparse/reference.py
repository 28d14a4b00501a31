"""The literal math of the sparse diff family, with a dense delta: the oracle of the tests (run it in float64)."""
from __future__ import annotations

import torch


def dense_delta(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The [out, in] delta holding ``values`` at ``indices`` (autograd reaches ``values``)."""
    delta = torch.zeros(weight.numel(), dtype=values.dtype, device=values.device)
    return delta.index_add(0, indices.long(), values).view(weight.shape)


def sparse_diff_linear_reference(x, weight, bias, indices, values):
    y = x @ (weight + dense_delta(weight, indices, values).to(weight.dtype)).t()
    return y if bias is None else y + bias


def masked_weight_grad_reference(grad_out, x, indices):
    return (grad_out.t() @ x).reshape(-1)[indices.long()]
