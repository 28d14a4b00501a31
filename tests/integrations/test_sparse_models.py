"""FISH Mask's sparse diffs on transformers models as users train them: ``pk.patch(model, "fish_mask", ...)`` on
GPT-2 (Conv1D weights), OPT and Qwen2 built from their configs. Their small layers train through csrc/torch's C++
node (from the second call straight from C++), with gradients a float64 twin on PyTorch's ops confirms; transformers'
``Trainer`` with activation checkpointing trains them; under ``torch.autocast`` they take the registered op."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import peftkern as pk
from peftkern import _native

from .._helpers import assert_close, tiny_batch, tiny_model

FAMILIES = ["gpt2", "opt", "qwen2"]
# gradient_checkpointing is the name users know (transformers 5 calls it activation_checkpointing and warns)
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


def _patched(family: str):
    """A tiny ``family`` model with FISH Mask at 2% (calibrated on its batch), values moved off zero; its batch."""
    model = tiny_model(family, initializer_range=0.2)
    batch = tiny_batch(model)
    pk.patch(model, "fish_mask", calibration_data=[batch], density=0.02)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in _layers(model):
            layer.values.normal_(0, 0.05)
    return model.train(), batch


def _layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, pk.nn.SparseDiffLinear)]


def _record_nodes(model) -> list[bool]:
    """Per sparse layer call from now on: whether its output came out of csrc/torch's SparseSmall node."""
    ran = []

    def hook(module, args, out):
        fns = (out.grad_fn, *(f for f, _ in out.grad_fn.next_functions if f is not None))
        ran.append(any("SparseSmall" in f.name() for f in fns))

    for layer in _layers(model):
        layer.register_forward_hook(hook)
    return ran


def _grads(model, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_run_the_node_with_fp64_gradients(family, monkeypatch):
    model, batch = _patched(family)
    assert len(_layers(model)) >= 4
    twin = copy.deepcopy(model).double()
    ran = _record_nodes(model)
    first, second = _grads(model, batch), _grads(model, batch)  # the second: each layer's SmallLayer
    assert ran and all(ran), ran
    assert all(layer.__dict__.get("_small_call") is not None for layer in _layers(model))
    for name, g in first.items():
        torch.testing.assert_close(second[name], g, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    monkeypatch.setattr(_native, "USE_CPU_LIBRARY", False)  # the reference: PyTorch's ops in float64
    ref = _grads(twin, batch)
    assert ref.keys() == second.keys()
    for name, g in second.items():
        assert_close(g, ref[name], name=name)


def test_trainer_with_activation_checkpointing_trains_through_the_node(tmp_path):
    model, batch = _patched("gpt2")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ran = _record_nodes(model)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])] * 4
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                                          learning_rate=1e-2, gradient_checkpointing=True, use_cpu=True,
                                          report_to=[], disable_tqdm=True, logging_steps=1, save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   data_collator=transformers.default_data_collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(ran), "no sparse layer ran the node"
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.endswith("values") for n in moved), moved


def test_autocast_takes_the_op():
    model, batch = _patched("qwen2")
    ran = _record_nodes(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert ran and not any(ran)
    assert torch.isfinite(loss)
    assert all(layer.values.grad is not None and layer.values.grad.dtype == torch.float32 for layer in _layers(model))
