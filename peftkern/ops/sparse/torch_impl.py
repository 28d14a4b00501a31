"""Eager PyTorch implementation of the sparse diff ops: the CPU path, and any device without Triton.

Very sparse diffs (nnz at most min(out, in): about one entry per row or column) gather the columns they touch:
``y[:, r_e] += x[:, c_e] v_e`` and ``dx[:, c_e] += g[:, r_e] v_e`` by ``index_add_``, ``d v_e = sum_n g[n, r_e]
x[n, c_e]``, with [N, nnz] temporaries no larger than an activation. Denser ones use a CSR matrix built from the
sorted indices (rows in order, so CSR order = the indices' order): the corrections are sparse x dense products
(``delta @ x^T`` for y; the transposed CSR, built with one argsort, for dx) and the values' gradient is PyTorch's
SDDMM (``torch.sparse.sampled_addmm``). Work and memory scale with nnz, never a dense [out, in] matrix. Sparse math
runs in the values' dtype promoted to fp32.
"""
from __future__ import annotations

import warnings

import torch

from ...backend import register


def rows_cols(indices: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = indices.long()
    return idx // in_features, idx % in_features


def segment_bounds(sorted_keys: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups + 1] int64: the entries of key j are [b[j], b[j + 1]) of ``sorted_keys`` (keys in [0, groups)).

    A binary search per group, not ``torch.bincount``: CUDA's bincount reads its input's min and max back to the
    host, a stream sync every call (and no CUDA-graph capture)."""
    return torch.searchsorted(sorted_keys, torch.arange(groups + 1, device=sorted_keys.device))


def _csr(major: torch.Tensor, minor: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """CSR of entries sorted by ``major`` (rows of the result)."""
    crow = segment_bounds(major, shape[0])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, minor, values, shape)


def _math_dtype(values: torch.Tensor) -> torch.dtype:
    return torch.promote_types(values.dtype, torch.float32)


def _gathered(nnz: int, shape: tuple[int, int]) -> bool:
    """The gather path: [N, nnz] temporaries no larger than x or y, and no CSR built or transposed operand copied."""
    return nnz <= min(shape)


@register("sparse_diff_forward", "torch")
def forward(x, weight, bias, indices, values):
    """y [N, out] = x W^T + b + (delta x^T)^T."""
    O, I = weight.shape
    rows, cols = rows_cols(indices, I)
    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    dt = _math_dtype(values)
    if _gathered(indices.numel(), (O, I)):
        return y.to(dt).index_add_(1, rows, x[:, cols].to(dt) * values.to(dt)).to(y.dtype)
    corr = _csr(rows, cols, values.to(dt), (O, I)) @ x.to(dt).t()  # [out, N]
    return (y.to(dt) + corr.t()).to(y.dtype)


@register("sparse_masked_grad", "torch")
def masked_grad(grad_out, x, indices, in_features: int):
    """d values [nnz] = (g^T x) at indices (SDDMM), in promote(g, fp32)."""
    rows, cols = rows_cols(indices, in_features)
    dt = torch.promote_types(grad_out.dtype, torch.float32)
    if _gathered(indices.numel(), (grad_out.shape[1], in_features)):
        return (grad_out[:, rows].to(dt) * x[:, cols].to(dt)).sum(0)
    pattern = _csr(rows, cols, torch.zeros(indices.numel(), dtype=dt, device=x.device),
                   (grad_out.shape[1], in_features))
    return torch.sparse.sampled_addmm(pattern, grad_out.to(dt).t(), x.to(dt), beta=0.0).values()


@register("sparse_diff_dgrad", "torch")
def dgrad(grad_out, weight, indices, values):
    """dx [N, in] = g W + (delta^T g^T)^T, delta^T as a CSR of the entries sorted by column."""
    O, I = weight.shape
    rows, cols = rows_cols(indices, I)
    dt = _math_dtype(values)
    dx = grad_out @ weight
    if _gathered(indices.numel(), (O, I)):
        return dx.to(dt).index_add_(1, cols, grad_out[:, rows].to(dt) * values.to(dt)).to(dx.dtype)
    order = torch.argsort(cols, stable=True)
    corr = _csr(cols[order], rows[order], values[order].to(dt), (I, O)) @ grad_out.to(dt).t()  # [in, N]
    return (dx.to(dt) + corr.t()).to(dx.dtype)


@register("sparse_scatter_add", "torch")
def scatter_add_(flat: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    """flat[indices] += alpha * values, in place; the sum formed in fp32 (or fp64) and rounded once to flat's dtype."""
    idx = indices.long()
    dt = torch.promote_types(torch.promote_types(flat.dtype, values.dtype), torch.float32)
    flat[idx] = (flat[idx].to(dt) + alpha * values.to(dt)).to(flat.dtype)


@register("sparse_gather", "torch")
def gather(flat: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """flat[indices] (a copy)."""
    return flat[indices.long()]
