"""Eager PyTorch implementation of prefix attention (README.md): the CPU path, and any device without Triton.

On a CPU: the sequence keys through PyTorch's fused flash-attention kernel for CPUs
(``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward; GQA without copies, padding as a broadcast
[B, 1, 1, S] mask), the P prefix keys by matmuls, the parts merged through their log-sum-exps; all in the compute
dtype (fp32 for fp16/bf16: the kernel's bf16 backward costs more than fp32 here, and far more where the CPU lacks
bf16 instructions). Causal attention is split into query blocks (:func:`query_blocks`): each block reads the keys
before it in full and its own causally, so the work above the diagonal is skipped. Nothing is concatenated and no
[S, P + S] mask is built, except for small problems (:func:`_concatenates`), where one kernel call over the prefix
concatenated before the keys costs less than the split's more calls (there a call is mostly per-op overhead: the
causal mask is cached, and nothing is converted or copied that need not be). The backward needs no merge of its own:
given the merged o and lse, each flash backward's probabilities exp(s - lse) and row terms dO . o are those of the
whole softmax, so its dq, dk, dv are its keys' exact share; the prefix's share is the same formula on the [S, P]
scores.
Elsewhere (or with ``USE_CPU_FLASH`` off): queries in chunks of CHUNK rows, the prefix and the sequence keys scored
separately (no concatenation) and combined in one softmax, GQA broadcast without copies. Either way autograd keeps
q, k, v, the prefix, o and lse: O(B H S D).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ...backend import register
from ..custom_op import as_dtype

CHUNK = 256  # query rows per step: bounds the transient [B, H, CHUNK, P + S] scores
USE_CPU_FLASH = True  # tests switch it off to check the chunked path on the CPU
BLOCK_ROWS, MAX_BLOCKS = 64, 8  # the causal CPU path's query blocks (query_blocks)
CONCAT_MAX_WORK = 1 << 24  # the CPU path concatenates the prefix up to this B Hq S^2 D (_concatenates)
MASK_CACHE_MAX = 1 << 14  # S (P + S) up to which the concatenated path's causal mask is cached (_causal_mask)


def _cpu_flash(q: torch.Tensor) -> bool:
    return USE_CPU_FLASH and q.device.type == "cpu"


def _flash(q, k, v, causal, mask, scale):
    """The CPU flash kernel through its ``torch`` binding (~2 us a call less than ``torch.ops.aten``'s)."""
    return torch._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)


_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _flash_backward(grad_o, q, k, v, o, lse, causal, mask, scale):
    return _FLASH_BACKWARD(grad_o, q, k, v, o, lse, 0.0, causal, attn_mask=mask, scale=scale)


def query_blocks(S: int, causal: bool) -> list[tuple[int, int]]:
    """Query row blocks of the causal split: block [r0, r1) reads keys [0, r0) in full and [r0, r1) causally.

    The CPU kernel skips no key block of its own below 512 keys, so one causal call costs a full square; n blocks
    cost (n + 1) / 2n of it. Blocks of BLOCK_ROWS measured best here (one thread, fwd + bwd against SDPA, 2 blocks ->
    64 rows: 0.96x -> 0.87x at S 256, 0.76x -> 0.70x at S 512); past MAX_BLOCKS little is left to gain (S 1024:
    0.64x at 8 blocks, 0.62x at 16), while each kernel call more waits for a core another process holds."""
    n = min(MAX_BLOCKS, S // BLOCK_ROWS) if causal else 1
    if n < 2:
        return [(0, S)]
    edges = [S * i // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _hiding(key_padding_mask):
    """The mask where it hides a key, else None: a batch without padding skips the additive mask and the empty-row
    bookkeeping (8 small ops of a forward). Only on the CPU path, where reading it back costs no device sync."""
    return key_padding_mask if key_padding_mask is not None and bool(key_padding_mask.any()) else None


def _padding_mask(key_padding_mask, dtype):
    """Additive [B, 1, 1, S] mask in ``dtype`` (-inf at padding keys) for the CPU flash kernel, or None."""
    if key_padding_mask is None:
        return None
    mask = torch.zeros(key_padding_mask.shape[0], 1, 1, key_padding_mask.shape[1], dtype=dtype,
                       device=key_padding_mask.device)
    return mask.masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))


