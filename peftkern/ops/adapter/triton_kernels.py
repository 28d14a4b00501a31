"""Triton kernels of the bottleneck adapter: ``@triton.jit`` bodies only (launchers: triton_impl.py).

Notation (README.md): h [N, D], W_d [M, D], b_d [M], W_u [D, M], b_u [D], z [N, M], g = dL/dy [N, D],
dz [N, M] (fp32 workspace). Tiles: BLOCK_N rows, BLOCK_D features, BLOCK_M the whole bottleneck (a power of two
>= max(M, 16); columns past M are masked to 0, and act(0) = 0 for every activation here). Accumulation is fp32; dot
operands are cast to DOT_DTYPE (the tensors' dtype; fp32 for bf16 under the interpreter). PRECISION is tl.dot's
input_precision for fp32 operands. ACT: 0 relu, 1 gelu (erf), 2 gelu_tanh, 3 silu, 4 tanh. Element offsets are
int64 (``ops/triton_blocks.py``).
"""
import triton
import triton.language as tl

from ..triton_blocks import offsets, tile_offsets


@triton.jit
def adapter_tanh(x):
    # tl.math has no tanh under the interpreter; this form is exact in fp32 to rounding
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def adapter_act(z, ACT: tl.constexpr):
    """act(z) of an fp32 tile."""
    if ACT == 0:
        return tl.maximum(z, 0.0)
    elif ACT == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        return 0.5 * z * (1.0 + adapter_tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 3:
        return z * tl.sigmoid(z)
    else:
        return adapter_tanh(z)


@triton.jit
def adapter_act_grad(z, ACT: tl.constexpr):
    """act'(z) of an fp32 tile."""
    if ACT == 0:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 2:
        t = adapter_tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 3:
        sig = tl.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))
    else:
        t = adapter_tanh(z)
        return 1.0 - t * t


