"""Triton kernels of the NF4 family: ``@triton.jit`` bodies only (launchers: triton_impl.py). README.md has the math.

Layout: W's n elements flat in row-major order; ``packed`` [ceil(n/2)] uint8, element i in byte i // 2, the high
nibble for even i; block absmax ``absmax[i // BLOCKSIZE]`` fp32. ``code`` fp32 [16], ``code8`` fp32 [256] (sorted).
``HAND_BF16`` rounds fp32 to bf16 to nearest even by hand: set under the interpreter, whose bf16 cast truncates.
Quantization divides with ``tl.math.div_rn`` (correctly rounded, as torch, C++ and CUDA divide; ``/`` compiles to
the approximate ``div.full.f32``), so its codes are bit-exact on a GPU too. Element offsets are int64
(``ops/triton_blocks.py``).
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
def nf4_decode(packed_ptr, absmax_ptr, code_ptr, flat, mask, BLOCKSIZE: tl.constexpr):
    """fp32 code[q_i] * absmax[i // BLOCKSIZE] at flat indices ``flat`` (any tile shape, int64)."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    return value * tl.load(absmax_ptr + flat // BLOCKSIZE, mask=mask, other=0.0)


@triton.jit
def nf4_weight(packed_ptr, absmax_ptr, code_ptr, flat, mask, BLOCKSIZE: tl.constexpr, W_DTYPE: tl.constexpr,
               X_DTYPE: tl.constexpr, HAND_BF16: tl.constexpr):
    """W's elements at ``flat`` as the torch path computes them: dequantized to W_DTYPE, then cast to X_DTYPE."""
    w = nf4_round(nf4_decode(packed_ptr, absmax_ptr, code_ptr, flat, mask, BLOCKSIZE), W_DTYPE, HAND_BF16)
    return nf4_round(w.to(tl.float32), X_DTYPE, HAND_BF16)


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
                      stride_wr, stride_wc, lora_lhs_ptr, lora_scale_ptr, lora_rhs_ptr, RL, stride_ll, stride_lrr,
                      stride_lrc, lora_alpha, seed, threshold, keep_scale,
                      HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, W_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, HAND_BF16: tl.constexpr, PRECISION: tl.constexpr,
                      HAS_LORA: tl.constexpr, HAS_LORA_SCALE: tl.constexpr, LORA_DROPOUT: tl.constexpr,
                      MASK_GROUPED: tl.constexpr, LORA_DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_RL: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, C] = a[M, R] @ Wop (+ bias) (+ the LoRA term), Wop[r, c] = W's flat element r * stride_wr + c * stride_wc
    dequantized in registers, tile by tile, to bitsandbytes' values (W_DTYPE, then the compute dtype X_DTYPE), never
    written out. Forward: Wop = W^T (R = in, C = out, strides (1, in)); dgrad: Wop = W (R = out, C = in, strides
    (in, 1)). QLoRA's term in the epilogue: lora_alpha * (lora_lhs * e) @ lora_rhs ([M, RL] @ [RL, C], rhs strided):
    s (h e) B^T in the forward, (dh A) * mask / (1 - p) in the dgrad (LORA_DROPOUT, the mask regenerated from seed).
    """
    # GROUP_M row tiles at a time reuse the decoded W tiles from L2
    pid_m, pid_c = lora_grouped_tile(tl.program_id(0), M, C, BLOCK_M, BLOCK_C, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        red = r0 + tl.arange(0, BLOCK_R)  # [BR]
        a = tl.load(a_ptr + tile_offsets(rows, red, stride_am, stride_ar),
                    mask=(rows[:, None] < M) & (red[None, :] < R), other=0.0)  # [BM, BR]
        w_mask = (red[:, None] < R) & (cols[None, :] < C)
        flat = tile_offsets(red, cols, stride_wr, stride_wc)  # [BR, BC]
        w = nf4_weight(packed_ptr, absmax_ptr, code_ptr, flat, w_mask, BLOCKSIZE, W_DTYPE, X_DTYPE, HAND_BF16)
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_LORA:
        if LORA_DROPOUT:
            # the mask is elementwise on the LoRA product, so that product needs its own accumulator
            lora = lora_rank_expand(tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32), lora_lhs_ptr, lora_scale_ptr,
                                    lora_rhs_ptr, rows, cols, M, C, RL, stride_ll, stride_lrr, stride_lrc, lora_alpha,
                                    HAS_LORA_SCALE, LORA_DOT_DTYPE, PRECISION, BLOCK_RL)
            keep = lora_keep_mask(seed, rows, pid_c * BLOCK_C, C, threshold, BLOCK_C, MASK_GROUPED)
            acc += tl.where(keep, lora * keep_scale, 0.0)
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
                    HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, W_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr,
                    HAND_BF16: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Decode-time forward: out[m, c] = sum_r a[m, r] W[c, r] (+ bias) for a few rows m, without tensor cores;
    program (m, c-tile) streams its BLOCK_C rows of W once (4 bits per weight)."""
    m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC] output features = rows of W
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        red = r0 + tl.arange(0, BLOCK_R)  # [BR] input features
        a = tl.load(a_ptr + offsets(m, stride_am) + offsets(red, stride_ar), mask=red < R,
                    other=0.0).to(tl.float32)  # [BR]
        w_mask = (cols[:, None] < C) & (red[None, :] < R)
        flat = tile_offsets(cols, red, R, 1)  # [BC, BR], W row-major [C, R]
        w = nf4_weight(packed_ptr, absmax_ptr, code_ptr, flat, w_mask, BLOCKSIZE, W_DTYPE, X_DTYPE, HAND_BF16)
        acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets(m, C) + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < C)
