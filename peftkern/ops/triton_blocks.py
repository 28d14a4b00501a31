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
def lora_keep_mask(seed, rows, cols, n_cols, p):
    """Bernoulli(1-p) keep mask [len(rows), len(cols)] of x's elements, regenerated from the seed."""
    return tl.rand(seed, tile_offsets(rows, cols, n_cols, 1)) >= p


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