@triton.jit
def adapter_rows_to_bottleneck(x_ptr, stride_xn, w_ptr, stride_wm, stride_wd, rows, mids, N, D, M,
                               DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """[BN, BM] fp32 = x[rows, :] @ w^T over D, w[m, d] at w_ptr + m stride_wm + d stride_wd (W_d, or W_u^T)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)  # [BD]
        x = tl.load(x_ptr + tile_offsets(rows, cols, stride_xn, 1),
                    mask=(rows[:, None] < N) & (cols[None, :] < D), other=0.0)  # [BN, BD]
        w_t = tl.load(w_ptr + tile_offsets(cols, mids, stride_wd, stride_wm),
                      mask=(mids[None, :] < M) & (cols[:, None] < D), other=0.0)  # [BD, BM]
        acc = tl.dot(x.to(DOT_DTYPE), w_t.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def adapter_fwd_kernel(h_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, y_ptr, z_ptr, N, D, M, stride_hn, scale,
                       ACT: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """z = h W_d^T + b_d; y = [h +] scale (act(z) W_u^T + b_u); one program per BLOCK_N rows, grid (cdiv(N, BN),)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mids = tl.arange(0, BLOCK_M)  # [BM]
    z = adapter_rows_to_bottleneck(h_ptr, stride_hn, wd_ptr, D, 1, rows, mids, N, D, M, DOT_DTYPE, PRECISION,
                                   BLOCK_N, BLOCK_D, BLOCK_M)  # [BN, BM]
    if HAS_BD:
        z += tl.load(bd_ptr + mids, mask=mids < M, other=0.0).to(tl.float32)[None, :]
    # z is rounded to its stored dtype first: backward recomputes act from exactly what it reads back
    z = z.to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + tile_offsets(rows, mids, M, 1), z, mask=(rows[:, None] < N) & (mids[None, :] < M))
    a = adapter_act(z.to(tl.float32), ACT).to(DOT_DTYPE)  # [BN, BM], stays in registers
    for d0 in range(0, D, BLOCK_D):
        outs = d0 + tl.arange(0, BLOCK_D)  # [BD]
        wu_t = tl.load(wu_ptr + tile_offsets(mids, outs, 1, M),
                       mask=(outs[None, :] < D) & (mids[:, None] < M), other=0.0)  # [BM, BD] = W_u^T tile
        acc = tl.dot(a, wu_t.to(DOT_DTYPE), input_precision=PRECISION)  # [BN, BD]
        if HAS_BU:
            acc += tl.load(bu_ptr + outs, mask=outs < D, other=0.0).to(tl.float32)[None, :]
        acc = acc * scale
        mask = (rows[:, None] < N) & (outs[None, :] < D)
        if RESIDUAL:
            acc += tl.load(h_ptr + tile_offsets(rows, outs, stride_hn, 1), mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + tile_offsets(rows, outs, D, 1), acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adapter_bwd_dz_dh_kernel(g_ptr, z_ptr, wd_ptr, wu_ptr, dz_ptr, dh_ptr, N, D, M, scale,
                             ACT: tl.constexpr, RESIDUAL: tl.constexpr, DOT_DTYPE: tl.constexpr,
                             PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_M: tl.constexpr):
    """dz = scale (g W_u) act'(z) (fp32); dh = [g +] dz W_d; one program per BLOCK_N rows, grid (cdiv(N, BN),)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mids = tl.arange(0, BLOCK_M)  # [BM]
    # W_u [D, M] read as (W_u^T)[m, d]
    da = adapter_rows_to_bottleneck(g_ptr, D, wu_ptr, 1, M, rows, mids, N, D, M, DOT_DTYPE, PRECISION,
                                    BLOCK_N, BLOCK_D, BLOCK_M)  # [BN, BM]
    zmask = (rows[:, None] < N) & (mids[None, :] < M)
    z = tl.load(z_ptr + tile_offsets(rows, mids, M, 1), mask=zmask, other=0.0).to(tl.float32)
    dz = da * scale * adapter_act_grad(z, ACT)
    dz = tl.where(zmask, dz, 0.0)  # act'(0) is not 0 for every activation: padding must not leak into dh
    tl.store(dz_ptr + tile_offsets(rows, mids, M, 1), dz, mask=zmask)
    dz = dz.to(DOT_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        outs = d0 + tl.arange(0, BLOCK_D)  # [BD]
        wd = tl.load(wd_ptr + tile_offsets(mids, outs, D, 1),
                     mask=(mids[:, None] < M) & (outs[None, :] < D), other=0.0)  # [BM, BD]
        acc = tl.dot(dz, wd.to(DOT_DTYPE), input_precision=PRECISION)  # [BN, BD]
        mask = (rows[:, None] < N) & (outs[None, :] < D)
        if RESIDUAL:
            acc += tl.load(g_ptr + tile_offsets(rows, outs, D, 1), mask=mask, other=0.0).to(tl.float32)
        tl.store(dh_ptr + tile_offsets(rows, outs, D, 1), acc.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adapter_bwd_weight_kernel(x_ptr, y_ptr, out_ptr, sum_ptr, N, D, M, stride_xn, stride_od, stride_om, alpha,
                              ACT: tl.constexpr, APPLY_ACT: tl.constexpr, SUM_X: tl.constexpr,
                              SUM_Y: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[D, M] (strided) = alpha X^T f(Y) over all N rows, X [N, D], Y [N, M] contiguous, f = act or identity;
    sum_ptr gets alpha sum_n X (SUM_X, [D]) or sum_n Y (SUM_Y, [M], by program 0). Grid (cdiv(D, BD),)."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    mids = tl.arange(0, BLOCK_M)  # [BM]
    acc = tl.zeros((BLOCK_D, BLOCK_M), dtype=tl.float32)
    sx = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # the X^T and Y tiles at n0 = 0, moved by a scalar each step: 64-bit tile offsets rebuilt every step spill
    x_tile = x_ptr + tile_offsets(cols, tl.arange(0, BLOCK_N), 1, stride_xn)
    y_tile = y_ptr + tile_offsets(tl.arange(0, BLOCK_N), mids, M, 1)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)  # [BN]
        x_t = tl.load(x_tile + offsets(n0, stride_xn), mask=(rows[None, :] < N) & (cols[:, None] < D),
                      other=0.0)  # [BD, BN] = X^T tile
        y = tl.load(y_tile + offsets(n0, M), mask=(rows[:, None] < N) & (mids[None, :] < M),
                    other=0.0).to(tl.float32)  # [BN, BM]
        if APPLY_ACT:
            y = adapter_act(y, ACT)
        acc = tl.dot(x_t.to(DOT_DTYPE), y.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if SUM_X:
            sx += tl.sum(x_t.to(tl.float32), axis=1)
        if SUM_Y:
            sy += tl.sum(y, axis=0)
    tl.store(out_ptr + tile_offsets(cols, mids, stride_od, stride_om),
             (acc * alpha).to(out_ptr.dtype.element_ty), mask=(cols[:, None] < D) & (mids[None, :] < M))
    if SUM_X:
        tl.store(sum_ptr + cols, (sx * alpha).to(sum_ptr.dtype.element_ty), mask=cols < D)
    if SUM_Y:
        if pid == 0:
            tl.store(sum_ptr + mids, (sy * alpha).to(sum_ptr.dtype.element_ty), mask=mids < M)
