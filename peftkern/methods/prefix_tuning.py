"""Prefix Tuning (Li & Liang, 2021) and P-Tuning v2 (Liu et al., 2022) on transformers models, through
:func:`peftkern.prefix_attention` instead of PEFT's past_key_values.

Every layer attends to P learned key/value vectors per KV head before the sequence. The prefix lives in one table
``prefix [P, L * 2 * Hkv * D]`` (PEFT's ``prompt_embeddings`` layout: layer l's keys at slot 2l, values at 2l + 1),
either trained directly (P-Tuning v2, ``prefix_projection=False``) or produced by the MLP reparameterization
``Embedding(P, Hkv D) -> Linear -> Tanh -> Linear`` during training (Prefix Tuning), which :meth:`PrefixTuning.fold`
replaces by its output for inference and saving.

:func:`add_prefix` patches the model in place: the table is the model's submodule ``peftkern_prompt``, the model's
attention runs peftkern's prefix attention (registered with transformers' attention-function registry under
``"peftkern_prefix"``, with the padding-mask format of flash attention), and a pre-hook on the model's call hands
each attention module its prefix for that call (kept on the module, so activation checkpointing recomputes with it)
and places the sequence after the virtual tokens: positions ``P + position_ids``, where the call gives none the
model's own numbering after ``P + cached`` tokens (``P + cached + 0 .. S-1``; RoBERTa's from its padding index), as
PEFT's prefix in the cache places them; RoPE is not applied to prefix keys. Models whose forward takes no
``position_ids`` keep their own positions.

Encoder-decoders (T5, BART): :class:`PrefixTuning`'s ``attentions`` says which attentions get a prefix (``pk.patch``'s
prefix_tuning / P-Tuning v2: PEFT's, the decoder's self-attention only; MAM, UniPELT: every one), and the hooks sit on
the encoder's and the decoder's calls (``generate`` runs the encoder by itself). A stack whose self-attention has a
prefix places its tokens after the P virtual ones as PEFT's prefix in its cache does: BART's learned positions
(``embed_positions``) start at P; T5's relative position bias, which transformers adds to the scores as
``position_bias``, gets the columns of the prefix keys at positions 0 .. P-1 for queries at ``P + cached + i``
(``compute_bias``; the sequence's own part is unchanged, the bias depending on distances only). Attention with such a
bias runs SDPA with it as an additive mask (the fused op takes none).

Generation: the prefix never enters the KV cache (a dynamic cache holds the sequence's keys only, so any length
bookkeeping of ``generate`` is the model's own); the decoding steps, whose few queries follow the cached keys,
attend to ``[prefix; cache]`` with SDPA (bottom-right causal). Static / compiled caches are refused.
Attention-probability dropout is not applied (the fused op has none), nor sliding windows: longer inputs raise.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Mapping, Optional

import torch
from torch import nn

from .. import _validate as V

from ..ops.prefix_attention import prefix_attention
from .prompt_tuning import (ATTRIBUTE, PromptLearningConfig, cached_tokens, is_encoder_decoder, load_table_,
                            register_call_hook, virtual_tokens)
from .base import Method, optional_integer, sites_spec
from .sites import attention_modules
from .targets import freeze_except

ATTENTION_NAME = "peftkern_prefix"
ATTENTIONS = ("all", "peft")  # which attentions of an encoder-decoder get a prefix (PrefixTuning's docstring)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
               position_bias=None, **kwargs):
    """transformers attention function: query [B, Hq, Sq, D], key/value [B, Hkv, Sk, D] (Sk > Sq: the queries are
    the last Sq of Sk keys, after a cache); attention_mask the 2-D padding mask over the Sk keys (1 = token) or
    None; ``position_bias`` [1 or B, Hq, Sq, Sk] what the model adds to the scores (T5's relative position bias),
    the prefix keys' part coming with the prefix (zeros where it has none). Returns ([B, Sq, Hq, D], None)."""
    if sliding_window is not None and key.shape[-2] > sliding_window:
        raise ValueError(f"input_ids: {key.shape[-2]} tokens exceed the model's sliding attention window of "
                         f"{sliding_window}, which prefix attention does not apply")
    attached = vars(module)  # what the hooks put on the module (a miss through Module.__getattr__ raises: ~1 us)
    prefix = attached.get("peftkern_prefix")
    if prefix is None:  # a layer without prefix (P = 0)
        empty = key.new_zeros(key.shape[1], 0, key.shape[-1])
        prefix = (empty, empty, None)
    padding = None if attention_mask is None else ~attention_mask.bool()
    if padding is not None and padding.shape[-1] != key.shape[-2]:
        raise ValueError(f"the padding mask covers {padding.shape[-1]} keys but the layer has {key.shape[-2]}")
    prefix_k, prefix_v = (t if t.dtype == query.dtype else t.to(query.dtype) for t in prefix[:2])
    causal = bool(getattr(module, "is_causal", False))
    gate = attached.get("peftkern_prefix_gate")
    bias = None
    if position_bias is not None:
        ahead = prefix[2]
        if ahead is None:
            ahead = position_bias.new_zeros(*position_bias.shape[:-1], prefix_k.shape[-2])
        bias = torch.cat([ahead.to(position_bias.dtype), position_bias], -1)
    if query.shape[-2] == key.shape[-2] and gate is None and bias is None:
        out = prefix_attention(query, key, value, prefix_k, prefix_v, causal=causal, key_padding_mask=padding,
                               softmax_scale=scaling)
    else:
        out = _sdpa(query, key, value, prefix_k, prefix_v, causal, padding, scaling, gate, bias)
    return out.transpose(1, 2), None


def _sdpa(q, k, v, prefix_k, prefix_v, causal: bool, padding: Optional[torch.Tensor], scale,
          gate: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
    """SDPA over ``[prefix; keys]``, query i seeing every prefix key and the keys up to its own position
    ``Sk - Sq + i``. Decoding steps (a query or a few after cached keys) take this path, where the fused op (made for
    Sq = Sk training) would save nothing; so do gated prefixes and scores with a bias: ``bias`` [1 or B, Hq, Sq,
    P + Sk] added to the scaled scores of ``[prefix; keys]`` (T5), as a float mask.

    ``gate`` [B, Sq] (UniPELT) scales query i's prefix keys and values by ``gate[:, i]``: one SDPA over heads of
    2D, queries ``[q, g q]``, keys ``[k, 0]`` / ``[0, prefix_k]``, values ``[0, v]`` / ``[prefix_v, 0]``, so a row's
    scores are ``q . k`` and ``g q . prefix_k`` and its output ``g o[:D] + o[D:]``."""
    B, Sq, Sk, P, D = q.shape[0], q.shape[-2], k.shape[-2], prefix_k.shape[-2], q.shape[-1]
    prefix_k = prefix_k.expand(B, *prefix_k.shape[-3:])
    prefix_v = prefix_v.expand(B, *prefix_v.shape[-3:])
    visible = torch.ones(B, 1, Sq, P + Sk, dtype=torch.bool, device=q.device)
    if causal:
        position = torch.arange(Sk - Sq, Sk, device=q.device)[:, None]
        visible[..., P:] &= torch.arange(Sk, device=q.device) <= position
    if padding is not None:
        visible[..., P:] &= ~padding[:, None, None, :]
    mask = visible if bias is None else bias.to(q.dtype).masked_fill(~visible, float("-inf"))
    if gate is None:
        return nn.functional.scaled_dot_product_attention(q, torch.cat([prefix_k, k], 2), torch.cat([prefix_v, v], 2),
                                                          attn_mask=mask, scale=scale, enable_gqa=True)
    g = gate.to(q.dtype)[:, None, :, None]  # [B, 1, Sq, 1]
    keys = torch.cat([torch.cat([torch.zeros_like(prefix_k), prefix_k], -1), torch.cat([k, torch.zeros_like(k)], -1)],
                     2)
    values = torch.cat([torch.cat([prefix_v, torch.zeros_like(prefix_v)], -1),
                        torch.cat([torch.zeros_like(v), v], -1)], 2)
    out = nn.functional.scaled_dot_product_attention(torch.cat([q, g * q], -1), keys, values, attn_mask=mask,
                                                     scale=D ** -0.5 if scale is None else scale, enable_gqa=True)
    return g * out[..., :D] + out[..., D:]


def register_attention() -> None:
    """Register the attention function and its mask format with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, flash_attention_mask)


class PrefixTuning(nn.Module):
    """The learned prefix of a transformers model ``model`` (read for its config, whether its forward takes
    ``position_ids``, and its attention modules, found by :func:`peftkern.methods.sites.attention_modules` with
    ``sites``; :func:`add_prefix` attaches it): ``num_virtual_tokens`` P; ``prefix_projection`` the MLP
    reparameterization (Prefix Tuning; off: P-Tuning v2) with ``encoder_hidden_size`` hidden units (default the
    model's hidden size).

    :attr:`layers` are the attention modules that get a prefix, :attr:`slots` the table layer each reads. Encoder or
    decoder models: every self-attention, layer l from table layer l. Encoder-decoders, by ``attentions``:
    ``"all"`` (Li & Liang's placement) every encoder self-, decoder self- and decoder cross-attention, in that order,
    one table layer each; ``"peft"`` what PEFT's ``SEQ_2_SEQ_LM`` prefix tuning does with its table of
    ``config.num_hidden_layers`` layers (its past_key_values): only the decoder's self-attention, decoder layer g
    reading table layer ``2g mod L`` (PEFT doubles the table along the layers and splits it in fours per decoder
    layer, self- then cross-attention keys and values, then empties the cross-attention cache; so the odd table
    layers are never read), layers past the table's L none."""

    def __init__(self, model: nn.Module, num_virtual_tokens: int, *, prefix_projection: bool = False,
                 encoder_hidden_size: Optional[int] = None, sites: Optional[Mapping[str, str]] = None,
                 attentions: str = "all"):
        super().__init__()
        V.integer("num_virtual_tokens", num_virtual_tokens)
        if attentions not in ATTENTIONS:
            raise ValueError(f"attentions must be one of {ATTENTIONS}, got {attentions!r}")
        cfg = model.config
        heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        self.head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or cfg.hidden_size // heads
        self.num_virtual_tokens = num_virtual_tokens
        self.takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        self.encoder_decoder = is_encoder_decoder(model)
        self.num_transformer_submodules = 2 if self.encoder_decoder else 1  # PEFT's name for it
        found = attention_modules(model, sites=sites)
        self.num_layers = cfg.num_hidden_layers
        if not self.encoder_decoder and len(found) != self.num_layers:
            raise ValueError(f"model: found {len(found)} self-attention modules for {self.num_layers} layers")
        if self.encoder_decoder and attentions == "peft":
            found = [(layer, m) for layer, m in found if layer.role == "decoder"][:self.num_layers]
            self.slots = [2 * g % self.num_layers for g in range(len(found))]
        else:
            found = found + (attention_modules(model, cross=True, sites=sites) if self.encoder_decoder else [])
            self.num_layers, self.slots = len(found), list(range(len(found)))
        self.layers = [m for _, m in found]
        self.roles = [layer.role for layer, _ in found]  # the stack ("encoder" / "decoder") of each
        self.cross = [m is not model.get_submodule(layer.attention.module) for layer, m in found]
        self.attentions = attentions
        token_dim = self.num_kv_heads * self.head_dim
        out_dim = self.num_layers * 2 * token_dim
        device = next(model.parameters()).device
        self.prefix_projection = prefix_projection
        if prefix_projection:
            hidden = encoder_hidden_size or cfg.hidden_size
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden, device=device), nn.Tanh(),
                                           nn.Linear(hidden, out_dim, device=device))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out_dim, device=device)
            self.transform = None

    def prefix(self) -> torch.Tensor:
        """[P, L * 2 * Hkv * D]: the table PEFT calls ``prompt_embeddings``."""
        table = self.embedding.weight
        return table if self.transform is None else self.transform(table)

    def layer_prefixes(self) -> torch.Tensor:
        """[L * 2, Hkv, P, D]: table layer l's prefix keys at 2l, values at 2l + 1."""
        kv = self.prefix().view(self.num_virtual_tokens, self.num_layers * 2, self.num_kv_heads, self.head_dim)
        return kv.permute(1, 2, 0, 3)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP reparameterization by its output (inference, saving); a no-op without it."""
        if self.transform is None:
            return
        table = self.prefix().detach()
        self.embedding = nn.Embedding(*table.shape, device=table.device, dtype=table.dtype)
        self.embedding.weight.copy_(table)
        self.transform, self.prefix_projection = None, False

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """Load a PEFT prefix-tuning adapter's ``prompt_embeddings`` [P, L * 2 * Hkv * D] (folds first)."""
        self.fold()
        load_table_(self.embedding, prompt_embeddings, "[P, L * 2 * Hkv * D]")

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, layers={self.num_layers}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, prefix_projection={self.prefix_projection}"
                + (f", attentions={self.attentions!r}" if self.encoder_decoder else ""))


