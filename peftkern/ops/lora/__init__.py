import importlib.util

from . import torch_impl
from .function import dora_linear, dora_weight_norm, lora_linear

if importlib.util.find_spec("triton") is not None:
    from . import triton_impl  # noqa: F401  (registers the "triton" backend of the LoRA ops)

__all__ = ["lora_linear", "dora_linear", "dora_weight_norm"]
