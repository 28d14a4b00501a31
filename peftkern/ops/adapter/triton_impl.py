"""Triton launchers of the bottleneck adapter (kernels: triton_kernels.py); torch_impl.py's signatures.
``AOT_SCENARIOS`` are the launches ``peftkern kernels`` compiles (``peftkern._aot``)."""
from __future__ import annotations

import functools

import torch
import triton

from ...backend import fallback, register
from ..triton_launch import (block_config, dot_dtype, launch_opts, out_buffer, precision, staged, torch_fallback,
                             unstage)
from .triton_kernels import adapter_bwd_dz_dh_kernel, adapter_bwd_weight_kernel, adapter_fwd_kernel

ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "tanh": 4}
MAX_BOTTLENECK = 256  # the whole bottleneck is one register tile


def block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def _gpu_cfg(m: int, weight_grad: bool) -> dict:
    """The row tile shrinks as the bottleneck tile grows (the [BLOCK_N, BLOCK_M] fp32 tile lives in registers);
    the weight gradient, which steps over rows by BLOCK_N beside its [BLOCK_D, BLOCK_M] accumulator, takes 32-row
    steps up to M = 64 (64-row steps spill on sm_90). Chosen so no kernel spills at M = 64 or 256 on sm_80 / sm_90
    as the JIT specializes them (`peftkern kernels`)."""
    bm = block_m(m)
    rows = (32 if weight_grad else 64) if bm <= 64 else 16
    return dict(BLOCK_N=rows, BLOCK_D=32, BLOCK_M=bm, num_warps=8, num_stages=2)


def _cfg(m: int, weight_grad: bool = False) -> dict:
    return block_config(_gpu_cfg(m, weight_grad), dict(BLOCK_N=16, BLOCK_D=16, BLOCK_M=block_m(m)))


def _unsupported(op, h, w_down):
    impl = torch_fallback(op, h)
    if impl is None and w_down.shape[0] > MAX_BOTTLENECK:
        impl = fallback(op, f"bottleneck width {w_down.shape[0]} > {MAX_BOTTLENECK} (one register tile)")
    return impl


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
    cfg = _cfg(M, weight_grad=True)
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


# ------------------------------------------------------------------------------------ ahead-of-time listing


def _aot_step(m: int) -> None:
    """Forward and backward of a Houlsby adapter (GELU, biases, residual) of bottleneck ``m`` on bf16 hidden
    states of width 4096, 1024 tokens."""
    N, D = 1024, 4096
    h, g = (torch.empty(N, D, dtype=torch.bfloat16) for _ in range(2))
    w_down, b_down = torch.empty(m, D, dtype=h.dtype), torch.empty(m, dtype=h.dtype)
    w_up, b_up = torch.empty(D, m, dtype=h.dtype), torch.empty(D, dtype=h.dtype)
    _, z = forward(h, w_down, b_down, w_up, b_up, "gelu", True, 1.0)
    backward(g, h, z, w_down, w_up, "gelu", True, 1.0)


# representative launches for peftkern._aot: one per tile configuration
AOT_SCENARIOS = {f"bf16, gelu, bottleneck {m}": functools.partial(_aot_step, m) for m in (64, MAX_BOTTLENECK)}
