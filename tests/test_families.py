"""Every method of ``pk.patch`` on every family of ``tests._helpers.TINY_FAMILIES`` (issue 13): patched in place,
each of 20 training steps on a fixed batch lowers the loss and leaves the frozen base bit-identical; greedy
``generate`` on decoders and encoder-decoders gives the same tokens with the KV cache, without it and as the argmax
of the patched model's own forward, and a forward continued over a cache gives the logits of the whole one;
``save_adapter`` -> ``load_adapter`` on a fresh model gives the same logits, and so does PEFT's
``PeftModel.from_pretrained`` for the methods PEFT has.

A cell of the matrix is "ok", "refused" (a ``ValueError`` saying why, asserted) or "xfail" (a known bug, strict).
:func:`support_table` prints README's "Supported architectures" table from the same definitions:
``python -m tests.test_families``."""
from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import peft
import pytest
import torch

import peftkern as pk
from tests._helpers import TINY_FAMILIES, tiny_batch, tiny_model
from tests.test_patching import _randomize_

FAMILIES = list(TINY_FAMILIES)
METHODS = list(pk.patching.METHODS)
ENCODERS = {"bert", "roberta", "distilbert"}
NO_BIAS = {"llama", "mistral", "gemma", "phi3", "t5"}  # no bias in any linear or norm: BitFit has nothing to train

OPTIONS = {"lora": dict(r=4), "dora": dict(r=4), "qlora": dict(r=4, blocksize=32),
           "prompt_tuning": dict(num_virtual_tokens=3), "p_tuning": dict(num_virtual_tokens=3, encoder_hidden_size=16),
           "prefix_tuning": dict(num_virtual_tokens=3, encoder_hidden_size=16),
           "p_tuning_v2": dict(num_virtual_tokens=3),
           "adapter_houlsby": dict(reduction_factor=4), "adapter_pfeiffer": dict(reduction_factor=4),
           "adapter_drop": dict(reduction_factor=4, skip_layers=1), "adapter_fusion": {},
           "adalora": dict(init_r=4, target_r=2), "bitfit": {}, "diff_pruning": {}, "fish_mask": dict(density=0.02),
           "far": dict(fraction=0.25), "unipelt": dict(r=4, num_virtual_tokens=3, reduction_factor=4),
           "mam": dict(num_virtual_tokens=3, reduction_factor=4)}
# a fixed batch at a high learning rate: each of the 20 steps lowers every cell's loss (by >= 1.7e-5 relative,
# AdaLoRA's first steps the least: its singular values start at zero); at 1e-2 a classifier's loss (RoBERTa +
# AdapterFusion) goes up once in 5 steps, at 3e-2 many
STEPS, LR = 20, 5e-3
NEW = 3  # tokens generated
INIT = dict(initializer_range=0.2)  # weights large enough that context and positions move the argmax


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on these tiny tensors OpenMP's fork/join per op costs more than it saves (the matrix
    takes several times longer on 2 cores with 2 threads, and far longer on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _refusal(family: str, method: str):
    """The ValueError message (a regex) ``pk.patch`` raises for this cell, or None."""
    if method == "bitfit" and family in NO_BIAS:
        return "no bias terms"
    return None


# the methods whose files PEFT loads (QLoRA's too, but onto a bitsandbytes 4-bit base: tests/methods/test_sites.py)
PEFT_METHODS = {"lora", "dora", "prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2"}
PEFT_REFUSES = {("distilbert", "prefix_tuning"), ("distilbert", "p_tuning_v2")}  # its forward takes no past_key_values
# (family, method) -> the bug
XFAIL: dict[tuple[str, str], str] = {}


def outcome(family: str, method: str) -> str:
    return "xfail" if (family, method) in XFAIL else "refused" if _refusal(family, method) else "ok"


