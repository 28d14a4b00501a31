"""Which modules a method adapts (its targets, the task head), and swapping them in place: shared by every method
and ``pk.patch``."""
from __future__ import annotations

import re
from typing import Callable, Iterable, Union

from torch import nn

from ..nn.lora import is_conv1d

TargetSpec = Union[str, Iterable[str], Callable[[str, nn.Module], bool]]
HEAD_NAMES = ("classifier", "score")  # PEFT's modules_to_save for sequence classification


def name_matches(name: str, key: str) -> bool:
    """PEFT's rule: ``key`` is the module's full name or a dotted suffix of it."""
    return name == key or name.endswith("." + key)


def target_matcher(target_modules: TargetSpec, arg: str = "target_modules") -> Callable[[str, nn.Module], bool]:
    """``(name, module) -> bool`` for a regex string (full match, as PEFT), names / dotted suffixes, or a callable."""
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"{arg} is not a valid regular expression: {e}") from None
        return lambda name, mod: pattern.fullmatch(name) is not None
    if callable(target_modules):
        return lambda name, mod: bool(target_modules(name, mod))
    try:
        keys = list(target_modules)
    except TypeError:
        raise ValueError(f"{arg} must be a regex str, an iterable of module-name suffixes or a callable "
                         f"(name, module) -> bool, got {type(target_modules).__name__}") from None
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"{arg} must hold non-empty module-name strings, got {keys!r}")
    return lambda name, mod: any(name_matches(name, k) for k in keys)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def freeze_except(model: nn.Module, trainable_head: Iterable[str]) -> None:
    """Freeze every parameter of ``model`` but those under the modules named in ``trainable_head``."""
    heads = tuple(trainable_head)
    for n, p in model.named_parameters():
        p.requires_grad_(any(n == h or n.startswith(h + ".") for h in heads))


def head_modules(model: nn.Module, modules_to_save) -> list[str]:
    """The task head's modules: by default the model's children whose names end with a HEAD_NAMES entry, as PEFT's
    modules_to_save matches names by suffix (DistilBERT's ``pre_classifier`` with ``classifier``)."""
    if modules_to_save is None:
        return [n for n, m in model.named_children() if n.endswith(HEAD_NAMES)]
    names = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save)
    for h in names:
        try:
            model.get_submodule(h)
        except AttributeError:
            raise ValueError(f"modules_to_save names {h!r}, which is not a submodule of the model") from None
    return names


def is_bnb_4bit(module: nn.Module) -> bool:
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def linear_targets(model: nn.Module, target_modules: TargetSpec, heads: list[str],
                   quantized: bool = False) -> list[str]:
    """Names of the modules to adapt: every ``nn.Linear`` and transformers ``Conv1D`` (and bitsandbytes 4-bit linear
    where ``quantized``) for ``"all-linear"`` except the heads and the output embeddings, else those
    ``target_modules`` matches."""
    def linear(m):
        return (isinstance(m, nn.Linear) or is_conv1d(m)) and (quantized or not is_bnb_4bit(m))

    def in_head(n):  # the heads train whole; PEFT puts no LoRA inside its modules_to_save either
        return any(n == h or n.startswith(h + ".") for h in heads)

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if target_modules == "all-linear":
        names = [n for n, m in model.named_modules() if linear(m) and m is not out_emb and not in_head(n)]
    else:
        match = target_matcher(target_modules)
        names = [n for n, m in model.named_modules() if n and match(n, m) and not in_head(n)]
        bad = [n for n in names if not linear(model.get_submodule(n))]
        if bad:
            kind = "torch.nn.Linear / transformers Conv1D" + (" or bitsandbytes Linear4bit" if quantized else
                                                               " (use method='qlora' for a 4-bit base)")
            raise ValueError(f"target_modules matched {bad[:3]}, which are not {kind}")
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no linear layer of the model")
    return names
