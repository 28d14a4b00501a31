"""Integrations with the libraries users already have (PEFT, bitsandbytes, transformers)."""
from . import peft

__all__ = ["peft"]