def add_prefix(model: nn.Module, num_virtual_tokens: int, **options) -> PrefixTuning:
    """Give the attention layers of ``model`` (a transformers model) a trainable prefix, in place: a
    :class:`PrefixTuning` (``options``: its keyword arguments) as ``model.peftkern_prompt``, prefix attention as the
    model's attention implementation and the call hooks of the module docstring. Freezes nothing (``pk.patch``
    freezes the base first). Returns the module."""
    if virtual_tokens(model) is not None:
        raise ValueError(f"model already has virtual tokens ({ATTRIBUTE})")
    module = PrefixTuning(model, num_virtual_tokens, **options)
    model.add_module(ATTRIBUTE, module)
    register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    if not module.encoder_decoder:
        register_call_hook(model, functools.partial(_place_after_prefix, module, _relative_bias_source(model)))
        return module
    for role, stack in (("encoder", model.get_encoder()), ("decoder", model.get_decoder())):
        mine = [i for i, r in enumerate(module.roles) if r == role]
        if not mine:
            continue
        register_call_hook(stack, functools.partial(_stack_prefixes, module, mine, _relative_bias_source(stack)))
        positions = getattr(stack, "embed_positions", None)
        if positions is not None and not all(module.cross[i] for i in mine):
            _shift_positions(positions, num_virtual_tokens)
    return module