def support_table() -> str:
    """README's table: a row per family, a column per method; ok, refused (a ValueError) or xfail (a known bug),
    then what each refusal says and each bug."""
    mark = {"ok": "ok", "refused": "refused", "xfail": "**xfail**"}
    lines = ["| family | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    lines += [f"| {f} | " + " | ".join(mark[outcome(f, m)] for m in METHODS) + " |" for f in FAMILIES]
    notes: dict[str, list[str]] = {}
    for f in FAMILIES:
        for m in METHODS:
            if outcome(f, m) == "refused":
                notes.setdefault(f"refused (`ValueError`: \"...{_refusal(f, m)}...\")", []).append(f"{f} {m}")
            elif outcome(f, m) == "xfail":
                notes.setdefault(f"xfail: {XFAIL[f, m]}", []).append(f"{f} {m}")
    lines += [""] + [textwrap.fill(f"- {note}: {', '.join(cells)}", 120, subsequent_indent="  ")
                     for note, cells in notes.items()]
    return "\n".join(lines)


def _cell(family: str, method: str):
    if (family, method) in XFAIL:
        return pytest.param(family, method, marks=pytest.mark.xfail(raises=AssertionError, strict=True,
                                                                          reason=XFAIL[family, method]))
    return pytest.param(family, method)


def _model(family: str):
    model = tiny_model(family, **INIT)
    if family not in ENCODERS:  # every row generates NEW tokens
        model.generation_config.eos_token_id = model.generation_config.forced_eos_token_id = None
    return model


def _stage1(family: str, directory) -> list:
    """AdapterFusion's stage 1: two Pfeiffer adapters saved from ``family`` models, moved from their init (fresh ones
    output zero, so a fusion of them would have nothing to learn) and from each other."""
    dirs = []
    for seed in (1, 2):
        model = _model(family)
        torch.manual_seed(seed)  # the adapters' initialization (tiny_model seeds the base)
        pk.patch(model, "adapter_pfeiffer", reduction_factor=4)
        _randomize_(model)
        dirs.append(pk.save_adapter(model, directory / f"stage1-{seed}").parent)
    return dirs


def _patch(model, family: str, method: str, batch: dict, directory):
    calibration = [batch] if pk.patching.METHODS[method].calibrated else None
    options = dict(adapters=_stage1(family, directory)) if method == "adapter_fusion" else OPTIONS[method]
    return pk.patch(model, method, calibration_data=calibration, **options)


def _train(model, batch: dict) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _argmax_loop(model, ids: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Greedy decoding by hand, the model's forward on the whole growing sequence without a cache; an
    encoder-decoder's decoder starts from the start token ``generated`` begins with."""
    encoder_decoder = model.config.is_encoder_decoder
    seq = generated[:, :1] if encoder_decoder else ids
    with torch.no_grad():
        for _ in range(NEW):
            inputs = dict(input_ids=ids, decoder_input_ids=seq) if encoder_decoder else dict(input_ids=seq)
            seq = torch.cat([seq, model(**inputs, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def _check_generate(model, batch: dict):
    ids = batch["input_ids"]
    greedy = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                  pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **greedy)
        uncached = model.generate(ids, use_cache=False, **greedy)
    assert cached.shape == (ids.shape[0], (1 if model.config.is_encoder_decoder else ids.shape[1]) + NEW)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, _argmax_loop(model, ids, cached))


def _check_cache_continuation(model, inputs: dict, split: int = 5):
    """A forward that fills the cache, then one with the rest of the (decoder's) tokens over it: the logits of one
    forward over all of it (generate's tokens can agree by chance; these logits cannot)."""
    key = "decoder_input_ids" if model.config.is_encoder_decoder else "input_ids"
    ids, rest = inputs[key][:, :split], inputs[key][:, split:]
    first = {**inputs, key: ids}
    if key == "input_ids":
        first["attention_mask"] = inputs["attention_mask"][:, :split]
    with torch.no_grad():
        whole = model(**inputs).logits[:, -rest.shape[1]:]
        past = model(**first, use_cache=True).past_key_values
        after = model(**{**inputs, key: rest}, past_key_values=past).logits
    torch.testing.assert_close(after, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, method", [_cell(f, m) for f in FAMILIES for m in METHODS])
def test_family_method(family, method, tmp_path):
    model = _model(family)
    batch = tiny_batch(model)
    refusal = _refusal(family, method)
    if refusal:
        with pytest.raises(ValueError, match=refusal):
            _patch(model, family, method, batch, tmp_path)
        return
    # the base's parameter objects, kept alive (a freed one's id could be reused), and their values
    before = {id(p): (p, p.detach().clone()) for p in model.parameters()}
    assert _patch(model, family, method, batch, tmp_path) is model
    frozen = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]
              if not t.requires_grad}
    losses = _train(model, batch)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(now[n], t) for n, t in frozen.items())
    kept = [(before[id(p)][1], p) for p in model.parameters() if id(p) in before and not p.requires_grad]
    assert len(kept) > 4 and all(torch.equal(p, old) for old, p in kept)
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = batch["input_ids"]
    if family not in ENCODERS:
        _check_generate(model, batch)
        _check_cache_continuation(model, inputs)
    with torch.no_grad():
        ref = model(**inputs).logits
    pk.save_adapter(model, tmp_path)
    loaded = pk.load_adapter(_model(family), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, ref, rtol=1e-5, atol=1e-5)
    if method in PEFT_METHODS and (family, method) not in PEFT_REFUSES:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(_model(family), str(tmp_path)).eval()
            logits = theirs(**inputs).logits  # a causal LM's begins with the virtual tokens'
        torch.testing.assert_close(logits[:, -ref.shape[1]:] if ref.dim() == 3 else logits, ref, rtol=1e-5, atol=1e-5)


PEFT_TASKS = {"bert": "SEQ_CLS", "roberta": "SEQ_CLS", "distilbert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM",
              "bart": "SEQ_2_SEQ_LM"}  # the others: CAUSAL_LM
# what PEFT reads from the model's config, given (DistilBERT's config calls them dim, n_heads, n_layers)
PEFT_SIZES = dict(num_virtual_tokens=3, token_dim=32, num_attention_heads=4, num_layers=2)
PEFT_CONFIGS = {
    "lora": lambda task: peft.LoraConfig(task_type=task, r=4, target_modules="all-linear"),
    "dora": lambda task: peft.LoraConfig(task_type=task, r=4, target_modules="all-linear", use_dora=True),
    "prompt_tuning": lambda task: peft.PromptTuningConfig(task_type=task, **PEFT_SIZES),
    "p_tuning": lambda task: peft.PromptEncoderConfig(task_type=task, **PEFT_SIZES, encoder_hidden_size=16),
    "prefix_tuning": lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3, token_dim=32,
                                                          prefix_projection=True, encoder_hidden_size=16),
    "p_tuning_v2": lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3, token_dim=32)}
