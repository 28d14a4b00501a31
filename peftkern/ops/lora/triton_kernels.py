"""Triton kernels of the LoRA family: ``@triton.jit`` bodies only (launchers: triton_impl.py).

Notation (README.md): x [N, K] (K = in features), W [O, K], bias [O], A [R, K], B [O, R], e [R] (rank scale),
g = dL/dy [N, O], h = drop(x) A^T [N, R], dh [N, R] (fp32 workspace). Outputs are contiguous row-major.
Tiles: BLOCK_M rows, BLOCK_N output columns, BLOCK_K reduction, BLOCK_R ranks (a power of two >= 16, the
minimum tl.dot size; ranks past R are masked to 0). Accumulation is fp32. Dot operands are cast to
DOT_DTYPE (the base GEMM: x's dtype) or LORA_DOT_DTYPE (the LoRA path: promote(x, A)); the launcher passes
fp32 there for bf16 under the interpreter, where bf16 tl.dot is wrong. PRECISION is tl.dot's input_precision
for fp32 operands ("ieee", or "tf32" when torch allows TF32).
Dropout: keep = 16-bit draw of element row * K + col of the logical 2-D x >= threshold (``lora_keep_mask``: one
Philox call per 8 elements, MASK_GROUPED where K % 8 == 0), offsets in int64 so no two elements share a draw; the
1/(1-p) scale is applied by the caller of lora_keep_mask. The kernels taking a seed leave it unspecialized
(``do_not_specialize``): it changes every call. Element offsets are int64 (``ops/triton_blocks.py``).
"""
import triton
import triton.language as tl

from ..triton_blocks import lora_grouped_tile, lora_keep_mask, lora_rank_expand, offsets, tile_offsets


