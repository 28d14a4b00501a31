from . import torch_impl
from .function import dora_linear, dora_weight_norm, lora_linear

__all__ = ["lora_linear", "dora_linear", "dora_weight_norm"]