def _keys(t, r0, r1):
    return None if t is None else t[..., r0:r1]


def _part(q, k, v, mask, seen, r0, r1, k0, k1, causal, scale):
    """(o, lse) of query rows [r0, r1) over keys [k0, k1) (causal: aligned at k0 = r0), lse -inf for a row that sees
    no key there (the kernel outputs 0 with an lse of 0 for it, which would count as a key). ``seen`` [B, S + 1]:
    the unpadded keys before each position, or None without padding."""
    o, lse = _flash(q[:, :, r0:r1], k[:, :, k0:k1], v[:, :, k0:k1], causal, _keys(mask, k0, k1), scale)
    lse = lse.contiguous()  # the kernel's is [B, S, H] in memory
    if seen is not None:
        count = (seen[:, r0 + 1:r1 + 1] if causal else seen[:, k1:k1 + 1]) - seen[:, k0:k0 + 1]  # [B, rows or 1]
        lse = lse.masked_fill((count == 0)[:, None, :], float("-inf"))
    return o, lse


def _sequence_parts(q, k, v, key_padding_mask, causal, scale):
    """Attention of q over the sequence keys as parts (o, lse, r0), each over query rows [r0, S) in q's dtype, lse
    -inf for a row that sees no key of the part: one part, or with query_blocks the blocks' own keys (causal, rows
    [0, S)) and the keys before each block (rows from the second block on); concatenated per part, so that the merge
    runs once over whole tensors."""
    mask = _padding_mask(key_padding_mask, q.dtype)
    seen = None
    if key_padding_mask is not None:
        seen = torch.nn.functional.pad((~key_padding_mask).cumsum(1), (1, 0))
    S = q.shape[2]
    blocks = query_blocks(S, causal)
    if len(blocks) == 1:
        return [(*_part(q, k, v, mask, seen, 0, S, 0, S, causal, scale), 0)]
    own = [_part(q, k, v, mask, seen, r0, r1, r0, r1, True, scale) for r0, r1 in blocks]
    before = [_part(q, k, v, mask, seen, r0, r1, 0, r0, False, scale) for r0, r1 in blocks[1:]]
    return [(torch.cat([o for o, _ in part], 2), torch.cat([lse for _, lse in part], 2), r0)
            for part, r0 in ((own, 0), (before, blocks[1][0]))]


def _sequence_backward(grad_o, q, k, v, o, lse, key_padding_mask, causal, scale):
    """(dq, dk, dv) in the compute dtype: the sequence keys' share of the gradients, given the merged o and lse."""
    mask = _padding_mask(key_padding_mask, q.dtype)
    blocks = query_blocks(q.shape[2], causal)
    if len(blocks) == 1:
        return _flash_backward(grad_o, q, k, v, o, lse, causal, mask, scale)
    rows = [(grad_o[:, :, r0:r1], q[:, :, r0:r1], o[:, :, r0:r1], lse[:, :, r0:r1]) for r0, r1 in blocks]
    own = [_flash_backward(g, q_b, k[:, :, r0:r1], v[:, :, r0:r1], o_b, lse_b, True, _keys(mask, r0, r1), scale)
           for (g, q_b, o_b, lse_b), (r0, r1) in zip(rows, blocks)]
    dq, dk, dv = (torch.cat(parts, 2) for parts in zip(*own))
    dq_before = []
    for (g, q_b, o_b, lse_b), (r0, _) in zip(rows[1:], blocks[1:]):
        dq_b, dk_b, dv_b = _flash_backward(g, q_b, k[:, :, :r0], v[:, :, :r0], o_b, lse_b, False,
                                           _keys(mask, 0, r0), scale)
        dq_before.append(dq_b)
        dk[:, :, :r0] += dk_b
        dv[:, :, :r0] += dv_b
    dq[:, :, blocks[1][0]:] += torch.cat(dq_before, 2)
    return dq, dk, dv