def _relative_bias_source(model: nn.Module) -> Optional[nn.Module]:
    """The attention module whose ``compute_bias`` gives the relative position bias the model's attentions add (T5:
    its stack's first self-attention), or None."""
    return next((m for m in model.modules() if getattr(m, "has_relative_attention_bias", False)
                 and callable(getattr(m, "compute_bias", None))), None)


def _hand_out(prefix: PrefixTuning, indices, bias_source: Optional[nn.Module], call: dict) -> int:
    """Put on each attention module ``prefix.layers[i]`` (i in ``indices``) its prefix for this call: ``(keys,
    values, bias)``, bias the relative position bias of its queries (after the cached and the P virtual tokens) to
    the prefix keys (at positions 0 .. P-1), [1, H, Sq, P], for the self-attentions of a model with one (T5), else
    None. Returns how many tokens the call's cache holds."""
    seen = cached_tokens(call.get("past_key_values"))
    # unbind: one backward node stacking the layers' gradients (a select per layer materializes a zero table each)
    kv = prefix.layer_prefixes().unbind(0)
    bias = None
    ref = call.get("input_ids") if call.get("inputs_embeds") is None else call["inputs_embeds"]
    if bias_source is not None and ref is not None:
        P = prefix.num_virtual_tokens
        bias = bias_source.compute_bias(ref.shape[1], P, past_seen_tokens=P + seen)
    for i in indices:
        slot = prefix.slots[i]
        prefix.layers[i].peftkern_prefix = (kv[2 * slot], kv[2 * slot + 1], None if prefix.cross[i] else bias)
    return seen


