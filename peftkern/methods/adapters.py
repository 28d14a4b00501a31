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

import dataclasses
import functools
from typing import Mapping, Optional

import torch
from torch import nn

from .. import _validate as V
from ..nn.adapter import BottleneckAdapter
from ..nn.lora import linear_features
from ..ops.adapter.function import activation_name
from .base import Method, MethodConfig, optional_integer, paths, sites_spec
from .prefix_tuning import add_prefix
from .sites import find_layers
from .targets import freeze_except


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


def check_bottleneck(reduction_factor, non_linearity) -> None:
    """The options of every adapter config: ``reduction_factor`` > 0 and ``non_linearity`` an activation the adapter
    kernels have (``TypeError`` / ``ValueError`` naming the option)."""
    V.number("reduction_factor", reduction_factor, low=0.0, low_open=True)
    try:
        activation_name(non_linearity)
    except (TypeError, ValueError) as e:
        raise type(e)(f"non_linearity: {e}") from None


@dataclasses.dataclass(kw_only=True)
class PfeifferConfig(MethodConfig):
    """The options of a bottleneck adapter after every layer's FFN (Pfeiffer et al., 2021). ``reduction_factor``:
    hidden size / bottleneck size; ``non_linearity``: the bottleneck's activation (relu, gelu, swish, ...);
    ``layer_norm``: a LayerNorm on the adapter's input; ``sites``: regexes naming the layers' modules where the
    model's own are not found (:func:`peftkern.methods.sites.find_layers`)."""

    reduction_factor: float = 16
    non_linearity: str = "relu"
    layer_norm: bool = False
    sites: Optional[dict[str, str]] = None

    def __post_init__(self):
        super().__post_init__()
        check_bottleneck(self.reduction_factor, self.non_linearity)
        V.flag("layer_norm", self.layer_norm)
        self.sites = sites_spec(self.sites)


@dataclasses.dataclass(kw_only=True)
class HoulsbyConfig(PfeifferConfig):
    """Pfeiffer's options for adapters after attention and after the FFN (Houlsby et al., 2019), swish by default
    as there."""

    non_linearity: str = "swish"


@dataclasses.dataclass(kw_only=True)
class AdapterDropConfig(PfeifferConfig):
    """AdapterDrop (Rücklé et al., 2021): adapters at ``placement`` ("pfeiffer", "houlsby" or "parallel") from layer
    ``skip_layers`` on (None: the upper half of the layers), each skipped per training forward with probability
    ``drop_prob``."""

    placement: str = "pfeiffer"
    skip_layers: Optional[int] = None
    drop_prob: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        V.one_of("placement", self.placement, ("pfeiffer", "houlsby", "parallel"))
        self.skip_layers = optional_integer("skip_layers", self.skip_layers, low=0)
        V.number("drop_prob", self.drop_prob, low=0.0, high=1.0)


_ADAPTER_KEYS = ("reduction_factor", "non_linearity", "layer_norm")


@dataclasses.dataclass(kw_only=True)
class AdapterFusionConfig(MethodConfig):
    """AdapterFusion (stage 2): ``adapters``, the directories of earlier ``pk.save_adapter`` runs of
    adapter_pfeiffer / adapter_houlsby models, loaded frozen under a trainable fusion at every FFN output; or
    ``num_adapters`` (>= 2) fresh ones of ``adapter_options`` (their ``reduction_factor`` / ``non_linearity`` /
    ``layer_norm``), which a saved fusion then fills. ``sites``: as :class:`PfeifferConfig`'s."""

    adapters: Optional[list[str]] = None
    num_adapters: Optional[int] = None
    adapter_options: Optional[dict] = None
    sites: Optional[dict[str, str]] = None

    def __post_init__(self):
        super().__post_init__()
        self.adapters = paths("adapters", self.adapters)
        self.num_adapters = optional_integer("num_adapters", self.num_adapters, low=2)
        if self.adapter_options is not None:
            if not isinstance(self.adapter_options, Mapping):
                raise TypeError(f"adapter_options must be None or a dict, got {self.adapter_options!r}")
            unknown = sorted(set(self.adapter_options) - set(_ADAPTER_KEYS))
            if unknown:
                raise ValueError(f"adapter_options has unknown key(s) {unknown}; valid keys: {list(_ADAPTER_KEYS)}")
            self.adapter_options = dict(self.adapter_options)
        self.sites = sites_spec(self.sites)


@dataclasses.dataclass(kw_only=True)
class MamConfig(MethodConfig):
    """MAM adapter (He et al., 2022): a parallel adapter beside every FFN (``reduction_factor``, ``non_linearity``,
    its output times ``scale``) and a prefix of ``num_virtual_tokens`` on every attention (``prefix_projection`` as
    Prefix Tuning's); ``sites`` as :class:`PfeifferConfig`'s."""

    num_virtual_tokens: int = 30
    prefix_projection: bool = False
    reduction_factor: float = 4
    non_linearity: str = "relu"
    scale: float = 4.0
    sites: Optional[dict[str, str]] = None

    def __post_init__(self):
        super().__post_init__()
        V.integer("num_virtual_tokens", self.num_virtual_tokens)
        V.flag("prefix_projection", self.prefix_projection)
        check_bottleneck(self.reduction_factor, self.non_linearity)
        V.number("scale", self.scale)
        self.sites = sites_spec(self.sites)


