"""UniPELT (Mao et al., 2022): LoRA, prefix tuning and a bottleneck adapter in one model, each behind a learned gate.

Per layer: the query and value projections get a gated LoRA term ``W x + b + sigmoid(x w_L + c_L) * s B A x``
(:class:`GatedLoRALinear`; the gate is per token, so the LoRA term is computed apart from the base GEMM); the
attention gets a prefix whose keys and values are scaled per example by ``sigmoid(mean_s(h) w_P + c_P)``, h the
attention's input (prefix attention with a per-row prefix); the FFN output gets a Pfeiffer adapter
``h + sigmoid(h w_A + c_A) * f(h)`` on the fused adapter kernel. Everything else is frozen.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..nn.lora import LoRALinear
from .adapters import add_adapters
from .prefix_tuning import PrefixTuning, add_prefix


class GatedLoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose LoRA term is scaled per token by ``sigmoid(gate(x))`` (``gate`` [1, in])."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    **kwargs) -> "GatedLoRALinear":
        self = super().from_linear(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, **kwargs)
        self.gate = nn.Linear(self.in_features, 1, device=self.lora_A.device, dtype=self.lora_A.dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = nn.functional.linear(x, self.weight, self.bias)
        xa = x.to(self.lora_A.dtype)
        dropped = nn.functional.dropout(xa, self.lora_dropout, self.training)
        lora = nn.functional.linear(nn.functional.linear(dropped, self.lora_A), self.lora_B) * self.scaling
        return base + (torch.sigmoid(self.gate(xa)) * lora).to(base.dtype)


def _gated_prefix_hook(prefix: PrefixTuning, gate: nn.Linear, module: nn.Module, args, kwargs):
    """Before an attention module runs: its prefix, scaled per example by the gate of its input."""
    h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    kv = prefix.layer_prefixes()
    g = torch.sigmoid(gate(h.to(gate.weight.dtype).mean(1)))[:, :, None, None]  # [B, 1, 1, 1]
    i = module.layer_idx
    module.peftkern_prefix = (kv[2 * i][None] * g, kv[2 * i + 1][None] * g)


def unipelt(model: nn.Module, *, lora_targets: list[str], r: int = 8, lora_alpha: float = 16,
            num_virtual_tokens: int = 10, reduction_factor: float = 16, non_linearity: str = "relu") -> nn.Module:
    """Gated LoRA on ``lora_targets`` (module names), a gated prefix (its gates beside the prefix, in
    ``model.peftkern_prompt.gates``) and a gated FFN adapter in every layer, in place. Freezes nothing itself (the
    caller freezes the base first). Returns the model."""
    for name in lora_targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                GatedLoRALinear.from_linear(model.get_submodule(name), r=r, lora_alpha=lora_alpha))
    add_adapters(model, "pfeiffer", reduction_factor=reduction_factor, non_linearity=non_linearity, gated=True)
    prefix = add_prefix(model, num_virtual_tokens)
    d = model.config.hidden_size
    ref = prefix.embedding.weight
    prefix.gates = nn.ModuleList(nn.Linear(d, 1, device=ref.device, dtype=ref.dtype) for _ in prefix.layers)
    for layer, gate in zip(prefix.layers, prefix.gates):
        layer.register_forward_pre_hook(functools.partial(_gated_prefix_hook, prefix, gate), with_kwargs=True)
    return model
