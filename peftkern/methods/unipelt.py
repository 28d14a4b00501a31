"""UniPELT (Mao et al., 2022): LoRA, prefix tuning and a bottleneck adapter in one model, each behind a learned gate.

Per layer: the query and value projections get a gated LoRA term ``W x + b + sigmoid(x w_L + c_L) * s B A x``
(:class:`GatedLoRALinear`; the gate is per token, so the LoRA term is computed apart from the base GEMM; where q,
k and v are one fused projection, a rank-r LoRA on its q slice and one on its v slice, under one gate); the
attention gets a prefix whose keys and values are scaled, for query i, by ``sigmoid(h_i w_P + c_P)``, h the
attention's input (per token like the other gates, so causal: with a KV cache a new token's gate is the one it had in
the whole forward; one SDPA over doubled heads, ``prefix_tuning._sdpa``); the FFN output gets a Pfeiffer adapter
``h + sigmoid(h w_A + c_A) * f(h)`` on the fused adapter kernel. Everything else is frozen.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .. import _validate as V
from ..nn.lora import LoRALinear
from .adapters import add_adapters, check_bottleneck
from .base import Method, MethodConfig, sites_spec, target_spec
from .sites import Layer, find_layers
from .prefix_tuning import add_prefix
from .targets import TargetSpec, freeze_except, linear_targets


class GatedLoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose LoRA term is scaled per token by ``sigmoid(gate(x))`` (``gate`` [1, in]).

    ``slices`` (output-feature indices, one tensor per slice: the q and v parts of a fused qkv projection): a rank-r
    LoRA per slice that adds to those outputs only; ``lora_A`` [slices * r, in] stacks their down projections,
    ``lora_B`` [sum of slice sizes, r] their up projections, ``lora_rows`` the outputs they add to."""

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0, *,
                    slices: Optional[Sequence[torch.Tensor]] = None, **kwargs) -> "GatedLoRALinear":
        self = super().from_linear(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, **kwargs)
        self.register_buffer("lora_rows", None)
        if slices is not None:
            rows = torch.cat(list(slices)).to(self.lora_A.device)
            if (rows.numel() == 0 or rows.unique().numel() != rows.numel() or rows.min() < 0
                    or rows.max() >= self.out_features):
                raise ValueError(f"slices must be disjoint non-empty output-feature indices in [0, "
                                 f"{self.out_features}), got sizes {[len(s) for s in slices]}")
            kw = dict(device=self.lora_A.device, dtype=self.lora_A.dtype)
            self.lora_A = nn.Parameter(torch.empty(len(slices) * r, self.in_features, **kw))
            for a in self.lora_A.split(r):
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_B = nn.Parameter(torch.zeros(rows.numel(), r, **kw))
            self.register_buffer("lora_rows", rows, persistent=False)
            self.lora_sizes = [len(s) for s in slices]
        self.gate = nn.Linear(self.in_features, 1, device=self.lora_A.device, dtype=self.lora_A.dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = nn.functional.linear(x, self.base_weight, self.bias)
        xa = x.to(self.lora_A.dtype)
        dropped = nn.functional.dropout(xa, self.lora_dropout, self.training)
        h = nn.functional.linear(dropped, self.lora_A)
        if self.lora_rows is None:
            lora = nn.functional.linear(h, self.lora_B) * self.scaling
            return base + (torch.sigmoid(self.gate(xa)) * lora).to(base.dtype)
        lora = torch.cat([nn.functional.linear(hs, bs) for hs, bs in zip(h.split(self.r, -1),
                                                                          self.lora_B.split(self.lora_sizes))], -1)
        return base.index_add(-1, self.lora_rows, (torch.sigmoid(self.gate(xa)) * lora * self.scaling).to(base.dtype))


LoRATargets = Union[Sequence[str], Mapping[str, Optional[Sequence[torch.Tensor]]]]


def qv_targets(layers: Sequence[Layer]) -> dict[str, Optional[list[torch.Tensor]]]:
    """UniPELT's LoRA targets from the model's sites: every self-attention's query and value projections (module
    name -> None), or where they are slices of one fused projection, its name -> their output-feature indices."""
    parts: dict[str, list] = {}
    for layer in layers:
        for proj in (layer.attention.q, layer.attention.v):
            parts.setdefault(proj.name, []).append(proj.indices())
    return {name: None if rows == [None] else rows for name, rows in parts.items()}


def _gated_prefix_hook(gate: nn.Linear, module: nn.Module, args, kwargs):
    """Before the attention module runs: the gate of each of its queries, from that token's input alone."""
    h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    module.peftkern_prefix_gate = torch.sigmoid(gate(h.to(gate.weight.dtype)))[..., 0]  # [B, S]


def unipelt(model: nn.Module, *, lora_targets: LoRATargets, r: int = 8, lora_alpha: float = 16,
            num_virtual_tokens: int = 10, reduction_factor: float = 16, non_linearity: str = "relu",
            sites: Optional[Mapping[str, str]] = None) -> nn.Module:
    """Gated LoRA on ``lora_targets`` (module names; or a dict of module name -> None or its slices, as
    :func:`qv_targets` gives), a gated prefix (its gates beside the prefix, in
    ``model.peftkern_prompt.gates``) and a gated FFN adapter in every layer, in place. Freezes nothing itself (the
    caller freezes the base first). Returns the model."""
    targets = lora_targets if isinstance(lora_targets, Mapping) else dict.fromkeys(lora_targets)
    for name, slices in targets.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                GatedLoRALinear.from_linear(model.get_submodule(name), r=r, lora_alpha=lora_alpha, slices=slices))
    add_adapters(model, "pfeiffer", reduction_factor=reduction_factor, non_linearity=non_linearity, gated=True,
                 sites=sites)
    prefix = add_prefix(model, num_virtual_tokens, sites=sites)
    d = model.config.hidden_size
    ref = prefix.embedding.weight
    prefix.gates = nn.ModuleList(nn.Linear(d, 1, device=ref.device, dtype=ref.dtype) for _ in prefix.layers)
    for layer, gate in zip(prefix.layers, prefix.gates):
        layer.register_forward_pre_hook(functools.partial(_gated_prefix_hook, gate), with_kwargs=True)
    return model


