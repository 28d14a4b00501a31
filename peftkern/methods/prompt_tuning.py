"""Prompt Tuning (Lester et al., 2021) and P-Tuning (Liu et al., 2021): P virtual token embeddings before the input.

Prompt Tuning trains the P x hidden table directly (initialised at random, from P sampled vocabulary rows, or from
a text); P-Tuning produces it with PEFT's prompt encoder (``encoder="lstm"``: bidirectional LSTM + two-layer MLP;
``"mlp"``: three-layer MLP). Module and parameter names follow PEFT's prompt encoder, so its saved weights load with
``load_state_dict``.

:func:`add_prompt` patches the model in place: the table is the model's submodule ``peftkern_prompt`` (state_dict,
optimizers and ``.to()`` see it) and a pre-hook on the model's call puts the virtual tokens first, as PEFT arranges
them: ``inputs_embeds`` becomes ``[prompt; inputs]``, the attention mask gets P ones in front, token ``labels`` P
ignored positions (-100), ``token_type_ids`` P zeros, given ``position_ids`` ``[p0 .. p0+P-1; P + position_ids]``
(p0 the first given one: 0, or RoBERTa's padding index + 1). The model stays itself (its class, ``generate``,
``save_pretrained``, activation checkpointing, its forward's signature for ``Trainer``). With a KV cache the virtual
tokens are in the cache's frame, as with PEFT: they enter once, on the call that fills an empty cache; later calls
(``generate``'s decoding steps) get only the P mask ones and the position offset, and the cache holds P + the
sequence's tokens.

Encoder-decoders (T5, BART) get the virtual tokens as PEFT's ``SEQ_2_SEQ_LM`` models do (``num_transformer_submodules
= 2``): the table has 2P rows (a P-Tuning encoder reads all of them), the first P go before the encoder's input (its
attention mask gets P ones in front) and the other P are trained nowhere, kept for PEFT's layout; the decoder's
inputs, labels and mask are unchanged. The hooks sit on the encoder and the decoder rather than on the model's call,
because ``generate`` runs the encoder once by itself: the encoder's call puts the prompt in, the decoder's call gives
its cross-attention mask the P ones where the encoder states it receives are P longer than the mask.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Optional

import torch
from torch import nn

from .. import _validate as V
from .base import Method, MethodConfig, optional_integer
from .targets import freeze_except

ATTRIBUTE = "peftkern_prompt"  # the model's submodule holding the virtual tokens (prompt or prefix)


def virtual_tokens(model: nn.Module) -> Optional[nn.Module]:
    """The :class:`PromptTuning` / prefix module :func:`add_prompt` or ``add_prefix`` put on ``model``, else None."""
    return model._modules.get(ATTRIBUTE)


def load_table_(embedding: nn.Embedding, prompt_embeddings: torch.Tensor, layout: str) -> None:
    """Copy a saved ``prompt_embeddings`` table into ``embedding`` after checking its shape (``layout`` names it)."""
    expected = tuple(embedding.weight.shape)
    if tuple(prompt_embeddings.shape) != expected:
        raise ValueError(f"prompt_embeddings must have shape {expected} ({layout}), "
                         f"got {tuple(prompt_embeddings.shape)}")
    with torch.no_grad():
        embedding.weight.copy_(prompt_embeddings)


def register_call_hook(model: nn.Module, hook: Callable[[nn.Module, dict], dict]) -> None:
    """Run ``hook(model, arguments) -> arguments`` before every call of ``model``, with the call's arguments by name
    (positional ones named after the model's forward), so it can rewrite inputs wherever the caller put them."""
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    model.register_forward_pre_hook(functools.partial(_by_name, names, hook), with_kwargs=True)


def _by_name(names: list[str], hook: Callable, model: nn.Module, args: tuple, kwargs: dict):
    if len(args) > len(names):
        raise TypeError(f"{type(model).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
    return (), hook(model, {**dict(zip(names, args)), **kwargs})


def cached_tokens(cache) -> int:
    """How many tokens a KV cache (``past_key_values``) already holds; 0 without one. Static (compilable) caches,
    whose size ``generate`` chooses from the sequence alone, are refused."""
    if getattr(cache, "is_compileable", False):
        raise ValueError(f"past_key_values: prompt and prefix methods decode with a dynamic cache (generate's "
                         f"default, no cache_implementation), got a {type(cache).__name__}")
    return 0 if cache is None else int(cache.get_seq_length())


def shift_positions(position_ids: torch.Tensor, num_virtual_tokens: int, prepend: bool) -> torch.Tensor:
    """Sequence positions after P virtual tokens: ``position_ids + P``, with the virtual tokens' in front where they
    are part of the input (``prepend``): the P positions from the first given one on (0 .. P-1 for positions that
    start at 0). Any leading dims (batch, rope sections) are kept."""
    shifted = position_ids + num_virtual_tokens
    if not prepend:
        return shifted
    ahead = torch.arange(num_virtual_tokens, device=position_ids.device, dtype=position_ids.dtype)
    return torch.cat([position_ids[..., :1] + ahead, shifted], -1)


class PromptTuning(nn.Module):
    """The virtual tokens of a prompt-tuned model: the table ``embedding`` [P * num_transformer_submodules, hidden]
    (2P rows on encoder-decoders, PEFT's layout) and, for P-Tuning, the encoder that turns it into what the model sees
    (:meth:`prompts`). ``words``: the model's input embeddings (width, device, and the rows ``init="vocab"`` /
    ``"text"`` start from)."""

    def __init__(self, words: nn.Embedding, num_virtual_tokens: int, *, init: str = "random",
                 init_text: Optional[str] = None, tokenizer=None, encoder: Optional[str] = None,
                 encoder_hidden_size: Optional[int] = None, encoder_num_layers: int = 2, encoder_dropout: float = 0.0,
                 num_transformer_submodules: int = 1):
        super().__init__()
        V.integer("num_virtual_tokens", num_virtual_tokens)
        if num_transformer_submodules not in (1, 2):
            raise ValueError(f"num_transformer_submodules must be 1 or 2 (encoder-decoders), "
                             f"got {num_transformer_submodules!r}")
        if init not in ("random", "vocab", "text"):
            raise ValueError(f"init must be 'random', 'vocab' or 'text', got {init!r}")
        if encoder not in (None, "lstm", "mlp"):
            raise ValueError(f"encoder must be None (prompt tuning), 'lstm' or 'mlp' (P-Tuning), got {encoder!r}")
        dim, device = words.weight.shape[1], words.weight.device
        self.num_virtual_tokens = num_virtual_tokens
        self.num_transformer_submodules = num_transformer_submodules
        self.embedding = nn.Embedding(num_virtual_tokens * num_transformer_submodules, dim, device=device)
        self._initialise(words, init, init_text, tokenizer)
        self.encoder = encoder
        hidden = encoder_hidden_size or dim
        self.lstm_head = None
        self.mlp_head = None
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=encoder_num_layers, dropout=encoder_dropout,
                                     bidirectional=True, batch_first=True, device=device)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, device=device), nn.ReLU(),
                                          nn.Linear(2 * hidden, dim, device=device))
        elif encoder == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden, device=device), nn.ReLU(),
                                          nn.Linear(hidden, hidden, device=device), nn.ReLU(),
                                          nn.Linear(hidden, dim, device=device))

    @torch.no_grad()
    def _initialise(self, words: nn.Embedding, init: str, init_text, tokenizer) -> None:
        if init == "random":
            return
        rows = self.embedding.weight.shape[0]
        if init == "vocab":
            ids = torch.randint(0, words.weight.shape[0], (rows,), device=words.weight.device)
        else:
            if not init_text or tokenizer is None:
                raise ValueError("init='text' needs init_text and the model's tokenizer")
            tokens = tokenizer(init_text, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise ValueError(f"init_text {init_text!r} tokenizes to nothing")
            reps = -(-rows // len(tokens))
            ids = torch.tensor((tokens * reps)[:rows], device=words.weight.device)
        self.embedding.weight.copy_(words(ids).float().to(self.embedding.weight.dtype))

    def prompts(self) -> torch.Tensor:
        """[P * num_transformer_submodules, hidden]: the virtual token embeddings (the model sees the first P)."""
        x = self.embedding.weight
        if self.encoder == "lstm":
            return self.mlp_head(self.lstm_head(x[None])[0])[0]
        if self.encoder == "mlp":
            return self.mlp_head(x)
        return x

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """Load a PEFT prompt-tuning / P-tuning adapter's ``prompt_embeddings`` [P * num_transformer_submodules,
        hidden] (what the model sees): the table becomes them and a prompt encoder is dropped, as PEFT does for
        inference."""
        load_table_(self.embedding, prompt_embeddings, "[P * num_transformer_submodules, hidden]")
        self.encoder, self.lstm_head, self.mlp_head = None, None, None

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, encoder={self.encoder}, "
                f"num_transformer_submodules={self.num_transformer_submodules}")


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers encoder-decoder (T5, BART: ``config.is_encoder_decoder``)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def add_prompt(model: nn.Module, num_virtual_tokens: int, **options) -> PromptTuning:
    """Put P trainable virtual tokens before every input of ``model`` (a transformers model; of an encoder-decoder,
    before its encoder's), in place: a :class:`PromptTuning` (``options``: its keyword arguments) as
    ``model.peftkern_prompt`` and the call hooks of the module docstring. Freezes nothing (``pk.patch`` freezes the
    base first). Returns the module."""
    if virtual_tokens(model) is not None:
        raise ValueError(f"model already has virtual tokens ({ATTRIBUTE})")
    encoder_decoder = is_encoder_decoder(model)
    module = PromptTuning(model.get_input_embeddings(), num_virtual_tokens,
                          num_transformer_submodules=2 if encoder_decoder else 1, **options)
    model.add_module(ATTRIBUTE, module)
    if encoder_decoder:
        register_call_hook(model.get_encoder(), functools.partial(_prepend, module))
        register_call_hook(model.get_decoder(), functools.partial(_extend_encoder_mask, num_virtual_tokens))
    else:
        register_call_hook(model, functools.partial(_prepend, module))
    return module


def _prepend(prompt: PromptTuning, model: nn.Module, call: dict) -> dict:
    """The call hook of :func:`add_prompt` on ``model`` (the model, or an encoder-decoder's encoder): the module
    docstring."""
    P = prompt.num_virtual_tokens
    ids, embeds, mask = call.get("input_ids"), call.get("inputs_embeds"), call.get("attention_mask")
    ref = embeds if embeds is not None else ids
    if ref is None:
        return call
    B = ref.shape[0]
    prefill = cached_tokens(call.get("past_key_values")) == 0
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(f"attention_mask must be the 2-D [batch, sequence] padding mask with prompt tuning (the "
                             f"virtual tokens are put in front of it), got shape {tuple(mask.shape)}")
        call["attention_mask"] = torch.cat([mask.new_ones(B, P), mask], 1)
    if call.get("position_ids") is not None:
        call["position_ids"] = shift_positions(call["position_ids"], P, prepend=prefill)
    if not prefill:  # the cache holds the virtual tokens already
        return call
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)
    prompts = prompt.prompts()[:P].to(embeds.dtype)
    call["inputs_embeds"] = torch.cat([prompts.expand(B, -1, -1), embeds], 1)
    call["input_ids"] = None
    labels, types = call.get("labels"), call.get("token_type_ids")
    if labels is not None and labels.dim() == 2:  # token labels (causal LM): the prompt is not predicted
        call["labels"] = torch.cat([labels.new_full((B, P), -100), labels], 1)
    if types is not None:
        call["token_type_ids"] = torch.cat([types.new_zeros(B, P), types], 1)
    return call


