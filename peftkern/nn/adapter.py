"""BottleneckAdapter: the Houlsby / Pfeiffer / parallel adapter as a module over the fused ``pk.bottleneck_adapter``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _validate as V
from ..ops.adapter import activation_name, bottleneck_adapter
from .lora import _member


def _weight_and_bias(linear: nn.Module) -> tuple:
    """(weight, bias) of an nn.Linear from its parameter dict (~1 us a decode-sized call less than four
    :func:`_member` reads), through :func:`_member` where they are not there (a parametrized weight)."""
    params = linear._parameters
    if "weight" in params and "bias" in params:
        return params["weight"], params["bias"]
    return _member(linear, "weight"), _member(linear, "bias")


class BottleneckAdapter(nn.Module):
    """``y = [h +] scale * up(act(down(LN(h))))`` with ``down`` [D / reduction_factor, D] and ``up`` [D, that].

    ``up`` starts at zero, so a fresh adapter is the identity (with ``residual``) or adds nothing (without: the
    parallel adapter). ``layer_norm``: a LayerNorm on the adapter's input (the residual stays the raw h).
    ``gated``: UniPELT's per-token gate, ``y = h + sigmoid(h w_g + b_g) * scale * up(act(down(h)))``.
    """

    def __init__(self, hidden_size: int, reduction_factor: float = 16, non_linearity: str = "relu", *,
                 layer_norm: bool = False, residual: bool = True, scale: float = 1.0, gated: bool = False,
                 bottleneck_size: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        V.integer("hidden_size", hidden_size)
        V.number("reduction_factor", reduction_factor, low=0.0, low_open=True)
        V.number("scale", scale)
        if bottleneck_size is None:
            bottleneck_size = max(1, int(hidden_size // reduction_factor))
        V.integer("bottleneck_size", bottleneck_size)
        self.hidden_size, self.bottleneck_size = hidden_size, bottleneck_size
        self.non_linearity = activation_name(non_linearity)
        self.residual, self.scale = bool(residual), float(scale)
        kw = dict(device=device, dtype=dtype)
        self.layer_norm = nn.LayerNorm(hidden_size, **kw) if layer_norm else None
        self.down = nn.Linear(hidden_size, bottleneck_size, **kw)
        self.up = nn.Linear(bottleneck_size, hidden_size, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.gate = nn.Linear(hidden_size, 1, **kw) if gated else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        modules = self._modules
        (w_down, b_down), (w_up, b_up) = _weight_and_bias(modules["down"]), _weight_and_bias(modules["up"])
        x = h if h.dtype == w_down.dtype else h.to(w_down.dtype)
        if self.layer_norm is None and self.gate is None:
            y = bottleneck_adapter(x, w_down, b_down, w_up, b_up, self.non_linearity, self.residual, self.scale)
            return y if y.dtype == h.dtype else y.to(h.dtype)
        inner = x if self.layer_norm is None else self.layer_norm(x)
        y = bottleneck_adapter(inner, w_down, b_down, w_up, b_up, self.non_linearity, False, self.scale)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y
        return (x + y if self.residual else y).to(h.dtype)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size} -> {self.bottleneck_size} -> {self.hidden_size}, {self.non_linearity}, "
                f"residual={self.residual}, scale={self.scale:g}")
