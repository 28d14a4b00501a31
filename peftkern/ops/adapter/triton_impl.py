"""Triton launchers of the bottleneck adapter (kernels: triton_kernels.py); torch_impl.py's signatures."""
from __future__ import annotations

import torch
import triton

from ..._aot import KernelSpec
from ...backend import fallback, interpret_mode, register
from ..triton_launch import TL_DTYPES, dot_dtype, launch_opts, out_buffer, precision, staged, unstage
from .triton_kernels import adapter_bwd_dz_dh_kernel, adapter_bwd_weight_kernel, adapter_fwd_kernel

ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "tanh": 4}
MAX_BOTTLENECK = 256  # the whole bottleneck is one register tile


def block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def _gpu_cfg(m: int) -> dict:
    """The row tile shrinks as the bottleneck tile grows (the [BLOCK_N, BLOCK_M] fp32 tile lives in registers);
    chosen so no kernel spills at M = 64 or 256 on sm_80 / sm_90 (`peftkern kernels`)."""
    bm = block_m(m)
    return dict(BLOCK_N=64 if bm <= 64 else 16, BLOCK_D=32, BLOCK_M=bm, num_warps=8, num_stages=2)


def _cfg(m: int) -> dict:
    return dict(BLOCK_N=16, BLOCK_D=16, BLOCK_M=block_m(m)) if interpret_mode() else _gpu_cfg(m)


def _unsupported(op, h, w_down):
    if h.dtype == torch.float64:
        return fallback(op, "float64 tensors (the Triton kernels accumulate in fp32)")
    if w_down.shape[0] > MAX_BOTTLENECK:
        return fallback(op, f"bottleneck width {w_down.shape[0]} > {MAX_BOTTLENECK} (one register tile)")
    return None


def _common(h):
    return dict(DOT_DTYPE=dot_dtype(h.dtype), PRECISION=precision())


def fwd(h, w_down, b_down, w_up, b_up, activation, residual, scale, out=None, out_z=None):
    """(y [N, D], z [N, M]) of contiguous h, W_d, W_u; ``out`` / ``out_z`` as in triton_launch.out_buffer."""
    (N, D), M = h.shape, w_down.shape[0]
    y, z = out_buffer(out, (N, D), h.dtype, h.device), out_buffer(out_z, (N, M), h.dtype, h.device)
    yb, zb = staged(y), staged(z)
    cfg = _cfg(M)
    adapter_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        h, w_down, b_down, w_up, b_up, yb, zb, N, D, M, h.stride(0), float(scale), ACT=ACT_CODES[activation],
        RESIDUAL=bool(residual), HAS_BD=b_down is not None, HAS_BU=b_up is not None, **_common(h),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], **launch_opts(cfg))
    return unstage(y, yb), unstage(z, zb)


def bwd_dz_dh(g, z, w_down, w_up, activation, residual, scale, out_dz=None, out_dh=None):
    """(dz [N, M] fp32, dh [N, D]) of contiguous inputs."""
    (N, D), M = g.shape, w_down.shape[0]
    dz = out_buffer(out_dz, (N, M), torch.float32, g.device)
    dh = out_buffer(out_dh, (N, D), g.dtype, g.device)
    dhb = staged(dh)
    cfg = _cfg(M)
    adapter_bwd_dz_dh_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        g, z, w_down, w_up, dz, dhb, N, D, M, float(scale), ACT=ACT_CODES[activation], RESIDUAL=bool(residual),
        **_common(g), BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], **launch_opts(cfg))
    return dz, unstage(dh, dhb)


