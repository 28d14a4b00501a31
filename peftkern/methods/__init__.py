"""Training-time algorithms built on the ops, each method's config and ``pk.patch`` glue beside its mechanism
(:mod:`.base`: the ``MethodConfig`` / ``Method`` every method follows; :mod:`.lora`, :mod:`.adapters` with MAM,
:mod:`.adalora`, :mod:`.selective`, :mod:`.prompt_tuning`, :mod:`.prefix_tuning`, :mod:`.unipelt`), and where methods
attach (:mod:`.sites`, :mod:`.targets`)."""
from .adalora import AdaLoRAAllocator, adalora_scaling, prepare_adalora
from .adapters import AdapterFusion, add_adapters, transformer_sites
from .prefix_tuning import PrefixTuning, add_prefix
from .prompt_tuning import PromptTuning, add_prompt
from .selective import (DiffPruningLinear, bitfit, diff_pruning, diff_pruning_l0, diff_pruning_to_sparse, far_select,
                        fish_mask)
from .unipelt import GatedLoRALinear, unipelt

__all__ = ["AdaLoRAAllocator", "adalora_scaling", "prepare_adalora", "AdapterFusion", "add_adapters",
           "transformer_sites", "GatedLoRALinear", "unipelt", "PrefixTuning", "PromptTuning", "add_prefix",
           "add_prompt", "bitfit", "fish_mask", "DiffPruningLinear", "diff_pruning", "diff_pruning_l0",
           "diff_pruning_to_sparse", "far_select"]
