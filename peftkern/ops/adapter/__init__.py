import importlib.util

from . import torch_impl  # noqa: F401  (registers the "torch" backend of the adapter ops)
from .function import activation_name, bottleneck_adapter

if importlib.util.find_spec("triton") is not None:
    from . import triton_impl  # noqa: F401  (registers the "triton" backend of the adapter ops)

__all__ = ["bottleneck_adapter", "activation_name"]
