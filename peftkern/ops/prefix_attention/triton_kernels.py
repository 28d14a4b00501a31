"""Triton kernels of prefix attention (flash-attention style): ``@triton.jit`` bodies only (launchers:
triton_impl.py). README.md has the math.

Notation: q [B, Hq, S, D], k/v [B, Hkv, S, D], prefix pk/pv [B or 1, Hkv, P, D] (batch stride 0 when shared),
kpm [B, S] (True = padding), o [B, Hq, S, D], lse [B, Hq, S] fp32. Query head h reads key/value head h // G.
Tiles: BLOCK_M queries, BLOCK_N keys, BLOCK_D >= D features (masked). Scores and statistics are fp32; dot operands
are cast to DOT_DTYPE (the inputs' dtype; fp32 for bf16 under the interpreter). Element offsets are int64
(``ops/triton_blocks.py``).
"""
import triton
import triton.language as tl

from ..triton_blocks import offsets, tile_offsets


@triton.jit
def prefix_attention_scores(q, kt, cols, rows, n_keys, kpm_row_ptr, scale, PREFIX: tl.constexpr,
                            CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
                            PRECISION: tl.constexpr):
    """Scaled scores [BM, BN] = q [BM, BD] @ kt [BD, BN], -inf where a key is not visible to a query: past the
    keys; for sequence keys also after the query (CAUSAL) or padding (HAS_PAD). Prefix keys are always visible."""
    s = tl.dot(q.to(DOT_DTYPE), kt.to(DOT_DTYPE), input_precision=PRECISION) * scale
    visible = cols[None, :] < n_keys
    if not PREFIX:
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        if HAS_PAD:
            pad = tl.load(kpm_row_ptr + cols, mask=cols < n_keys, other=1).to(tl.int1)
            visible = visible & ~pad[None, :]
    return tl.where(visible, s, float("-inf"))