def _place_after_prefix(prefix: PrefixTuning, bias_source: Optional[nn.Module], model: nn.Module,
                        call: dict) -> dict:
    """The call hook of :func:`add_prefix` on an encoder or decoder model (module docstring)."""
    seen = _hand_out(prefix, range(len(prefix.layers)), bias_source, call)
    if not prefix.takes_positions:
        return call
    P = prefix.num_virtual_tokens
    ref = call.get("input_ids") if call.get("inputs_embeds") is None else call["inputs_embeds"]
    if call.get("position_ids") is not None:
        call["position_ids"] = call["position_ids"] + P
    elif ref is not None:
        call["position_ids"] = _default_positions(model, call.get("input_ids"), ref, seen + P)
    return call


def _stack_prefixes(prefix: PrefixTuning, indices: list[int], bias_source: Optional[nn.Module], stack: nn.Module,
                    call: dict) -> dict:
    """The call hook of :func:`add_prefix` on an encoder-decoder's encoder or decoder (module docstring)."""
    _hand_out(prefix, indices, bias_source, call)
    return call


def _shift_positions(embed_positions: nn.Module, num_virtual_tokens: int) -> None:
    """Number an encoder-decoder stack's tokens after the P virtual tokens: its learned or sinusoidal position
    embedding module (BART's ``embed_positions``) gets ``position_ids + P``, or without them
    ``past_key_values_length + P``."""
    params = inspect.signature(embed_positions.forward).parameters
    if "position_ids" not in params and "past_key_values_length" not in params:
        raise ValueError(f"model: its {type(embed_positions).__name__} takes neither position_ids nor "
                         f"past_key_values_length, so the sequence cannot be placed after the prefix")
    embed_positions.register_forward_pre_hook(functools.partial(_after_virtual_tokens, num_virtual_tokens),
                                              with_kwargs=True)


