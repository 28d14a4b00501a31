"""The literal math of multi-adapter LoRA: the oracle of the tests (run it in float64).

A plain loop over the sequences of the batch, each with its own adapter (or none for id -1). Run in low precision it
is also the eager peer: the LoRA term is computed in the adapters' dtype and cast to x's dtype before the sum, as
PEFT's mixed-batch forward does (both casts are no-ops in float64).
"""
from __future__ import annotations

import torch


def multi_lora_linear_reference(x, weight, bias, lora_A, lora_B, scalings, adapter_ids):
    """y_b = x_b W^T + b + s_a (x_b A_a^T) B_a^T with a = adapter_ids[b] (no LoRA term for a = -1).

    x [B, S, in] or [B, in]; autograd-friendly torch ops, so gradients come from autograd.
    """
    ids = [int(a) for a in (adapter_ids.tolist() if isinstance(adapter_ids, torch.Tensor) else adapter_ids)]
    scal = [float(s) for s in (scalings.tolist() if isinstance(scalings, torch.Tensor) else scalings)]
    ys = []
    for b, a in enumerate(ids):
        xb = x[b]
        yb = xb @ weight.t()
        if bias is not None:
            yb = yb + bias
        if a >= 0:
            lora = scal[a] * ((xb.to(lora_A.dtype) @ lora_A[a].t()) @ lora_B[a].t())
            yb = yb + lora.to(x.dtype)
        ys.append(yb)
    return torch.stack(ys, 0)