# PEFT's get_peft_model itself fails: its modules_to_save matches names by suffix, so "classifier" takes
# DistilBERT's pre_classifier, which all-linear also targets
PEFT_FAILS = {("distilbert", "lora"), ("distilbert", "dora")}
PEFT_CELLS = [(f, m) for f in FAMILIES for m in PEFT_CONFIGS
              if outcome(f, m) == "ok" and (f, m) not in PEFT_REFUSES | PEFT_FAILS]


@pytest.mark.parametrize("family, method", PEFT_CELLS)
def test_peft_adapter_loads_with_peft_logits(family, method, tmp_path):
    """A PEFT adapter (its trainable tensors moved from their init) loaded by ``pk.load_adapter`` into a fresh model
    gives PEFT's logits."""
    model = _model(family)
    batch = tiny_batch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(model, PEFT_CONFIGS[method](PEFT_TASKS.get(family, "CAUSAL_LM")))
    _randomize_(theirs)
    theirs.eval().save_pretrained(str(tmp_path))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = batch["input_ids"]
    ours = pk.load_adapter(_model(family), tmp_path).eval()
    with torch.no_grad():
        ref, logits = theirs(**inputs).logits, ours(**inputs).logits
    if ref.dim() == 3:  # a causal LM's begin with the virtual tokens'
        ref, logits = ref[:, -inputs["input_ids"].shape[1]:], logits[:, -inputs["input_ids"].shape[1]:]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_readme_table_is_the_matrix():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert support_table() in readme, "README's 'Supported architectures' table: paste python -m tests.test_families"


if __name__ == "__main__":
    print(support_table())
