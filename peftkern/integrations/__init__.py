"""Integrations with the libraries users already have (PEFT, bitsandbytes, transformers).

``transformers`` (transformers' ``Trainer`` for ``pk.patch`` models) is imported on first use: it imports
transformers' trainer, which ``import peftkern`` should not pay for."""
import importlib

from . import peft

__all__ = ["peft", "transformers"]


def __getattr__(name: str):
    if name == "transformers":
        return importlib.import_module(f"{__name__}.transformers")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
