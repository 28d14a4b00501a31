"""Triton kernels of multi-adapter LoRA (SGMV): @triton.jit bodies only; launchers live in triton_impl.py.

Every row-block kernel reads its block from ``table`` ([blocks, 3] int32: start, end, adapter), a range of the rows
sorted by adapter, and gathers the original rows through ``perm`` (sorted position -> row of x / y). Blocks past the
real count have start == end and exit at once; adapter -1 means the base layer only.

Constexprs shared by the kernels: ``DOT_DTYPE`` / ``LORA_DOT_DTYPE`` are the ``tl.dot`` operand dtypes of the base
GEMM (x's dtype) and of the LoRA path (promote(x, A)), except fp32 for bf16 under the interpreter (its bf16
``tl.dot`` is wrong); ``PRECISION`` is ``tl.dot``'s ``input_precision`` for fp32 operands ("ieee", or "tf32" where
PyTorch allows TF32 matmuls). Accumulation is fp32; each output is rounded once.
"""
import triton
import triton.language as tl


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
    row_start = tl.load(table_ptr + pid * 3)
    row_end = tl.load(table_ptr + pid * 3 + 1)
    adapter = tl.load(table_ptr + pid * 3 + 2)
    if row_start >= row_end:
        return
    offs_m = row_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    rows = tl.load(perm_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if adapter >= 0:
        a_base = a_ptr + adapter.to(tl.int64) * stride_an
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                         mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            acc = _multi_lora_mma(acc, xt, at, LORA_DOT_DTYPE, PRECISION)
    out = acc.to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr, out,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def multi_lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, scal_ptr, y_ptr, perm_ptr, table_ptr,
    N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hr,
    stride_bad, stride_bn, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, LORA_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """y[rows, n-tile] = x W^T (+ s_a h B_a^T unless adapter -1) (+ b): the expand fused in the base GEMM's epilogue.

    Grid (blocks, out tiles): consecutive programs share the W tile.
    """
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    row_start = tl.load(table_ptr + pid * 3)
    row_end = tl.load(table_ptr + pid * 3 + 1)
    adapter = tl.load(table_ptr + pid * 3 + 2)
    if row_start >= row_end:
        return
    offs_m = row_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    rows = tl.load(perm_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                     mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        acc = _multi_lora_mma(acc, xt, wt, DOT_DTYPE, PRECISION)
    if adapter >= 0:
        b_base = b_ptr + adapter.to(tl.int64) * stride_bad
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            ht = tl.load(h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            bt = tl.load(b_base + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                         mask=n_mask[None, :] & r_mask[:, None], other=0.0)
            lora = _multi_lora_mma(lora, ht, bt, LORA_DOT_DTYPE, PRECISION)
        s = tl.load(scal_ptr + adapter)
        acc += s * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, out,
             mask=m_mask[:, None] & n_mask[None, :])


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
    row_start = tl.load(table_ptr + pid * 3)
    row_end = tl.load(table_ptr + pid * 3 + 1)
    adapter = tl.load(table_ptr + pid * 3 + 2)
    if (row_start >= row_end) | (adapter < 0):
        return
    offs_m = row_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    rows = tl.load(perm_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    b_base = b_ptr + adapter.to(tl.int64) * stride_bad
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < N
        gt = tl.load(g_ptr + rows[:, None] * stride_gm + offs_k[None, :] * stride_gn,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        bt = tl.load(b_base + offs_k[:, None] * stride_bn + offs_r[None, :] * stride_br,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _multi_lora_mma(acc, gt, bt, LORA_DOT_DTYPE, PRECISION)
    s = tl.load(scal_ptr + adapter)
    out = (acc * s).to(dh_ptr.dtype.element_ty)
    tl.store(dh_ptr + rows[:, None] * stride_dm + offs_r[None, :] * stride_dr, out,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def multi_lora_dx_kernel(
    g_ptr, w_ptr, dh_ptr, a_ptr, dx_ptr, perm_ptr, table_ptr,
    N, K, R,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_dm, stride_dr,
    stride_aad, stride_ar, stride_ak, stride_xm, stride_xk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, LORA_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dx[rows, in-tile] = g W (+ dh A_a unless adapter -1): the LoRA term fused in the dgrad GEMM's epilogue.

    Here the GEMM's reduction runs over ``N`` (out features) and its tile over ``K`` (in features). Grid (blocks,
    in tiles).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    row_start = tl.load(table_ptr + pid * 3)
    row_end = tl.load(table_ptr + pid * 3 + 1)
    adapter = tl.load(table_ptr + pid * 3 + 2)
    if row_start >= row_end:
        return
    offs_m = row_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    rows = tl.load(perm_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        gt = tl.load(g_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                     mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _multi_lora_mma(acc, gt, wt, DOT_DTYPE, PRECISION)
    if adapter >= 0:
        a_base = a_ptr + adapter.to(tl.int64) * stride_aad
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            dht = tl.load(dh_ptr + rows[:, None] * stride_dm + offs_r[None, :] * stride_dr,
                          mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            at = tl.load(a_base + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                         mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc = _multi_lora_mma(acc, dht, at, LORA_DOT_DTYPE, PRECISION)
    out = acc.to(dx_ptr.dtype.element_ty)
    tl.store(dx_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk, out,
             mask=m_mask[:, None] & k_mask[None, :])


@triton.jit
def multi_lora_dB_kernel(
    g_ptr, h_ptr, scal_ptr, ws_ptr, perm_ptr, seg_ptr,
    N, R, SPLIT,
    stride_gm, stride_gn, stride_hm, stride_hr, stride_ws, stride_wa, stride_wn, stride_wr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    LORA_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """ws[split, a, n-tile, r-tile] = s_a sum over the split's row chunks of adapter a's segment of g^T h.

    Grid (n adapters, out tiles * r tiles, SPLIT); split ``j`` takes chunks j, j + SPLIT, ... of the segment. An
    adapter no sequence uses writes zeros.
    """
    adapter = tl.program_id(0)
    pid_t = tl.program_id(1)
    split = tl.program_id(2)
    num_r = tl.cdiv(R, BLOCK_R)
    pid_n = pid_t // num_r
    pid_r = pid_t % num_r
    seg_start = tl.load(seg_ptr + adapter * 2)
    seg_end = tl.load(seg_ptr + adapter * 2 + 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(seg_start + split * BLOCK_M, seg_end, SPLIT * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seg_end
        rows = tl.load(perm_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        gt = tl.load(g_ptr + rows[None, :] * stride_gm + offs_n[:, None] * stride_gn,
                     mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        ht = tl.load(h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _multi_lora_mma(acc, gt, ht, LORA_DOT_DTYPE, PRECISION)
    s = tl.load(scal_ptr + adapter)
    out = ws_ptr + split.to(tl.int64) * stride_ws + adapter.to(tl.int64) * stride_wa
    tl.store(out + offs_n[:, None] * stride_wn + offs_r[None, :] * stride_wr, acc * s,
             mask=n_mask[:, None] & r_mask[None, :])


@triton.jit
def multi_lora_dA_kernel(
    dh_ptr, x_ptr, ws_ptr, perm_ptr, seg_ptr,
    K, R, SPLIT,
    stride_dm, stride_dr, stride_xm, stride_xk, stride_ws, stride_wa, stride_wr, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    LORA_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """ws[split, a, r-tile, in-tile] = sum over the split's row chunks of adapter a's segment of dh^T x.

    Grid (n adapters, r tiles * in tiles, SPLIT), as :func:`multi_lora_dB_kernel`.
    """
    adapter = tl.program_id(0)
    pid_t = tl.program_id(1)
    split = tl.program_id(2)
    num_r = tl.cdiv(R, BLOCK_R)
    pid_k = pid_t // num_r
    pid_r = pid_t % num_r
    seg_start = tl.load(seg_ptr + adapter * 2)
    seg_end = tl.load(seg_ptr + adapter * 2 + 1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    # accumulated transposed, acc [in-tile, r-tile] = x^T dh (the layout of multi_lora_dB_kernel: far fewer
    # registers than dh^T x with the fp32 FMA dot)
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for m0 in range(seg_start + split * BLOCK_M, seg_end, SPLIT * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seg_end
        rows = tl.load(perm_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        xt = tl.load(x_ptr + rows[None, :] * stride_xm + offs_k[:, None] * stride_xk,
                     mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        dht = tl.load(dh_ptr + rows[:, None] * stride_dm + offs_r[None, :] * stride_dr,
                      mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _multi_lora_mma(acc, xt, dht, LORA_DOT_DTYPE, PRECISION)
    out = ws_ptr + split.to(tl.int64) * stride_ws + adapter.to(tl.int64) * stride_wa
    tl.store(out + offs_k[:, None] * stride_wk + offs_r[None, :] * stride_wr, acc,
             mask=k_mask[:, None] & r_mask[None, :])