def _concatenates(q: torch.Tensor, P: int) -> bool:
    """Small problems concatenate the prefix before the keys: one kernel call and a [S, P + S] mask cost less than
    the split's dozen more small ops there. Measured here (one thread, fwd + bwd, concatenated / split): B 1, S 16,
    P 8, D 16: 0.73; B 2, S 127, P 32, D 64 (B Hq S^2 D = 2^24): 0.93; S 192: 1.09. Without a prefix they are the
    same."""
    B, Hq, S, D = q.shape
    return 0 < P and B * Hq * S * S * D <= CONCAT_MAX_WORK


def _concat_keys(q, k, v, prefix_k, prefix_v, f):
    """(keys, values) [B, Hkv, P + S, D] in the compute dtype ``f``: the prefix (a shared one broadcast over the
    batch, not copied) before the sequence keys. The op's inputs share one dtype (its check; autocast casts them
    all)."""
    if prefix_k.dim() == 3:
        B = q.shape[0]
        prefix_k, prefix_v = ((t.unsqueeze(0) if B == 1 else t.expand(B, -1, -1, -1)) for t in (prefix_k, prefix_v))
    return as_dtype(torch.cat([prefix_k, k], 2), f), as_dtype(torch.cat([prefix_v, v], 2), f)


def _causal_mask(S: int, P: int, dtype, device) -> torch.Tensor:
    """Additive [1, 1, S, P + S] mask, -inf where sequence key j > query i (bottom-right causal over the P + S keys).
    Cached up to MASK_CACHE_MAX elements (64 KB in fp32, 64 masks at most): built, it takes half the kernel call's
    time at S 16, P 8 (B 1, 4 heads, D 16; 6.7 vs 13.5 us here) and a quarter at S 80, P 16."""
    if S * (P + S) <= MASK_CACHE_MAX:
        return _cached_causal_mask(S, P, dtype, device)
    return _build_causal_mask(S, P, dtype, device)


def _build_causal_mask(S: int, P: int, dtype, device) -> torch.Tensor:
    hidden = torch.ones(S, P + S, dtype=torch.bool, device=device).triu(P + 1)
    return torch.zeros(1, 1, S, P + S, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))


@functools.lru_cache(maxsize=64)
def _cached_causal_mask(S: int, P: int, dtype, device) -> torch.Tensor:
    """The kernels only read it; an ordinary tensor even when first asked for under ``torch.inference_mode``."""
    with torch.inference_mode(False):
        return _build_causal_mask(S, P, dtype, device)


def _concat_mask(q, P: int, key_padding_mask, causal: bool, f):
    """The additive mask of the concatenated keys in ``f``: [1, 1, S, P + S] (causal), with padding [B, 1, S or 1,
    P + S], or None."""
    S = q.shape[2]
    if key_padding_mask is None:
        return _causal_mask(S, P, f, q.device) if causal else None
    hidden = torch.nn.functional.pad(key_padding_mask, (P, 0))[:, None, None, :]
    if causal:
        return _causal_mask(S, P, f, q.device).masked_fill(hidden, float("-inf"))
    return torch.zeros(hidden.shape, dtype=f, device=q.device).masked_fill_(hidden, float("-inf"))


def _concat_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    """The CPU forward of small problems (:func:`_concatenates`): one kernel call over the prefix concatenated
    before the keys."""
    f = compute_dtype(q)
    keys, values = _concat_keys(q, k, v, prefix_k, prefix_v, f)
    mask = _concat_mask(q, prefix_k.shape[-2], key_padding_mask, causal, f)
    o, lse = _flash(as_dtype(q, f), keys, values, False, mask, scale)
    return as_dtype(o, q.dtype), lse.contiguous()


