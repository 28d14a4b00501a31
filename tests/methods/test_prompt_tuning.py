"""Prompt Tuning and P-Tuning (LSTM / MLP prompt encoders) through ``pk.patch``: the model patched in place (its class,
its call by position or name, its transformers API), PEFT's logits and prompt gradients on the same weights (encoders,
decoders, and T5 / BART with PEFT's seq2seq layout), initialisations, position ids, labels, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import peft
import transformers
from safetensors.torch import load_file

import peftkern as pk
from peftkern.methods.prompt_tuning import PromptTuning
from tests._helpers import seq2seq_losses_agree, tiny_bert, tiny_llama, tiny_model

P = 4
BUILDERS = {"llama": (tiny_llama, "CAUSAL_LM"), "bert": (tiny_bert, "SEQ_CLS"),
            "roberta": (lambda: tiny_model("roberta"), "SEQ_CLS")}


def _patch(model, encoder=None, **options):
    if encoder is None:
        return pk.patch(model, "prompt_tuning", num_virtual_tokens=P, **options)
    return pk.patch(model, "p_tuning", num_virtual_tokens=P, encoder=encoder, encoder_hidden_size=24, **options)


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("encoder", [None, "mlp", "lstm"], ids=["prompt-tuning", "p-tuning-mlp", "p-tuning-lstm"])
@pytest.mark.parametrize("arch", ["llama", "bert", "roberta"])
def test_matches_peft(arch, encoder):
    build, task = BUILDERS[arch]
    model = build()
    ours = _patch(copy.deepcopy(model), encoder)
    if encoder is None:
        config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P)
    else:
        config = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=24,
                                          encoder_reparameterization_type=encoder.upper())
    pm = peft.get_peft_model(model, config)
    ours.peftkern_prompt.load_state_dict(pm.prompt_encoder["default"].state_dict())  # PEFT's names, all of them
    if task == "SEQ_CLS":
        ours.classifier.load_state_dict(pm.base_model.classifier.modules_to_save["default"].state_dict())
    ids, mask = _batch()
    extra = {"labels": ids} if task == "CAUSAL_LM" else {}
    out_p = pm(input_ids=ids, attention_mask=mask, **extra)
    out_o = ours(input_ids=ids, attention_mask=mask, **extra)
    torch.testing.assert_close(out_o.logits, out_p.logits, rtol=1e-5, atol=1e-5)
    if task == "CAUSAL_LM":
        torch.testing.assert_close(out_o.loss, out_p.loss)
    out_p.logits.square().sum().backward()
    out_o.logits.square().sum().backward()
    torch.testing.assert_close(ours.peftkern_prompt.embedding.weight.grad,
                               pm.prompt_encoder["default"].embedding.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("encoder", [None, "mlp", "lstm"], ids=["prompt-tuning", "p-tuning-mlp", "p-tuning-lstm"])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_matches_peft(family, encoder):
    """PEFT's SEQ_2_SEQ_LM layout: a table of 2P rows (an LSTM encoder reads all of them), the first P before the
    encoder's input, the decoder's inputs, labels and padded mask untouched: PEFT's loss, logits and gradients."""
    model = tiny_model(family, initializer_range=0.2)
    ours = _patch(copy.deepcopy(model), encoder)
    if encoder is None:
        config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)
    else:
        config = peft.PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, encoder_hidden_size=24,
                                          encoder_reparameterization_type=encoder.upper())
    pm = peft.get_peft_model(model, config)
    torch.nn.init.normal_(pm.prompt_encoder["default"].embedding.weight)
    ours.peftkern_prompt.load_state_dict(pm.prompt_encoder["default"].state_dict())
    assert ours.peftkern_prompt.embedding.weight.shape == (2 * P, 32)
    ids, mask = _batch()
    seq2seq_losses_agree(ours, pm, ids, mask)
    grad = ours.peftkern_prompt.embedding.weight.grad
    torch.testing.assert_close(grad, pm.prompt_encoder["default"].embedding.weight.grad, rtol=1e-4, atol=1e-6)
    assert grad[:P].abs().sum() > 0 and (encoder == "lstm") == bool(grad[P:].abs().sum() > 0)


