"""Eager PyTorch implementation of the sparse diff ops: the CPU path, and any device without Triton.

Each product picks its form per call from the sizes (measured crossovers on a CPU, :func:`correction_form` and
:func:`sddmm_form`):

* ``gather`` (few products ``N nnz``): the columns the entries touch, ``y[:, r_e] += x[:, c_e] v_e`` and ``dx[:, c_e]
  += g[:, r_e] v_e`` by ``index_add_``, ``d v_e = sum_n g[n, r_e] x[n, c_e]``: a handful of small ops, no CSR built,
  [N, nnz] temporaries of at most ``GATHER_PRODUCTS`` (``GATHER_SDDMM_PRODUCTS``) elements;
* ``dense`` (the values' gradient of a small layer in fp32 or fp64): ``g^T x``, one small GEMM, gathered at the
  indices;
* ``merged`` (y and dx where W is small next to ``N nnz``): the values added into a copy of W, block by block, and
  one dense GEMM a block, in W's dtype (where bf16 GEMMs are fast, as fast as the peer's): a copy of W costs less
  than the sparse products once each entry meets enough tokens. The copies are transient (at most
  ``BLOCK_BYTES`` a block, rows for y and columns for dx so the blocks' outputs never overlap) and nothing W-sized is
  kept for backward;
* ``csr`` (otherwise): the corrections as sparse x dense products (``delta @ x^T`` for y, ``delta^T @ g^T`` for dx)
  and the values' gradient as PyTorch's SDDMM (``torch.sparse.sampled_addmm``), work and memory scaling with nnz.
* ``small`` (a :func:`small` layer in fp32 or fp64, where csrc/torch is built): y, dx and the values' gradient by
  its C++ functions, one GEMM a direction and the N nnz products in loops (:func:`small_nodes`); the eager path runs
  the same functions as one C++ autograd node, so both give the same bits.

Sparse math runs in the values' dtype promoted to fp32. What the indices imply (rows, columns, the column and tile
orders, the groupings' bounds: :class:`Structure`; their int64 forms and the merged blocks: :class:`Plan`) is built
once per indices tensor and kept while it lives: a layer's indices are a fixed buffer, and rebuilding it every call
(sorts and searches over nnz) cost as much as the sparse products themselves.
"""
from __future__ import annotations

import ctypes
import sys
import warnings
import weakref
from typing import Callable, NamedTuple, Optional

import torch

from ... import _native
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


def cached(table: dict, indices: torch.Tensor, shape: tuple[int, int], build: Callable):
    """``build(indices, shape)``, kept in ``table`` while ``indices`` lives; rebuilt when they change in place (their
    version), move or the shape differs (inference tensors, which keep no version, every call). The lookup reads
    Python-side metadata only."""
    keep = not indices.is_inference()  # an inference tensor has no version counter to tell a change
    stamp = (indices._version, indices.data_ptr(), *shape) if keep else None
    key = id(indices)
    seen = table.get(key)
    if keep and seen is not None and seen[0]() is indices and seen[1] == stamp:
        return seen[2]
    found = build(indices, shape)
    if keep:
        table[key] = (weakref.ref(indices, lambda _, key=key: table.pop(key, None)), stamp, found)
    return found


