"""Prompt Tuning and P-Tuning (LSTM / MLP prompt encoders): PEFT's logits and prompt gradients on the same weights,
initialisations, labels, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import peft
import transformers

from peftkern.methods.prompt_tuning import PromptTuning

P = 4


def _models():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    bcfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)
    return {"llama": (lambda: transformers.LlamaForCausalLM(cfg), "CAUSAL_LM"),
            "bert": (lambda: transformers.BertForSequenceClassification(bcfg), "SEQ_CLS")}


@pytest.mark.parametrize("encoder", [None, "mlp", "lstm"], ids=["prompt-tuning", "p-tuning-mlp", "p-tuning-lstm"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_matches_peft(arch, encoder):
    build, task = _models()[arch]
    torch.manual_seed(0)
    model = build().eval()
    ours = PromptTuning(copy.deepcopy(model), P, encoder=encoder, encoder_hidden_size=24)
    if encoder is None:
        config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P)
    else:
        config = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=24,
                                          encoder_reparameterization_type=encoder.upper())
    pm = peft.get_peft_model(model, config)
    encoder_state = pm.prompt_encoder["default"].state_dict()
    missing, unexpected = ours.load_state_dict(encoder_state, strict=False)
    assert not unexpected and all(k.startswith("model.") for k in missing)
    if task == "SEQ_CLS":
        ours.model.classifier.load_state_dict(pm.base_model.classifier.modules_to_save["default"].state_dict())
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    extra = {"labels": ids} if task == "CAUSAL_LM" else {}
    out_p = pm(input_ids=ids, attention_mask=mask, **extra)
    out_o = ours(input_ids=ids, attention_mask=mask, **extra)
    torch.testing.assert_close(out_o.logits, out_p.logits, rtol=1e-5, atol=1e-5)
    if task == "CAUSAL_LM":
        torch.testing.assert_close(out_o.loss, out_p.loss)
    out_p.logits.square().sum().backward()
    out_o.logits.square().sum().backward()
    torch.testing.assert_close(ours.embedding.weight.grad, pm.prompt_encoder["default"].embedding.weight.grad,
                               rtol=1e-4, atol=1e-6)


def test_loads_peft_saved_prompt_embeddings():
    """PEFT saves what the model sees (the encoder's output for P-Tuning): loading it reproduces PEFT's logits."""
    build, task = _models()["llama"]
    torch.manual_seed(0)
    model = build().eval()
    ours = PromptTuning(copy.deepcopy(model), P, encoder="mlp", encoder_hidden_size=24)
    pm = peft.get_peft_model(model, peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P,
                                                             encoder_hidden_size=24))
    saved = peft.get_peft_model_state_dict(pm)["prompt_embeddings"]
    ours.load_prompt_embeddings(saved)
    assert ours.encoder is None
    ids = torch.randint(0, 100, (2, 6))
    torch.testing.assert_close(ours(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prompt_embeddings must have shape"):
        ours.load_prompt_embeddings(saved[:, :3])


def test_initialisations():
    build, _ = _models()["llama"]
    torch.manual_seed(0)
    model = build()
    words = model.get_input_embeddings().weight
    vocab = PromptTuning(model, P, init="vocab")
    rows = (vocab.embedding.weight[:, None, :] == words[None]).all(-1).any(-1)
    assert rows.all()  # every virtual token starts as some vocabulary row

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 100 for c in text]}

    text = PromptTuning(build(), 5, init="text", init_text="ab", tokenizer=Tok())
    torch.testing.assert_close(text.embedding.weight, text.model.get_input_embeddings()(
        torch.tensor([97 % 100, 98 % 100] * 2 + [97 % 100])))
    assert [n for n, p in text.named_parameters() if p.requires_grad] == ["embedding.weight"]


def test_bad_input():
    build, _ = _models()["llama"]
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptTuning(build(), 0)
    with pytest.raises(ValueError, match="init must be"):
        PromptTuning(build(), P, init="zeros")
    with pytest.raises(ValueError, match="encoder must be"):
        PromptTuning(build(), P, encoder="gru")
    with pytest.raises(ValueError, match="init_text"):
        PromptTuning(build(), P, init="text")
