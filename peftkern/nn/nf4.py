"""NF4Linear (a frozen 4-bit linear layer, bitsandbytes' checkpoint format) and QLoRALinear (LoRA over it)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import _validate as V
from ..ops.nf4 import NF4Tensor, nf4_linear, qlora_linear, quantize


class NF4Linear(nn.Module):
    """``y = x dequant(W)^T + b`` with ``weight`` an :class:`~peftkern.nf4.NF4Tensor` [out, in] (frozen).

    Its ``state_dict`` is bitsandbytes' / transformers' 4-bit format: ``weight`` (packed uint8), ``weight.absmax``,
    ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
    ``weight.quant_state.bitsandbytes__nf4``, ``bias``: a ``bnb.nn.Linear4bit`` state dict loads, and
    ``Params4bit.from_prequantized`` reads ours. ``.to(device)`` moves the 4-bit state; dtype casts leave it alone.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, device=None, dtype=None):
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init(quantize(linear.weight.detach(), blocksize, double_quant), linear.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        """Quantize an ``nn.Linear``'s weight (bit-exact with bitsandbytes); its bias is shared, frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init(quantize(linear.weight.detach(), blocksize, double_quant), linear.bias)
        return self

    @classmethod
    def from_bnb(cls, linear4bit: nn.Module) -> "NF4Linear":
        """Wrap a ``bitsandbytes.nn.Linear4bit`` (NF4) losslessly: same packed codes and scales, no re-quantization."""
        state = getattr(getattr(linear4bit, "weight", None), "quant_state", None)
        if state is None:
            raise TypeError(f"linear4bit must be a quantized bitsandbytes Linear4bit, got {type(linear4bit).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init(NF4Tensor.from_bnb(linear4bit.weight.data, state), linear4bit.bias)
        return self

    def to_bnb(self) -> nn.Module:
        """A ``bitsandbytes.nn.Linear4bit`` (NF4, compute dtype = the weight's dtype) holding the same bits and bias."""
        import bitsandbytes as bnb

        w = self.weight
        q4 = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=self.bias is not None, compute_dtype=w.dtype,
                               quant_type="nf4", compress_statistics=w.double_quant, device="meta")
        packed, state = w.to_bnb()
        q4.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=w.blocksize,
                                      compress_statistics=w.double_quant, quant_type="nf4", bnb_quantized=True,
                                      module=q4)
        if self.bias is not None:
            q4.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return q4

    def _init(self, weight: NF4Tensor, bias: Optional[torch.Tensor]) -> None:
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be a 2-D NF4Tensor, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        if bias is not None:
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach())
            bias.requires_grad_(False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.dequantize()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # the device fn moves tensors to (a dtype cast would break the 4-bit state's fixed dtypes: ignored)
        device = fn(torch.empty(0, device=self.weight.device)).device
        if device != self.weight.device:
            self.weight = self.weight.to(device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.weight.state_dict_items().items():
            destination[prefix + "weight" + ("." + key if key else "")] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        name = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k == name or k.startswith(name + ".")}
        if mine:
            try:
                weight = NF4Tensor.from_state_dict_items({k[len(name) + 1:]: v for k, v in mine.items()},
                                                         device=self.weight.device)
            except (ValueError, TypeError, KeyError) as e:
                error_msgs.append(f"{name}: {e}")
            else:
                if tuple(weight.shape) != (self.out_features, self.in_features):
                    error_msgs.append(f"size mismatch for {name}: the checkpoint holds {tuple(weight.shape)}, "
                                      f"this layer is {(self.out_features, self.in_features)}")
                else:
                    self.weight = weight
        elif strict:
            missing_keys.append(name)
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.weight.blocksize}, double_quant={self.weight.double_quant}, "
                f"dtype={self.weight.dtype}")


class QLoRALinear(NF4Linear):
    """QLoRA: an :class:`NF4Linear` base plus a LoRA adapter on the fused kernels; only ``lora_A`` [r, in] and
    ``lora_B`` [out, r] train (PEFT layouts and initialisation, fp32 over a half-precision base as PEFT keeps them).

    ``merge()`` returns a full-precision ``nn.Linear`` holding ``dequant(W) + scaling B A``; putting that back into
    4 bits re-quantizes it (``NF4Linear.from_linear``), which rounds the merged update away in part.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    blocksize: int = 64, double_quant: bool = True, use_rslora: bool = False,
                    adapter_dtype: Optional[torch.dtype] = None) -> "QLoRALinear":
        self = super().from_linear(linear, blocksize, double_quant)
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, linear.weight.device)
        return self

    @classmethod
    def from_bnb(cls, linear4bit: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, adapter_dtype: Optional[torch.dtype] = None) -> "QLoRALinear":
        self = super().from_bnb(linear4bit)
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, self.weight.device)
        return self

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, device) -> None:
        V.integer("r", r)
        V.number("lora_alpha", lora_alpha)
        V.number("lora_dropout", lora_dropout, low=0.0, high=1.0)
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, float(lora_dropout), use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if self.weight.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype
        kw = dict(device=device, dtype=adapter_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                            dropout_p=self.lora_dropout, training=self.training)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A full-precision ``nn.Linear`` (the base's dtype) with the adapter folded in."""
        w = self.dequantized_weight()
        delta = self.scaling * (self.lora_B @ self.lora_A)
        merged = (w.to(torch.promote_types(w.dtype, delta.dtype)) + delta).to(w.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                           dtype=w.dtype)
        linear.weight.copy_(merged)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}, dropout={self.lora_dropout}"
