"""Drop-in modules built on peftkern's ops."""
from .lora import LoRALinear

__all__ = ["LoRALinear"]
