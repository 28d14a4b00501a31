"""Eager PyTorch implementation of prefix attention (README.md): the CPU path, and any device without Triton.

On a CPU: PyTorch's fused flash-attention kernel for CPUs (``aten::_scaled_dot_product_flash_attention_for_cpu``
and its backward) over keys concatenated on the fly, a transient copy rebuilt by the backward, never saved.
Elsewhere (or with ``USE_CPU_FLASH`` off): queries in chunks of CHUNK rows, the prefix and the sequence keys scored
separately (no concatenation) and combined in one softmax, GQA broadcast without copies. Either way autograd keeps
q, k, v, the prefix, o and lse: O(B H S D).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...backend import register

CHUNK = 256  # query rows per step: bounds the transient [B, H, CHUNK, P + S] scores
USE_CPU_FLASH = True  # tests switch it off to check the chunked path on the CPU


def _cpu_flash(q: torch.Tensor) -> bool:
    return USE_CPU_FLASH and q.device.type == "cpu"


def _concatenated(q, k, v, prefix_k, prefix_v, key_padding_mask, causal):
    """(keys, values [B, Hq, P + S, D], additive mask [B or 1, 1, S, P + S] in q's dtype or None, rows that see no
    key [B or 1, 1, S] or None) for the CPU flash kernel."""
    B, Hq, S, D = q.shape
    g = Hq // k.shape[1]
    P = prefix_k.shape[-2]
    pk = prefix_k.expand(B, *prefix_k.shape) if prefix_k.dim() == 3 else prefix_k
    pv = prefix_v.expand(B, *prefix_v.shape) if prefix_v.dim() == 3 else prefix_v
    keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    if g > 1:
        keys, values = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    if not causal and key_padding_mask is None:
        return keys, values, None, None
    visible = torch.ones(1, 1, S, P + S, dtype=torch.bool, device=q.device)
    if causal:
        visible[..., P:] = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        visible = visible & torch.cat([key_padding_mask.new_ones(B, P), ~key_padding_mask], 1)[:, None, None, :]
    empty = ~visible.any(-1) if P == 0 else None
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    return keys, values, mask, (empty if empty is not None and empty.any() else None)


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, S, D] -> [B, Hkv, G, S, D] (a view)."""
    B, Hq, S, D = q.shape
    return q.view(B, hkv, Hq // hkv, S, D)


def _scores(qc, pk, k, i0, causal, kpm, scale):
    """Scaled scores of query rows i0.. against the prefix [.., Sc, P] and the sequence [.., Sc, S], -inf where a
    sequence key is not visible. qc [B, Hkv, G, Sc, D] fp32; pk [B or 1, Hkv, 1, P, D]; k [B, Hkv, 1, S, D]."""
    s_p = (qc @ pk.transpose(-1, -2)) * scale
    s_s = (qc @ k.transpose(-1, -2)) * scale
    Sc, S = qc.shape[-2], k.shape[-2]
    hidden = None
    if causal:
        rows = torch.arange(i0, i0 + Sc, device=qc.device)[:, None]
        hidden = torch.arange(S, device=qc.device)[None, :] > rows  # [Sc, S]
    if kpm is not None:
        pad = kpm[:, None, None, None, :]  # [B, 1, 1, 1, S]
        hidden = pad if hidden is None else hidden | pad
    if hidden is not None:
        s_s = s_s.masked_fill(hidden, float("-inf"))
    return s_p, s_s


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs, fp64 for fp64: the dtype of the softmax statistics (and lse)."""
    return torch.promote_types(q.dtype, torch.float32)


def _prep(q, k, v, prefix_k, prefix_v):
    """Views in the compute dtype: q [B, Hkv, G, S, D], k/v [B, Hkv, 1, S, D], prefix [B or 1, Hkv, 1, P, D]."""
    hkv = k.shape[1]
    f = compute_dtype(q)
    qg = _grouped(q, hkv).to(f)
    kk, vv = k.to(f).unsqueeze(2), v.to(f).unsqueeze(2)
    pk = (prefix_k if prefix_k.dim() == 4 else prefix_k.unsqueeze(0)).to(f).unsqueeze(2)
    pv = (prefix_v if prefix_v.dim() == 4 else prefix_v.unsqueeze(0)).to(f).unsqueeze(2)
    return qg, kk, vv, pk, pv


def _key_sum(t: torch.Tensor, over_batch: bool) -> torch.Tensor:
    """[B, Hkv, G, L, D] -> [B or 1, Hkv, 1, L, D]: a key/value head's gradient sums over its G query heads, a
    shared prefix's also over the batch."""
    t = t.sum(2, keepdim=True)
    return t.sum(0, keepdim=True) if over_batch else t


@register("prefix_attention_forward", "torch")
def forward(q, k, v, prefix_k, prefix_v, key_padding_mask: Optional[torch.Tensor], causal: bool, scale: float):
    """(o [B, Hq, S, D] in q's dtype, lse [B, Hq, S] in the compute dtype; +inf for a query with no visible key)."""
    if _cpu_flash(q):
        keys, values, mask, empty = _concatenated(q, k, v, prefix_k, prefix_v, key_padding_mask, causal)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, keys, values, 0.0, False,
                                                                           attn_mask=mask, scale=scale)
        if empty is not None:
            o, lse = o.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, float("inf"))
        return o, lse.to(compute_dtype(q))
    B, Hq, S, D = q.shape
    qg, kk, vv, pk, pv = _prep(q, k, v, prefix_k, prefix_v)
    o = torch.empty_like(qg)
    lse = torch.empty(qg.shape[:-1], dtype=qg.dtype, device=q.device)
    for i0 in range(0, S, CHUNK):
        sl = slice(i0, min(i0 + CHUNK, S))
        s_p, s_s = _scores(qg[..., sl, :], pk, kk, i0, causal, key_padding_mask, scale)
        m = s_s.amax(-1, keepdim=True)
        if s_p.shape[-1]:
            m = torch.maximum(m, s_p.amax(-1, keepdim=True))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e_p, e_s = torch.exp(s_p - m), torch.exp(s_s - m)
        l = e_p.sum(-1, keepdim=True) + e_s.sum(-1, keepdim=True)
        o[..., sl, :] = (e_p @ pv + e_s @ vv) / torch.where(l > 0, l, torch.ones_like(l))
        lse[..., sl] = torch.where(l > 0, m + torch.log(l), torch.full_like(l, float("inf"))).squeeze(-1)
    return o.view(B, Hq, S, D).to(q.dtype), lse.view(B, Hq, S)


