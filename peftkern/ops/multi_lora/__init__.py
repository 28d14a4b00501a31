"""Multi-adapter LoRA (one adapter per sequence, SGMV): reference, torch and Triton implementations, custom ops."""
import importlib.util

from . import torch_impl
from .function import multi_lora_linear

if importlib.util.find_spec("triton") is not None:
    from . import triton_impl  # noqa: F401  (registers the "triton" backend of the multi-LoRA ops)

__all__ = ["multi_lora_linear"]
