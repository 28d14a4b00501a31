import importlib.util

from . import torch_impl  # noqa: F401  (registers the "torch" backend of the sparse diff ops)
from . import cuda_impl  # noqa: F401  (the "cuda" backend of merge; the library loads lazily, on a CUDA device only)
from .function import masked_weight_grad, merge, sparse_diff_linear, unmerge

if importlib.util.find_spec("triton") is not None:
    from . import triton_impl  # noqa: F401  (registers the "triton" backend of the sparse diff ops)

__all__ = ["sparse_diff_linear", "masked_weight_grad", "merge", "unmerge"]
