"""LoRALinear: a drop-in nn.Linear with a LoRA (rsLoRA, DoRA, AdaLoRA-form) adapter on the fused kernels."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import _validate as V
from ..ops.lora import dora_linear, dora_weight_norm, lora_linear


class LoRALinear(nn.Module):
    """``y = x W^T + b + scaling * (dropout(x) A^T [* rank_scale]) B^T`` with W (and b) frozen.

    Parameter layouts and initialisation follow PEFT: ``lora_A`` [r, in] kaiming-uniform(a=sqrt(5)),
    ``lora_B`` [out, r] zeros, ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). With ``use_dora`` a
    trainable ``lora_magnitude`` [out] starts at the row norms of W. ``rank_scale`` [r] (AdaLoRA's singular
    values) is created by :meth:`enable_rank_scale`. Adapters over a half-precision base are kept in fp32, as PEFT
    does, unless ``adapter_dtype`` says otherwise.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False,
                 device=None, dtype=None, adapter_dtype: Optional[torch.dtype] = None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init(base.weight, base.bias, r, lora_alpha, lora_dropout, use_rslora, use_dora, adapter_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False,
                    adapter_dtype: Optional[torch.dtype] = None) -> "LoRALinear":
        """Wrap an existing ``nn.Linear``; its weight and bias tensors are shared, not copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init(linear.weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora, use_dora, adapter_dtype)
        return self

    def _init(self, weight, bias, r, lora_alpha, lora_dropout, use_rslora, use_dora, adapter_dtype):
        V.integer("r", r)
        V.number("lora_alpha", lora_alpha)
        V.number("lora_dropout", lora_dropout, low=0.0, high=1.0)
        out_features, in_features = weight.shape
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha, self.lora_dropout = lora_alpha, float(lora_dropout)
        self.use_rslora, self.use_dora = use_rslora, use_dora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.weight.requires_grad_(False)
        self.bias = bias
        if bias is not None:
            self.bias.requires_grad_(False)
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        kw = dict(device=weight.device, dtype=adapter_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_magnitude = None
        if use_dora:
            self.lora_magnitude = nn.Parameter(self._weight_norm().to(adapter_dtype))
        self.rank_scale: Optional[nn.Parameter] = None
        self.merged = False
        self._unmerged_weight: Optional[torch.Tensor] = None

    def enable_rank_scale(self, init: float = 0.0) -> nn.Parameter:
        """Add AdaLoRA's per-rank scale ``rank_scale`` [r] (SVD form ``B diag(e) A``), initialised to ``init``."""
        if self.use_dora:
            raise ValueError("rank_scale (AdaLoRA) cannot be combined with use_dora")
        self.rank_scale = nn.Parameter(torch.full((self.r,), float(init), device=self.lora_A.device,
                                                  dtype=self.lora_A.dtype))
        return self.rank_scale

    def _weight_norm(self) -> torch.Tensor:
        return dora_weight_norm(self.weight, self.lora_A, self.lora_B, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        if self.use_dora:
            return dora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.lora_magnitude,
                               dropout_p=self.lora_dropout, training=self.training)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.lora_dropout, training=self.training, rank_scale=self.rank_scale)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B diag(rank_scale) A`` in the adapters' dtype, [out, in]."""
        A = self.lora_A if self.rank_scale is None else self.lora_A * self.rank_scale[:, None]
        return self.scaling * (self.lora_B @ A)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``weight`` with the adapter folded in (DoRA: each row rescaled to ``lora_magnitude``), computed in the wider
        of the two dtypes and returned in the weight's; ``weight`` itself is left as it is."""
        w = self.weight.to(torch.promote_types(self.weight.dtype, self.lora_A.dtype)) + self.delta_weight()
        if self.use_dora:
            w = w * (self.lora_magnitude / self._weight_norm())[:, None]
        return w.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (a copy of the original is kept so :meth:`unmerge` restores it exactly)."""
        if self.merged:
            return
        self._unmerged_weight = self.weight.detach().clone()
        self.weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, scaling={self.scaling:g}, dropout={self.lora_dropout}, dora={self.use_dora}, "
                f"merged={self.merged}")
