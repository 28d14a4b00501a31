"""The literal math of the bottleneck adapter (README.md): the tests' oracle, run in float64."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": lambda z: torch.nn.functional.gelu(z),
    "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
}


def bottleneck_adapter_reference(h: Tensor, w_down: Tensor, b_down: Optional[Tensor], w_up: Tensor,
                                 b_up: Optional[Tensor], activation: str, residual: bool = True,
                                 scale: float = 1.0) -> Tensor:
    z = h @ w_down.t() + (b_down if b_down is not None else 0)
    up = ACTIVATIONS[activation](z) @ w_up.t() + (b_up if b_up is not None else 0)
    return h + scale * up if residual else scale * up
