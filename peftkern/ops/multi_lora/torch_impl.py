"""Eager PyTorch implementation of multi-adapter LoRA: the CPU path, and any device without Triton.

Sequences are grouped by adapter (a stable argsort of the ids); each used adapter costs one shrink and one expand
GEMM over its own rows, the base GEMM runs once over the batch. Never a per-token loop, never ``[n, out, in]``.
"""
from __future__ import annotations

import torch

from ...backend import register


def lora_dtype(x: torch.Tensor, lora_A: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, lora_A.dtype)


def adapter_groups(adapter_ids: torch.Tensor, n: int, device: torch.device) -> list[tuple[int, object, int]]:
    """[(adapter, selector, count)] for each adapter used by at least one sequence.

    The selector indexes dim 0 of ``[B, ...]`` tensors: a slice when the adapter's sequences are contiguous (a view,
    no copy), else an int64 index tensor on ``device`` (sorted, unique). Planned on the host: ids on a GPU cost one
    copy to the host (a sync); CPU ids cost none (the index tensors go to the device without waiting).
    """
    ids = adapter_ids.detach().to("cpu", torch.int64).view(-1)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids + 1, minlength=n + 1).tolist()
    groups = []
    pos = counts[0]  # the base-only sequences (id -1) sort first
    for a in range(n):
        c = counts[a + 1]
        if c == 0:
            continue
        idx = order[pos:pos + c]
        pos += c
        first, last = int(idx[0]), int(idx[-1])
        sel = slice(first, first + c) if last - first + 1 == c else idx.to(device, non_blocking=True)
        groups.append((a, sel, c))
    return groups


def _add_product(target: torch.Tensor, sel, count: int, m1: torch.Tensor, m2: torch.Tensor, alpha: float) -> None:
    """target[sel] += alpha * m1 @ m2 for target [B, S, F] and m1 @ m2 [count * S, F] in the LoRA dtype.

    The sum is formed in the LoRA dtype and rounded once to target's dtype; only the selected rows are touched
    (in place through a view when ``sel`` is a slice, else gathered, updated and scattered back).
    """
    F = target.shape[-1]
    rows = target[sel].view(-1, F) if isinstance(sel, slice) else target[sel].reshape(-1, F)
    if rows.dtype == m1.dtype:
        rows.addmm_(m1, m2, alpha=alpha)
    else:
        rows.copy_(torch.addmm(rows.to(m1.dtype), m1, m2, alpha=alpha))
    if not isinstance(sel, slice):
        target.index_copy_(0, sel, rows.view(count, *target.shape[1:]))


@register("multi_lora_forward", "torch")
def multi_lora_forward(x, weight, bias, lora_A, lora_B, scalings, adapter_ids):
    """(y [B, S, out], h [B, S, r]) for x [B, S, in]; h is 0 for the rows of base-only sequences."""
    B, S, K = x.shape
    n, r, _ = lora_A.shape
    ldt = lora_dtype(x, lora_A)
    y = torch.nn.functional.linear(x, weight, bias)
    if not y.is_contiguous():
        y = y.contiguous()
    h = x.new_zeros(B, S, r, dtype=ldt)
    groups = adapter_groups(adapter_ids, n, x.device)
    if not groups:
        return y, h
    scal = scalings.detach().to("cpu", torch.float64).tolist()
    for a, sel, c in groups:
        xa = x[sel].reshape(c * S, K).to(ldt)
        ha = xa @ lora_A[a].to(ldt).t()
        h[sel] = ha.view(c, S, r)
        _add_product(y, sel, c, ha, lora_B[a].to(ldt).t(), scal[a])
    return y, h


@register("multi_lora_backward", "torch")
def multi_lora_backward(grad_y, x, weight, lora_A, lora_B, scalings, adapter_ids, h, compute_dx: bool,
                        compute_dlora: bool):
    """(dx [B, S, in] or None, dA [n, r, in] or None, dB [n, out, r] or None); unused adapters get zeros."""
    B, S, K = x.shape
    n, r, _ = lora_A.shape
    out = weight.shape[0]
    ldt = h.dtype
    groups = adapter_groups(adapter_ids, n, x.device)
    scal = scalings.detach().to("cpu", torch.float64).tolist()
    dA = torch.zeros_like(lora_A) if compute_dlora else None
    dB = torch.zeros_like(lora_B) if compute_dlora else None
    dx = torch.matmul(grad_y, weight) if compute_dx else None
    for a, sel, c in groups:
        ga = grad_y[sel].reshape(c * S, out).to(ldt)
        dh = torch.mm(ga, lora_B[a].to(ldt)).mul_(scal[a])
        if compute_dlora:
            ha = h[sel].reshape(c * S, r)
            dB[a] = torch.mm(ga.t(), ha).mul_(scal[a])
            dA[a] = torch.mm(dh.t(), x[sel].reshape(c * S, K).to(ldt))
        if compute_dx:
            _add_product(dx, sel, c, dh, lora_A[a].to(ldt), 1.0)
    return dx, dA, dB
