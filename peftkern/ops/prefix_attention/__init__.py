import importlib.util

from . import torch_impl  # noqa: F401  (registers the "torch" backend of prefix attention)
from .function import prefix_attention

if importlib.util.find_spec("triton") is not None:
    from . import triton_impl  # noqa: F401  (registers the "triton" backend of prefix attention)

__all__ = ["prefix_attention"]
