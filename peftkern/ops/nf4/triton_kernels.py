"""Triton kernels of the NF4 family: ``@triton.jit`` bodies only (launchers: triton_impl.py). README.md has the math.

Layout: W's n elements flat in row-major order; ``packed`` [ceil(n/2)] uint8, element i in byte i // 2, the high
nibble for even i; block absmax ``absmax[i // BLOCKSIZE]`` fp32. ``code`` fp32 [16], ``code8`` fp32 [256] (sorted).
``HAND_BF16`` rounds fp32 to bf16 to nearest even by hand: set under the interpreter, whose bf16 cast truncates.
Quantization divides with ``tl.math.div_rn`` (correctly rounded, as torch, C++ and CUDA divide; ``/`` compiles to
the approximate ``div.full.f32``), so its codes are bit-exact on a GPU too. Element offsets are int64
(``ops/triton_blocks.py``).
The matmuls decode W tile by tile (``nf4_tile``): where W's rows are whole blocks (ALIGNED) each byte is loaded once
and split by shifts into the even and odd columns, which the dots take as two halves, and each block's absmax is
loaded once.
"""
import triton
import triton.language as tl

from ..triton_blocks import lora_grouped_tile, lora_keep_mask, lora_rank_expand, offsets, tile_offsets


@triton.jit
def nf4_round(v, DT: tl.constexpr, HAND_BF16: tl.constexpr):
    """fp32 ``v`` rounded to DT (nearest even)."""
    if HAND_BF16 and DT == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(DT)


