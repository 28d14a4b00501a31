"""Triton ``@triton.jit`` building blocks shared by the families' kernels (``ops/<family>/triton_kernels.py``):
int64 element offsets, the grouped tile order of the GEMMs, and the LoRA epilogue (the dropout keep mask and the
rank expand) that the LoRA and NF4 (QLoRA) kernels both fuse.

Element offsets: every product that lands in an address is taken in int64 through :func:`offsets` or
:func:`tile_offsets`. Indices and strides arrive as int32 (the JIT types ints below 2**31 as i32), and their int32
product wraps once a tensor spans 2**31 elements: tokens x features does at ~150k tokens of a 14336-wide layer.
The widening costs one 64-bit multiply per row and column, hoisted out of the reduction loops.
"""
import triton
import triton.language as tl


@triton.jit
def offsets(index, stride):
    """``index * stride`` in int64: one index (a scalar, a loop counter) or a tensor of them, along one dimension of
    stride ``stride``."""
    return tl.cast(index, tl.int64) * stride


@triton.jit
def tile_offsets(rows, cols, stride_r, stride_c):
    """[len(rows), len(cols)] int64 element offsets ``rows * stride_r + cols * stride_c`` of a 2-D tile."""
    return offsets(rows, stride_r)[:, None] + offsets(cols, stride_c)[None, :]


@triton.jit
def lora_keep_mask(seed, rows, col0, n_cols, threshold, BLOCK_COLS: tl.constexpr, GROUPED: tl.constexpr):
    """Dropout keep mask [len(rows), BLOCK_COLS] of x [*, n_cols] at columns ``col0 + arange(BLOCK_COLS)``: element
    ``e = row * n_cols + col`` is kept where its 16-bit draw ``u_e >= threshold`` (P(keep) = 1 - threshold / 2**16).

    ``u_e`` is the low (``e % 8 < 4``) or high half of 32-bit word ``e % 4`` of the 10-round Philox of counter
    ``e // 8``: one Philox call (its four words, both halves of each) serves 8 elements, where ``tl.rand`` per
    element spends a call on each. The draws are a function of (seed, e) only, so every kernel that regenerates the
    mask, at any tile, gets the same bits. GROUPED (``n_cols % 8 == 0`` and ``col0 % 8 == 0``, the launchers' case
    on real models): one call per 8 elements of the tile, joined into place; otherwise a call per element, keeping
    its 16 bits (odd widths).
    """
    thr = threshold.to(tl.uint32)
    if GROUPED:
        tl.static_assert(BLOCK_COLS % 8 == 0)
        groups = offsets(rows, n_cols // 8)[:, None] + (col0 // 8 + tl.arange(0, BLOCK_COLS // 8))[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, groups)  # [len(rows), BLOCK_COLS // 8] each
        # joined on a new last axis (fastest), three times: element 4 * half + word of each group of 8
        keep = tl.join(tl.join(tl.join((w0 & 0xFFFF) >= thr, (w0 >> 16) >= thr),
                               tl.join((w2 & 0xFFFF) >= thr, (w2 >> 16) >= thr)),
                       tl.join(tl.join((w1 & 0xFFFF) >= thr, (w1 >> 16) >= thr),
                               tl.join((w3 & 0xFFFF) >= thr, (w3 >> 16) >= thr)))
        return tl.reshape(keep, (rows.shape[0], BLOCK_COLS))
    else:
        e = tile_offsets(rows, col0 + tl.arange(0, BLOCK_COLS), n_cols, 1)
        w0, w1, w2, w3 = tl.randint4x(seed, e >> 3)
        word = e & 3
        w = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
        return tl.where((e & 4) == 0, w & 0xFFFF, w >> 16) >= thr


@triton.jit
def lora_grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a 1-D program id, GROUP_M row tiles at a time so their operands stay in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * grid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    return pid_m, pid_n


@triton.jit
def lora_rank_expand(acc, lhs_ptr, scale_ptr, rhs_ptr, rows, cols, M, N, R, stride_lhs, stride_rhs_r, stride_rhs_c,
                     alpha, HAS_SCALE: tl.constexpr, LORA_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """acc [BM, BN] + alpha * (lhs[rows, :] * scale) @ rhs[:, cols]; lhs [M, R] with row stride stride_lhs,
    rhs [R, N] strided."""
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        lhs = tl.load(lhs_ptr + tile_offsets(rows, ranks, stride_lhs, 1),
                      mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0).to(tl.float32)  # [BM, BR]
        if HAS_SCALE:
            lhs = lhs * tl.load(scale_ptr + ranks, mask=ranks < R, other=0.0).to(tl.float32)[None, :]
        # alpha is folded into the small [BM, BR] tile rather than the [BM, BN] product
        lhs = (lhs * alpha).to(LORA_DOT_DTYPE)
        rhs = tl.load(rhs_ptr + tile_offsets(ranks, cols, stride_rhs_r, stride_rhs_c),
                      mask=(ranks[:, None] < R) & (cols[None, :] < N), other=0.0)  # [BR, BN]
        acc = tl.dot(lhs, rhs.to(LORA_DOT_DTYPE), acc, input_precision=PRECISION)
    return acc
