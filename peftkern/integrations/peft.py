"""Run a PEFT model's LoRA layers on peftkern's fused kernels, in place: ``fuse(peft_model)`` / ``unfuse``.

Each ``peft.tuners.lora.Linear`` keeps its modules, parameters and names (``save_pretrained`` and
``PeftModel.from_pretrained`` are untouched); only its forward changes, to
* ``pk.lora_linear`` (LoRA, rsLoRA) or ``pk.dora_linear`` (DoRA) over an ``nn.Linear`` base,
* ``pk.qlora_linear`` over a bitsandbytes NF4 ``Linear4bit`` base (its codes read as they are, no re-quantization),
* ``pk.multi_lora_linear`` for mixed-adapter batches (``adapter_names=``) of plain LoRA adapters of one rank.
Anything else (several active adapters summed, merged or disabled adapters, other bases) runs PEFT's own forward.
Dropout masks come from peftkern's generator, not PEFT's: the same distribution, other draws.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from .. import _validate as V
from ..ops.lora import dora_linear, lora_linear
from ..ops.multi_lora import multi_lora_linear
from ..ops.nf4 import NF4Tensor, qlora_linear


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear

    return Linear


def _dropout_p(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _nf4_base(layer) -> NF4Tensor | None:
    """The layer's bitsandbytes NF4 base as an NF4Tensor (cached; rebuilt if the packed storage changes)."""
    base = layer.get_base_layer()
    state = getattr(getattr(base, "weight", None), "quant_state", None)
    if state is None or getattr(state, "quant_type", None) != "nf4":
        return None
    cached = getattr(layer, "_peftkern_nf4", None)
    if cached is None or cached[0] != base.weight.data_ptr():
        cached = (base.weight.data_ptr(), NF4Tensor.from_bnb(base.weight.data, state))
        layer._peftkern_nf4 = cached
    return cached[1]


def _mixed_batch(layer, x, adapter_names):
    """multi_lora_linear for a batch whose rows use different adapters, or None where it does not apply."""
    names = [a for a in dict.fromkeys(adapter_names) if a != "__base__"]
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear) or any(a not in layer.lora_A or layer.use_dora.get(a, False) for a in names):
        return None
    if not names or len({layer.r[a] for a in names}) != 1 or len(adapter_names) != x.shape[0]:
        return None
    A = torch.stack([layer.lora_A[a].weight for a in names])
    B = torch.stack([layer.lora_B[a].weight for a in names])
    ids = [names.index(a) if a != "__base__" else -1 for a in adapter_names]
    return multi_lora_linear(x, base.weight, base.bias, A, B, [layer.scaling[a] for a in names], ids)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter_names = kwargs.get("adapter_names")
    active = [a for a in self.active_adapters if a in self.lora_A]
    if args or set(kwargs) - {"adapter_names"} or self.disable_adapters or self.merged:
        return self._peftkern_peft_forward(x, *args, **kwargs)
    if adapter_names is not None:
        out = _mixed_batch(self, x, adapter_names)
        return out if out is not None else self._peftkern_peft_forward(x, *args, **kwargs)
    if len(active) != 1:
        return self._peftkern_peft_forward(x, *args, **kwargs)
    a = active[0]
    A, B, s = self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a]
    p = _dropout_p(self.lora_dropout[a])
    base = self.get_base_layer()
    # under autocast the op casts both, as PEFT's F.linear does (a layer norm hands an fp32 x to a bf16 layer)
    if isinstance(base, nn.Linear) and V.cast_dtype(base.weight) == V.cast_dtype(x) and not base.weight.requires_grad:
        if self.use_dora.get(a, False):
            return dora_linear(x, base.weight, base.bias, A, B, s, self.lora_magnitude_vector[a].weight,
                               dropout_p=p, training=self.training)
        return lora_linear(x, base.weight, base.bias, A, B, s, dropout_p=p, training=self.training)
    q = _nf4_base(self)
    if q is not None and not self.use_dora.get(a, False):
        bias = base.bias
        xq = x.to(q.dtype)
        y = qlora_linear(xq, q, bias.to(q.dtype) if bias is not None else None, A, B, s, dropout_p=p,
                         training=self.training)
        return y.to(x.dtype)
    return self._peftkern_peft_forward(x, *args, **kwargs)


def fuse(peft_model: nn.Module) -> int:
    """Route every PEFT LoRA ``Linear`` of ``peft_model`` through peftkern's kernels, in place. Returns how many."""
    cls = _lora_linear_class()
    count = 0
    for module in peft_model.modules():
        if isinstance(module, cls) and "_peftkern_peft_forward" not in module.__dict__:
            module._peftkern_peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def unfuse(peft_model: nn.Module) -> int:
    """Give every fused layer PEFT's forward back. Returns how many."""
    count = 0
    for module in peft_model.modules():
        if "_peftkern_peft_forward" in module.__dict__:
            del module.forward, module._peftkern_peft_forward
            module.__dict__.pop("_peftkern_nf4", None)
            count += 1
    return count