@triton.jit(do_not_specialize=["seed"])
def lora_shrink_kernel(x_ptr, a_ptr, h_ptr, N, K, R, stride_xm, stride_xk, stride_ar, stride_ak,
                       seed, threshold, keep_scale,
                       DROPOUT: tl.constexpr, MASK_GROUPED: tl.constexpr, LORA_DOT_DTYPE: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """h[N, R] = drop(x) @ A^T, one [BLOCK_M, BLOCK_R] tile of h per program; grid (cdiv(N, BM), cdiv(R, BR)).

    BLOCK_R covers the rank (up to 256: ``triton_launch.lora_rank_tile``), so each x element is loaded and its mask
    drawn once; a grid over rank chunks would draw it once per chunk."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)  # [BK]
        x = tl.load(x_ptr + tile_offsets(rows, cols, stride_xm, stride_xk),
                    mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0)  # [BM, BK]
        if DROPOUT:
            x = tl.where(lora_keep_mask(seed, rows, k0, K, threshold, BLOCK_K, MASK_GROUPED), x, 0.0)
        a_t = tl.load(a_ptr + tile_offsets(cols, ranks, stride_ak, stride_ar),
                      mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0)  # [BK, BR] = A^T tile
        acc = tl.dot(x.to(LORA_DOT_DTYPE), a_t.to(LORA_DOT_DTYPE), acc, input_precision=PRECISION)
    if DROPOUT:
        # the 1/(1-p) scale is uniform, so it is applied once to the sum instead of to every x element
        acc = acc * keep_scale
    tl.store(h_ptr + tile_offsets(rows, ranks, R, 1), acc.to(h_ptr.dtype.element_ty),
             mask=(rows[:, None] < N) & (ranks[None, :] < R))


@triton.jit
def lora_fwd_kernel(x_ptr, w_ptr, bias_ptr, h_ptr, e_ptr, b_ptr, y_ptr, N, K, O, R,
                    stride_xm, stride_xk, stride_wo, stride_wk, stride_bo, stride_br, scaling,
                    HAS_BIAS: tl.constexpr, HAS_RANK_SCALE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    LORA_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """y[N, O] = x @ W^T + bias + scaling * (h * e) @ B^T: the base GEMM with bias and LoRA expand in its epilogue."""
    pid_m, pid_n = lora_grouped_tile(tl.program_id(0), N, O, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)  # [BK]
        x = tl.load(x_ptr + tile_offsets(rows, cols, stride_xm, stride_xk),
                    mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0)  # [BM, BK]
        w_t = tl.load(w_ptr + tile_offsets(cols, outs, stride_wk, stride_wo),
                      mask=(outs[None, :] < O) & (cols[:, None] < K), other=0.0)  # [BK, BN] = W^T tile
        acc = tl.dot(x.to(DOT_DTYPE), w_t.to(DOT_DTYPE), acc, input_precision=PRECISION)
    # B^T [R, O] is B read with swapped strides
    acc = lora_rank_expand(acc, h_ptr, e_ptr, b_ptr, rows, outs, N, O, R, R, stride_br, stride_bo, scaling,
                           HAS_RANK_SCALE, LORA_DOT_DTYPE, PRECISION, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < O, other=0.0).to(tl.float32)[None, :]
    # base, bias and LoRA sum in fp32 and round once to y's dtype
    tl.store(y_ptr + tile_offsets(rows, outs, O, 1), acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < N) & (outs[None, :] < O))


@triton.jit
def lora_bwd_dh_kernel(g_ptr, b_ptr, h_ptr, e_ptr, dh_ptr, de_ptr, N, O, R,
                       stride_gm, stride_go, stride_bo, stride_br, stride_dh, scaling,
                       HAS_RANK_SCALE: tl.constexpr, LORA_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """dhe = s g B, dh = dhe*e and the row block's share of de = colsum(dhe*h); grid (cdiv(N, BM), cdiv(R, BR)).

    BLOCK_R covers the rank (up to 256), so g is read once. dh_ptr [N, R] fp32 with row stride stride_dh (the
    launcher pads it to a multiple of 16 so the dh tiles load vectorized); de_ptr [cdiv(N, BM), R] fp32 takes one
    row per row block (summed by the launcher: no atomics).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    row_ok = rows < N
    rank_ok = ranks < R
    dhe = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # the g and B tiles at o0 = 0, moved by a scalar each step: 64-bit tile offsets rebuilt every step spill
    g_tile = g_ptr + tile_offsets(rows, tl.arange(0, BLOCK_N), stride_gm, stride_go)  # [BM, BN]
    b_tile = b_ptr + tile_offsets(tl.arange(0, BLOCK_N), ranks, stride_bo, stride_br)  # [BN, BR]
    for o0 in range(0, O, BLOCK_N):
        outs = o0 + tl.arange(0, BLOCK_N)  # [BN]
        g = tl.load(g_tile + offsets(o0, stride_go), mask=row_ok[:, None] & (outs[None, :] < O), other=0.0)
        b = tl.load(b_tile + offsets(o0, stride_bo), mask=(outs[:, None] < O) & rank_ok[None, :], other=0.0)
        dhe = tl.dot(g.to(LORA_DOT_DTYPE), b.to(LORA_DOT_DTYPE), dhe, input_precision=PRECISION)
    dhe = dhe * scaling
    if HAS_RANK_SCALE:
        h = tl.load(h_ptr + tile_offsets(rows, ranks, R, 1), mask=row_ok[:, None] & rank_ok[None, :],
                    other=0.0).to(tl.float32)  # [BM, BR]
        tl.store(de_ptr + offsets(tl.program_id(0), R) + ranks, tl.sum(dhe * h, axis=0), mask=rank_ok)
        dhe = dhe * tl.load(e_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(dh_ptr + tile_offsets(rows, ranks, stride_dh, 1), dhe, mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit(do_not_specialize=["seed"])
def lora_bwd_wgrad_kernel(lhs_ptr, e_ptr, rhs_ptr, out_ptr, N, C, R, stride_lhs, stride_rm, stride_rc, stride_os,
                          stride_or, stride_oc, rows_per_split, alpha, seed, threshold,
                          HAS_RANK_SCALE: tl.constexpr, DROPOUT: tl.constexpr, MASK_GROUPED: tl.constexpr,
                          LORA_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """The adapters' weight gradients: out[split, R, C] = alpha * (lhs * e)^T @ drop(rhs) summed over the rows of
    one split; grid (cdiv(C, BC), cdiv(R, BR), splits).

    dA = dh^T drop(x) (lhs = dh, rhs = x, alpha = 1/(1-p), the mask regenerated from the seed) and dB^T =
    s (h e)^T g (lhs = h, e the rank scale, rhs = g). lhs [N, R] has row stride stride_lhs and unit column stride;
    rhs [N, C] and out [splits, R, C] are strided; rows_per_split is a multiple of BLOCK_M. Each program stores its
    split's sum and the launcher adds the splits: a bounded workspace and one reduction in place of atomics onto
    one buffer (deterministic). BLOCK_R covers the rank (up to 256): rhs and its mask are read and drawn once.
    """
    col0 = tl.program_id(0) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C)  # [BC]
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    row_start = tl.program_id(2) * rows_per_split
    row_end = min(row_start + rows_per_split, N)
    if HAS_RANK_SCALE:
        e = tl.load(e_ptr + ranks, mask=ranks < R, other=0.0).to(tl.float32)[:, None]  # [BR, 1]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)  # [BM]
        lhs_t = tl.load(lhs_ptr + tile_offsets(ranks, rows, 1, stride_lhs),
                        mask=(rows[None, :] < row_end) & (ranks[:, None] < R), other=0.0)  # [BR, BM] = lhs^T tile
        if HAS_RANK_SCALE:
            lhs_t = lhs_t.to(tl.float32) * e
        rhs = tl.load(rhs_ptr + tile_offsets(rows, cols, stride_rm, stride_rc),
                      mask=(rows[:, None] < row_end) & (cols[None, :] < C), other=0.0)  # [BM, BC]
        if DROPOUT:
            rhs = tl.where(lora_keep_mask(seed, rows, col0, C, threshold, BLOCK_C, MASK_GROUPED), rhs, 0.0)
        acc = tl.dot(lhs_t.to(LORA_DOT_DTYPE), rhs.to(LORA_DOT_DTYPE), acc, input_precision=PRECISION)
    tl.store(out_ptr + offsets(tl.program_id(2), stride_os) + tile_offsets(ranks, cols, stride_or, stride_oc),
             acc * alpha, mask=(ranks[:, None] < R) & (cols[None, :] < C))


@triton.jit(do_not_specialize=["seed"])
def lora_bwd_dx_kernel(g_ptr, w_ptr, dh_ptr, a_ptr, dx_ptr, N, K, O, R,
                       stride_gm, stride_go, stride_wo, stride_wk, stride_dh, stride_ar, stride_ak, seed, threshold,
                       keep_scale, DROPOUT: tl.constexpr, MASK_GROUPED: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       LORA_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """dx[N, K] = g @ W + (dh @ A) * mask / (1-p): the dgrad GEMM (reduction over O), LoRA term in its epilogue."""
    pid_m, pid_n = lora_grouped_tile(tl.program_id(0), N, K, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] columns of dx (input features)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for o0 in range(0, O, BLOCK_K):
        outs = o0 + tl.arange(0, BLOCK_K)  # [BK]
        g = tl.load(g_ptr + tile_offsets(rows, outs, stride_gm, stride_go),
                    mask=(rows[:, None] < N) & (outs[None, :] < O), other=0.0)  # [BM, BK]
        w = tl.load(w_ptr + tile_offsets(outs, cols, stride_wo, stride_wk),
                    mask=(outs[:, None] < O) & (cols[None, :] < K), other=0.0)  # [BK, BN]
        acc = tl.dot(g.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if DROPOUT:
        # the mask is elementwise on dh @ A, so that product needs its own accumulator; 1/(1-p) rides on dh
        keep = lora_keep_mask(seed, rows, pid_n * BLOCK_N, K, threshold, BLOCK_N, MASK_GROUPED)
        lora = lora_rank_expand(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), dh_ptr, dh_ptr, a_ptr, rows, cols,
                                N, K, R, stride_dh, stride_ar, stride_ak, keep_scale, False, LORA_DOT_DTYPE,
                                PRECISION, BLOCK_R)
        acc += tl.where(keep, lora, 0.0)
    else:
        acc = lora_rank_expand(acc, dh_ptr, dh_ptr, a_ptr, rows, cols, N, K, R, stride_dh, stride_ar, stride_ak, 1.0,
                               False, LORA_DOT_DTYPE, PRECISION, BLOCK_R)
    tl.store(dx_ptr + tile_offsets(rows, cols, K, 1), acc.to(dx_ptr.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < K))


@triton.jit(do_not_specialize=["seed"])
def lora_dropout_mask_kernel(keep_ptr, N, K, seed, threshold, MASK_GROUPED: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """keep[N, K] (bool) = the mask the LoRA kernels draw for x [N, K]; grid (cdiv(N, BM), cdiv(K, BK))."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)  # [BK]
    tl.store(keep_ptr + tile_offsets(rows, cols, K, 1),
             lora_keep_mask(seed, rows, col0, K, threshold, BLOCK_K, MASK_GROUPED),
             mask=(rows[:, None] < N) & (cols[None, :] < K))
