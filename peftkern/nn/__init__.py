"""Drop-in modules built on peftkern's ops."""
from .adapter import BottleneckAdapter
from .lora import LoRALinear
from .nf4 import NF4Linear, QLoRALinear
from .sparse import RowDiffLinear, SparseDiffLinear

__all__ = ["BottleneckAdapter", "LoRALinear", "NF4Linear", "QLoRALinear", "SparseDiffLinear", "RowDiffLinear"]
