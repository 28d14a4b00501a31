"""NF4Linear (a frozen 4-bit linear layer, bitsandbytes' checkpoint format) and QLoRALinear (LoRA over it)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import _validate as V
from ..ops.nf4 import NF4Tensor, nf4_linear, qlora_linear, quantize
from .lora import NamedAdapters, _check_linear, _member, out_in


_STATE = ("absmax", "qabsmax", "absmax2", "offset", "code", "code8")  # NF4Tensor's tensors besides the codes


class NF4Linear(nn.Module):
    """``y = x dequant(W)^T + b`` with W [out, in] frozen in NF4 (:attr:`nf4`: it as an ``NF4Tensor``).

    Storage as bitsandbytes' ``Params4bit``: ``weight`` is a frozen parameter holding the packed codes, viewed as
    ``quant_storage`` (uint8 by default; e.g. bf16 to share a dtype with the other parameters) in shape
    [bytes / itemsize, 1], so FSDP2 (``fully_shard``) shards it on dim 0 like any parameter; the scales and code
    tables are (non-persistent) buffers ``quant_*``. Its ``state_dict`` is bitsandbytes' / transformers' 4-bit format:
    ``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
    ``weight.quant_state.bitsandbytes__nf4``, ``bias``: a ``bnb.nn.Linear4bit`` state dict loads, and
    ``Params4bit.from_prequantized`` reads ours. ``.to(device)`` moves the 4-bit state; dtype casts leave it alone.

    Dtypes as in ``bnb.nn.Linear4bit``: the input and the bias are cast to ``compute_dtype`` (None: the input's
    dtype), the output back to the input's dtype; under ``torch.autocast`` the product is in autocast's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, quant_storage: torch.dtype = torch.uint8,
                 compute_dtype: Optional[torch.dtype] = None, device=None, dtype=None):
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init(quantize(linear.weight.detach(), blocksize, double_quant), linear.bias, quant_storage,
                   compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    quant_storage: torch.dtype = torch.uint8,
                    compute_dtype: Optional[torch.dtype] = None) -> "NF4Linear":
        """Quantize an ``nn.Linear``'s weight (bit-exact with bitsandbytes); its bias is shared, frozen. A
        transformers ``Conv1D``'s [in, out] weight is quantized as [out, in], as transformers' 4-bit loading does."""
        _check_linear(linear)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init(quantize(out_in(linear).detach().contiguous(), blocksize, double_quant), linear.bias,
                   quant_storage, compute_dtype)
        return self

    @classmethod
    def from_bnb(cls, linear4bit: nn.Module) -> "NF4Linear":
        """Wrap a ``bitsandbytes.nn.Linear4bit`` (NF4) losslessly: same packed codes and scales, no re-quantization;
        its ``compute_dtype`` too."""
        state = getattr(getattr(linear4bit, "weight", None), "quant_state", None)
        if state is None:
            raise TypeError(f"linear4bit must be a quantized bitsandbytes Linear4bit, got {type(linear4bit).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init(NF4Tensor.from_bnb(linear4bit.weight.data, state), linear4bit.bias, linear4bit.weight.dtype,
                   getattr(linear4bit, "compute_dtype", None))
        return self

    def to_bnb(self) -> nn.Module:
        """A ``bitsandbytes.nn.Linear4bit`` (NF4, compute dtype ours or else the weight's) holding the same bits and
        bias."""
        import bitsandbytes as bnb

        w = self.nf4
        q4 = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=self.bias is not None,
                               compute_dtype=self.compute_dtype or w.dtype, quant_type="nf4",
                               compress_statistics=w.double_quant, device="meta")
        packed, state = w.to_bnb()
        q4.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=w.blocksize,
                                      compress_statistics=w.double_quant, quant_type="nf4", bnb_quantized=True,
                                      module=q4)
        if self.bias is not None:
            q4.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return q4

    def _init(self, weight: NF4Tensor, bias: Optional[torch.Tensor], quant_storage: torch.dtype,
              compute_dtype: Optional[torch.dtype]) -> None:
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be a 2-D NF4Tensor, got shape {tuple(weight.shape)}")
        if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"compute_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, "
                            f"got {compute_dtype!r}")
        self.compute_dtype = compute_dtype
        self.out_features, self.in_features = weight.shape
        self._set_nf4(weight, quant_storage)
        if bias is not None:
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach())
            bias.requires_grad_(False)
        self.bias = bias

    def _set_nf4(self, q: NF4Tensor, quant_storage: torch.dtype) -> None:
        if not isinstance(quant_storage, torch.dtype):
            raise TypeError(f"quant_storage must be a torch.dtype, got {type(quant_storage).__name__}")
        size = torch.empty(0, dtype=quant_storage).element_size()
        packed = q.packed.view(-1)
        if packed.numel() % size:  # pad the codes to whole storage elements (bitsandbytes pads the same way)
            packed = torch.cat([packed, packed.new_zeros(size - packed.numel() % size)])
        self.weight = nn.Parameter(packed.view(quant_storage).view(-1, 1), requires_grad=False)
        self._nf4_meta = (q.shape, q.dtype, q.blocksize, q.nested_blocksize, q.packed.numel())
        for name in _STATE:
            self.register_buffer(f"quant_{name}", getattr(q, name), persistent=False)

    @property
    def nf4(self) -> NF4Tensor:
        """The weight as an :class:`NF4Tensor` over this module's current tensors (no copy)."""
        shape, dtype, blocksize, nested_blocksize, nbytes = self._nf4_meta
        weight, buffers = _member(self, "weight"), self._buffers  # every call: no nn.Module.__getattr__ (~0.5 us each)
        packed = weight
        if weight.dtype != torch.uint8 or weight.shape != (nbytes, 1):
            packed = weight.view(-1).view(torch.uint8)[:nbytes].view(-1, 1)
        return NF4Tensor(packed, shape, dtype, blocksize, nested_blocksize=nested_blocksize,
                         **{name: buffers[f"quant_{name}"] for name in _STATE})

    @property
    def quant_storage(self) -> torch.dtype:
        return self.weight.dtype

    def _compute_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x in the compute dtype, and the bias in x's (bitsandbytes casts both; the stored bias is left as it is)."""
        V.tensor("x", x, min_ndim=1)
        if self.compute_dtype is not None and x.dtype != torch.float64:
            x = x.to(self.compute_dtype)
        bias = _member(self, "bias")
        return x, None if bias is None else bias.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc, bias = self._compute_inputs(x)
        return nf4_linear(xc, self.nf4, bias).to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.nf4.dequantize()

    def _apply(self, fn, recurse=True):
        before = self.nf4, self.quant_storage
        super()._apply(fn, recurse)
        # a dtype cast would break the 4-bit state's fixed dtypes: only the device change is kept
        dtypes = [(getattr(self, f"quant_{n}"), getattr(before[0], n)) for n in _STATE]
        if self.weight.dtype != before[1] or any(t is not None and t.dtype != b.dtype for t, b in dtypes):
            self._set_nf4(before[0].to(self.weight.device), before[1])
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.nf4.state_dict_items().items():
            if key in ("quant_map", "nested_quant_map"):  # code tables every layer shares: safetensors refuses them
                value = value.clone()
            destination[prefix + "weight" + ("." + key if key else "")] = value
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()

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
                    self._set_nf4(weight, self.quant_storage)
        n_missing = len(missing_keys)
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if mine:  # the codes were loaded above, not by nn.Module
            missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k != name]

    def extra_repr(self) -> str:
        _, dtype, blocksize, _, _ = self._nf4_meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={blocksize}, double_quant={self.quant_qabsmax is not None}, dtype={dtype}, "
                f"quant_storage={self.quant_storage}, compute_dtype={self.compute_dtype}")


