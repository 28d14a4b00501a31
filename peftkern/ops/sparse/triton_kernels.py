"""Triton kernels of the sparse diff family: ``@triton.jit`` bodies only (launchers: triton_impl.py).

Entries e have a row r_e and a column c_e of the [out, in] weight and a value v_e. Activations are row-major with
row strides; feature stride 1. Accumulation is fp32. Element offsets are int64 (``ops/triton_blocks.py``).
"""
import triton
import triton.language as tl

from ..triton_blocks import tile_offsets


@triton.jit
def sparse_sddmm_kernel(g_ptr, x_ptr, rows_ptr, cols_ptr, out_ptr, N, NNZ, stride_gn, stride_gf, stride_xn, stride_xf,
                        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[e] = sum_n g[n, r_e] x[n, c_e] for BLOCK_E entries per program: only the sampled entries of g^T x, for
    diffs sparser than a few entries a tile (the launcher decides). g and x come feature-major (``stride_gn`` =
    ``stride_xn`` = 1: a feature's tokens contiguous), so each entry reads its two features' BLOCK_N tokens as
    contiguous runs, where token-major rows gave a 32-byte sector per value."""
    ents = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
    ent_ok = ents < NNZ
    rows = tl.load(rows_ptr + ents, mask=ent_ok, other=0)
    cols = tl.load(cols_ptr + ents, mask=ent_ok, other=0)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)  # [BN]
        m = (toks[:, None] < N) & ent_ok[None, :]
        g = tl.load(g_ptr + tile_offsets(toks, rows, stride_gn, stride_gf), mask=m, other=0.0)  # [BN, BE]
        x = tl.load(x_ptr + tile_offsets(toks, cols, stride_xn, stride_xf), mask=m, other=0.0)
        acc += tl.sum(g.to(tl.float32) * x.to(tl.float32), axis=0)
    tl.store(out_ptr + ents, acc, mask=ent_ok)


@triton.jit
def sparse_sddmm_tile_kernel(g_ptr, x_ptr, bounds_ptr, by_tile_ptr, pos_ptr, out_ptr, N, OUT, IN, TILES_C,
                             stride_gn, stride_xn, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                             TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[e] = sum_n g[n, r_e] x[n, c_e] by dense tiles: program t owns the TILE x TILE weight tile t (row block
    t // TILES_C, column block t % TILES_C) and its entries [bounds[t], bounds[t + 1]) of the tile order
    (``by_tile``: their entry numbers, ``pos``: r % TILE * TILE + c % TILE). A nonempty tile reads its g and x
    columns as row-contiguous [BLOCK_N, TILE] tiles (coalesced, where the per-entry gather used ~1/16 of each
    sector), forms the tile of g^T x on tensor cores and gathers its entries from the accumulator; an empty one
    returns at once."""
    t = tl.program_id(0)
    start = tl.load(bounds_ptr + t)
    end = tl.load(bounds_ptr + t + 1)
    if start == end:
        return
    lanes = tl.arange(0, TILE)
    rows = (t // TILES_C) * TILE + lanes
    cols = (t % TILES_C) * TILE + lanes
    acc = tl.zeros((TILE, TILE), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)  # [BN]
        tok_ok = toks[:, None] < N
        g = tl.load(g_ptr + tile_offsets(toks, rows, stride_gn, 1), mask=tok_ok & (rows[None, :] < OUT), other=0.0)
        x = tl.load(x_ptr + tile_offsets(toks, cols, stride_xn, 1), mask=tok_ok & (cols[None, :] < IN), other=0.0)
        acc = tl.dot(tl.trans(g.to(DOT_DTYPE)), x.to(DOT_DTYPE), acc, input_precision=PRECISION)  # [TILE, TILE]
    for e0 in range(start, end, BLOCK_E):
        ents = e0 + tl.arange(0, BLOCK_E)  # [BE]
        ok = ents < end
        pos = tl.load(pos_ptr + ents, mask=ok, other=0)
        picked = tl.gather(acc, tl.broadcast_to((pos // TILE)[:, None], (BLOCK_E, TILE)), 0)  # [BE, TILE]: rows
        val = tl.sum(tl.where(lanes[None, :] == (pos % TILE)[:, None], picked, 0.0), axis=1)
        tl.store(out_ptr + tl.load(by_tile_ptr + ents, mask=ok, other=0), val, mask=ok)


@triton.jit
def sparse_correction_kernel(out_ptr, src_ptr, seg_ptr, src_pos_ptr, val_ptr, N, G, stride_on, stride_sn, stride_sf,
                             BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr):
    """out[n, j] += sum over the entries of group j of src[n, src_pos_e] v_e: the sparse term of y (groups = output
    rows, src = x, src_pos = c) or of dx (groups = input columns, src = g, src_pos = r). Entries are grouped:
    group j owns [seg[j], seg[j + 1]). Grid (cdiv(G, BLOCK_G), cdiv(N, BLOCK_N)); a program sums BLOCK_G groups'
    columns and adds them to out as one [BLOCK_N, BLOCK_G] tile (row runs, where a column a program wrote a sector a
    token); every (n, j) has one writer: no atomics. src comes feature-major (``stride_sn`` = 1): each entry reads
    BLOCK_N contiguous tokens of its feature."""
    j0 = tl.program_id(0) * BLOCK_G
    if tl.load(seg_ptr + j0) == tl.load(seg_ptr + tl.minimum(j0 + BLOCK_G, G)):
        return
    toks = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    lanes = tl.arange(0, BLOCK_G)
    tok_ok = toks < N
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    for jj in range(0, BLOCK_G):
        j = tl.minimum(j0 + jj, G)  # past the last group: the empty range [seg[G], seg[G])
        end = tl.load(seg_ptr + tl.minimum(j + 1, G))
        col = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for e0 in range(tl.load(seg_ptr + j), end, BLOCK_E):
            ents = e0 + tl.arange(0, BLOCK_E)  # [BE]
            ent_ok = ents < end
            pos = tl.load(src_pos_ptr + ents, mask=ent_ok, other=0)
            v = tl.load(val_ptr + ents, mask=ent_ok, other=0.0).to(tl.float32)
            src = tl.load(src_ptr + tile_offsets(toks, pos, stride_sn, stride_sf),
                          mask=tok_ok[:, None] & ent_ok[None, :], other=0.0)  # [BN, BE]
            col += tl.sum(src.to(tl.float32) * v[None, :], axis=1)
        acc = tl.where(lanes[None, :] == jj, col[:, None], acc)
    groups = j0 + lanes
    ptrs = out_ptr + tile_offsets(toks, groups, stride_on, 1)
    ok = tok_ok[:, None] & (groups[None, :] < G)
    base = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(ptrs, (base + acc).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def sparse_scatter_add_kernel(flat_ptr, idx_ptr, val_ptr, NNZ, alpha, BLOCK: tl.constexpr):
    """flat[idx_e] += alpha v_e (indices unique: one writer per element); the sum in fp32, rounded once to flat's
    dtype (the launcher turns FP fusion off, so alpha v is rounded before the add, as torch does)."""
    ents = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = ents < NNZ
    idx = tl.load(idx_ptr + ents, mask=ok, other=0).to(tl.int64)
    v = tl.load(val_ptr + ents, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(flat_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    tl.store(flat_ptr + idx, (w + alpha * v).to(flat_ptr.dtype.element_ty), mask=ok)
