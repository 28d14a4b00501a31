from . import torch_impl  # noqa: F401  (registers the "torch" backend of prefix attention)
from .function import prefix_attention

__all__ = ["prefix_attention"]
