import importlib.util

from . import torch_impl  # noqa: F401  (registers the "torch" backend of the NF4 ops)
from . import cuda_impl  # noqa: F401  (the "cuda" backend; the library loads lazily, on a CUDA device only)
from .function import BLOCKSIZES, NF4Tensor, dequantize, nf4_linear, qlora_linear, quantize

if importlib.util.find_spec("triton") is not None:
    from . import triton_impl  # noqa: F401  (registers the "triton" backend of the NF4 ops)

__all__ = ["NF4Tensor", "quantize", "dequantize", "nf4_linear", "qlora_linear", "BLOCKSIZES"]
