"""Optimizers for QLoRA training: bitsandbytes' paged AdamW (we do not write our own)."""
from __future__ import annotations

from typing import Iterable

import torch


def paged_adamw(params: Iterable, lr: float = 2e-4, *, bits: int = 32, **kwargs) -> torch.optim.Optimizer:
    """QLoRA's optimizer: bitsandbytes' ``PagedAdamW32bit`` / ``PagedAdamW8bit`` (state paged to CPU memory under GPU
    memory pressure). Parameters on a CPU get the same update unpaged (``AdamW32bit`` / ``AdamW8bit``), paging being a
    GPU feature. ``kwargs`` go to the bitsandbytes optimizer (betas, eps, weight_decay, ...)."""
    if bits not in (8, 32):
        raise ValueError(f"bits must be 8 or 32, got {bits!r}")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("paged_adamw needs bitsandbytes: pip install bitsandbytes") from e
    params = list(params)
    on_gpu = any((p["params"][0] if isinstance(p, dict) else p).is_cuda for p in params)
    name = f"{'Paged' if on_gpu else ''}AdamW{bits}bit"
    return getattr(bnb.optim, name)(params, lr=lr, **kwargs)
