"""Prompt Tuning (Lester et al., 2021) and P-Tuning (Liu et al., 2021): P virtual token embeddings before the input.

Prompt Tuning trains the P x hidden table directly (initialised at random, from P sampled vocabulary rows, or from
a text); P-Tuning produces it with PEFT's prompt encoder (``encoder="lstm"``: bidirectional LSTM + two-layer MLP;
``"mlp"``: three-layer MLP). The frozen model sees ``[prompt; inputs]``: the attention mask gets P ones in front,
``labels`` P ignored positions (-100), ``token_type_ids`` P zeros, as PEFT arranges them. Module and parameter
names follow PEFT's prompt encoder, so its saved weights load with ``load_state_dict``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _validate as V


def load_table_(embedding: nn.Embedding, prompt_embeddings: torch.Tensor, layout: str) -> None:
    """Copy a saved ``prompt_embeddings`` table into ``embedding`` after checking its shape (``layout`` names it)."""
    expected = tuple(embedding.weight.shape)
    if tuple(prompt_embeddings.shape) != expected:
        raise ValueError(f"prompt_embeddings must have shape {expected} ({layout}), "
                         f"got {tuple(prompt_embeddings.shape)}")
    with torch.no_grad():
        embedding.weight.copy_(prompt_embeddings)


class ModelWrapper(nn.Module):
    """Base of the prompt and prefix wrappers: what transformers' ``Trainer`` asks of the model it trains and the
    wrapper leaves as it is (its configs, activation checkpointing) is the wrapped ``model``'s."""

    _DELEGATED = frozenset({"config", "generation_config", "activation_checkpointing_enable",
                            "activation_checkpointing_disable", "gradient_checkpointing_enable",
                            "gradient_checkpointing_disable", "is_activation_checkpointing",
                            "is_gradient_checkpointing"})

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in self._DELEGATED:
                raise
            return getattr(super().__getattr__("model"), name)


class PromptTuning(ModelWrapper):
    def __init__(self, model: nn.Module, num_virtual_tokens: int, *, init: str = "random",
                 init_text: Optional[str] = None, tokenizer=None, encoder: Optional[str] = None,
                 encoder_hidden_size: Optional[int] = None, encoder_num_layers: int = 2, encoder_dropout: float = 0.0):
        super().__init__()
        V.integer("num_virtual_tokens", num_virtual_tokens)
        if init not in ("random", "vocab", "text"):
            raise ValueError(f"init must be 'random', 'vocab' or 'text', got {init!r}")
        if encoder not in (None, "lstm", "mlp"):
            raise ValueError(f"encoder must be None (prompt tuning), 'lstm' or 'mlp' (P-Tuning), got {encoder!r}")
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        words = model.get_input_embeddings()
        dim = words.weight.shape[1]
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, dim, device=words.weight.device)
        self._initialise(words, init, init_text, tokenizer)
        self.encoder = encoder
        hidden = encoder_hidden_size or dim
        self.lstm_head = None
        self.mlp_head = None
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=encoder_num_layers, dropout=encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        elif encoder == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    @torch.no_grad()
    def _initialise(self, words: nn.Embedding, init: str, init_text, tokenizer) -> None:
        if init == "random":
            return
        if init == "vocab":
            ids = torch.randint(0, words.weight.shape[0], (self.num_virtual_tokens,), device=words.weight.device)
        else:
            if not init_text or tokenizer is None:
                raise ValueError("init='text' needs init_text and the model's tokenizer")
            tokens = tokenizer(init_text, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise ValueError(f"init_text {init_text!r} tokenizes to nothing")
            reps = -(-self.num_virtual_tokens // len(tokens))
            ids = torch.tensor((tokens * reps)[: self.num_virtual_tokens], device=words.weight.device)
        self.embedding.weight.copy_(words(ids).float().to(self.embedding.weight.dtype))

    def prompts(self) -> torch.Tensor:
        """[P, hidden]: the virtual token embeddings the model sees."""
        x = self.embedding.weight
        if self.encoder == "lstm":
            return self.mlp_head(self.lstm_head(x[None])[0])[0]
        if self.encoder == "mlp":
            return self.mlp_head(x)
        return x

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """Load a PEFT prompt-tuning / P-tuning adapter's ``prompt_embeddings`` [P, hidden] (what the model sees):
        the table becomes them and a prompt encoder is dropped, as PEFT does for inference."""
        load_table_(self.embedding, prompt_embeddings, "[P, hidden]")
        self.encoder, self.lstm_head, self.mlp_head = None, None, None

    def forward(self, input_ids=None, *, attention_mask=None, inputs_embeds=None, labels=None, token_type_ids=None,
                **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.model.get_input_embeddings()(input_ids)
        B = inputs_embeds.shape[0]
        P = self.num_virtual_tokens
        prompts = self.prompts().to(inputs_embeds.dtype).expand(B, -1, -1)
        inputs_embeds = torch.cat([prompts, inputs_embeds], 1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], 1)
        if labels is not None and labels.dim() == 2:  # token labels (causal LM): the prompt is not predicted
            labels = torch.cat([labels.new_full((B, P), -100), labels], 1)
        if token_type_ids is not None:
            token_type_ids = torch.cat([token_type_ids.new_zeros(B, P), token_type_ids], 1)
            kwargs["token_type_ids"] = token_type_ids
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, encoder={self.encoder}"