@pytest.mark.parametrize("arch", ["llama", "bert", "roberta"])
def test_patched_in_place_and_called_as_the_model(arch, tmp_path):
    """The same object of the same class, its table a submodule (state_dict, save_pretrained, activation
    checkpointing are the model's), and its call the model's: by position or by name, with the position ids the
    model numbers its tokens with (the virtual tokens take the first P, the sequence follows: RoBERTa's start after
    its padding index) and BERT's token type ids."""
    build, _ = BUILDERS[arch]
    model = build()
    cls = type(model)
    ours = _patch(model, "mlp")
    assert ours is model and type(ours) is cls
    assert {k for k in ours.state_dict() if k.startswith("peftkern_prompt.")} == {
        f"peftkern_prompt.{k}" for k in ours.peftkern_prompt.state_dict()}
    ids, mask = _batch()
    ref = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours(ids, mask).logits, ref, rtol=0, atol=0)
    first = ours.config.pad_token_id + 1 if arch == "roberta" else 0
    positions = (first + torch.arange(ids.shape[1])).expand_as(ids)
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask, position_ids=positions).logits, ref,
                               rtol=1e-6, atol=1e-6)
    if arch == "bert":
        types = torch.ones_like(ids)
        with_types = ours(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        embeds = torch.cat([ours.peftkern_prompt.prompts().expand(2, -1, -1), ours.get_input_embeddings()(ids)], 1)
        by_hand = ours.bert(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, P).long(), mask], 1),
                            token_type_ids=torch.cat([torch.zeros(2, P).long(), types], 1)).pooler_output
        torch.testing.assert_close(with_types, ours.classifier(by_hand), rtol=1e-6, atol=1e-6)
    ours.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert {k for k in saved if k.startswith("peftkern_prompt.")} == {
        k for k in ours.state_dict() if k.startswith("peftkern_prompt.")}
    ours.train()
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ours.is_gradient_checkpointing
    ours(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    assert ours.peftkern_prompt.embedding.weight.grad.abs().sum() > 0


def test_loads_peft_saved_prompt_embeddings():
    """PEFT saves what the model sees (the encoder's output for P-Tuning): loading it reproduces PEFT's logits."""
    model = tiny_llama()
    ours = _patch(copy.deepcopy(model), "mlp")
    pm = peft.get_peft_model(model, peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                             encoder_hidden_size=24))
    saved = peft.get_peft_model_state_dict(pm)["prompt_embeddings"]
    ours.peftkern_prompt.load_prompt_embeddings(saved)
    assert ours.peftkern_prompt.encoder is None
    ids = torch.randint(0, 100, (2, 6))
    torch.testing.assert_close(ours(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prompt_embeddings must have shape"):
        ours.peftkern_prompt.load_prompt_embeddings(saved[:, :3])


def test_initialisations():
    model = tiny_llama()
    words = model.get_input_embeddings().weight
    vocab = pk.patch(model, "prompt_tuning", num_virtual_tokens=P, init="vocab").peftkern_prompt
    rows = (vocab.embedding.weight[:, None, :] == words[None]).all(-1).any(-1)
    assert rows.all()  # every virtual token starts as some vocabulary row

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 100 for c in text]}

    text = pk.patch(tiny_llama(), "prompt_tuning", num_virtual_tokens=5, init="text", init_text="ab", tokenizer=Tok())
    torch.testing.assert_close(text.peftkern_prompt.embedding.weight, text.get_input_embeddings()(
        torch.tensor([97 % 100, 98 % 100] * 2 + [97 % 100])))
    assert [n for n, p in text.named_parameters() if p.requires_grad] == ["peftkern_prompt.embedding.weight"]


def test_bad_input():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        pk.patch(tiny_llama(), "prompt_tuning", num_virtual_tokens=0)
    with pytest.raises(ValueError, match="init must be"):
        pk.patch(tiny_llama(), "prompt_tuning", init="zeros")
    with pytest.raises(ValueError, match="encoder must be"):
        pk.patch(tiny_llama(), "p_tuning", encoder="gru")
    with pytest.raises(ValueError, match="init_text"):
        pk.patch(tiny_llama(), "prompt_tuning", init="text")
    with pytest.raises(ValueError, match="init must be"):
        PromptTuning(tiny_llama().get_input_embeddings(), P, init="zeros")
    ours = _patch(tiny_llama())
    ids, mask = _batch()
    with pytest.raises(ValueError, match="attention_mask must be the 2-D"):
        ours(input_ids=ids, attention_mask=mask[:, None, None, :])
    with pytest.raises(ValueError, match="num_transformer_submodules must be 1 or 2"):
        PromptTuning(tiny_llama().get_input_embeddings(), P, num_transformer_submodules=3)
