"""Triton kernels of multi-adapter LoRA (SGMV): @triton.jit bodies only; launchers live in triton_impl.py.

Every row-block kernel reads its block from ``table`` ([blocks, 3] int32: start, end, adapter), a range of the rows
sorted by adapter, and gathers the original rows through ``perm`` (sorted position -> row of x / y). Blocks past the
real count have start == end and exit at once; adapter -1 means the base layer only.

Constexprs shared by the kernels: ``DOT_DTYPE`` / ``LORA_DOT_DTYPE`` are the ``tl.dot`` operand dtypes of the base
GEMM (x's dtype) and of the LoRA path (promote(x, A)), except fp32 for bf16 under the interpreter (its bf16
``tl.dot`` is wrong); ``PRECISION`` is ``tl.dot``'s ``input_precision`` for fp32 operands ("ieee", or "tf32" where
PyTorch allows TF32 matmuls). Accumulation is fp32; each output is rounded once. Element offsets are int64
(``ops/triton_blocks.py``).
"""
import triton
import triton.language as tl

from ..triton_blocks import offsets, tile_offsets


@triton.jit
def _block(table_ptr, pid):
    """(start, end, adapter) of row block ``pid`` of the plan."""
    return tl.load(table_ptr + pid * 3), tl.load(table_ptr + pid * 3 + 1), tl.load(table_ptr + pid * 3 + 2)


@triton.jit
def _block_rows(perm_ptr, start, end, BLOCK_M: tl.constexpr):
    """(rows [BM] of x / y at sorted positions start.., their mask: positions before end)."""
    offs_m = start + tl.arange(0, BLOCK_M)  # [BM] sorted positions
    m_mask = offs_m < end
    return tl.load(perm_ptr + offs_m, mask=m_mask, other=0), m_mask


