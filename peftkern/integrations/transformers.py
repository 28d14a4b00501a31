"""transformers' ``Trainer`` for ``pk.patch`` models: checkpoints hold the adapter, not the whole model.

``Trainer`` (a drop-in for ``transformers.Trainer``) and ``AdapterCheckpointMixin`` (for another trainer class:
``class MyTrainer(AdapterCheckpointMixin, SFTTrainer)``) change two things, and only for a model ``pk.patch``
made (anything else is left to transformers):

* every save (the ``checkpoint-*`` folders, ``trainer.save_model()``) writes ``pk.save_adapter``'s
  ``adapter_model.safetensors`` and ``adapter_config.json`` (PEFT's files where PEFT has the method), the tokenizer
  and ``training_args.bin``, as a PEFT model's checkpoints do. Prompt encoders (P-Tuning) and prefix MLPs (Prefix
  Tuning) are saved folded, as PEFT saves them, so their trainable parameters also go to
  ``peftkern_trainable.safetensors`` for resuming;
* ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` read them back into the model in training:
  the same parameters, bit for bit, as at the save.

``pk.patch`` patches in place, so everything else (the dataset columns ``Trainer`` keeps by the forward's signature,
activation checkpointing, the optimizer's parameters) is the model's own, for every method.

Why a trainer rather than a callback: ``Trainer`` reads checkpoints back itself and only knows PEFT's ``PeftModel``
as a model whose checkpoint is an adapter. The model's own ``save_pretrained`` is unchanged (the whole model).
With FSDP / DeepSpeed (where ``Trainer`` gathers a state dict) checkpoints stay whole-model ones.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import transformers
from torch import nn

from ..patching import WEIGHTS_NAME, _expected, load_adapter, save_adapter

TRAINABLE_NAME = "peftkern_trainable.safetensors"


def _patched(model: nn.Module) -> bool:
    return getattr(model, "peftkern_config", None) is not None


def save_checkpoint(model: nn.Module, directory: str | os.PathLike) -> None:
    """``pk.save_adapter(model, directory)``, plus the trainable parameters under their names in
    ``peftkern_trainable.safetensors`` when the adapter does not hold them as they are (a folded prompt encoder)."""
    from safetensors.torch import save_file

    save_adapter(model, directory)
    saved = list(_expected(model, model.peftkern_config).values())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if any(all(p is not t for t in saved) for p in trainable.values()):
        save_file({n: p.detach().contiguous().clone() for n, p in trainable.items()},
                  str(Path(directory) / TRAINABLE_NAME), metadata={"format": "pt"})


def load_checkpoint(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Put the parameters :func:`save_checkpoint` wrote back into ``model`` (patched, as it was at the save)."""
    from safetensors.torch import load_file

    path = Path(directory) / TRAINABLE_NAME
    if not path.is_file():
        return load_adapter(model, directory)
    saved = load_file(str(path))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(trainable):
        raise ValueError(f"{str(path)!r} does not fit the model: missing {sorted(set(trainable) - set(saved))[:4]}, "
                         f"unexpected {sorted(set(saved) - set(trainable))[:4]}")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(saved[name])
    return model


class AdapterCheckpointMixin:
    """Mix into a ``transformers.Trainer`` (sub)class, first: see the module's docstring."""

    def _patched_model(self) -> Optional[nn.Module]:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if _patched(model) else None

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        model = self._patched_model()
        if model is None or state_dict is not None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_checkpoint(model, output_dir)
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        target = self._patched_model() if model is None or model is self.model else None
        if target is None or not (Path(resume_from_checkpoint) / WEIGHTS_NAME).is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_checkpoint(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        model, best = self._patched_model(), self.state.best_model_checkpoint
        if model is None or not (Path(best) / WEIGHTS_NAME).is_file():
            return super()._load_best_model()
        load_checkpoint(model, best)


class Trainer(AdapterCheckpointMixin, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints of a ``pk.patch`` model hold the adapter (module docstring)."""
