"""Training-time algorithms built on the ops."""
from .adalora import AdaLoRAAllocator, adalora_scaling, prepare_adalora
from .prefix_tuning import PrefixTuning
from .prompt_tuning import PromptTuning
from .selective import (DiffPruningLinear, bitfit, diff_pruning, diff_pruning_l0, diff_pruning_to_sparse, far_select,
                        fish_mask)

__all__ = ["AdaLoRAAllocator", "adalora_scaling", "prepare_adalora", "PrefixTuning", "PromptTuning", "bitfit",
           "fish_mask", "DiffPruningLinear", "diff_pruning", "diff_pruning_l0", "diff_pruning_to_sparse", "far_select"]