def _after_virtual_tokens(num_virtual_tokens: int, module: nn.Module, args: tuple, kwargs: dict):
    """The forward pre-hook of :func:`_shift_positions`, its arguments by name wherever the stack put them."""
    call = inspect.signature(module.forward).bind(*args, **kwargs)
    if call.arguments.get("position_ids") is not None:
        call.arguments["position_ids"] = call.arguments["position_ids"] + num_virtual_tokens
    else:
        call.arguments["past_key_values_length"] = call.arguments.get("past_key_values_length", 0) + num_virtual_tokens
    return call.args, call.kwargs


def _default_positions(model: nn.Module, input_ids, ref: torch.Tensor, start: int) -> torch.Tensor:
    """The position ids the model numbers its tokens with when given none, for tokens that follow ``start`` others
    (the cached and the virtual ones): ``start + 0 .. S-1``, or, where the embeddings number from their padding
    index (RoBERTa and its kin: ``create_position_ids_from_input_ids``), their own numbering moved by ``start``."""
    embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
    pad = getattr(embeddings, "padding_idx", None)
    if pad is None or not hasattr(embeddings, "create_position_ids_from_input_ids"):
        return torch.arange(start, start + ref.shape[1], device=ref.device)[None]
    if input_ids is not None:
        return embeddings.create_position_ids_from_input_ids(input_ids, pad, start)
    return embeddings.create_position_ids_from_inputs_embeds(ref, pad) + start


@dataclasses.dataclass(kw_only=True)
class PTuningV2Config(PromptLearningConfig):
    """P-Tuning v2's options: ``sites``, regexes naming the attention modules where the model's own are not found
    (:func:`peftkern.methods.sites.find_layers`)."""

    sites: Optional[dict[str, str]] = None

    def __post_init__(self):
        super().__post_init__()
        self.sites = sites_spec(self.sites)


@dataclasses.dataclass(kw_only=True)
class PrefixTuningConfig(PTuningV2Config):
    """Prefix Tuning's options: P-Tuning v2's, and the MLP reparameterization of the prefix while training
    (``prefix_projection``) with ``encoder_hidden_size`` units (None: the model's hidden size)."""

    prefix_projection: bool = True
    encoder_hidden_size: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        V.flag("prefix_projection", self.prefix_projection)
        self.encoder_hidden_size = optional_integer("encoder_hidden_size", self.encoder_hidden_size)


class PTuningV2Method(Method):
    """P-Tuning v2, saved as PEFT's prefix tuning: ``prompt_embeddings`` (the whole prefix table) and the head under
    ``base_model.``. On encoder-decoders the prefix goes where PEFT's does (``attentions="peft"``), so PEFT loads
    the file."""

    config_class = PTuningV2Config
    head_prefix = "base_model."

    def apply(self, model, config: PTuningV2Config, heads, calibration_data=None) -> dict:
        freeze_except(model, heads)
        add_prefix(model, config.num_virtual_tokens, sites=config.sites, attentions="peft")
        return {}

    def tensors(self, model, record) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": virtual_tokens(model).prefix()}

    def peft_config(self, model, record) -> dict:
        module = virtual_tokens(model)
        return {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": module.num_virtual_tokens,
                "token_dim": module.num_kv_heads * module.head_dim, "num_attention_heads": module.num_kv_heads,
                "num_layers": module.num_layers, "num_transformer_submodules": module.num_transformer_submodules,
                "prefix_projection": False}


class PrefixTuningMethod(PTuningV2Method):
    """Prefix Tuning: P-Tuning v2 with the MLP reparameterization (folded into ``prompt_embeddings`` when saved)."""

    config_class = PrefixTuningConfig

    def apply(self, model, config: PrefixTuningConfig, heads, calibration_data=None) -> dict:
        freeze_except(model, heads)
        add_prefix(model, config.num_virtual_tokens, prefix_projection=config.prefix_projection,
                   encoder_hidden_size=config.encoder_hidden_size, sites=config.sites, attentions="peft")
        return {}
