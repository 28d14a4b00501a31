"""Eager PyTorch implementation of prefix attention (README.md): the CPU path, and any device without Triton.

Queries are processed in chunks of CHUNK rows; the prefix and the sequence keys are scored separately (no
concatenation) and combined in one softmax; GQA broadcasts the key/value heads over their G query heads without
copying. The backward recomputes the probabilities from lse, so only O(B H S D) tensors are kept.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...backend import register

CHUNK = 256  # query rows per step: bounds the transient [B, H, CHUNK, P + S] scores


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
