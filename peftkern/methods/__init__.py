"""Training-time algorithms built on the ops."""
from .adalora import AdaLoRAAllocator, adalora_scaling, prepare_adalora
from .prefix_tuning import PrefixTuning
from .prompt_tuning import PromptTuning

__all__ = ["AdaLoRAAllocator", "adalora_scaling", "prepare_adalora", "PrefixTuning", "PromptTuning"]
