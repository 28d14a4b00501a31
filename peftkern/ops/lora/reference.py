"""The literal math of the LoRA family: the oracle of the tests (run it in float64)."""
from __future__ import annotations

import torch


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, *, rank_scale=None, keep_mask=None,
                          dropout_p=0.0):
    """y = x W^T + b + s * ((drop(x) A^T) * e) B^T, computed by autograd-friendly torch ops."""
    xd = x if keep_mask is None else x * keep_mask / (1.0 - dropout_p)
    h = xd @ lora_A.t()
    if rank_scale is not None:
        h = h * rank_scale
    y = x @ weight.t() + scaling * (h @ lora_B.t())
    return y if bias is None else y + bias


def dora_weight_norm_reference(weight, lora_A, lora_B, scaling):
    """Row norms of W + s B A (the merged weight), [out]."""
    return torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1)


def dora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, magnitude, *, keep_mask=None, dropout_p=0.0):
    norm = dora_weight_norm_reference(weight, lora_A, lora_B, scaling).detach()
    y = lora_linear_reference(x, weight, None, lora_A, lora_B, scaling, keep_mask=keep_mask, dropout_p=dropout_p)
    y = y * (magnitude / norm)
    return y if bias is None else y + bias

