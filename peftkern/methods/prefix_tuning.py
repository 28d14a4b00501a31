"""Prefix Tuning (Li & Liang, 2021) and P-Tuning v2 (Liu et al., 2022) on transformers models, through
:func:`peftkern.prefix_attention` instead of PEFT's past_key_values.

Every layer attends to P learned key/value vectors per KV head before the sequence. The prefix lives in one table
``prefix [P, L * 2 * Hkv * D]`` (PEFT's ``prompt_embeddings`` layout: layer l's keys at slot 2l, values at 2l + 1),
either trained directly (P-Tuning v2, ``prefix_projection=False``) or produced by the MLP reparameterization
``Embedding(P, Hkv D) -> Linear -> Tanh -> Linear`` during training (Prefix Tuning), which :meth:`fold` replaces
by its output for inference and saving.

The model's attention runs peftkern's prefix attention (registered with transformers' attention-function registry
under ``"peftkern_prefix"``, with the padding-mask format of flash attention): no cache objects, no concatenation,
gradient checkpointing works (the prefix of the current step is kept on each attention module). Sequence tokens
take positions P .. P + S - 1, as with PEFT's prefix in the cache; RoPE is not applied to prefix keys.
Attention-probability dropout is not applied (the fused op has none).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _validate as V

from ..ops.prefix_attention import prefix_attention
from .prompt_tuning import ModelWrapper, load_table_

ATTENTION_NAME = "peftkern_prefix"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, S, D], key/value [B, Hkv, S, D]; attention_mask the 2-D
    padding mask (1 = token) or None. Returns ([B, S, Hq, D], None)."""
    prefix = getattr(module, "peftkern_prefix", None)
    if prefix is None:  # a layer without prefix (P = 0)
        empty = key.new_zeros(key.shape[1], 0, key.shape[-1])
        prefix = (empty, empty)
    padding = None if attention_mask is None else ~attention_mask.bool()
    if padding is not None and padding.shape[-1] != key.shape[-2]:
        raise ValueError(f"the padding mask covers {padding.shape[-1]} keys but the layer has {key.shape[-2]} "
                         f"(generation with a cache is not supported by prefix attention)")
    out = prefix_attention(query, key, value, prefix[0].to(query.dtype), prefix[1].to(query.dtype),
                           causal=bool(getattr(module, "is_causal", False)), key_padding_mask=padding,
                           softmax_scale=scaling)
    return out.transpose(1, 2), None


def register_attention() -> None:
    """Register the attention function and its mask format with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, flash_attention_mask)


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules, in layer order (modules with ``layer_idx`` and ``scaling``, no cross-attention)."""
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")
              and "cross" not in type(m).__name__.lower() and not getattr(m, "is_cross_attention", False)]
    return sorted(layers, key=lambda m: m.layer_idx)


class PrefixTuning(ModelWrapper):
    """A frozen transformers model with a learned prefix at every layer; ``model(...)``'s arguments pass through.

    ``num_virtual_tokens`` P (per task: several PrefixTuning over one frozen model each bring their own length);
    ``prefix_projection`` the MLP reparameterization (Prefix Tuning; off: P-Tuning v2) with ``encoder_hidden_size``
    hidden units (default the model's hidden size).
    """

    def __init__(self, model: nn.Module, num_virtual_tokens: int, *, prefix_projection: bool = False,
                 encoder_hidden_size: Optional[int] = None):
        super().__init__()
        V.integer("num_virtual_tokens", num_virtual_tokens)
        cfg = model.config
        heads = cfg.num_attention_heads
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.num_virtual_tokens = num_virtual_tokens
        token_dim = self.num_kv_heads * self.head_dim
        out_dim = self.num_layers * 2 * token_dim
        self.prefix_projection = prefix_projection
        if prefix_projection:
            hidden = encoder_hidden_size or cfg.hidden_size
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out_dim)
            self.transform = None
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self._layers = _attention_layers(model)
        if len(self._layers) != self.num_layers:
            raise ValueError(f"found {len(self._layers)} self-attention modules with layer_idx for "
                             f"{self.num_layers} layers; this architecture is not supported")
        register_attention()
        model.set_attn_implementation(ATTENTION_NAME)

    def prefix(self) -> torch.Tensor:
        """[P, L * 2 * Hkv * D]: the table PEFT calls ``prompt_embeddings``."""
        table = self.embedding.weight
        return table if self.transform is None else self.transform(table)

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

    def _set_layer_prefixes(self) -> None:
        kv = self.prefix().view(self.num_virtual_tokens, self.num_layers * 2, self.num_kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3)  # [L * 2, Hkv, P, D]
        for layer in self._layers:
            layer.peftkern_prefix = (kv[2 * layer.layer_idx], kv[2 * layer.layer_idx + 1])

    def forward(self, input_ids=None, *, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        """The model's call; the usual text inputs are named so that transformers' ``Trainer``, which keeps only the
        dataset columns the signature names, keeps them (those left None are not passed on)."""
        self._set_layer_prefixes()
        if position_ids is None:  # sequence tokens follow the P virtual tokens, as PEFT places them
            ref = input_ids if input_ids is not None else inputs_embeds
            B, S = ref.shape[0], ref.shape[1]
            position_ids = torch.arange(self.num_virtual_tokens, self.num_virtual_tokens + S,
                                        device=ref.device).expand(B, S)
        given = {k: v for k, v in dict(token_type_ids=token_type_ids, labels=labels).items() if v is not None}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                          position_ids=position_ids, **given, **kwargs)

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, layers={self.num_layers}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, prefix_projection={self.prefix_projection}")