@dataclasses.dataclass(kw_only=True)
class UniPeltConfig(MethodConfig):
    """UniPELT's options: gated LoRA (``r``, ``lora_alpha``) on ``target_modules`` (None: every self-attention's query
    and value projections, or their slices of a fused qkv projection), a gated prefix of ``num_virtual_tokens`` and a
    gated adapter (``reduction_factor``, ``non_linearity``) in every layer; ``sites`` as
    :class:`~peftkern.methods.adapters.PfeifferConfig`'s."""

    r: int = 8
    lora_alpha: float = 16
    target_modules: Optional[TargetSpec] = None
    sites: Optional[dict[str, str]] = None
    num_virtual_tokens: int = 10
    reduction_factor: float = 16
    non_linearity: str = "relu"

    def __post_init__(self):
        super().__post_init__()
        V.integer("r", self.r)
        V.number("lora_alpha", self.lora_alpha)
        self.target_modules = target_spec(self.target_modules, none_ok=True)
        self.sites = sites_spec(self.sites)
        V.integer("num_virtual_tokens", self.num_virtual_tokens)
        check_bottleneck(self.reduction_factor, self.non_linearity)


class UniPeltMethod(Method):
    """UniPELT; saved as the parameters it added (the prefix's table and the gates among them)."""

    config_class = UniPeltConfig

    def apply(self, model, config: UniPeltConfig, heads, calibration_data=None) -> dict:
        if config.target_modules is None:
            targets = qv_targets(find_layers(model, config.sites))
        else:
            targets = linear_targets(model, config.target_modules, heads)
        freeze_except(model, heads)
        unipelt(model, lora_targets=targets, r=config.r, lora_alpha=config.lora_alpha,
                num_virtual_tokens=config.num_virtual_tokens, reduction_factor=config.reduction_factor,
                non_linearity=config.non_linearity, sites=config.sites)
        return {}
