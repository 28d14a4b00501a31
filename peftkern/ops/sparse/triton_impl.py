"""Triton launchers of the sparse diff ops: the dense GEMMs stay with PyTorch (cuBLAS), the nnz-sized work runs in
the kernels of triton_kernels.py. The registered ops have torch_impl.py's signatures and return conventions.
``AOT_SCENARIOS`` are the launches ``peftkern kernels`` compiles (``peftkern._aot``).
"""
from __future__ import annotations

import functools

import torch
import triton

from ...backend import register
from ..triton_launch import block_config, dot_dtype, launch_opts, precision, staged, torch_fallback, unstage
from .torch_impl import TILE, structure, tiles
from .triton_kernels import (sparse_correction_kernel, sparse_scatter_add_kernel, sparse_sddmm_kernel,
                             sparse_sddmm_tile_kernel)

# Mean entries per TILE x TILE tile from which the values' gradient takes dense tiles (README, Roofline): per token
# and tile, the feature-major gather moves 4 bytes an entry, a tile 512 bytes of L2 traffic and 2 TILE^2 tensor
# FLOPs; estimated equal at ~43 (H100) to ~65 (A100) entries a tile
TILED_SDDMM_ENTRIES = 48
_GPU = {"sddmm": dict(BLOCK_E=64, BLOCK_N=64, num_warps=4, num_stages=2),
        "sddmm_tile": dict(BLOCK_N=32, BLOCK_E=32, num_warps=8, num_stages=3),
        "correction": dict(BLOCK_N=128, BLOCK_E=32, BLOCK_G=32, num_warps=4, num_stages=2),
        "scatter": dict(BLOCK=1024, num_warps=4, num_stages=1)}
_INTERPRET = {"sddmm": dict(BLOCK_E=16, BLOCK_N=8), "sddmm_tile": dict(BLOCK_N=16, BLOCK_E=16),
              "correction": dict(BLOCK_N=8, BLOCK_E=16, BLOCK_G=4),
              "scatter": dict(BLOCK=64)}


def _cfg(name: str) -> dict:
    return block_config(_GPU, _INTERPRET)[name]


