"""Prefix Tuning / P-Tuning v2 through peftkern's prefix attention: PEFT's logits and prefix gradients on the same
prefix (BERT encoder, Llama GQA decoder, padding), gradient checkpointing, the MLP reparameterization and fold."""
from __future__ import annotations

import copy

import pytest
import torch
import peft
import transformers

from peftkern.methods.prefix_tuning import PrefixTuning

P = 5


def _bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attention_probs_dropout_prob=0.0,
                                  hidden_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg), "SEQ_CLS"


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg), "CAUSAL_LM"


def _pair(build):
    torch.manual_seed(0)
    model, task = build()
    ours_base = copy.deepcopy(model)
    pm = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P))
    table = pm.prompt_encoder["default"].embedding.weight
    torch.nn.init.normal_(table)
    ours = PrefixTuning(ours_base, P)
    ours.load_prompt_embeddings(peft.get_peft_model_state_dict(pm)["prompt_embeddings"])  # PEFT's saved adapter
    if task == "SEQ_CLS":  # PEFT trains a copy of the head: give ours the same
        ours.model.classifier.load_state_dict(pm.base_model.classifier.modules_to_save["default"].state_dict())
    return pm, ours, table


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama-gqa"])
def test_peft_logits_and_prefix_gradients(build):
    pm, ours, table = _pair(build)
    ids, mask = _batch()
    keep = mask.bool() if build is _llama else torch.ones(2, dtype=torch.bool)
    lp = pm(input_ids=ids, attention_mask=mask).logits
    lo = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(lo[keep], lp[keep], rtol=1e-5, atol=1e-5)
    lp[keep].square().sum().backward()
    lo[keep].square().sum().backward()
    torch.testing.assert_close(ours.embedding.weight.grad, table.grad, rtol=1e-4, atol=1e-5)


def test_a_prompt_length_per_task_on_one_base():
    """P-Tuning v2 style: two tasks with their own prefix lengths over one frozen model, each its own numbers."""
    torch.manual_seed(0)
    base, _ = _llama()
    base.eval()
    ids, mask = _batch()
    tasks = {p: PrefixTuning(base, p) for p in (3, 8)}
    for t in tasks.values():
        torch.nn.init.normal_(t.embedding.weight)
    alone = {p: t(input_ids=ids, attention_mask=mask).logits.detach() for p, t in tasks.items()}
    interleaved = [tasks[p](input_ids=ids, attention_mask=mask).logits for p in (8, 3, 8)]
    torch.testing.assert_close(interleaved[0], alone[8])
    torch.testing.assert_close(interleaved[1], alone[3])
    assert not torch.allclose(alone[3], alone[8])


def test_gradient_checkpointing_same_gradients():
    _, ours, _ = _pair(_llama)
    ids, mask = _batch()
    ours.train()
    ours.model(input_ids=ids).logits  # warm the lazy modules
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            ours.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        ours.embedding.weight.grad = None
        ours(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
        grads.append(ours.embedding.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


def test_prefix_projection_trains_and_folds():
    torch.manual_seed(0)
    model, _ = _bert()
    ours = PrefixTuning(model, P, prefix_projection=True, encoder_hidden_size=24)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                         "transform.2.bias"}
    ids, mask = _batch()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        ours(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    ours.eval()
    before = ours(input_ids=ids, attention_mask=mask).logits
    ours.fold()
    assert ours.transform is None and tuple(ours.embedding.weight.shape) == (P, 2 * 2 * 32)
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, before)


def test_bad_input():
    model, _ = _bert()
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuning(model, 0)
    ours = PrefixTuning(model, P)
    with pytest.raises(ValueError, match="prompt_embeddings must have shape"):
        ours.load_prompt_embeddings(torch.zeros(P, 7))
