"""peftkern: fused kernels for parameter-efficient fine-tuning."""
from .backend import available_backends, get_backend, set_backend, use_backend
from .ops.adapter import bottleneck_adapter
from .ops.lora import dora_linear, lora_linear
from .ops.multi_lora import multi_lora_linear
from .ops.nf4 import nf4_linear, qlora_linear
from .ops.prefix_attention import prefix_attention
from .ops.sparse import sparse_diff_linear
from .patching import load_adapter, patch, save_adapter
from .methods.adalora import AdaLoraConfig
from .methods.adapters import AdapterDropConfig, AdapterFusionConfig, HoulsbyConfig, MamConfig, PfeifferConfig
from .methods.lora import DoraConfig, LoraConfig, QLoraConfig
from .methods.prefix_tuning import PrefixTuningConfig, PTuningV2Config
from .methods.prompt_tuning import PromptLearningConfig, PromptTuningConfig, PTuningConfig
from .methods.selective import BitFitConfig, DiffPruningConfig, FarConfig, FishMaskConfig
from .methods.unipelt import UniPeltConfig
from .lifecycle import delete_adapter, disable, merge, set_adapter, unpatch
from . import integrations, methods, nf4, nn, optim, sparse  # noqa: E402

__version__ = "0.1.0"

__all__ = ["available_backends", "get_backend", "set_backend", "use_backend", "lora_linear", "dora_linear",
           "multi_lora_linear", "bottleneck_adapter", "nf4_linear", "qlora_linear", "prefix_attention",
           "sparse_diff_linear",
           "patch", "save_adapter", "load_adapter", "merge", "unpatch", "disable", "set_adapter",
           "delete_adapter",
           "LoraConfig", "DoraConfig", "QLoraConfig", "PromptLearningConfig", "PromptTuningConfig", "PTuningConfig",
           "PrefixTuningConfig", "PTuningV2Config", "HoulsbyConfig", "PfeifferConfig", "AdapterDropConfig",
           "AdapterFusionConfig", "AdaLoraConfig", "BitFitConfig", "DiffPruningConfig", "FishMaskConfig", "FarConfig",
           "UniPeltConfig", "MamConfig",
           "integrations", "methods", "nf4", "nn", "optim", "sparse"]
