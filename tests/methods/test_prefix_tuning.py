"""Prefix Tuning / P-Tuning v2 through ``pk.patch`` and peftkern's prefix attention: the model patched in place,
PEFT's logits and prefix gradients on the same prefix (BERT and RoBERTa encoders, Llama GQA decoder, padding, position
ids; T5 and BART as PEFT's seq2seq prefix reaches them), the attentions an encoder-decoder's prefix reaches, gradient
checkpointing, the MLP reparameterization and fold."""
from __future__ import annotations

import copy

import pytest
import torch
import peft

import peftkern as pk
from peftkern.methods.prefix_tuning import PrefixTuning, _sdpa
from tests._helpers import seq2seq_losses_agree, tiny_bert, tiny_llama, tiny_model
from tests.methods.test_unipelt import _literal

P = 5


def _pair(arch: str):
    """(PEFT's prefix-tuned model, ours holding the same prefix: PEFT's saved adapter, and head), both eval."""
    model = {"bert": tiny_bert, "llama": tiny_llama}.get(arch, lambda: tiny_model(arch, initializer_range=0.2))()
    task = {"llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bart": "SEQ_2_SEQ_LM"}.get(arch, "SEQ_CLS")
    ours = pk.patch(copy.deepcopy(model), "p_tuning_v2", num_virtual_tokens=P)
    pm = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P))
    table = pm.prompt_encoder["default"].embedding.weight
    torch.nn.init.normal_(table)
    ours.peftkern_prompt.load_prompt_embeddings(peft.get_peft_model_state_dict(pm)["prompt_embeddings"])
    if task == "SEQ_CLS":  # PEFT trains a copy of the head: give ours the same
        ours.classifier.load_state_dict(pm.base_model.classifier.modules_to_save["default"].state_dict())
    return pm, ours, table


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["bert", "roberta", "llama"])
def test_peft_logits_and_prefix_gradients(arch):
    """RoBERTa numbers positions from its padding index: PEFT's prefix in the cache moves that numbering by P."""
    pm, ours, table = _pair(arch)
    ids, mask = _batch()
    keep = mask.bool() if arch == "llama" else torch.ones(2, dtype=torch.bool)
    lp = pm(input_ids=ids, attention_mask=mask).logits
    lo = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(lo[keep], lp[keep], rtol=1e-5, atol=1e-5)
    lp[keep].square().sum().backward()
    lo[keep].square().sum().backward()
    torch.testing.assert_close(ours.peftkern_prompt.embedding.weight.grad, table.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_peft_logits_and_prefix_gradients(family):
    """PEFT's seq2seq prefix reaches the decoder's self-attention only (layer g reads table layer 2g mod L: with L = 2
    both read layer 0, layer 1's rows get no gradient), after which the decoder's tokens sit: BART's learned
    positions move by P, T5's relative position bias extends to the prefix keys; a padded decoder mask."""
    pm, ours, table = _pair(family)
    ids, mask = _batch()
    seq2seq_losses_agree(ours, pm, ids, mask)
    grad = ours.peftkern_prompt.embedding.weight.grad
    torch.testing.assert_close(grad, table.grad, rtol=1e-4, atol=1e-6)
    per_layer = grad.view(P, 2, -1).abs().sum((0, 2))
    assert per_layer[0] > 0 and per_layer[1] == 0
    decoder = ours.get_decoder()
    assert all(any(m is a for a in decoder.modules()) for m in ours.peftkern_prompt.layers)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("causal,Sq", [(True, 7), (False, 7), (True, 2)], ids=["causal", "bidirectional", "decode"])
def test_attention_with_a_position_bias_matches_the_math_fp64(causal, Sq, gated):
    """T5's path: scaled scores of [prefix; keys] plus a bias (its relative position bias, the prefix keys' columns
    included), padding; with UniPELT's gate too. Forward and every gradient against the literal math."""
    g = torch.Generator().manual_seed(0)
    B, H, Sk, P, D = 2, 4, 7, 3, 8
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    q, k, v, pk_, pv, bias = t(B, H, Sq, D), t(B, H, Sk, D), t(B, H, Sk, D), t(H, P, D), t(H, P, D), t(1, H, Sq, P + Sk)
    gate = torch.rand(B, Sq, generator=g, dtype=torch.float64).requires_grad_() if gated else None
    padding = torch.zeros(B, Sk, dtype=torch.bool)
    padding[1, -2:] = True
    out = _sdpa(q, k, v, pk_, pv, causal, padding, 0.3, gate, bias)
    ref = _literal(q, k, v, pk_, pv, torch.ones(B, Sq, dtype=torch.float64) if gate is None else gate, causal,
                   padding, 0.3, bias)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    inputs = (q, k, v, pk_, pv, bias) + ((gate,) if gated else ())
    for a, b in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_all_attentions_get_a_prefix(family):
    """``attentions="all"`` (MAM and UniPELT): the encoder's self-attention, the decoder's self- and cross-attention,
    each its own table layer, every one of which reaches the loss; the file's table is ours, so PEFT's layout is not
    needed."""
    model = tiny_model(family)
    prefix = PrefixTuning(model, P)
    names = {m: n for n, m in model.named_modules()}
    own = [n for n in map(names.get, prefix.layers) if n.endswith(("SelfAttention", "self_attn"))]
    cross = [n for n in map(names.get, prefix.layers) if n.endswith(("EncDecAttention", "encoder_attn"))]
    assert len(own) == 4 and len(cross) == 2 and prefix.slots == list(range(6)) and prefix.cross == [False] * 4 + [
        True] * 2
    ours = pk.patch(model, "mam", num_virtual_tokens=P)
    torch.nn.init.normal_(ours.peftkern_prompt.embedding.weight)
    ids, mask = _batch()
    ours(input_ids=ids, attention_mask=mask, labels=ids[:, :4].clone()).loss.backward()
    per_layer = ours.peftkern_prompt.embedding.weight.grad.view(P, 6, -1).abs().sum((0, 2))
    assert (per_layer > 0).all(), per_layer


def test_given_position_ids_follow_the_prefix_as_in_peft():
    """PEFT moves given position ids past its P cached prefix tokens: the same numbers for the same ids, by position
    or by name, and the default ids (none given) are 0 .. S-1 before the shift."""
    pm, ours, _ = _pair("llama")
    ids, _ = _batch()
    positions = (torch.arange(7) + 3).expand(2, 7)
    ref = pm(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(ours(input_ids=ids, position_ids=positions).logits, ref, rtol=1e-5, atol=1e-5)
    default = ours(ids).logits
    torch.testing.assert_close(ours(input_ids=ids, position_ids=torch.arange(7)[None]).logits, default,
                               rtol=0, atol=0)


def test_patched_in_place_with_gradient_checkpointing():
    _, ours, _ = _pair("llama")
    ids, mask = _batch()
    ours.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            ours.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        ours.peftkern_prompt.embedding.weight.grad = None
        ours(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
        grads.append(ours.peftkern_prompt.embedding.weight.grad.clone())
    assert ours.is_activation_checkpointing and type(ours).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(grads[1], grads[0])


def test_prefix_projection_trains_and_folds():
    ours = pk.patch(tiny_bert(), "prefix_tuning", num_virtual_tokens=P, encoder_hidden_size=24)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    prefix = {"embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"}
    assert trainable == {f"peftkern_prompt.{n}" for n in prefix} | {"classifier.weight", "classifier.bias"}
    ids, mask = _batch()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ours.train()
    for _ in range(2):
        ours(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    ours.eval()
    before = ours(input_ids=ids, attention_mask=mask).logits
    ours.peftkern_prompt.fold()
    assert ours.peftkern_prompt.transform is None
    assert tuple(ours.peftkern_prompt.embedding.weight.shape) == (P, 2 * 2 * 32)
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, before)


def test_bad_input():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        pk.patch(tiny_bert(), "p_tuning_v2", num_virtual_tokens=0)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuning(tiny_bert(), 0)
    ours = pk.patch(tiny_bert(), "p_tuning_v2", num_virtual_tokens=P)
    with pytest.raises(ValueError, match="prompt_embeddings must have shape"):
        ours.peftkern_prompt.load_prompt_embeddings(torch.zeros(P, 7))
    with pytest.raises(ValueError, match="attentions must be one of"):
        PrefixTuning(tiny_model("t5"), P, attentions="cross")
    mistral = pk.patch(tiny_model("mistral", sliding_window=4), "p_tuning_v2", num_virtual_tokens=P)
    with pytest.raises(ValueError, match="input_ids: 7 tokens exceed the model's sliding attention window of 4"):
        mistral(input_ids=_batch()[0])