def bwd_weight(x, y, alpha, activation, apply_act, sum_x, transposed, dtype, out=None, out_sum=None):
    """alpha x^T f(y) ([D, M], or [M, D] with ``transposed``) and alpha sum x [D] (``sum_x``) or sum y [M]."""
    (N, D), M = x.shape, y.shape[1]
    w = out_buffer(out, (M, D) if transposed else (D, M), dtype, x.device)
    sums = out_buffer(out_sum, (D if sum_x else M,), dtype, x.device)
    wb, sb = staged(w), staged(sums)
    view = wb.t() if transposed else wb  # the kernel writes [D, M] through strides
    cfg = _cfg(M)
    adapter_bwd_weight_kernel[(triton.cdiv(D, cfg["BLOCK_D"]),)](
        x, y, view, sb, N, D, M, x.stride(0), view.stride(0), view.stride(1), float(alpha),
        ACT=ACT_CODES[activation], APPLY_ACT=apply_act, SUM_X=sum_x, SUM_Y=not sum_x, **_common(x),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], **launch_opts(cfg))
    return unstage(w, wb), unstage(sums, sb)


@register("adapter_forward", "triton")
def forward(h, w_down, b_down, w_up, b_up, activation, residual, scale):
    impl = _unsupported("adapter_forward", h, w_down)
    if impl is not None:
        return impl(h, w_down, b_down, w_up, b_up, activation, residual, scale)
    return fwd(h.contiguous(), w_down.contiguous(), b_down, w_up.contiguous(), b_up, activation, residual, scale)


@register("adapter_backward", "triton")
def backward(g, h, z, w_down, w_up, activation, residual, scale):
    impl = _unsupported("adapter_backward", h, w_down)
    if impl is not None:
        return impl(g, h, z, w_down, w_up, activation, residual, scale)
    g, h, z = g.contiguous(), h.contiguous(), z.contiguous()
    dz, dh = bwd_dz_dh(g, z, w_down.contiguous(), w_up.contiguous(), activation, residual, scale)
    dw_up, db_up = bwd_weight(g, z, scale, activation, True, True, False, w_up.dtype)
    dw_down, db_down = bwd_weight(h, dz, 1.0, activation, False, False, True, w_down.dtype)
    return dh, dw_down, db_down, dw_up, db_up


def _kernel_specs() -> list[KernelSpec]:
    """bf16, GELU, a 64-wide and the widest (256) bottleneck."""
    specs = []
    for m in (64, MAX_BOTTLENECK):
        cfg = _gpu_cfg(m)
        tiles = dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], ACT=1,
                     DOT_DTYPE=TL_DTYPES[torch.bfloat16], PRECISION="ieee")
        run = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], variant=f"bf16, gelu, M<={m}")
        specs += [
            KernelSpec(adapter_fwd_kernel, dict(h_ptr="*bf16", wd_ptr="*bf16", bd_ptr="*bf16", wu_ptr="*bf16",
                                                bu_ptr="*bf16", y_ptr="*bf16", z_ptr="*bf16", N="i32", D="i32",
                                                M="i32", stride_hn="i32", scale="fp32"),
                       dict(tiles, RESIDUAL=True, HAS_BD=True, HAS_BU=True),
                       aligned=("h_ptr", "wd_ptr", "wu_ptr", "y_ptr", "z_ptr"), **run),
            KernelSpec(adapter_bwd_dz_dh_kernel, dict(g_ptr="*bf16", z_ptr="*bf16", wd_ptr="*bf16", wu_ptr="*bf16",
                                                      dz_ptr="*fp32", dh_ptr="*bf16", N="i32", D="i32", M="i32",
                                                      scale="fp32"),
                       dict(tiles, RESIDUAL=True), aligned=("g_ptr", "z_ptr", "wd_ptr", "wu_ptr", "dz_ptr", "dh_ptr"),
                       **run),
            KernelSpec(adapter_bwd_weight_kernel, dict(x_ptr="*bf16", y_ptr="*bf16", out_ptr="*bf16",
                                                       sum_ptr="*bf16", N="i32", D="i32", M="i32", stride_xn="i32",
                                                       stride_od="i32", stride_om="i32", alpha="fp32"),
                       dict(tiles, APPLY_ACT=True, SUM_X=True, SUM_Y=False), aligned=("x_ptr", "y_ptr"), **run),
        ]
    return specs


KERNELS: list[KernelSpec] = _kernel_specs()
