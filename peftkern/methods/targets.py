"""Which modules a method adapts, and swapping them in place: shared by every method and ``pk.patch``."""
from __future__ import annotations

import re
from typing import Callable, Iterable, Union

from torch import nn

TargetSpec = Union[str, Iterable[str], Callable[[str, nn.Module], bool]]


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