class PfeifferMethod(Method):
    """Serial adapters after every FFN."""

    config_class = PfeifferConfig
    placement = "pfeiffer"

    def apply(self, model, config: PfeifferConfig, heads, calibration_data=None) -> dict:
        freeze_except(model, heads)
        add_adapters(model, self.placement, reduction_factor=config.reduction_factor,
                     non_linearity=config.non_linearity, layer_norm=config.layer_norm, sites=config.sites)
        return {}


class HoulsbyMethod(PfeifferMethod):
    """Serial adapters after every attention and every FFN."""

    config_class = HoulsbyConfig
    placement = "houlsby"


class AdapterDropMethod(Method):
    config_class = AdapterDropConfig

    def apply(self, model, config: AdapterDropConfig, heads, calibration_data=None) -> dict:
        if config.skip_layers is None:  # resolved here so the saved options rebuild the same layers
            config.skip_layers = len(transformer_sites(model, config.sites)) // 2
        freeze_except(model, heads)
        add_adapters(model, config.placement, reduction_factor=config.reduction_factor,
                     non_linearity=config.non_linearity, layer_norm=config.layer_norm, skip_layers=config.skip_layers,
                     drop_prob=config.drop_prob, sites=config.sites)
        return {}


class AdapterFusionMethod(Method):
    """The adapters of earlier runs (or fresh ones), frozen, under a trainable AdapterFusion at every FFN output."""

    config_class = AdapterFusionConfig

    def apply(self, model, config: AdapterFusionConfig, heads, calibration_data=None) -> dict:
        from ..patching import read_adapter  # patching imports this module

        freeze_except(model, heads)
        dirs, n, adapter_options = config.adapters, config.num_adapters, dict(config.adapter_options or {})
        if dirs:
            metas = [read_adapter(d)[2] or {} for d in dirs]
            bad = [m.get("method") for m in metas if m.get("method") not in ("adapter_pfeiffer", "adapter_houlsby")]
            if bad:
                raise ValueError(f"adapters must be saved from adapter_pfeiffer / adapter_houlsby models, got {bad}")
            adapter_options = {k: v for k, v in metas[0]["options"].items() if k in _ADAPTER_KEYS}
            config.adapter_options, config.num_adapters, n = adapter_options, len(dirs), len(dirs)
        if n is None or n < 2:
            raise ValueError(f"adapter_fusion needs adapters=[2+ directories] or num_adapters >= 2, got {dirs!r} / "
                             f"{n!r}")
        sites = transformer_sites(model, config.sites)
        d = linear_features(sites[0]["ffn_out"])[1]
        per_site = [_fusion_site(site, d, n, adapter_options) for site in sites]
        for i, directory in enumerate(dirs or []):
            tensors = read_adapter(directory)[0]
            for name, adapters in zip([_site_name(model, s) for s in sites], per_site):
                prefix = f"base_model.model.{name}.adapter."
                state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if not state:
                    raise ValueError(f"{directory}: no adapter at {name} (was it saved from this architecture?)")
                adapters[i].load_state_dict(state)
        config.adapters = None  # what was loaded is saved with the fusion; the directories are not needed again
        return {}


class MamMethod(Method):
    """MAM: a parallel adapter beside every FFN and a prefix on every attention (on encoder-decoders every encoder
    self-, decoder self- and cross-attention); saved as the parameters it added (the prefix's table among them)."""

    config_class = MamConfig

    def apply(self, model, config: MamConfig, heads, calibration_data=None) -> dict:
        freeze_except(model, heads)
        add_adapters(model, "parallel", reduction_factor=config.reduction_factor, non_linearity=config.non_linearity,
                     scale=config.scale, sites=config.sites)
        add_prefix(model, config.num_virtual_tokens, prefix_projection=config.prefix_projection, sites=config.sites)
        return {}


def _fusion_site(site: dict, hidden: int, n: int, options: dict) -> list[BottleneckAdapter]:
    ref = site["ffn_out"].weight
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    adapters = [BottleneckAdapter(hidden, options.get("reduction_factor", 16), options.get("non_linearity", "relu"),
                                  layer_norm=options.get("layer_norm", False), device=ref.device, dtype=dtype)
                for _ in range(n)]
    add_serial(site["ffn_out"], AdapterFusion(adapters, hidden))
    return adapters


def _site_name(model: nn.Module, site: dict) -> str:
    return next(n for n, m in model.named_modules() if m is site["ffn_out"])