def _build_structure(indices: torch.Tensor, shape: tuple[int, int]) -> Structure:
    out_f, in_f = shape
    rows, cols = rows_cols(indices, in_f)
    by_col = torch.argsort(cols, stable=True).int()
    tile = (rows // TILE) * tiles(shape)[1] + cols // TILE
    by_tile = torch.argsort(tile, stable=True).int()
    return Structure(rows, cols, segment_bounds(rows, out_f), by_col, rows[by_col], segment_bounds(cols[by_col], in_f),
                     by_tile, ((rows % TILE) * TILE + cols % TILE)[by_tile],
                     segment_bounds(tile[by_tile], tiles(shape)[0] * tiles(shape)[1]))


_structures: dict[int, tuple] = {}  # id(indices) -> (weak reference, (version, address, shape), Structure)


def structure(indices: torch.Tensor, shape: tuple[int, int]) -> Structure:
    """The :class:`Structure` of sorted unique flat ``indices`` into an [out, in] weight, built on first use and
    kept while ``indices`` lives (:func:`cached`). The Triton launchers share it. No host sync: a sort and binary
    searches."""
    return cached(_structures, indices, shape, _build_structure)


BLOCK_BYTES = 8 << 20  # the merged form's copies of W: blocks a heap allocation reuses (no fresh pages a call)


class Plan:
    """The torch paths' view of a :class:`Structure`: int64 indices (``index_add_`` / ``index_select`` with int32
    ones ran ~10x slower on this CPU) and, built on first use per block size, the merged form's blocks."""

    def __init__(self, indices: torch.Tensor, shape: tuple[int, int]):
        self.shape = shape
        self.structure = s = structure(indices, shape)
        self.flat, self.rows, self.cols = indices.long(), s.rows.long(), s.cols.long()
        self._blocks: dict[tuple, list] = {}
        self._flat_t: Optional[torch.Tensor] = None

    @property
    def flat_t(self) -> torch.Tensor:
        """The entries' flat positions in the [in, out] transpose of W (index order, so not sorted)."""
        if self._flat_t is None:
            self._flat_t = self.cols * self.shape[0] + self.rows
        return self._flat_t

    def row_blocks(self, rows_per_block: int) -> list[tuple[int, int, torch.Tensor, Optional[slice]]]:
        """[(r0, r1, flat positions of the entries in rows [r0, r1) inside that block, their slice of the entries)]:
        one block (all of W, the indices as they are) where it fits, else the bounds read once to the host."""
        out_f, in_f = self.shape
        if rows_per_block >= out_f:
            return [(0, out_f, self.flat, None)]
        key = ("rows", rows_per_block)
        if key not in self._blocks:
            starts = list(range(0, out_f, rows_per_block)) + [out_f]
            bounds = self.structure.row_bounds[starts].tolist()
            self._blocks[key] = [(r0, r1, self.flat[e0:e1] - r0 * in_f, slice(e0, e1))
                                 for r0, r1, e0, e1 in zip(starts, starts[1:], bounds, bounds[1:])]
        return self._blocks[key]

    def col_blocks(self, cols_per_block: int) -> list[tuple[int, int, torch.Tensor, Optional[torch.Tensor]]]:
        """[(c0, c1, flat positions of the entries in columns [c0, c1) inside that [out, c1 - c0] block, the
        entries)]: one block where it fits (entries in index order), else the bounds read once to the host."""
        out_f, in_f = self.shape
        if cols_per_block >= in_f:
            return [(0, in_f, self.flat, None)]
        key = ("cols", cols_per_block)
        if key not in self._blocks:
            s = self.structure
            starts = list(range(0, in_f, cols_per_block)) + [in_f]
            bounds = s.col_bounds[starts].tolist()
            blocks = []
            for c0, c1, e0, e1 in zip(starts, starts[1:], bounds, bounds[1:]):
                entries = s.by_col[e0:e1].long()
                blocks.append((c0, c1, self.rows[entries] * (c1 - c0) + self.cols[entries] - c0, entries))
            self._blocks[key] = blocks
        return self._blocks[key]


_plans: dict[int, tuple] = {}


def plan(indices: torch.Tensor, shape: tuple[int, int]) -> Plan:
    """The :class:`Plan` of ``indices`` over an [out, in] weight, kept as :func:`structure` keeps its Structure."""
    return cached(_plans, indices, shape, Plan)


# Crossovers measured on a 2-vCPU AMD EPYC (Zen 4, AVX-512 bf16), fp32 and bf16, 1 to 256 tokens, 64^2 to 4096^2
GATHER_PRODUCTS = 1 << 15  # y's and dx's terms by gather up to N nnz products (no CSR's fixed cost, transposes)
GATHER_SDDMM_PRODUCTS = 1 << 17  # the values' gradient by gather up to N nnz products (temporaries in cache)
DENSE_SDDMM_MACS = 1 << 17  # the values' gradient from the dense g^T x up to N out in multiply-adds


def correction_form(tokens: int, nnz: int, shape: tuple[int, int], weight_bytes: int) -> str:
    """How y's and dx's sparse terms are formed: "merged", "gather" or "csr" (module docstring).

    Merged where copying W costs less than the CSR form's extra work: its products (~2 bytes of copy each) and the
    transposing copies of the activations and their cache misses (~32 bytes a token and feature), as measured here.
    So at 256 tokens merged at any density at 1024^2 and 4096^2; at 16 tokens and 1024^2 from ~9% in fp32 (~3% in
    bf16)."""
    if tokens >= merged_from(nnz, shape, weight_bytes):
        return "merged"
    return "gather" if tokens * nnz <= GATHER_PRODUCTS else "csr"


def merged_from(nnz: int, shape: tuple[int, int], weight_bytes: int) -> int:
    """The fewest tokens at which :func:`correction_form` merges: W's bytes <= tokens (2 nnz + 32 (out + in))."""
    return -(-(shape[0] * shape[1] * weight_bytes) // max(1, 2 * nnz + 32 * (shape[0] + shape[1])))


def sddmm_form(tokens: int, nnz: int, shape: tuple[int, int]) -> str:
    """How the values' gradient is formed: "dense" (g^T x, one small GEMM, its entries gathered), "gather" or "csr"
    (module docstring)."""
    if tokens * shape[0] * shape[1] <= DENSE_SDDMM_MACS:
        return "dense"
    return "gather" if tokens * nnz <= GATHER_SDDMM_PRODUCTS else "csr"


def small(tokens: int, nnz: int, shape: tuple[int, int], weight_bytes: int) -> bool:
    """Whether y and dx take the merged form in one block and the values' gradient the dense one: a layer whose
    training call the eager path runs as one autograd node of PyTorch ops, or of csrc/torch's (:func:`small_nodes`),
    without a Python backward."""
    return tokens in small_tokens(nnz, shape, weight_bytes)


def small_tokens(nnz: int, shape: tuple[int, int], weight_bytes: int) -> range:
    """The token counts at which a layer is :func:`small`: merged (:func:`merged_from`) up to the most tokens of a
    dense SDDMM (``tokens out in <= DENSE_SDDMM_MACS``: :func:`sddmm_form`), W in one block."""
    out_f, in_f = shape
    if out_f * in_f * weight_bytes > BLOCK_BYTES:
        return range(0)
    most = DENSE_SDDMM_MACS // (out_f * in_f) if out_f * in_f else sys.maxsize
    return range(merged_from(nnz, shape, weight_bytes), most + 1)


def small_nodes(tokens: int, nnz: int, shape: tuple[int, int], *tensors: torch.Tensor):
    """csrc/torch's extension (``sparse_small*``) for a :func:`small` layer whose ``tensors`` are CPU tensors of one
    dtype, fp32 or fp64; None where it does not apply or is not built."""
    nodes = _native.TORCH_NODES.module()
    t0 = tensors[0]
    if (nodes is None or t0.device.type != "cpu" or t0.dtype not in _WIDE
            or any(t.dtype != t0.dtype for t in tensors[1:]) or not small(tokens, nnz, shape, t0.element_size())):
        return None
    return nodes


def _csr(bounds: torch.Tensor, minor: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """CSR matrix of ``shape`` whose row j holds ``values`` [bounds[j], bounds[j + 1]) at columns ``minor``."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(bounds, minor, values, shape)


_WIDE = (torch.float32, torch.float64)


def _math_dtype(values: torch.Tensor) -> torch.dtype:
    return torch.promote_types(values.dtype, torch.float32)


def _transposed(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``t^T`` contiguous in ``dt``: the dense operand of a CSR product (a strided one takes MKL's slow path, 3x
    here)."""
    return t.to(dt).t().contiguous()


def _add_transposed(dense: torch.Tensor, corr_t: torch.Tensor) -> torch.Tensor:
    """``dense + corr_t^T`` in ``dense``'s dtype (in place where it is the math dtype), summed in corr's dtype."""
    if dense.dtype == corr_t.dtype:
        return dense.add_(corr_t.t())
    return dense.to(corr_t.dtype).add_(corr_t.t()).to(dense.dtype)


def _add_at(flat: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """flat[idx] += values in place (int64 ``idx``), the sum formed in fp32 or wider, rounded once to flat's dtype."""
    dt = torch.promote_types(torch.promote_types(flat.dtype, values.dtype), torch.float32)
    if flat.dtype == dt == values.dtype:
        return flat.index_add_(0, idx, values)
    return flat.index_put_((idx,), flat.index_select(0, idx).to(dt).add_(values.to(dt)).to(flat.dtype))


def _merged(weight: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``weight`` with ``values`` added at its flat positions ``idx``."""
    w = weight.clone(memory_format=torch.contiguous_format)
    _add_at(w.view(-1), idx, values)
    return w


_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SPARSE_TOKEN = [_P, _P, ctypes.c_int, _P, ctypes.c_int, _P, _P, _P, _I64, _I64, _P]


def token_forward(x, weight, bias, p: Plan, values, out=None) -> torch.Tensor:
    """y [..., out] of one token (x [..., in], leading dims of size 1): csrc/cpu's kernel (the base GEMV, bias and
    each row's entries in one call; x, W and b in fp32, fp16 or bf16, the values in fp32 or x's dtype when that is
    fp32: the torch gather's roundings) where it applies (packed tensors, a weight of at most
    ``_native.TOKEN_MAX_WEIGHT`` elements in either layout), else ``F.linear`` and the gather (:func:`_gather_add`).
    ``out``: the y to write (tests poison it)."""
    fn = _native.cpu_function(x, "pk_sparse_token", _SPARSE_TOKEN)
    dtype = _native.CPU_DTYPES.get(x.dtype)
    layout = None if fn is None or dtype is None else _native.token_weight_layout(weight)
    packed = _native.packed
    if (layout is None or weight.dtype != x.dtype
            or not (packed(x, x.dtype) and packed(bias, x.dtype) and packed(values))):
        y = torch.nn.functional.linear(x, weight, bias)
        return _gather_add(y.view(1, -1), p.rows, x.view(1, -1), p.cols, values).view(y.shape)
    O, I = weight.shape
    y = out if out is not None else x.new_empty(*x.shape[:-1], O)
    s = p.structure
    if fn(x.data_ptr(), weight.data_ptr(), layout, _native.ptr(bias), dtype, s.row_bounds.data_ptr(),
          s.cols.data_ptr(), values.data_ptr(), I, O, y.data_ptr()) != 0:
        raise RuntimeError("pk_sparse_token refused its arguments")
    return y


def add_token_(out: torch.Tensor, to: torch.Tensor, src: torch.Tensor, frm: torch.Tensor,
               values: torch.Tensor) -> torch.Tensor:
    """:func:`_gather_add` for one token in one precision (``out``, ``src`` of any leading dims of size 1): as 1-D
    tensors, along which ``index_add_`` ran ~2x faster here than along a row's dim 1."""
    out.view(-1).index_add_(0, to, src.view(-1).index_select(0, frm).mul_(values))
    return out


def _gather_add(out: torch.Tensor, to: torch.Tensor, src: torch.Tensor, frm: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
    """``out[:, to_e] += src[:, frm_e] v_e`` summed in the values' math dtype; ``out`` in place where it is that."""
    if out.dtype == src.dtype == values.dtype in _WIDE:
        if out.shape[0] == 1:
            return add_token_(out, to, src, frm, values)
        return out.index_add_(1, to, src.index_select(1, frm).mul_(values))
    dt = _math_dtype(values)
    return out.to(dt).index_add_(1, to, src.index_select(1, frm).to(dt).mul_(values)).to(out.dtype)


@register("sparse_diff_forward", "torch")
def forward(x, weight, bias, indices, values):
    """y [N, out] = x W^T + b + the sparse term (module docstring: merged, gather, csr or small; one token in one
    precision or under fp32 values by :func:`token_forward`)."""
    p = plan(indices, tuple(weight.shape))
    if x.shape[0] == 1 and (x.dtype == values.dtype in _WIDE or values.dtype == torch.float32):
        return token_forward(x, weight, bias, p, values)
    return forward_as(forward_form(x, weight, values, indices.numel()), x, weight, bias, p, values)


def forward_form(x, weight, values, nnz: int) -> str:
    """How :func:`forward` forms y of x [..., in]: "small" for a :func:`small` layer in one precision, fp32 or fp64
    (csrc/torch's function where it is built, else merged), else :func:`correction_form`'s form."""
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    shape, weight_bytes = tuple(weight.shape), weight.element_size()
    if x.dtype == weight.dtype == values.dtype in _WIDE and small(tokens, nnz, shape, weight_bytes):
        return "small"
    return correction_form(tokens, nnz, shape, weight_bytes)


def forward_as(form: str, x, weight, bias, p: Plan, values):
    """:func:`forward` in the given form, with the indices' :class:`Plan`."""
    if form == "small":  # forward_form checked the layer's size and dtypes
        nodes = _native.TORCH_NODES.module()
        if nodes is not None and x.device.type == "cpu":
            return nodes.sparse_small_forward(x, weight, bias, p.structure.rows, p.structure.cols, values)
        form = "merged"
    if form == "merged":
        O, I = weight.shape
        y = x.new_empty(x.shape[0], O)
        for r0, r1, idx, part in p.row_blocks(max(1, BLOCK_BYTES // (I * weight.element_size()))):
            w = _merged(weight[r0:r1], idx, values if part is None else values[part])
            if bias is None:
                torch.mm(x, w.t(), out=y[:, r0:r1])
            else:
                torch.addmm(bias[r0:r1], x, w.t(), out=y[:, r0:r1])
        return y
    y = torch.nn.functional.linear(x, weight, bias)
    if form == "gather":
        return _gather_add(y, p.rows, x, p.cols, values)
    s, dt = p.structure, _math_dtype(values)
    return _add_transposed(y, _csr(s.row_bounds, s.cols, values.to(dt), p.shape) @ _transposed(x, dt))  # [out, N]


@register("sparse_masked_grad", "torch")
def masked_grad(grad_out, x, indices, in_features: int):
    """d values [nnz] = (g^T x) at indices (SDDMM), in promote(g, fp32)."""
    O = grad_out.shape[1]
    p = plan(indices, (O, in_features))
    nodes = small_nodes(x.shape[0], indices.numel(), (O, in_features), grad_out, x)
    if nodes is not None:
        return nodes.sparse_small_vgrad(grad_out, x, p.structure.rows, p.structure.cols)
    dt = torch.promote_types(grad_out.dtype, torch.float32)
    form = sddmm_form(x.shape[0], indices.numel(), (O, in_features))
    if form == "dense" and grad_out.dtype == x.dtype == dt and not torch._C._is_any_autocast_enabled():
        return grad_out.t().mm(x).view(-1).index_select(0, p.flat)  # (autocast would run the mm in half precision)
    if form != "csr":
        return grad_out.index_select(1, p.rows).to(dt).mul_(x.index_select(1, p.cols)).sum(0)
    s = p.structure
    pattern = _csr(s.row_bounds, s.cols, torch.zeros(indices.numel(), dtype=dt, device=x.device), (O, in_features))
    return torch.sparse.sampled_addmm(pattern, _transposed(grad_out, dt), x.to(dt), beta=0.0).values()


@register("sparse_diff_dgrad", "torch")
def dgrad(grad_out, weight, indices, values):
    """dx [N, in] = g W + the sparse term (gather, merged by column blocks, or delta^T g^T with delta^T as a CSR of
    the entries in column order)."""
    O, I = weight.shape
    p = plan(indices, (O, I))
    nodes = small_nodes(grad_out.shape[0], indices.numel(), (O, I), grad_out, weight, values)
    if nodes is not None:
        return nodes.sparse_small_dgrad(grad_out, weight, p.structure.rows, p.structure.cols, values)
    form = correction_form(grad_out.shape[0], indices.numel(), (O, I), weight.element_size())
    if form == "merged":
        dx = grad_out.new_empty(grad_out.shape[0], I)
        for c0, c1, idx, entries in p.col_blocks(max(1, BLOCK_BYTES // (O * weight.element_size()))):
            w = _merged(weight[:, c0:c1], idx, values if entries is None else values.index_select(0, entries))
            torch.mm(grad_out, w, out=dx[:, c0:c1])
        return dx
    dx = grad_out @ weight
    if form == "gather":
        return _gather_add(dx, p.cols, grad_out, p.rows, values)
    s, dt = p.structure, _math_dtype(values)
    delta_t = _csr(s.col_bounds, s.col_rows, values.index_select(0, s.by_col).to(dt), (I, O))
    return _add_transposed(dx, delta_t @ _transposed(grad_out, dt))  # [in, N]


@register("sparse_scatter_add", "torch")
def scatter_add_(flat: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    """flat[indices] += alpha * values, in place; the sum formed in fp32 (or fp64) and rounded once to flat's dtype."""
    _add_at(flat, indices.long(), values if alpha == 1.0 else alpha * values.to(_math_dtype(values)))


@register("sparse_gather", "torch")
def gather(flat: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """flat[indices] (a copy)."""
    return flat[indices.long()]