def _extend_encoder_mask(num_virtual_tokens: int, decoder: nn.Module, call: dict) -> dict:
    """The call hook of :func:`add_prompt` on an encoder-decoder's decoder: its cross-attention mask gets P ones in
    front where the encoder states are P tokens longer than it (they hold the prompt; a mask already that long is
    left as it is)."""
    mask, states = call.get("encoder_attention_mask"), call.get("encoder_hidden_states")
    if mask is None or states is None:
        return call
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be the 2-D [batch, sequence] padding mask with prompt tuning (the "
                         f"virtual tokens are put in front of it), got shape {tuple(mask.shape)}")
    if states.shape[1] == mask.shape[1] + num_virtual_tokens:
        call["encoder_attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], num_virtual_tokens), mask], 1)
    return call


@dataclasses.dataclass(kw_only=True)
class PromptLearningConfig(MethodConfig):
    """The option every prompt and prefix method has: ``num_virtual_tokens`` P (PEFT's name)."""

    num_virtual_tokens: int = 20

    def __post_init__(self):
        super().__post_init__()
        V.integer("num_virtual_tokens", self.num_virtual_tokens)


@dataclasses.dataclass(kw_only=True)
class PromptTuningConfig(PromptLearningConfig):
    """Prompt Tuning's options: ``init`` of the table, "random", "vocab" (rows of the model's embeddings) or "text"
    (``init_text`` tokenized by ``tokenizer``, repeated)."""

    init: str = "random"
    init_text: Optional[str] = None
    tokenizer: object = None

    def __post_init__(self):
        super().__post_init__()
        V.one_of("init", self.init, ("random", "vocab", "text"))
        if self.init_text is not None and not isinstance(self.init_text, str):
            raise TypeError(f"init_text must be None or a str, got {type(self.init_text).__name__}")


@dataclasses.dataclass(kw_only=True)
class PTuningConfig(PromptLearningConfig):
    """P-Tuning's options: the prompt ``encoder`` ("mlp" or "lstm") with ``encoder_hidden_size`` units (None: the
    model's hidden size), ``encoder_num_layers`` (LSTM) and ``encoder_dropout``."""

    encoder: str = "mlp"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        V.one_of("encoder", self.encoder, ("mlp", "lstm"))
        self.encoder_hidden_size = optional_integer("encoder_hidden_size", self.encoder_hidden_size)
        V.integer("encoder_num_layers", self.encoder_num_layers)
        V.number("encoder_dropout", self.encoder_dropout, low=0.0, high=1.0)


class PromptTuningMethod(Method):
    """Prompt Tuning, saved as PEFT saves it: ``prompt_embeddings`` (what the model sees) and the head under
    ``base_model.``."""

    config_class = PromptTuningConfig
    head_prefix = "base_model."

    def apply(self, model, config: PromptTuningConfig, heads, calibration_data=None) -> dict:
        freeze_except(model, heads)
        add_prompt(model, config.num_virtual_tokens, init=config.init, init_text=config.init_text,
                   tokenizer=config.tokenizer)
        return {}

    def tensors(self, model, record) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": virtual_tokens(model).prompts()}

    def peft_config(self, model, record) -> dict:
        cfg, module = model.config, virtual_tokens(model)
        return {"peft_type": "P_TUNING" if module.encoder else "PROMPT_TUNING",
                "num_virtual_tokens": module.num_virtual_tokens, "token_dim": module.embedding.weight.shape[1],
                "num_attention_heads": cfg.num_attention_heads, "num_layers": cfg.num_hidden_layers,
                "num_transformer_submodules": module.num_transformer_submodules}


class PTuningMethod(PromptTuningMethod):
    """P-Tuning: Prompt Tuning's table through a prompt encoder (folded into ``prompt_embeddings`` when saved)."""

    config_class = PTuningConfig

    def apply(self, model, config: PTuningConfig, heads, calibration_data=None) -> dict:
        freeze_except(model, heads)
        add_prompt(model, config.num_virtual_tokens, encoder=config.encoder,
                   encoder_hidden_size=config.encoder_hidden_size, encoder_num_layers=config.encoder_num_layers,
                   encoder_dropout=config.encoder_dropout)
        return {}