class QLoRALinear(NamedAdapters, NF4Linear):
    """QLoRA: an :class:`NF4Linear` base plus a LoRA adapter on the fused kernels; only ``lora_A`` [r, in] and
    ``lora_B`` [out, r] train (PEFT layouts and initialisation, fp32 over a half-precision base as PEFT keeps them).

    ``merge()`` returns a full-precision ``nn.Linear`` holding ``dequant(W) + scaling B A``; putting that back into
    4 bits re-quantizes it (``NF4Linear.from_linear``), which rounds the merged update away in part.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    blocksize: int = 64, double_quant: bool = True, use_rslora: bool = False,
                    adapter_dtype: Optional[torch.dtype] = None,
                    compute_dtype: Optional[torch.dtype] = None) -> "QLoRALinear":
        self = super().from_linear(linear, blocksize, double_quant, compute_dtype=compute_dtype)
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
            dtype = self.nf4.dtype
            adapter_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        kw = dict(device=device, dtype=adapter_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc, bias = self._compute_inputs(x)
        if self.adapter_names is not None:  # several adapters in one batch: over the dequantized weight
            return self.mixed_forward(xc, self.dequantized_weight().to(xc.dtype), bias).to(x.dtype)
        a = self.adapter(self.active_adapter)
        if a is None:
            return nf4_linear(xc, self.nf4, bias).to(x.dtype)
        return qlora_linear(xc, self.nf4, bias, a.lora_A, a.lora_B, a.scaling, dropout_p=a.lora_dropout,
                            training=self.training).to(x.dtype)

    @torch.no_grad()
    def merge(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A full-precision ``nn.Linear`` in ``dtype`` (default: the compute dtype, else the dtype the base was
        quantized from) with the active adapter folded in; the sum is formed in the wider dtype and rounded once."""
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        w = self.dequantized_weight()
        dtype = dtype or self.compute_dtype or w.dtype
        delta = self.delta_weight()
        merged = w.to(torch.promote_types(torch.promote_types(w.dtype, delta.dtype), dtype)) + delta
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                           dtype=dtype)
        linear.weight.copy_(merged)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def base_layer(self) -> NF4Linear:
        """The frozen 4-bit base alone: an :class:`NF4Linear` over this layer's codes, scales and bias (shared)."""
        base = NF4Linear.__new__(NF4Linear)
        nn.Module.__init__(base)
        base._init(self.nf4, self.bias, self.quant_storage, self.compute_dtype)
        return base

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}, dropout={self.lora_dropout}"
