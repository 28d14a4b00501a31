"""What every method of ``pk.patch`` is made of: its options as a typed config (a :class:`MethodConfig` dataclass,
like PEFT's ``LoraConfig``) and its glue (a :class:`Method`: apply, the tensors to save, PEFT's config fields, the
rebuild from saved tensors), so that ``pk.patch`` / ``pk.save_adapter`` / ``pk.load_adapter`` treat all methods
alike. A family's module defines both next to its mechanism; ``peftkern.patching.METHODS`` names one ``Method`` per
method.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .. import _validate as V
from .sites import check_sites
from .targets import TargetSpec, target_matcher


def jsonable(options: dict) -> dict:
    """The options JSON can hold (dtypes by name); others (a tokenizer, a callable target) are left out."""
    out = {}
    for k, v in options.items():
        if isinstance(v, torch.dtype):
            v = str(v).replace("torch.", "")
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def module_names(name: str, value) -> Optional[Union[str, list[str]]]:
    """None, one module name, or a list of them (any iterable of non-empty strings becomes a list)."""
    if value is None or (isinstance(value, str) and value):
        return value
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be None, a module name or a list of them, got {value!r}")
    names = list(value)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{name} must hold non-empty module-name strings, got {names!r}")
    return names


def target_spec(value: Optional[TargetSpec], none_ok: bool = False) -> Optional[TargetSpec]:
    """``target_modules`` checked (a regex str, module-name suffixes as a list, or a callable; None where the method
    then finds its own)."""
    if value is None and none_ok:
        return None
    if value is not None and not isinstance(value, str) and not callable(value) and hasattr(value, "__iter__"):
        value = list(value)
    target_matcher(value)
    return value


def sites_spec(value: Optional[Mapping[str, str]]) -> Optional[dict[str, str]]:
    """``sites`` checked (see :func:`peftkern.methods.sites.find_layers`), as a dict."""
    check_sites(value)
    return None if value is None else dict(value)


def optional_integer(name: str, value, low: int = 1) -> Optional[int]:
    return None if value is None else V.integer(name, value, low=low)


def floating_dtype(name: str, value) -> Optional[torch.dtype]:
    """None or a floating torch dtype (also by name, as JSON holds it: ``"bfloat16"``)."""
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if value is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"{name} must be None or a floating-point torch.dtype, got {value!r}")
    return dtype


def paths(name: str, value) -> Optional[list[str]]:
    """None or a list of directory paths (str / os.PathLike), as strings."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be None or a list of directories, got {value!r}")
    items = list(value)
    if not all(isinstance(p, (str, os.PathLike)) for p in items):
        raise TypeError(f"{name} must hold directory paths (str or os.PathLike), got {items!r}")
    return [os.fspath(p) for p in items]


@dataclasses.dataclass(kw_only=True)
class MethodConfig:
    """A method's options (one subclass per method), checked when the config is made: a bad value raises
    ``ValueError`` / ``TypeError`` naming the option.

    ``modules_to_save``: the task head, which trains whole (a module name or a list of them; None: the model's
    children named like a head, ``classifier`` / ``score``, as PEFT's sequence classification)."""

    modules_to_save: Optional[Union[str, list[str]]] = None

    def __post_init__(self):
        self.modules_to_save = module_names("modules_to_save", self.modules_to_save)

    def to_dict(self) -> dict:
        """Every option by name, as given (``pk.patch``'s keyword options)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, options: Mapping):
        """The config of these options (the others keep their defaults); a name that is no option raises."""
        valid = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; valid options: {valid}")
        return cls(**options)

    def to_json(self) -> str:
        """The options as JSON, as ``pk.save_adapter`` stores them: dtypes by name; what JSON cannot hold (a
        tokenizer, a callable ``target_modules``) is left out and comes back as its default."""
        return json.dumps(jsonable(self.to_dict()))

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


class Method:
    """One method's glue, what ``pk.patch`` / ``pk.save_adapter`` / ``pk.load_adapter`` call (an instance per entry
    of ``peftkern.patching.METHODS``). A subclass sets ``config_class`` and defines :meth:`apply`; the others have
    defaults that fit a method whose saved tensors are the parameters it added."""

    config_class: type[MethodConfig] = MethodConfig
    calibrated: Union[bool, str] = False  # True: apply needs calibration_data (batches with labels); or "optional"
    head_prefix = "base_model.model."  # where PEFT saves the task head's parameters

    @property
    def defaults(self) -> dict:
        """Every option and its default."""
        return self.config_class().to_dict()

    def apply(self, model: nn.Module, config: MethodConfig, heads: list[str], calibration_data=None) -> dict:
        """Add the method's parameters to ``model`` in place and freeze the rest but the modules ``heads``. Returns
        what saving and reloading need besides the options (e.g. the adapted modules' names); options resolved from
        the model are set on ``config`` (it is ``pk.patch``'s own copy), so the saved options rebuild the same."""
        raise NotImplementedError

    def tensors(self, model: nn.Module, record: dict) -> dict[str, torch.Tensor]:
        """The method's tensors (live) under their saved names, for the adapter ``record`` (``peftkern_config``)
        describes: by default the parameters it added, under PEFT's ``base_model.model.`` prefix."""
        params = dict(model.named_parameters())
        return {f"base_model.model.{n}": params[n] for n in record["added"]}

    def peft_config(self, model: nn.Module, record: dict) -> Optional[dict]:
        """PEFT's ``adapter_config.json`` fields where PEFT has the method; None: the file holds our config."""
        return None

    def rebuild(self, model: nn.Module, config: MethodConfig, heads: list[str],
                tensors: dict[str, torch.Tensor]) -> dict:
        """:meth:`apply` for ``pk.load_adapter``, which then copies ``tensors`` (a saved adapter) in; a method that
        selects entries by calibration rebuilds the saved selection instead."""
        return self.apply(model, config, heads)