@register("prefix_attention_backward", "torch")
def backward(grad_o, q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, causal: bool, scale: float):
    """(dq, dk, dv, d prefix_k, d prefix_v) in their inputs' dtypes; a shared prefix's sums over the batch."""
    B, Hq, S, D = q.shape
    hkv = k.shape[1]
    if _cpu_flash(q):
        keys, values, mask, empty = _concatenated(q, k, v, prefix_k, prefix_v, key_padding_mask, causal)
        if empty is not None:  # those rows have no gradient; a finite lse keeps their probabilities at 0
            grad_o, lse = grad_o.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, 0.0)
        dq, dkeys, dvalues = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_o, q, keys, values, o, lse.float(), 0.0, False, attn_mask=mask, scale=scale)
        P = prefix_k.shape[-2]
        dkeys, dvalues = (t.view(B, hkv, Hq // hkv, P + S, D).sum(2) for t in (dkeys, dvalues))
        dpk, dpv = dkeys[:, :, :P], dvalues[:, :, :P]
        if prefix_k.dim() == 3:  # shared by the batch
            dpk, dpv = dpk.sum(0), dpv.sum(0)
        # copies: a custom op's outputs may not alias one another
        own = lambda t, like: t.to(like.dtype, copy=True, memory_format=torch.contiguous_format)  # noqa: E731
        return (dq, own(dkeys[:, :, P:], k), own(dvalues[:, :, P:], v), own(dpk, prefix_k), own(dpv, prefix_v))
    qg, kk, vv, pk, pv = _prep(q, k, v, prefix_k, prefix_v)
    do = _grouped(grad_o, hkv).to(qg.dtype)
    lse_g = lse.view(qg.shape[:-1]).unsqueeze(-1).to(qg.dtype)
    delta = (do * _grouped(o, hkv).to(qg.dtype)).sum(-1, keepdim=True)  # [B, Hkv, G, S, 1]
    dq = torch.empty_like(qg)
    dk, dv = torch.zeros_like(kk), torch.zeros_like(vv)
    dpk, dpv = torch.zeros_like(pk), torch.zeros_like(pv)
    for i0 in range(0, S, CHUNK):
        sl = slice(i0, min(i0 + CHUNK, S))
        qc, doc = qg[..., sl, :], do[..., sl, :]
        s_p, s_s = _scores(qc, pk, kk, i0, causal, key_padding_mask, scale)
        p_p, p_s = torch.exp(s_p - lse_g[..., sl, :]), torch.exp(s_s - lse_g[..., sl, :])
        ds_p = p_p * (doc @ pv.transpose(-1, -2) - delta[..., sl, :])
        ds_s = p_s * (doc @ vv.transpose(-1, -2) - delta[..., sl, :])
        dq[..., sl, :] = (ds_p @ pk + ds_s @ kk) * scale
        dv += _key_sum(p_s.transpose(-1, -2) @ doc, False)
        dk += _key_sum(ds_s.transpose(-1, -2) @ qc, False) * scale
        dpv += _key_sum(p_p.transpose(-1, -2) @ doc, pk.shape[0] == 1)
        dpk += _key_sum(ds_p.transpose(-1, -2) @ qc, pk.shape[0] == 1) * scale
    dpk, dpv = dpk.squeeze(2), dpv.squeeze(2)
    if prefix_k.dim() == 3:  # shared by the batch
        dpk, dpv = dpk.squeeze(0), dpv.squeeze(0)
    return (dq.view(B, Hq, S, D).to(q.dtype), dk.squeeze(2).to(k.dtype), dv.squeeze(2).to(v.dtype),
            dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype))
