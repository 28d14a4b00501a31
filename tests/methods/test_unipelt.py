"""UniPELT's gated prefix: query i attends to the prefix scaled by its own gate ``g_i`` (keys and values), computed by
one SDPA over doubled heads; checked against the literal math in fp64, forward and every gradient, and on a model:
the gate of a token reads that token alone, so a forward continued over a KV cache gives the whole forward's logits."""
from __future__ import annotations

import pytest
import torch

import peftkern as pk
from peftkern.methods.prefix_tuning import _sdpa
from tests._helpers import tiny_batch, tiny_model


def _literal(q, k, v, pk_, pv, gate, causal, padding, scale, bias=None):
    """softmax over [g_i prefix_k; k] per query i (+ ``bias`` [.., Sq, P + Sk] after the scale), values
    [g_i prefix_v; v]; GQA by repeating KV heads."""
    B, Hq, Sq, _ = q.shape
    Sk, rep = k.shape[-2], Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    pk_, pv = pk_.repeat_interleave(rep, 0), pv.repeat_interleave(rep, 0)
    g = gate[:, None, :, None]
    scores = torch.cat([g * (q @ pk_.transpose(-1, -2)), q @ k.transpose(-1, -2)], -1) * scale
    scores = scores if bias is None else scores + bias
    P = pk_.shape[-2]
    visible = torch.ones(B, 1, Sq, P + Sk, dtype=torch.bool)
    if causal:
        visible[..., P:] &= torch.arange(Sk) <= torch.arange(Sk - Sq, Sk)[:, None]
    if padding is not None:
        visible[..., P:] &= ~padding[:, None, None, :]
    p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return g * (p[..., :P] @ pv) + p[..., P:] @ v


@pytest.mark.parametrize("causal,padded,Sq", [(True, False, 7), (True, True, 7), (False, True, 7), (True, True, 2)],
                         ids=["causal-S7", "causal-padded-S7", "bidirectional-padded-S7", "causal-padded-decode-Sq2"])
def test_gated_prefix_matches_the_math_fp64(causal, padded, Sq):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, Sk, P, D = 2, 4, 2, 7, 3, 8
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    q, k, v, pk_, pv = t(B, Hq, Sq, D), t(B, Hkv, Sk, D), t(B, Hkv, Sk, D), t(Hkv, P, D), t(Hkv, P, D)
    gate = torch.rand(B, Sq, generator=g, dtype=torch.float64).requires_grad_()
    padding = torch.zeros(B, Sk, dtype=torch.bool)
    if padded:
        padding[1, :2] = True  # left padding
    padding = padding if padded else None
    scale = 0.3
    out = _sdpa(q, k, v, pk_, pv, causal, padding, scale, gate)
    ref = _literal(q, k, v, pk_, pv, gate, causal, padding, scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    inputs = (q, k, v, pk_, pv, gate)
    for name, a, b in zip("q k v prefix_k prefix_v gate".split(), torch.autograd.grad(out, inputs, grad),
                          torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"d{name}: {m}")


def test_gate_is_per_token_and_causal():
    """Changing the last token leaves every earlier position's logits unchanged (the old per-example mean gate moved
    them all), and logits continued over a KV cache equal the whole forward's."""
    model = tiny_model("llama", initializer_range=0.2)
    pk.patch(model, "unipelt", r=4, num_virtual_tokens=3, reduction_factor=4)
    with torch.no_grad():
        for gate in model.peftkern_prompt.gates:
            gate.weight.normal_(0, 1.0)  # gates that differ per token (fresh ones are near-constant)
    ids = tiny_batch(model)["input_ids"]
    other = ids.clone()
    other[:, -1] = (ids[:, -1] + 1) % 100
    with torch.no_grad():
        whole = model(ids).logits
        assert torch.equal(whole[:, :-1], model(other).logits[:, :-1])
        head = model(ids[:, :5], use_cache=True)
        tail = model(ids[:, 5:], past_key_values=head.past_key_values).logits
    torch.testing.assert_close(torch.cat([head.logits, tail], 1), whole, rtol=1e-5, atol=1e-5)