def composite(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    """o of the small-problem path (:func:`_concat_forward`) as PyTorch ops under PyTorch's own autograd, for fp32 /
    fp64 inputs (the compute dtype): the same kernel calls on the same tensors, so o and every gradient are the op's
    bit for bit (the flash backward's; the keys' gradient split by cat's backward, a shared prefix's summed over the
    batch by expand's), with autograd's C++ nodes instead of a Python backward that recomputes the concatenation and
    copies the gradients apart (layer fwd + bwd at B 1, S 16, P 8, D 16: 153 vs 228 us here). Autograd keeps the
    concatenated keys and values and the cached mask, where the op keeps k, v and the prefix."""
    keys, values = _concat_keys(q, k, v, prefix_k, prefix_v, q.dtype)
    mask = _concat_mask(q, prefix_k.shape[-2], _hiding(key_padding_mask), causal, q.dtype)
    return _flash(q, keys, values, False, mask, scale)[0]


def composes(q: torch.Tensor, P: int) -> bool:
    """Whether an eager fp32 / fp64 CPU call with grad under "auto" takes :func:`composite` (the flags and sizes that
    choose the CPU path; the rest is the caller's signature)."""
    return _cpu_flash(q) and _concatenates(q, P)


def _concat_backward(grad_o, q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, causal, scale):
    """The backward of :func:`_concat_forward`: one flash backward; the keys' gradients split into the prefix's and
    the sequence's. Each output owns its storage (a custom op's outputs may not alias one another) and has the layout
    of ``torch.empty_like`` of its input, as the op's fake tensors say: the slices are copied, the kernel's dq and the
    batch sums of a shared prefix kept where they have it (transformers' q, k, v are [B, S, H, D] transposed, as the
    kernel lays out its gradients: then a contiguous copy is one the model's backward undoes with another)."""
    f = compute_dtype(q)
    P, S = prefix_k.shape[-2], q.shape[2]
    keys, values = _concat_keys(q, k, v, prefix_k, prefix_v, f)
    mask = _concat_mask(q, P, key_padding_mask, causal, f)
    dq, dkeys, dvalues = _flash_backward(as_dtype(grad_o, f), as_dtype(q, f), keys, values, as_dtype(o, f), lse,
                                         False, mask, scale)
    dpk, dk = dkeys.split_with_sizes([P, S], 2)
    dpv, dv = dvalues.split_with_sizes([P, S], 2)
    if prefix_k.dim() == 3:  # shared by the batch
        dpk, dpv = _fresh(dpk.sum(0), prefix_k), _fresh(dpv.sum(0), prefix_v)
    else:
        dpk, dpv = _copy(dpk, prefix_k), _copy(dpv, prefix_v)
    return _fresh(dq, q), _copy(dk, k), _copy(dv, v), dpk, dpv


def _fresh(t, like):
    """``t``, a tensor no other output shares, in the dtype and layout of ``torch.empty_like(like)``: itself where it
    has them (``like`` dense), else a copy."""
    return t if t.dtype == like.dtype and t.stride() == like.stride() else _copy(t, like)


def _copy(t, like):
    """A copy of ``t`` in the dtype and layout of ``torch.empty_like(like)``."""
    return torch.empty_like(like).copy_(t)


def _prefix_scores(q, prefix_k, scale):
    """(q [B, Hkv, G S, D], scores [B, Hkv, G S, P]) in q's dtype: GQA as a view of q's query heads."""
    B, Hq, S, D = q.shape
    qg = q.reshape(B, prefix_k.shape[-3], (Hq // prefix_k.shape[-3]) * S, D)
    return qg, torch.matmul(qg, prefix_k.to(q.dtype).transpose(-1, -2)).mul_(scale)


def _split_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    """The CPU forward (module docstring): flash over the sequence, matmuls over the prefix, merged by lse."""
    B, Hq, S, D = q.shape
    f = compute_dtype(q)
    qf = q.to(f)
    parts = _sequence_parts(qf, k.to(f), v.to(f), key_padding_mask, causal, scale)
    lse = parts[0][1].clone()
    for _, lse_i, r0 in parts[1:]:
        lse[:, :, r0:] = torch.logaddexp(lse[:, :, r0:], lse_i)
    if prefix_k.shape[-2]:
        _, s_p = _prefix_scores(qf, prefix_k, scale)
        lse = torch.logaddexp(lse, s_p.logsumexp(-1).view(B, Hq, S))
        o = torch.matmul(s_p.sub_(lse.view(*s_p.shape[:-1], 1)).exp_(), prefix_v.to(f)).view(B, Hq, S, D)
        ref = lse
    else:  # a row may see no key at all: lse -inf, its o 0
        o = torch.zeros_like(qf)
        ref = lse.masked_fill(torch.isinf(lse), 0.0)
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    for o_i, lse_i, r0 in parts:
        o[:, :, r0:].addcmul_(o_i, (lse_i - ref[:, :, r0:]).exp_().unsqueeze(-1))
    return o.to(q.dtype), lse


def _split_backward(grad_o, q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, causal, scale):
    """The CPU backward (module docstring): (dq, dk, dv, d prefix_k, d prefix_v)."""
    B, Hq, S, D = q.shape
    f = compute_dtype(q)
    qf, do, of = q.to(f), grad_o.to(f), o.to(f)
    if prefix_k.shape[-2] == 0:  # rows that see no key (lse +inf) have no gradient; a finite lse keeps their p at 0
        empty = torch.isinf(lse)[..., None]
        do, lse = do.masked_fill(empty, 0.0), lse.masked_fill(empty[..., 0], 0.0)
    dq, dk, dv = _sequence_backward(do, qf, k.to(f), v.to(f), of, lse, key_padding_mask, causal, scale)
    if prefix_k.shape[-2] == 0:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    qg, s_p = _prefix_scores(qf, prefix_k, scale)
    shape = qg.shape
    do, og = do.reshape(shape), of.reshape(shape)
    p = s_p.sub_(lse.view(*shape[:-1], 1)).exp_()
    ds = torch.matmul(do, prefix_v.to(f).transpose(-1, -2)).sub_((do * og).sum(-1, keepdim=True)).mul_(p)
    dq = torch.matmul(ds, prefix_k.to(f)).mul_(scale).view(B, Hq, S, D).add_(dq)
    dpk = torch.matmul(ds.transpose(-1, -2), qg).mul_(scale)
    dpv = torch.matmul(p.transpose(-1, -2), do)
    if prefix_k.dim() == 3:  # shared by the batch
        dpk, dpv = dpk.sum(0), dpv.sum(0)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)


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
        cpu = _concat_forward if _concatenates(q, prefix_k.shape[-2]) else _split_forward
        return cpu(q, k, v, prefix_k, prefix_v, _hiding(key_padding_mask), causal, scale)
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
    """(dq, dk, dv, d prefix_k, d prefix_v) in their inputs' dtypes; a shared prefix's sums over the batch.

    Its matmuls run in the compute dtype also where autograd runs it under ``torch.autocast`` (the forward's inputs
    were cast already; autocast would round the fp32 products to bf16 again)."""
    if torch.is_autocast_enabled(q.device.type):
        with torch.autocast(q.device.type, enabled=False):
            return _backward(grad_o, q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, causal, scale)
    return _backward(grad_o, q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, causal, scale)


def _backward(grad_o, q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, causal: bool, scale: float):
    B, Hq, S, D = q.shape
    hkv = k.shape[1]
    if _cpu_flash(q):
        cpu = _concat_backward if _concatenates(q, prefix_k.shape[-2]) else _split_backward
        return cpu(grad_o, q, k, v, prefix_k, prefix_v, _hiding(key_padding_mask), o, lse, causal, scale)
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
