"""Prefix Tuning / P-Tuning v2 through ``pk.patch`` and peftkern's prefix attention: the model patched in place,
PEFT's logits and prefix gradients on the same prefix (BERT and RoBERTa encoders, Llama GQA decoder, padding, position
ids), gradient checkpointing, the MLP reparameterization and fold, encoder-decoders refused."""
from __future__ import annotations

import copy

import pytest
import torch
import peft

import peftkern as pk
from peftkern.methods.prefix_tuning import PrefixTuning
from tests._helpers import tiny_bert, tiny_llama, tiny_model

P = 5


def _pair(arch: str):
    """(PEFT's prefix-tuned model, ours holding the same prefix: PEFT's saved adapter, and head), both eval."""
    model = {"bert": tiny_bert, "roberta": lambda: tiny_model("roberta"), "llama": tiny_llama}[arch]()
    task = "CAUSAL_LM" if arch == "llama" else "SEQ_CLS"
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
    with pytest.raises(ValueError, match="model: prefix methods take encoder or decoder models; "
                                         "T5ForConditionalGeneration is an encoder-decoder"):
        pk.patch(tiny_model("t5"), "prefix_tuning")
    mistral = pk.patch(tiny_model("mistral", sliding_window=4), "p_tuning_v2", num_virtual_tokens=P)
    with pytest.raises(ValueError, match="input_ids: 7 tokens exceed the model's sliding attention window of 4"):
        mistral(input_ids=_batch()[0])
