"""transformers' ``Trainer`` on ``pk.patch`` models, end to end on tiny models with activation checkpointing on:
``peftkern.integrations.transformers.Trainer`` trains LoRA (with dropout), QLoRA, prompt tuning and prefix tuning,
its checkpoints hold the adapter and nothing of the base (read back by ``pk.load_adapter`` and by PEFT with the same
outputs), resuming from one ends bit-identical to the uninterrupted run, and ``load_best_model_at_end`` restores the
best checkpoint. Plain ``transformers.Trainer`` trains them too, with whole-model checkpoints that load back (a QLoRA
one in bitsandbytes' 4-bit keys)."""
from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import peftkern as pk
from peftkern.integrations.transformers import Trainer

from .._helpers import tiny_bert, tiny_llama

METHODS = {"lora": ("bert", dict(r=4, lora_dropout=0.1)), "qlora": ("llama", dict(r=4)),
           "prompt_tuning": ("llama", dict(num_virtual_tokens=4)),
           "prefix_tuning": ("llama", dict(num_virtual_tokens=4))}  # (model family, options)
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json"}
WHOLE_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
# gradient_checkpointing is the name users know (transformers 5 calls it activation_checkpointing and warns)
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


def _data(family: str, n: int = 16) -> list[dict]:
    """Rows of 12 tokens, every fourth one padded after 8, and a column no model takes (the trainer drops it)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(1, 100, (12,), generator=g)
        mask = torch.ones_like(ids)
        if i % 4 == 3:
            mask[8:] = 0
        labels = ids.masked_fill(mask == 0, -100) if family == "llama" else torch.tensor(i % 3)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "text": "unused"})
    return rows


def _patched(method: str):
    family, options = METHODS[method]
    return pk.patch(tiny_llama() if family == "llama" else tiny_bert(), method, **options)


def _trainer(model, family: str, output_dir, trainer_cls=Trainer, compute_metrics=None, **arguments):
    """(trainer, the set of columns its batches carried): 4 steps of 4 rows, a checkpoint every 2; with
    ``compute_metrics``, 4 rows to evaluate."""
    columns = set()

    def collate(features):
        columns.update(features[0])
        return transformers.default_data_collator(features)

    arguments = {"max_steps": 4, "save_steps": 2, **arguments}
    args = transformers.TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=1e-2,
                                          seed=3, gradient_checkpointing=True, use_cpu=True, report_to=[],
                                          disable_tqdm=True, logging_steps=1, **arguments)
    trainer = trainer_cls(model=model, args=args, train_dataset=_data(family), data_collator=collate,
                          eval_dataset=_data(family, 4) if compute_metrics else None, compute_metrics=compute_metrics)
    return trainer, columns


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _batch() -> dict:
    rows = _data("llama")[:4]
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}


def _logits(model, family: str) -> torch.Tensor:
    """The logits of the real tokens (a prompt-tuned causal LM also returns its virtual tokens')."""
    batch = _batch()
    with torch.no_grad():
        logits = model(**batch).logits
    if family == "bert":
        return logits
    return logits[:, -batch["input_ids"].shape[1]:][batch["attention_mask"].bool()]


@pytest.fixture(scope="module", params=list(METHODS))
def run(request, tmp_path_factory):
    """One uninterrupted run per method, shared by the tests below."""
    method = request.param
    family = METHODS[method][0]
    out = tmp_path_factory.mktemp(method)
    model = _patched(method)
    init = _trainable(model)
    trainer, columns = _trainer(model, family, out)
    trainer.train()
    return SimpleNamespace(method=method, family=family, model=model.eval(), init=init, out=out, trainer=trainer,
                           columns=columns)


def test_trains_with_activation_checkpointing(run):
    assert run.model.is_activation_checkpointing
    assert run.columns == {"input_ids", "attention_mask", "labels"}
    losses = [h["loss"] for h in run.trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    now = _trainable(run.model)
    assert now.keys() == run.init.keys()
    assert not [n for n in now if torch.equal(now[n], run.init[n])], "parameters the training did not move"


def test_checkpoints_hold_the_adapter_only(run, tmp_path):
    pk.save_adapter(run.model, tmp_path)
    final = load_file(str(tmp_path / "adapter_model.safetensors"))
    trainable_bytes = sum(t.numel() * t.element_size() for t in _trainable(run.model).values())
    run.trainer.save_model()
    for directory in (run.out / "checkpoint-2", run.out / "checkpoint-4", run.out):
        files = {p.name for p in directory.iterdir()}
        assert ADAPTER_FILES <= files and not files & WHOLE_MODEL_FILES, sorted(files)
        saved = load_file(str(directory / "adapter_model.safetensors"))
        assert saved.keys() == final.keys()
        assert sum(t.numel() * t.element_size() for t in saved.values()) <= trainable_bytes
        # the prefix MLP is saved folded, as PEFT saves it: its own parameters travel beside the adapter
        assert ("peftkern_trainable.safetensors" in files) == (run.method == "prefix_tuning")
    for name, tensor in load_file(str(run.out / "checkpoint-4" / "adapter_model.safetensors")).items():
        assert torch.equal(tensor, final[name]), name


def _peft_reads(run, directory):
    """PEFT's model from the checkpoint; a QLoRA adapter goes on the NF4 weights' exact values in a plain model."""
    base = tiny_llama() if run.family == "llama" else tiny_bert()
    if run.method == "qlora":
        with torch.no_grad():
            for name in run.model.peftkern_config["targets"]:
                base.get_submodule(name).weight.copy_(run.model.get_submodule(name).dequantized_weight())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(directory)).eval()


def test_checkpoint_loads_into_a_fresh_model_and_into_peft(run):
    checkpoint = run.out / "checkpoint-4"
    expected = _logits(run.model, run.family)
    fresh = pk.load_adapter(tiny_llama() if run.family == "llama" else tiny_bert(), checkpoint).eval()
    torch.testing.assert_close(_logits(fresh, run.family), expected, rtol=1e-5, atol=1e-6)
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["peft_type"] == {"lora": "LORA", "qlora": "LORA", "prompt_tuning": "PROMPT_TUNING",
                                   "prefix_tuning": "PREFIX_TUNING"}[run.method]
    torch.testing.assert_close(_logits(_peft_reads(run, checkpoint), run.family), expected, rtol=1e-5, atol=1e-5)


def test_resume_equals_the_uninterrupted_run(run, tmp_path):
    model = _patched(run.method)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # whatever the checkpoint does not restore shows
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g))
    trainer, _ = _trainer(model, run.family, tmp_path)
    trainer.train(resume_from_checkpoint=str(run.out / "checkpoint-2"))
    assert trainer.state.global_step == 4
    resumed, uninterrupted = _trainable(model), _trainable(run.model)
    assert resumed.keys() == uninterrupted.keys()
    assert not [n for n in resumed if not torch.equal(resumed[n], uninterrupted[n])], "differs after resuming"


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    """Prefix tuning (saved folded): the best checkpoint's parameters come back as they trained, MLP included."""
    scores = iter([1.0, 0.0])
    model = _patched("prefix_tuning")
    trainer, _ = _trainer(model, "llama", tmp_path, compute_metrics=lambda prediction: {"score": next(scores)},
                          max_steps=2, save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                          metric_for_best_model="score", greater_is_better=True)
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    best = load_file(str(tmp_path / "checkpoint-1" / "peftkern_trainable.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-2" / "peftkern_trainable.safetensors"))
    now = _trainable(model)
    assert now.keys() == best.keys()
    assert all(torch.equal(now[n], best[n]) for n in now)
    assert not all(torch.equal(now[n], last[n]) for n in now)


@pytest.mark.parametrize("method", ["qlora", "prompt_tuning", "prefix_tuning"])
def test_plain_transformers_trainer_writes_whole_model_checkpoints_that_load(method, tmp_path):
    """The patched model under transformers' own Trainer: patched in place, its forward's signature keeps the inputs
    and labels, the prompt / prefix table is in its state dict, and a QLoRA model's state dict (bitsandbytes' keys,
    code tables every layer shares) saves with safetensors."""
    model = _patched(method)
    trainer, columns = _trainer(model, METHODS[method][0], tmp_path, transformers.Trainer, max_steps=2)
    trainer.train()
    assert columns == {"input_ids", "attention_mask", "labels"}
    state = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    if method == "qlora":
        suffixes = ("weight.quant_map", "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4")
        assert all(any(k.endswith(s) for k in state) for s in suffixes)
    else:
        assert "peftkern_prompt.embedding.weight" in state
    fresh = _patched(method)
    fresh.load_state_dict(state)
    mine, theirs = fresh.state_dict(), model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