@triton.jit
def prefix_attention_online(acc, m_i, l_i, s, v, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step: fold scores s [BM, BN] and values v [BN, BD] into (acc, running max, running sum)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet keeps zeros
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def prefix_attention_fwd_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, kpm_ptr, o_ptr, lse_ptr, S, P, D, Hq, G, scale,
                                stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb,
                                stride_vh, stride_vs, stride_pkb, stride_pkh, stride_pkp, stride_pvb, stride_pvh,
                                stride_pvp, stride_mb, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                                DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """o and lse of BLOCK_M queries of one (batch, head): the prefix keys, then the sequence keys up to the causal
    bound, from their own buffers. Grid (cdiv(S, BLOCK_M), B * Hq); feature stride 1 everywhere."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    kvh = h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    dims = tl.arange(0, BLOCK_D)  # [BD]
    q_base = q_ptr + offsets(b, stride_qb) + offsets(h, stride_qh)
    q = tl.load(q_base + tile_offsets(rows, dims, stride_qs, 1), mask=(rows[:, None] < S) & (dims[None, :] < D),
                other=0.0)  # [BM, BD]
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    pk_base = pk_ptr + offsets(b, stride_pkb) + offsets(kvh, stride_pkh)
    pv_base = pv_ptr + offsets(b, stride_pvb) + offsets(kvh, stride_pvh)
    for n0 in range(0, P, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)  # [BN] prefix keys
        kt = tl.load(pk_base + tile_offsets(dims, cols, 1, stride_pkp),
                     mask=(cols[None, :] < P) & (dims[:, None] < D), other=0.0)  # [BD, BN]
        v = tl.load(pv_base + tile_offsets(cols, dims, stride_pvp, 1),
                    mask=(cols[:, None] < P) & (dims[None, :] < D), other=0.0)  # [BN, BD]
        s = prefix_attention_scores(q, kt, cols, rows, P, kpm_ptr, scale, True, CAUSAL, False, DOT_DTYPE, PRECISION)
        acc, m_i, l_i = prefix_attention_online(acc, m_i, l_i, s, v, DOT_DTYPE, PRECISION)
    k_base = k_ptr + offsets(b, stride_kb) + offsets(kvh, stride_kh)
    v_base = v_ptr + offsets(b, stride_vb) + offsets(kvh, stride_vh)
    hi = tl.minimum(S, (pid_m + 1) * BLOCK_M) if CAUSAL else S  # keys past the last query are never visible
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)  # [BN] sequence keys
        kt = tl.load(k_base + tile_offsets(dims, cols, 1, stride_ks),
                     mask=(cols[None, :] < S) & (dims[:, None] < D), other=0.0)
        v = tl.load(v_base + tile_offsets(cols, dims, stride_vs, 1),
                    mask=(cols[:, None] < S) & (dims[None, :] < D), other=0.0)
        s = prefix_attention_scores(q, kt, cols, rows, S, kpm_ptr + offsets(b, stride_mb), scale, False, CAUSAL,
                                    HAS_PAD, DOT_DTYPE, PRECISION)
        acc, m_i, l_i = prefix_attention_online(acc, m_i, l_i, s, v, DOT_DTYPE, PRECISION)
    empty = l_i == 0.0  # no visible key: o = 0, lse = +inf (so the backward's probabilities are 0)
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    out_rows = bh.to(tl.int64) * S + rows
    tl.store(o_ptr + out_rows[:, None] * D + dims[None, :], o.to(o_ptr.dtype.element_ty),
             mask=(rows[:, None] < S) & (dims[None, :] < D))
    tl.store(lse_ptr + out_rows, lse, mask=rows < S)


@triton.jit
def prefix_attention_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                                   S, P, D, Hq, G, scale, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh,
                                   stride_ks, stride_vb, stride_vh, stride_vs, stride_pkb, stride_pkh, stride_pkp,
                                   stride_pvb, stride_pvh, stride_pvp, stride_mb, CAUSAL: tl.constexpr,
                                   HAS_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq of BLOCK_M queries: sum over visible keys of ds k, ds = p (do . v - delta), p recomputed from lse.
    do, lse, delta, dq are contiguous [B * Hq * S, (D)]. Grid (cdiv(S, BLOCK_M), B * Hq)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    kvh = h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    dims = tl.arange(0, BLOCK_D)  # [BD]
    row_ok = rows < S
    tile = (rows[:, None] < S) & (dims[None, :] < D)
    q = tl.load(q_ptr + offsets(b, stride_qb) + offsets(h, stride_qh) + tile_offsets(rows, dims, stride_qs, 1),
                mask=tile, other=0.0)
    flat = bh.to(tl.int64) * S + rows
    do = tl.load(do_ptr + flat[:, None] * D + dims[None, :], mask=tile, other=0.0)  # [BM, BD]
    lse = tl.load(lse_ptr + flat, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + flat, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    pk_base = pk_ptr + offsets(b, stride_pkb) + offsets(kvh, stride_pkh)
    pv_base = pv_ptr + offsets(b, stride_pvb) + offsets(kvh, stride_pvh)
    for n0 in range(0, P, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        key_tile = (cols[:, None] < P) & (dims[None, :] < D)
        k = tl.load(pk_base + tile_offsets(cols, dims, stride_pkp, 1), mask=key_tile, other=0.0)  # [BN, BD]
        v = tl.load(pv_base + tile_offsets(cols, dims, stride_pvp, 1), mask=key_tile, other=0.0)
        s = prefix_attention_scores(q, tl.trans(k), cols, rows, P, kpm_ptr, scale, True, CAUSAL, False, DOT_DTYPE,
                                    PRECISION)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do.to(DOT_DTYPE), tl.trans(v).to(DOT_DTYPE), input_precision=PRECISION)
        dq = tl.dot((p * (dp - delta[:, None])).to(DOT_DTYPE), k.to(DOT_DTYPE), dq, input_precision=PRECISION)
    k_base = k_ptr + offsets(b, stride_kb) + offsets(kvh, stride_kh)
    v_base = v_ptr + offsets(b, stride_vb) + offsets(kvh, stride_vh)
    hi = tl.minimum(S, (pid_m + 1) * BLOCK_M) if CAUSAL else S
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        key_tile = (cols[:, None] < S) & (dims[None, :] < D)
        k = tl.load(k_base + tile_offsets(cols, dims, stride_ks, 1), mask=key_tile, other=0.0)
        v = tl.load(v_base + tile_offsets(cols, dims, stride_vs, 1), mask=key_tile, other=0.0)
        s = prefix_attention_scores(q, tl.trans(k), cols, rows, S, kpm_ptr + offsets(b, stride_mb), scale,
                                    False, CAUSAL, HAS_PAD, DOT_DTYPE, PRECISION)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do.to(DOT_DTYPE), tl.trans(v).to(DOT_DTYPE), input_precision=PRECISION)
        dq = tl.dot((p * (dp - delta[:, None])).to(DOT_DTYPE), k.to(DOT_DTYPE), dq, input_precision=PRECISION)
    tl.store(dq_ptr + flat[:, None] * D + dims[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=tile)


@triton.jit
def prefix_attention_bwd_delta_kernel(do_ptr, o_ptr, delta_ptr, R, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(do * o) in fp32 of BLOCK_M rows of contiguous [R, D] do and o (R = B * Hq * S): the
    backward's ds = p (dp - delta) term, read once per row here instead of an fp32 product of both in memory.
    Grid (cdiv(R, BLOCK_M),)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    dims = tl.arange(0, BLOCK_D)  # [BD]
    tile = (rows[:, None] < R) & (dims[None, :] < D)
    at = tile_offsets(rows, dims, D, 1)
    do = tl.load(do_ptr + at, mask=tile, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + at, mask=tile, other=0.0).to(tl.float32)
    tl.store(delta_ptr + rows, tl.sum(do * o, axis=1), mask=rows < R)


@triton.jit
def prefix_attention_bwd_dkdv_kernel(q_ptr, key_ptr, val_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                                     S, L, D, Hq, G, B_PER_GROUP, SPLITS, UNITS_PER_SPLIT, scale, stride_qb,
                                     stride_qh, stride_qs, stride_keyb, stride_keyh, stride_keyl, stride_valb,
                                     stride_valh, stride_vall, stride_mb, PREFIX: tl.constexpr, CAUSAL: tl.constexpr,
                                     HAS_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv of BLOCK_N keys of one key/value head: sequence keys (L = S) or prefix keys (PREFIX, L = P), summed
    over the head's G query heads and one part of the query blocks that see them.

    A group is B_PER_GROUP batch rows sharing the keys (all B for a shared prefix, read with batch stride 0; else
    one row): B_PER_GROUP * cdiv(S, BLOCK_M) units (batch row, query block), in SPLITS parts of UNITS_PER_SPLIT
    consecutive units, so a shared prefix's few key tiles still fill the device. dk/dv are contiguous
    [groups * SPLITS, Hkv, L, D]: the part's sums (the launcher sums the parts where SPLITS > 1, in a fixed order:
    no atomics). Grid (cdiv(L, BLOCK_N), Hkv, groups * SPLITS)."""
    pid_n, kvh, pid_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    Hkv = Hq // G
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    dims = tl.arange(0, BLOCK_D)  # [BD]
    key_tile = (cols[:, None] < L) & (dims[None, :] < D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    n_m = tl.cdiv(S, BLOCK_M)
    u_lo = (pid_z % SPLITS) * UNITS_PER_SPLIT
    u_hi = tl.minimum(u_lo + UNITS_PER_SPLIT, B_PER_GROUP * n_m)
    # sequence keys: only query blocks from the one holding the block's first key see it (causal)
    m_first = pid_n * BLOCK_N // BLOCK_M if CAUSAL and not PREFIX else 0
    for i in range(u_lo // n_m, tl.cdiv(u_hi, n_m)):  # the group's batch rows this part touches
        b = (pid_z // SPLITS).to(tl.int64) * B_PER_GROUP + i
        k = tl.load(key_ptr + offsets(b, stride_keyb) + offsets(kvh, stride_keyh)
                    + tile_offsets(cols, dims, stride_keyl, 1), mask=key_tile, other=0.0)  # [BN, BD]
        v = tl.load(val_ptr + offsets(b, stride_valb) + offsets(kvh, stride_valh)
                    + tile_offsets(cols, dims, stride_vall, 1), mask=key_tile, other=0.0)
        kt = tl.trans(k)
        m_lo = tl.maximum(u_lo - i * n_m, m_first)
        m_hi = tl.minimum(u_hi - i * n_m, n_m)
        for h in range(kvh * G, kvh * G + G):  # the query heads of this key/value head
            bh = b * Hq + h
            for m in range(m_lo, m_hi):
                rows = m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
                tile = (rows[:, None] < S) & (dims[None, :] < D)
                q = tl.load(q_ptr + offsets(b, stride_qb) + offsets(h, stride_qh)
                            + tile_offsets(rows, dims, stride_qs, 1), mask=tile, other=0.0)
                flat = bh * S + rows
                do = tl.load(do_ptr + flat[:, None] * D + dims[None, :], mask=tile, other=0.0)
                lse = tl.load(lse_ptr + flat, mask=rows < S, other=float("inf"))
                delta = tl.load(delta_ptr + flat, mask=rows < S, other=0.0)
                s = prefix_attention_scores(q, kt, cols, rows, L, kpm_ptr + b * stride_mb, scale, PREFIX, CAUSAL,
                                            HAS_PAD, DOT_DTYPE, PRECISION)
                p = tl.exp(s - lse[:, None])  # [BM, BN]
                dv = tl.dot(tl.trans(p).to(DOT_DTYPE), do.to(DOT_DTYPE), dv, input_precision=PRECISION)
                dp = tl.dot(do.to(DOT_DTYPE), tl.trans(v).to(DOT_DTYPE), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dk = tl.dot(tl.trans(ds).to(DOT_DTYPE), q.to(DOT_DTYPE), dk, input_precision=PRECISION)
    out = (pid_z.to(tl.int64) * Hkv + kvh) * L + cols
    tl.store(dk_ptr + out[:, None] * D + dims[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=key_tile)
    tl.store(dv_ptr + out[:, None] * D + dims[None, :], dv.to(dv_ptr.dtype.element_ty), mask=key_tile)
