"""The literal math of prefix attention on concatenated keys: the oracle of the tests (run it in float64)."""
from __future__ import annotations

import torch


def prefix_attention_reference(q, k, v, prefix_k, prefix_v, *, causal=True, key_padding_mask=None,
                               softmax_scale=None):
    """Attention of q over [prefix; sequence] keys with a bottom-right causal mask over the P + S keys."""
    B, Hq, S, D = q.shape
    Hkv, P = k.shape[1], prefix_k.shape[-2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    pk = prefix_k.expand(B, *prefix_k.shape[-3:]) if prefix_k.dim() == 3 else prefix_k
    pv = prefix_v.expand(B, *prefix_v.shape[-3:]) if prefix_v.dim() == 3 else prefix_v
    keys = torch.cat([pk, k], dim=2).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, P + S, D]
    values = torch.cat([pv, v], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    visible = torch.ones(S, P + S, dtype=torch.bool, device=q.device)
    if causal:
        visible[:, P:] = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    visible = visible.expand(B, 1, S, P + S).clone()
    if key_padding_mask is not None:
        visible[:, :, :, P:] &= ~key_padding_mask[:, None, None, :]
    scores = (q @ keys.transpose(-1, -2)) * scale
    empty = ~visible.any(-1, keepdim=True)  # a query with no visible key attends to nothing
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0)
    attn = torch.softmax(scores, dim=-1) * ~empty
    return attn @ values
