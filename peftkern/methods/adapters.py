"""Bottleneck adapters in transformers models (Houlsby et al., 2019; Pfeiffer et al., 2021; He et al., 2022),
AdapterDrop (Rücklé et al., 2021) and AdapterFusion (Pfeiffer et al., 2021), on :class:`pk.nn.BottleneckAdapter`.

Where they go, per layer (``transformer_sites``, from :func:`peftkern.methods.sites.find_layers`): the linear that
produces the self-attention sublayer's output (BERT ``attention.output.dense``, Llama ``self_attn.o_proj``, GPT-2
``attn.c_proj``), the FFN's input module (BERT ``intermediate``, Llama ``mlp``, OPT ``fc1``) and the linear that
produces the FFN's output (BERT ``output.dense``, Llama ``mlp.down_proj``, T5 ``DenseReluDense.wo``), before the
layer's own residual and norm; in an encoder-decoder, the encoder's layers and the decoder's. A serial adapter
rewrites a sublayer output h as h + f(h) through a forward hook; a parallel adapter adds s f(x) of the FFN's input x
to the FFN's output. The adapter is a child module of the linear it follows (``<linear>.adapter``), so the base keeps
its parameter names and bits.
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional

import torch
from torch import nn

from ..nn.adapter import BottleneckAdapter
from ..nn.lora import linear_features
from .sites import find_layers


def transformer_sites(model: nn.Module, sites: Optional[Mapping[str, str]] = None) -> list[dict[str, nn.Module]]:
    """Per layer, in order: ``{"attn_out", "ffn_in", "ffn_out"}`` modules (see the module docstring); ``sites``
    names them where the model's own are not found (:func:`peftkern.methods.sites.find_layers`)."""
    return [{"attn_out": model.get_submodule(layer.attention.out.name), "ffn_in": model.get_submodule(layer.ffn),
             "ffn_out": model.get_submodule(layer.ffn_out)} for layer in find_layers(model, sites)]


def _dropped(adapter: nn.Module) -> bool:
    p = getattr(adapter, "drop_prob", 0.0)
    return adapter.training and p > 0.0 and bool(torch.rand(()) < p)


def _serial_hook(adapter: nn.Module, module: nn.Module, args, output):
    return output if _dropped(adapter) else adapter(output)


def _stash_hook(adapter: nn.Module, module: nn.Module, args):
    adapter.ffn_input = args[0]


def _parallel_hook(adapter: nn.Module, module: nn.Module, args, output):
    x, adapter.ffn_input = adapter.ffn_input, None
    return output if _dropped(adapter) else output + adapter(x)


def add_serial(linear: nn.Module, adapter: nn.Module) -> nn.Module:
    """``linear``'s output h becomes ``adapter(h)`` (the adapter carries its residual). Returns the adapter."""
    linear.adapter = adapter
    linear.register_forward_hook(functools.partial(_serial_hook, adapter))
    return adapter


def add_parallel(ffn_in: nn.Module, ffn_out: nn.Module, adapter: nn.Module) -> nn.Module:
    """``ffn_out``'s output gets ``adapter(x)`` added, x the input of ``ffn_in`` (a residual-free adapter)."""
    ffn_out.adapter = adapter
    ffn_in.register_forward_pre_hook(functools.partial(_stash_hook, adapter))
    ffn_out.register_forward_hook(functools.partial(_parallel_hook, adapter))
    return adapter


def add_adapters(model: nn.Module, placement: str, *, reduction_factor: float = 16, non_linearity: str = "relu",
                 layer_norm: bool = False, scale: float = 1.0, skip_layers: int = 0, drop_prob: float = 0.0,
                 gated: bool = False, hidden_size: Optional[int] = None,
                 sites: Optional[Mapping[str, str]] = None) -> list[BottleneckAdapter]:
    """Insert fresh adapters (identity at first) in every layer from ``skip_layers`` on (AdapterDrop's static
    dropping); ``drop_prob`` skips each one per training forward at random (its dynamic dropping).
    ``placement``: "houlsby" (after attention and after the FFN), "pfeiffer" (after the FFN) or "parallel"
    (beside the FFN, scaled by ``scale``); ``sites``: see :func:`transformer_sites`. Returns the adapters, lowest
    layer first."""
    if placement not in ("houlsby", "pfeiffer", "parallel"):
        raise ValueError(f"placement must be 'houlsby', 'pfeiffer' or 'parallel', got {placement!r}")
    sites = transformer_sites(model, sites)
    if not 0 <= skip_layers < len(sites):
        raise ValueError(f"skip_layers must be in [0, {len(sites)}) for this {len(sites)}-layer model, "
                         f"got {skip_layers}")
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
    d = hidden_size or linear_features(sites[0]["ffn_out"])[1]
    ref = sites[0]["ffn_out"].weight

    def new(residual: bool) -> BottleneckAdapter:
        a = BottleneckAdapter(d, reduction_factor, non_linearity, layer_norm=layer_norm, residual=residual,
                              scale=scale, gated=gated, device=ref.device,
                              dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32)
        a.drop_prob = float(drop_prob)
        return a

    added = []
    for site in sites[skip_layers:]:
        if placement == "houlsby":
            added.append(add_serial(site["attn_out"], new(True)))
        if placement == "parallel":
            added.append(add_parallel(site["ffn_in"], site["ffn_out"], new(False)))
        else:
            added.append(add_serial(site["ffn_out"], new(True)))
    return added


class AdapterFusion(nn.Module):
    """Attention over several frozen adapters' outputs at one site (Pfeiffer et al., 2021, stage 2).

    For the sublayer output h [.., D] and adapter deltas u_i = A_i(h) - h: ``w = softmax_i((h Q^T) . (u_i K^T))``,
    ``y = h + sum_i w_i (u_i V^T)``. Q and K start small (uniform weights at first), V at the identity, so a fresh
    fusion averages the adapters.
    """

    def __init__(self, adapters: list[BottleneckAdapter], hidden_size: int):
        super().__init__()
        if len(adapters) < 2:
            raise ValueError(f"AdapterFusion needs at least 2 adapters, got {len(adapters)}")
        self.adapters = nn.ModuleList(adapters)
        for p in self.adapters.parameters():
            p.requires_grad_(False)
        ref = next(self.adapters.parameters())
        kw = dict(device=ref.device, dtype=ref.dtype)
        self.query, self.key = nn.Linear(hidden_size, hidden_size, **kw), nn.Linear(hidden_size, hidden_size, **kw)
        self.value = nn.Linear(hidden_size, hidden_size, bias=False, **kw)
        for lin in (self.query, self.key):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.eye_(self.value.weight)
        self.drop_prob = 0.0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.query.weight.dtype)
        u = torch.stack([a(x) - x for a in self.adapters], dim=-2)  # [.., n, D]
        scores = (self.key(u) @ self.query(x).unsqueeze(-1)).squeeze(-1)  # [.., n]
        mixed = (scores.softmax(-1).unsqueeze(-1) * self.value(u)).sum(-2)
        return (x + mixed).to(h.dtype)
