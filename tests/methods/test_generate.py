"""``model.generate`` on ``pk.patch`` decoders (tiny Llama with GQA; GPT-2 and OPT): greedy decoding with the KV cache
gives the tokens it gives without one and the argmax of the patched model's own forward on the growing sequence; a
left-padded row the tokens it gives alone; a cache continued by several tokens the logits of the whole sequence;
PEFT's prompt-tuning, P-Tuning and prefix-tuning adapters loaded with ``pk.load_adapter`` the tokens PEFT's
``generate`` gives, on decoders and on T5 / BART (with PEFT's scores, the encoder run once)."""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import peftkern as pk
from tests._helpers import tiny_llama, tiny_model
from tests.test_patching import _randomize_

NEW = 4  # tokens generated
INIT = dict(initializer_range=0.2)  # weights large enough that context and positions move the argmax
GREEDY = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
OPTIONS = {"lora": dict(r=4), "prompt_tuning": dict(num_virtual_tokens=3),
           "p_tuning": dict(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=16),
           "prefix_tuning": dict(num_virtual_tokens=3, encoder_hidden_size=16),
           "p_tuning_v2": dict(num_virtual_tokens=3), "mam": dict(num_virtual_tokens=3, reduction_factor=4)}


def _ids(seed: int = 0, batch: int = 2, seq: int = 5) -> torch.Tensor:
    return torch.randint(3, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _patched(method: str):
    """A tiny Llama with ``method`` on it, its trainable tensors moved from their init, eval; eos off, so every row
    generates NEW tokens."""
    model = pk.patch(tiny_llama(**INIT), method, **OPTIONS[method])
    _randomize_(model)
    model.generation_config.eos_token_id = None
    return model.eval()


def _argmax_loop(model, ids: torch.Tensor) -> torch.Tensor:
    """Greedy decoding by hand: the model's forward on the whole growing sequence, no cache."""
    with torch.no_grad():
        for _ in range(NEW):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("method", list(OPTIONS))
def test_cache_equals_no_cache_equals_forward_argmax(method):
    model = _patched(method)
    ids = _ids()
    with_cache = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=True, **GREEDY)
    without = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=False, **GREEDY)
    assert with_cache.shape == (2, 5 + NEW)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache, _argmax_loop(model, ids))
    with pk.disable(model):  # the method acts on what is generated
        assert not torch.equal(model.generate(ids, attention_mask=torch.ones_like(ids), **GREEDY), with_cache)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_left_padded_row_generates_what_it_generates_alone(method):
    """The virtual tokens sit in the cache's frame: position ids and attention mask of a left-padded batch put each
    row's tokens where they are without padding."""
    model = _patched(method)
    ids = _ids(seed=2)
    short = ids[1, 2:]
    padded = ids.clone()
    padded[1, :2] = 0
    mask = (padded != 0).long()
    batch = model.generate(padded, attention_mask=mask, **GREEDY)
    alone = model.generate(short[None], attention_mask=torch.ones(1, 3, dtype=torch.long), **GREEDY)
    assert torch.equal(batch[1, 2:], alone[0])
    assert torch.equal(batch[0], model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), **GREEDY)[0])


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "mam"])
def test_cache_continued_by_several_tokens_gives_the_whole_sequences_logits(method):
    """A forward that fills the cache, then one with three new tokens over it (queries after cached keys: prefix
    attention's decoding path, bottom-right causal, padding masked): the logits of one forward over all of it."""
    model = _patched(method)
    ids = _ids(seed=3, seq=8)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits[:, -3:]
        first = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        assert first.past_key_values.get_seq_length() == 5 + (3 if method == "prompt_tuning" else 0)
        rest = model(input_ids=ids[:, 5:], attention_mask=mask, past_key_values=first.past_key_values).logits
    torch.testing.assert_close(rest, whole, rtol=1e-5, atol=1e-5)


PEFT_CONFIGS = {"prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                "p_tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                             encoder_hidden_size=16),
                "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)}


