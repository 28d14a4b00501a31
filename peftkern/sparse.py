"""``pk.sparse``: sparse diff updates of frozen weights (see peftkern/ops/sparse/README.md)."""
from .ops.sparse import masked_weight_grad, merge, sparse_diff_linear, unmerge

__all__ = ["sparse_diff_linear", "masked_weight_grad", "merge", "unmerge"]
