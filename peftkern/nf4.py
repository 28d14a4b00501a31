"""``pk.nf4``: bitsandbytes-exact NF4 quantization (see peftkern/ops/nf4/README.md)."""
from .ops.nf4 import BLOCKSIZES, NF4Tensor, dequantize, quantize

__all__ = ["NF4Tensor", "quantize", "dequantize", "BLOCKSIZES"]