@triton.jit
def _multi_lora_mma(acc, a, b, DT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with both operands cast to DT (the launcher's dot dtype)."""
    return tl.dot(a.to(DT), b.to(DT), acc, input_precision=PRECISION)


@triton.jit
def multi_lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr, perm_ptr, table_ptr,
    K, R,
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak, stride_hm, stride_hr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """h[rows, r-tile] = x[rows] A_a^T for one row block (zeros for adapter -1). Grid (blocks, r tiles)."""
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    row_start, row_end, adapter = _block(table_ptr, pid)
    if row_start >= row_end:
        return
    rows, m_mask = _block_rows(perm_ptr, row_start, row_end, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if adapter >= 0:
        a_base = a_ptr + offsets(adapter, stride_an)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xt = tl.load(x_ptr + tile_offsets(rows, offs_k, stride_xm, stride_xk),
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_base + tile_offsets(offs_k, offs_r, stride_ak, stride_ar),
                         mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            acc = _multi_lora_mma(acc, xt, at, LORA_DOT_DTYPE, PRECISION)
    out = acc.to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + tile_offsets(rows, offs_r, stride_hm, stride_hr), out,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def multi_lora_gemm_kernel(
    lhs_ptr, rhs_ptr, bias_ptr, lora_lhs_ptr, lora_rhs_ptr, scal_ptr, out_ptr, perm_ptr, table_ptr,
    C, K, R,
    stride_lm, stride_lk, stride_rk, stride_rc, stride_llm, stride_llr,
    stride_lra, stride_lrr, stride_lrc, stride_om, stride_oc,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, LORA_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[rows, c-tile] = lhs[rows] rhs (+ (s_a) lora_lhs[rows] lora_rhs_a unless adapter -1) (+ bias): a base GEMM
    over gathered rows with the adapter's LoRA term in its epilogue, one write of out.

    Forward: lhs = x, rhs = W^T, lora_lhs = h, lora_rhs = B_a^T, HAS_SCALE, HAS_BIAS (C = out, K = in).
    Dgrad: lhs = g, rhs = W, lora_lhs = dh (already scaled), lora_rhs = A_a (C = in, K = out).
    Grid (blocks, c tiles): consecutive programs share the rhs tile.
    """
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    row_start, row_end, adapter = _block(table_ptr, pid)
    if row_start >= row_end:
        return
    rows, m_mask = _block_rows(perm_ptr, row_start, row_end, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    c_mask = offs_c < C
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_mask = offs_k < K
        lhs = tl.load(lhs_ptr + tile_offsets(rows, offs_k, stride_lm, stride_lk),
                      mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        rhs = tl.load(rhs_ptr + tile_offsets(offs_k, offs_c, stride_rk, stride_rc),
                      mask=k_mask[:, None] & c_mask[None, :], other=0.0)  # [BK, BC]
        acc = _multi_lora_mma(acc, lhs, rhs, DOT_DTYPE, PRECISION)
    if adapter >= 0:
        lora_rhs_base = lora_rhs_ptr + offsets(adapter, stride_lra)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)  # [BR]
            r_mask = offs_r < R
            lora_lhs = tl.load(lora_lhs_ptr + tile_offsets(rows, offs_r, stride_llm, stride_llr),
                               mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # [BM, BR]
            if HAS_SCALE:
                # the adapter's scaling goes on the small [BM, BR] tile, not on the [BM, BC] product
                lora_lhs = lora_lhs.to(tl.float32) * tl.load(scal_ptr + adapter)
            lora_rhs = tl.load(lora_rhs_base + tile_offsets(offs_r, offs_c, stride_lrr, stride_lrc),
                               mask=r_mask[:, None] & c_mask[None, :], other=0.0)  # [BR, BC]
            acc = _multi_lora_mma(acc, lora_lhs, lora_rhs, LORA_DOT_DTYPE, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tile_offsets(rows, offs_c, stride_om, stride_oc), acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & c_mask[None, :])


@triton.jit
def multi_lora_grad_shrink_kernel(
    g_ptr, b_ptr, scal_ptr, dh_ptr, perm_ptr, table_ptr,
    N, R,
    stride_gm, stride_gn, stride_bad, stride_bn, stride_br, stride_dm, stride_dr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dh[rows, r-tile] = s_a g[rows] B_a for one row block (nothing for adapter -1). Grid (blocks, r tiles)."""
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    row_start, row_end, adapter = _block(table_ptr, pid)
    if (row_start >= row_end) | (adapter < 0):
        return
    rows, m_mask = _block_rows(perm_ptr, row_start, row_end, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    b_base = b_ptr + offsets(adapter, stride_bad)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < N
        gt = tl.load(g_ptr + tile_offsets(rows, offs_k, stride_gm, stride_gn),
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        bt = tl.load(b_base + tile_offsets(offs_k, offs_r, stride_bn, stride_br),
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _multi_lora_mma(acc, gt, bt, LORA_DOT_DTYPE, PRECISION)
    s = tl.load(scal_ptr + adapter)
    out = (acc * s).to(dh_ptr.dtype.element_ty)
    tl.store(dh_ptr + tile_offsets(rows, offs_r, stride_dm, stride_dr), out,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def multi_lora_segment_grad_kernel(
    lhs_ptr, rhs_ptr, scal_ptr, ws_ptr, perm_ptr, seg_ptr,
    C, R, SPLIT,
    stride_lm, stride_lc, stride_rm, stride_rr, stride_ws, stride_wa, stride_wc, stride_wr,
    HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    LORA_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """ws[split, a, c-tile, r-tile] = (s_a) sum over the split's row chunks of adapter a's segment of lhs^T rhs.

    lhs [N, C], rhs [N, R]: dB = s_a g^T h (lhs = g, C = out, HAS_SCALE) and dA = (x^T dh)^T (lhs = x, C = in,
    stored through transposed ws strides). Grid (n adapters, c tiles * r tiles, SPLIT); split ``j`` takes
    chunks j, j + SPLIT, ... of the segment. An adapter no sequence uses writes zeros. The [c, r] accumulator
    layout needs far fewer registers than [r, c] with the fp32 FMA dot.
    """
    adapter = tl.program_id(0)
    pid_t = tl.program_id(1)
    split = tl.program_id(2)
    num_r = tl.cdiv(R, BLOCK_R)
    pid_c = pid_t // num_r
    pid_r = pid_t % num_r
    seg_start = tl.load(seg_ptr + adapter * 2)
    seg_end = tl.load(seg_ptr + adapter * 2 + 1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    c_mask = offs_c < C
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for m0 in range(seg_start + split * BLOCK_M, seg_end, SPLIT * BLOCK_M):
        rows, m_mask = _block_rows(perm_ptr, m0, seg_end, BLOCK_M)
        lhs_t = tl.load(lhs_ptr + tile_offsets(offs_c, rows, stride_lc, stride_lm),
                        mask=c_mask[:, None] & m_mask[None, :], other=0.0)  # [BC, BM]
        rhs = tl.load(rhs_ptr + tile_offsets(rows, offs_r, stride_rm, stride_rr),
                      mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # [BM, BR]
        acc = _multi_lora_mma(acc, lhs_t, rhs, LORA_DOT_DTYPE, PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scal_ptr + adapter)
    out = ws_ptr + offsets(split, stride_ws) + offsets(adapter, stride_wa)
    tl.store(out + tile_offsets(offs_c, offs_r, stride_wc, stride_wr), acc,
             mask=c_mask[:, None] & r_mask[None, :])
