"""Eager PyTorch implementation of the sparse diff ops: the CPU path, and any device without Triton.

Very sparse diffs (nnz at most min(out, in): about one entry per row or column) gather the columns they touch:
``y[:, r_e] += x[:, c_e] v_e`` and ``dx[:, c_e] += g[:, r_e] v_e`` by ``index_add_``, ``d v_e = sum_n g[n, r_e]
x[n, c_e]``, with [N, nnz] temporaries no larger than an activation. Denser ones use CSR matrices: the corrections
are sparse x dense products (``delta @ x^T`` for y, ``delta^T @ g^T`` for dx) and the values' gradient is PyTorch's
SDDMM (``torch.sparse.sampled_addmm``). Work and memory scale with nnz, never a dense [out, in] matrix. Sparse math
runs in the values' dtype promoted to fp32.

What the indices imply (rows, columns, the column and tile orders, the groupings' bounds: :class:`Structure`) is
built once per indices tensor and kept while it lives (:func:`structure`): a layer's indices are a fixed buffer, and
rebuilding it every call (sorts and searches over nnz) cost as much as the sparse products themselves.
"""
from __future__ import annotations

import warnings
import weakref
from typing import NamedTuple

import torch

from ...backend import register


def rows_cols(indices: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each flat index into an [out, in] weight, int32 (a layer holds fewer than 2^31 entries)."""
    idx = indices.long()
    return (idx // in_features).int(), (idx % in_features).int()


def segment_bounds(sorted_keys: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups + 1] int32: the entries of key j are [b[j], b[j + 1]) of ``sorted_keys`` (keys in [0, groups)).

    A binary search per group, not ``torch.bincount``: CUDA's bincount reads its input's min and max back to the
    host, a stream sync every call (and no CUDA-graph capture)."""
    keys = torch.arange(groups + 1, dtype=sorted_keys.dtype, device=sorted_keys.device)
    return torch.searchsorted(sorted_keys, keys, out_int32=True)


TILE = 128  # the weight tiles of the Triton SDDMM (triton_impl.py): one tensor-core product per nonempty tile


def tiles(shape: tuple[int, int]) -> tuple[int, int]:
    """(row blocks, column blocks) of TILE x TILE tiles over an [out, in] weight."""
    return -(-shape[0] // TILE), -(-shape[1] // TILE)


class Structure(NamedTuple):
    """The entries of a sparse diff over an [out, in] weight, grouped by row (the indices' sorted order), by column
    and by TILE x TILE tile; all int32 (what the CSR kernels and the Triton launchers take) on the indices'
    device."""
    rows: torch.Tensor  # [nnz] row of each entry, nondecreasing
    cols: torch.Tensor  # [nnz] column of each entry
    row_bounds: torch.Tensor  # [out + 1]: row r's entries are [row_bounds[r], row_bounds[r + 1])
    by_col: torch.Tensor  # [nnz] the entries in column order (stable)
    col_rows: torch.Tensor  # [nnz] rows[by_col]
    col_bounds: torch.Tensor  # [in + 1]: column c's entries are by_col[col_bounds[c]:col_bounds[c + 1]]
    by_tile: torch.Tensor  # [nnz] the entries in TILE x TILE tile order (row-major tiles; stable)
    tile_pos: torch.Tensor  # [nnz] r % TILE * TILE + c % TILE of by_tile's entries: their place inside the tile
    tile_bounds: torch.Tensor  # [tiles + 1]: tile t's entries are by_tile[tile_bounds[t]:tile_bounds[t + 1]]


_structures: dict[int, tuple] = {}  # id(indices) -> (weak reference, (version, address, shape), Structure)


def structure(indices: torch.Tensor, shape: tuple[int, int]) -> Structure:
    """The :class:`Structure` of sorted unique flat ``indices`` into an [out, in] weight, built on first use and
    kept while ``indices`` lives; rebuilt when they change in place (their version), move or the shape differs
    (inference tensors, which keep no version, every call). The Triton launchers share it.

    No host sync: the lookup reads Python-side metadata only, the build is a sort and binary searches."""
    out_f, in_f = shape
    cached = not indices.is_inference()  # an inference tensor has no version counter to tell a change
    stamp = (indices._version, indices.data_ptr(), out_f, in_f) if cached else None
    key = id(indices)
    seen = _structures.get(key)
    if cached and seen is not None and seen[0]() is indices and seen[1] == stamp:
        return seen[2]
    rows, cols = rows_cols(indices, in_f)
    by_col = torch.argsort(cols, stable=True).int()
    tile = (rows // TILE) * tiles(shape)[1] + cols // TILE
    by_tile = torch.argsort(tile, stable=True).int()
    found = Structure(rows, cols, segment_bounds(rows, out_f), by_col, rows[by_col],
                      segment_bounds(cols[by_col], in_f), by_tile, ((rows % TILE) * TILE + cols % TILE)[by_tile],
                      segment_bounds(tile[by_tile], tiles(shape)[0] * tiles(shape)[1]))
    if cached:
        _structures[key] = (weakref.ref(indices, lambda _, key=key: _structures.pop(key, None)), stamp, found)
    return found


def _csr(bounds: torch.Tensor, minor: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """CSR matrix of ``shape`` whose row j holds ``values`` [bounds[j], bounds[j + 1]) at columns ``minor``."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(bounds, minor, values, shape)


def _math_dtype(values: torch.Tensor) -> torch.dtype:
    return torch.promote_types(values.dtype, torch.float32)


def _gathered(nnz: int, shape: tuple[int, int]) -> bool:
    """The gather path: [N, nnz] temporaries no larger than x or y, and no CSR built or transposed operand copied."""
    return nnz <= min(shape)


def _transposed(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``t^T`` contiguous in ``dt``: the dense operand of a CSR product (a strided one takes MKL's slow path, 3x
    here)."""
    return t.to(dt).t().contiguous()


def _add_transposed(dense: torch.Tensor, corr_t: torch.Tensor) -> torch.Tensor:
    """``dense + corr_t^T`` in ``dense``'s dtype (in place where it is the math dtype), summed in corr's dtype."""
    if dense.dtype == corr_t.dtype:
        return dense.add_(corr_t.t())
    return dense.to(corr_t.dtype).add_(corr_t.t()).to(dense.dtype)


@register("sparse_diff_forward", "torch")
def forward(x, weight, bias, indices, values):
    """y [N, out] = x W^T + b + (delta x^T)^T."""
    O, I = weight.shape
    s = structure(indices, (O, I))
    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    dt = _math_dtype(values)
    if _gathered(indices.numel(), (O, I)):
        return y.to(dt).index_add_(1, s.rows, x.index_select(1, s.cols).to(dt).mul_(values)).to(y.dtype)
    return _add_transposed(y, _csr(s.row_bounds, s.cols, values.to(dt), (O, I)) @ _transposed(x, dt))  # [out, N]


@register("sparse_masked_grad", "torch")
def masked_grad(grad_out, x, indices, in_features: int):
    """d values [nnz] = (g^T x) at indices (SDDMM), in promote(g, fp32)."""
    O = grad_out.shape[1]
    s = structure(indices, (O, in_features))
    dt = torch.promote_types(grad_out.dtype, torch.float32)
    if _gathered(indices.numel(), (O, in_features)):
        return grad_out.index_select(1, s.rows).to(dt).mul_(x.index_select(1, s.cols)).sum(0)
    pattern = _csr(s.row_bounds, s.cols, torch.zeros(indices.numel(), dtype=dt, device=x.device), (O, in_features))
    return torch.sparse.sampled_addmm(pattern, _transposed(grad_out, dt), x.to(dt), beta=0.0).values()


@register("sparse_diff_dgrad", "torch")
def dgrad(grad_out, weight, indices, values):
    """dx [N, in] = g W + (delta^T g^T)^T, delta^T as a CSR of the entries in column order."""
    O, I = weight.shape
    s = structure(indices, (O, I))
    dt = _math_dtype(values)
    dx = grad_out @ weight
    if _gathered(indices.numel(), (O, I)):
        return dx.to(dt).index_add_(1, s.cols, grad_out.index_select(1, s.rows).to(dt).mul_(values)).to(dx.dtype)
    delta_t = _csr(s.col_bounds, s.col_rows, values.index_select(0, s.by_col).to(dt), (I, O))
    return _add_transposed(dx, delta_t @ _transposed(grad_out, dt))  # [in, N]


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