@triton.jit
def nf4_tile(packed_ptr, absmax_ptr, code_ptr, rows, col0, n_rows, n_cols, BLOCK_COLS: tl.constexpr,
             BLOCKSIZE: tl.constexpr, ALIGNED: tl.constexpr):
    """(even, odd): fp32 code[q] * absmax of W [n_rows, n_cols] (row-major) at ``rows`` x the columns
    ``col0 + 2 j`` and ``col0 + 2 j + 1``, j < BLOCK_COLS / 2 ([len(rows), BLOCK_COLS / 2] each, 0 outside W).

    The callers take the two halves as they come, never interleaving them element by element: the forward's dot
    pairs them with a's even and odd columns, the dgrad keeps two accumulators. ALIGNED (``n_cols % BLOCKSIZE ==
    0``, col0 a multiple of BLOCK_COLS; both powers of two): each byte is loaded once, its high nibble the even
    column and its low nibble the odd one by shifts, and one absmax per block, per row where the tile lies in one
    block, else [rows, BLOCK_COLS / BLOCKSIZE] broadcast over the block. Otherwise (blocks spanning rows, odd
    widths) each element gathers its byte and its block's absmax. The code table (64 bytes) is gathered per
    element: it stays in L1, one wavefront a warp (PTX: ~7 instructions an element, against ~26 for a select tree
    over 16 codes in registers).
    """
    row_ok = rows < n_rows
    pairs = col0 // 2 + tl.arange(0, BLOCK_COLS // 2)  # [BC / 2]
    if ALIGNED:
        byte = tl.load(packed_ptr + offsets(rows, n_cols // 2)[:, None] + pairs[None, :],
                       mask=row_ok[:, None] & (pairs[None, :] < n_cols // 2), other=0).to(tl.int32)
        even = tl.load(code_ptr + (byte >> 4))
        odd = tl.load(code_ptr + (byte & 0xF))
        row_blocks = offsets(rows, n_cols // BLOCKSIZE)  # [len(rows)] first block of each row
        if BLOCK_COLS <= BLOCKSIZE:
            scale = tl.load(absmax_ptr + row_blocks + col0 // BLOCKSIZE, mask=row_ok, other=0.0)  # col0 < n_cols
            return even * scale[:, None], odd * scale[:, None]
        else:
            NB: tl.constexpr = BLOCK_COLS // BLOCKSIZE
            blocks = col0 // BLOCKSIZE + tl.arange(0, NB)
            scale = tl.load(absmax_ptr + row_blocks[:, None] + blocks[None, :],
                            mask=row_ok[:, None] & (blocks[None, :] < n_cols // BLOCKSIZE), other=0.0)[:, :, None]
            even = tl.reshape(tl.reshape(even, (rows.shape[0], NB, BLOCKSIZE // 2)) * scale,
                              (rows.shape[0], BLOCK_COLS // 2))
            odd = tl.reshape(tl.reshape(odd, (rows.shape[0], NB, BLOCKSIZE // 2)) * scale,
                             (rows.shape[0], BLOCK_COLS // 2))
            return even, odd
    else:
        even_col = 2 * pairs
        return (_nf4_elements(packed_ptr, absmax_ptr, code_ptr, rows, even_col, row_ok, n_cols, BLOCKSIZE),
                _nf4_elements(packed_ptr, absmax_ptr, code_ptr, rows, even_col + 1, row_ok, n_cols, BLOCKSIZE))


@triton.jit
def _nf4_elements(packed_ptr, absmax_ptr, code_ptr, rows, cols, row_ok, n_cols, BLOCKSIZE: tl.constexpr):
    """fp32 code[q] * absmax of W [*, n_cols] at ``rows`` x ``cols``, element by element (0 outside W)."""
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    flat = tile_offsets(rows, cols, n_cols, 1)
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    value = tl.load(code_ptr + tl.where(flat % 2 == 0, byte >> 4, byte & 0xF))
    return value * tl.load(absmax_ptr + flat // BLOCKSIZE, mask=mask, other=0.0)


@triton.jit
def nf4_weight(packed_ptr, absmax_ptr, code_ptr, rows, col0, n_rows, n_cols, BLOCK_COLS: tl.constexpr,
               BLOCKSIZE: tl.constexpr, ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr,
               HAND_BF16: tl.constexpr):
    """The (even, odd) ``nf4_tile`` of W as the torch path computes it: dequantized to W_DTYPE, then cast to
    X_DTYPE."""
    even, odd = nf4_tile(packed_ptr, absmax_ptr, code_ptr, rows, col0, n_rows, n_cols, BLOCK_COLS, BLOCKSIZE,
                         ALIGNED)
    return (nf4_round(nf4_round(even, W_DTYPE, HAND_BF16).to(tl.float32), X_DTYPE, HAND_BF16),
            nf4_round(nf4_round(odd, W_DTYPE, HAND_BF16).to(tl.float32), X_DTYPE, HAND_BF16))


@triton.jit
def nf4_dequantize_kernel(packed_ptr, absmax_ptr, qabsmax_ptr, absmax2_ptr, offset_ptr, code_ptr, code8_ptr, out_ptr,
                          n, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                          BLOCK: tl.constexpr):
    """out[i] = code[q_i] * absmax_j (decoded from the 8-bit state when DOUBLE_QUANT), BLOCK elements per program.

    The absmax decode fp32(code8[qa] * absmax2) + offset must round twice: the launcher disables FP fusion."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < n
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    value = tl.load(code_ptr + tl.where(offs % 2 == 0, byte >> 4, byte & 0xF), mask=mask, other=0.0)
    blk = offs // BLOCKSIZE
    if DOUBLE_QUANT:
        qa = tl.load(qabsmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code8_ptr + qa, mask=mask, other=0.0) * tl.load(absmax2_ptr + blk // NESTED_BLOCKSIZE,
                                                                         mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (value * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def nf4_quantize_kernel(w_ptr, code_ptr, packed_ptr, absmax_ptr, n, BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr):
    """ROWS quantization blocks per program: absmax, the code index (midpoints strictly below), packing, one pass.

    Elements past n load as 0: they leave absmax alone and an odd count's pad nibble becomes code 7 (0.0)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS] block indices
    flat = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # [ROWS, BLOCKSIZE]
    x = tl.load(w_ptr + flat, mask=flat < n, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)  # [ROWS]
    # NaN must reach absmax (the caller refuses a non-finite one); max reductions may skip it
    absmax = tl.where(tl.sum((x != x).to(tl.int32), axis=1) > 0, float("nan"), absmax)
    inv = tl.math.div_rn(1.0, tl.maximum(absmax, 1e-38))
    s = tl.minimum(tl.maximum(x * inv[:, None], -1.0), 1.0)
    q = tl.zeros((ROWS, BLOCKSIZE), dtype=tl.int32)
    for k in tl.static_range(15):
        mid = (tl.load(code_ptr + k) + tl.load(code_ptr + k + 1)) * 0.5  # exact, as the torch path's / 2
        q += (s > mid).to(tl.int32)
    hi, lo = tl.split(tl.reshape(q, (ROWS, BLOCKSIZE // 2, 2)))  # [ROWS, BLOCKSIZE / 2] each
    pair = rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + pair, ((hi << 4) | lo).to(tl.uint8), mask=pair < (n + 1) // 2)
    tl.store(absmax_ptr + rows, absmax, mask=rows * BLOCKSIZE < n)


@triton.jit
def nf4_quantize_absmax_kernel(absmax_ptr, offset_ptr, code8_ptr, q_ptr, absmax2_ptr, blocks,
                               NESTED_BLOCKSIZE: tl.constexpr):
    """Double quantization of ``absmax - offset``, one 256-block per program: nearest code8 entry, ties to even."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * NESTED_BLOCKSIZE + tl.arange(0, NESTED_BLOCKSIZE)  # [NESTED_BLOCKSIZE]
    mask = offs < blocks
    a = tl.load(absmax_ptr + offs, mask=mask, other=0.0) - tl.load(offset_ptr)
    a = tl.where(mask, a, 0.0)
    absmax2 = tl.max(tl.abs(a), axis=0)
    s = tl.minimum(tl.maximum(a * tl.math.div_rn(1.0, tl.maximum(absmax2, 1e-38)), -1.0), 1.0)
    j = tl.zeros((NESTED_BLOCKSIZE,), dtype=tl.int32)  # binary search: the last code8[j] <= s (0 below code8[0])
    for i in tl.static_range(8):
        cand = j + (128 >> i)
        j = tl.where(tl.load(code8_ptr + cand) <= s, cand, j)
    j = tl.minimum(j, 254)
    d_lo = s - tl.load(code8_ptr + j)
    d_hi = tl.load(code8_ptr + j + 1) - s
    q = tl.where(d_hi < d_lo, j + 1, tl.where(d_lo < d_hi, j, j + (j & 1)))
    tl.store(q_ptr + offs, q.to(tl.uint8), mask=mask)
    tl.store(absmax2_ptr + pid, absmax2)


@triton.jit(do_not_specialize=["seed"])
def nf4_matmul_kernel(a_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, out_ptr, M, C, R, stride_am, stride_ar,
                      lora_lhs_ptr, lora_scale_ptr, lora_rhs_ptr, RL, stride_ll, stride_lrr, stride_lrc, lora_alpha,
                      seed, threshold, keep_scale,
                      HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, ALIGNED: tl.constexpr,
                      TRANSPOSE_W: tl.constexpr, W_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, HAND_BF16: tl.constexpr, PRECISION: tl.constexpr,
                      HAS_LORA: tl.constexpr, HAS_LORA_SCALE: tl.constexpr, LORA_DROPOUT: tl.constexpr,
                      MASK_GROUPED: tl.constexpr, LORA_DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RL: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, C] = a[M, R] @ Wop (+ bias) (+ the LoRA term) for the few rows (M <= 128) where decoding W in
    registers beats dequantizing it first: Wop = W^T (TRANSPOSE_W, the forward: R = in, C = out) or W (the dgrad:
    R = out, C = in), W [out, in] decoded tile by tile (``nf4_weight``: bitsandbytes' values in W_DTYPE, then the
    compute dtype X_DTYPE), never written out. QLoRA's term in the epilogue: lora_alpha * (lora_lhs * e) @ lora_rhs
    ([M, RL] @ [RL, C], rhs strided): s (h e) B^T in the forward, (dh A) * mask / (1 - p) in the dgrad
    (LORA_DROPOUT, the mask regenerated from seed).
    """
    # GROUP_M row tiles at a time reuse the decoded W tiles from L2
    pid_m, pid_c = lora_grouped_tile(tl.program_id(0), M, C, BLOCK_M, BLOCK_C, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    row_ok = rows < M
    # the products run transposed, out^T = Wop^T a^T, so W is the dot's first operand: split between the warps,
    # each decoding its own rows (as the second operand it would be decoded by every warp); a^T is the small one
    if TRANSPOSE_W:
        acc_t = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    else:
        acc_even = tl.zeros((BLOCK_C // 2, BLOCK_M), dtype=tl.float32)
        acc_odd = tl.zeros((BLOCK_C // 2, BLOCK_M), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        if TRANSPOSE_W:
            # W [C, R]: rows cols; its even and odd columns of the step meet a's even and odd columns
            w_even, w_odd = nf4_weight(packed_ptr, absmax_ptr, code_ptr, cols, r0, C, R, BLOCK_R, BLOCKSIZE, ALIGNED,
                                       W_DTYPE, X_DTYPE, HAND_BF16)  # [BC, BR / 2] each
            red = r0 + 2 * tl.arange(0, BLOCK_R // 2)  # [BR / 2] even reduction indices
            a_even = a_ptr + tile_offsets(red, rows, stride_ar, stride_am)  # [BR / 2, BM] of a^T
            a = tl.load(a_even, mask=(red[:, None] < R) & row_ok[None, :], other=0.0)
            acc_t = tl.dot(w_even.to(DOT_DTYPE), a.to(DOT_DTYPE), acc_t, input_precision=PRECISION)
            a = tl.load(a_even + stride_ar, mask=(red[:, None] + 1 < R) & row_ok[None, :], other=0.0)
            acc_t = tl.dot(w_odd.to(DOT_DTYPE), a.to(DOT_DTYPE), acc_t, input_precision=PRECISION)
        else:
            # W [R, C]: rows red; its even and odd columns are the even and odd output columns
            red = r0 + tl.arange(0, BLOCK_R)  # [BR]
            a = tl.load(a_ptr + tile_offsets(red, rows, stride_ar, stride_am),
                        mask=(red[:, None] < R) & row_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BR, BM] of a^T
            w_even, w_odd = nf4_weight(packed_ptr, absmax_ptr, code_ptr, red, pid_c * BLOCK_C, R, C, BLOCK_C,
                                       BLOCKSIZE, ALIGNED, W_DTYPE, X_DTYPE, HAND_BF16)  # [BR, BC / 2] each
            acc_even = tl.dot(tl.trans(w_even).to(DOT_DTYPE), a, acc_even, input_precision=PRECISION)
            acc_odd = tl.dot(tl.trans(w_odd).to(DOT_DTYPE), a, acc_odd, input_precision=PRECISION)
    if TRANSPOSE_W:
        acc = tl.trans(acc_t)  # [BM, BC]
    else:  # the even and odd columns interleaved, once per tile
        acc = tl.reshape(tl.join(tl.trans(acc_even), tl.trans(acc_odd)), (BLOCK_M, BLOCK_C))
    if HAS_LORA:
        if LORA_DROPOUT:
            # the mask is elementwise on the LoRA product, so that product needs its own accumulator
            keep = lora_keep_mask(seed, rows, pid_c * BLOCK_C, C, threshold, BLOCK_C, MASK_GROUPED)
            lora = lora_rank_expand(tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32), lora_lhs_ptr, lora_scale_ptr,
                                    lora_rhs_ptr, rows, cols, M, C, RL, stride_ll, stride_lrr, stride_lrc,
                                    lora_alpha * keep_scale, HAS_LORA_SCALE, LORA_DOT_DTYPE, PRECISION, BLOCK_RL)
            acc += tl.where(keep, lora, 0.0)
        else:
            acc = lora_rank_expand(acc, lora_lhs_ptr, lora_scale_ptr, lora_rhs_ptr, rows, cols, M, C, RL, stride_ll,
                                   stride_lrr, stride_lrc, lora_alpha, HAS_LORA_SCALE, LORA_DOT_DTYPE, PRECISION,
                                   BLOCK_RL)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tile_offsets(rows, cols, C, 1), acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < C))


@triton.jit
def nf4_gemv_kernel(a_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, out_ptr, M, C, R, stride_am, stride_ar,
                    HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr,
                    X_DTYPE: tl.constexpr, HAND_BF16: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """Decode-time forward: out[m, c] = sum_r a[m, r] W[c, r] (+ bias) for the M <= ROWS rows, without tensor
    cores; program c-tile decodes its BLOCK_C rows of W once (4 bits per weight) for all the rows."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC] output features = rows of W
    ms = tl.arange(0, ROWS)  # [ROWS]
    acc = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        red = r0 + 2 * tl.arange(0, BLOCK_R // 2)  # [BR / 2] even input features
        w_even, w_odd = nf4_weight(packed_ptr, absmax_ptr, code_ptr, cols, r0, C, R, BLOCK_R, BLOCKSIZE, ALIGNED,
                                   W_DTYPE, X_DTYPE, HAND_BF16)  # [BC, BR / 2] each, W row-major [C, R]
        w_even, w_odd = w_even.to(tl.float32), w_odd.to(tl.float32)
        for m in tl.static_range(ROWS):
            # a row past M reads row M - 1 (valid memory); its sums are not stored
            a_even = a_ptr + offsets(tl.minimum(M - 1, m), stride_am) + offsets(red, stride_ar)
            a = tl.load(a_even, mask=red < R, other=0.0).to(tl.float32)
            part = w_even * a[None, :]
            a = tl.load(a_even + stride_ar, mask=red + 1 < R, other=0.0).to(tl.float32)
            part = tl.sum(part + w_odd * a[None, :], axis=1)  # [BC]
            acc = tl.where(ms[:, None] == m, acc + part[None, :], acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tile_offsets(ms, cols, C, 1), acc.to(out_ptr.dtype.element_ty),
             mask=(ms[:, None] < M) & (cols[None, :] < C))