def feature_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` [N, F] as a view of a contiguous [F, N] copy (strides (1, N)): the gathers read a feature's tokens as
    one contiguous run. One transposing copy of an activation a call (4 N F bytes at 16 bits) buys the gathers 16
    times fewer bytes moved than a 32-byte sector per 2-byte value."""
    return t.t().contiguous().t()


def add_correction_(out, src, bounds, src_pos, values) -> torch.Tensor:
    """out[:, j] += sum over entries e of group j of src[:, src_pos_e] v_e, in place; group j's entries are
    [bounds[j], bounds[j + 1]) of ``src_pos`` and ``values`` (the cached :func:`structure`'s order: no sort here).
    The kernel reads ``src`` :func:`feature_major`."""
    cfg = _cfg("correction")
    buf = staged(out)
    src = feature_major(src)
    sparse_correction_kernel[(triton.cdiv(out.shape[1], cfg["BLOCK_G"]), triton.cdiv(out.shape[0], cfg["BLOCK_N"]))](
        buf, src, bounds, src_pos, values.contiguous(), out.shape[0], out.shape[1], buf.stride(0), src.stride(0),
        src.stride(1), BLOCK_N=cfg["BLOCK_N"], BLOCK_E=cfg["BLOCK_E"], BLOCK_G=cfg["BLOCK_G"], **launch_opts(cfg))
    return unstage(out, buf)


@register("sparse_diff_forward", "triton")
def forward(x, weight, bias, indices, values):
    impl = torch_fallback("sparse_diff_forward", x, values)
    if impl is not None:
        return impl(x, weight, bias, indices, values)
    s = structure(indices, tuple(weight.shape))
    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    if y.numel() and values.numel():
        add_correction_(y, x, s.row_bounds, s.cols, values)
    return y


@register("sparse_masked_grad", "triton")
def masked_grad(grad_out, x, indices, in_features: int, *, out=None):
    impl = torch_fallback("sparse_masked_grad", grad_out, x)
    if impl is not None:
        return impl(grad_out, x, indices, in_features)
    s = structure(indices, (grad_out.shape[1], in_features))
    nnz = indices.numel()
    res = torch.empty(nnz, dtype=torch.float32, device=x.device) if out is None else out
    if nnz == 0:
        return res
    tiles_r, tiles_c = tiles((grad_out.shape[1], in_features))
    if nnz >= TILED_SDDMM_ENTRIES * tiles_r * tiles_c:
        cfg = _cfg("sddmm_tile")
        same = grad_out.dtype == x.dtype
        grad_out, x = grad_out.contiguous(), x.contiguous()
        sparse_sddmm_tile_kernel[(tiles_r * tiles_c,)](
            grad_out, x, s.tile_bounds, s.by_tile, s.tile_pos, res, x.shape[0], grad_out.shape[1], in_features,
            tiles_c, grad_out.stride(0), x.stride(0), DOT_DTYPE=dot_dtype(x.dtype if same else torch.float32),
            PRECISION=precision(), TILE=TILE, BLOCK_N=cfg["BLOCK_N"], BLOCK_E=cfg["BLOCK_E"], **launch_opts(cfg))
        return res
    cfg = _cfg("sddmm")
    g, x = feature_major(grad_out), feature_major(x)
    sparse_sddmm_kernel[(triton.cdiv(nnz, cfg["BLOCK_E"]),)](
        g, x, s.rows, s.cols, res, x.shape[0], nnz, g.stride(0), g.stride(1), x.stride(0), x.stride(1),
        BLOCK_E=cfg["BLOCK_E"], BLOCK_N=cfg["BLOCK_N"], **launch_opts(cfg))
    return res


@register("sparse_diff_dgrad", "triton")
def dgrad(grad_out, weight, indices, values):
    impl = torch_fallback("sparse_diff_dgrad", grad_out, values)
    if impl is not None:
        return impl(grad_out, weight, indices, values)
    s = structure(indices, tuple(weight.shape))
    dx = grad_out @ weight
    if dx.numel() and values.numel():
        add_correction_(dx, grad_out, s.col_bounds, s.col_rows, values[s.by_col])
    return dx


@register("sparse_gather", "triton")
def gather(flat, indices):
    """flat[indices]: a plain indexing copy (no kernel needed)."""
    return flat[indices.long()]


@register("sparse_scatter_add", "triton")
def scatter_add_(flat, indices, values, alpha: float) -> None:
    impl = torch_fallback("sparse_scatter_add", flat, values)
    if impl is not None:
        return impl(flat, indices, values, alpha)
    nnz = indices.numel()
    if nnz == 0:
        return None
    cfg = _cfg("scatter")
    buf = staged(flat)
    sparse_scatter_add_kernel[(triton.cdiv(nnz, cfg["BLOCK"]),)](
        buf, indices, values.contiguous(), nnz, float(alpha), BLOCK=cfg["BLOCK"], enable_fp_fusion=False,
        **launch_opts(cfg))
    unstage(flat, buf)
    return None


# ------------------------------------------------------------------------------------ ahead-of-time listing


def _aot_step(spacing: int) -> None:
    """A training step of a sparse diff on a bf16 4096 x 4096 weight (one entry in ``spacing``, fp32 values) at 1024
    tokens: the forward's and dgrad's corrections (their dense GEMMs are cuBLAS'), the values' gradient (by tiles
    at 1/64, by the per-entry gather at 1/16384), the merge."""
    N, K = 1024, 4096
    nnz = K * K // spacing
    indices = torch.arange(nnz) * spacing + torch.arange(nnz) % 61  # sorted, unique, over rows and columns
    s = structure(indices, (K, K))
    values = torch.empty(nnz)
    x, g = (torch.empty(N, K, dtype=torch.bfloat16) for _ in range(2))
    add_correction_(torch.empty(N, K, dtype=torch.bfloat16), x, s.row_bounds, s.cols, values)
    add_correction_(torch.empty(N, K, dtype=torch.bfloat16), g, s.col_bounds, s.col_rows, values[s.by_col])
    masked_grad(g, x, indices, K)
    scatter_add_(torch.empty(K * K, dtype=torch.bfloat16), indices, values, 1.0)


AOT_SCENARIOS = {f"bf16 activations and weight, fp32 values, density 1/{spacing}":
                 functools.partial(_aot_step, spacing) for spacing in (64, 16384)}  # peftkern._aot