def _saved_peft_adapter(base, kind: str, path):
    """PEFT's ``kind`` adapter over a copy of ``base`` (which then generates until max_new_tokens), its table random,
    saved to ``path``: the PeftModel."""
    base.generation_config.eos_token_id = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[kind]())
        torch.nn.init.normal_(pm.prompt_encoder["default"].embedding.weight)
        pm.save_pretrained(str(path))
    return pm


@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_peft_adapter_generates_what_peft_generates(kind, tmp_path):
    base = tiny_llama(**INIT)
    _saved_peft_adapter(base, kind, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
        ours = pk.load_adapter(copy.deepcopy(base), tmp_path).eval()
        ids = _ids(seed=4, batch=3)
        mask = torch.ones_like(ids)
        if kind == "prefix_tuning":  # PEFT moves generate's position ids past its prefix, as we do: padding agrees
            ids[2, :2], mask[2, :2] = 0, 0
        theirs = pm.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, **GREEDY), theirs)


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_other_decoders_generate_what_peft_generates_with_and_without_cache(family, kind, tmp_path):
    """GPT-2 (learned absolute positions, Conv1D projections) and OPT (positions from the attention mask, offset 2):
    a PEFT adapter loaded with pk.load_adapter generates PEFT's tokens, with the cache and without, and the argmax
    of its own forward."""
    base = tiny_model(family, **INIT)
    pm = _saved_peft_adapter(base, kind, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = _ids(seed=5)
        theirs = pm.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GREEDY)
    ours = pk.load_adapter(copy.deepcopy(base), tmp_path).eval()
    for use_cache in (True, False):
        assert torch.equal(ours.generate(ids, attention_mask=torch.ones_like(ids), use_cache=use_cache, **GREEDY),
                           theirs)
    assert torch.equal(_argmax_loop(ours, ids), theirs)


SEQ2SEQ = dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
SEQ2SEQ_CONFIGS = {
    "prompt_tuning": lambda: peft.PromptTuningConfig(**SEQ2SEQ),
    "p_tuning": lambda: peft.PromptEncoderConfig(**SEQ2SEQ, encoder_hidden_size=16),
    "prefix_tuning": lambda: peft.PrefixTuningConfig(**SEQ2SEQ, prefix_projection=True, encoder_hidden_size=16)}


@pytest.mark.parametrize("kind", list(SEQ2SEQ_CONFIGS))
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_generates_what_peft_generates(family, kind, tmp_path):
    """T5 (relative position bias, which PEFT's prefix in the cache extends to the prefix keys) and BART (learned
    positions, which it moves by P): a PEFT adapter loaded with pk.load_adapter generates PEFT's tokens with PEFT's
    scores, with the cache and without, and runs the encoder once per generate."""
    base = tiny_model(family, **INIT)
    base.generation_config.eos_token_id = base.generation_config.forced_eos_token_id = None
    ids = _ids(seed=6)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    scored = dict(attention_mask=mask, output_scores=True, return_dict_in_generate=True, **GREEDY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), SEQ2SEQ_CONFIGS[kind]())
        _randomize_(pm)
        pm.save_pretrained(str(tmp_path))
        theirs = pm.eval().generate(input_ids=ids, **scored)
    ours = pk.load_adapter(copy.deepcopy(base), tmp_path).eval()
    encoder_calls = []
    ours.get_encoder().register_forward_hook(lambda *_: encoder_calls.append(1))
    for use_cache in (True, False):
        out = ours.generate(ids, use_cache=use_cache, **scored)
        assert torch.equal(out.sequences, theirs.sequences)
        torch.testing.assert_close(torch.stack(out.scores), torch.stack(theirs.scores), rtol=1e-5, atol=1e-5)
    assert len(encoder_calls) == 2


def test_bad_calls_name_the_problem():
    ids = _ids()
    for method in ("prompt_tuning", "prefix_tuning"):
        model = _patched(method)
        with pytest.raises(ValueError, match="past_key_values: prompt and prefix methods decode with a dynamic cache"):
            model.generate(ids, attention_mask=torch.ones_like(ids), cache_implementation="static", **GREEDY)
