"""Run a PEFT model's LoRA layers on peftkern's fused kernels, in place: ``fuse(peft_model)`` / ``unfuse``.

Each PEFT LoRA layer keeps its modules, parameters and names (``save_pretrained`` and ``PeftModel.from_pretrained``
are untouched); only its forward changes, to
* ``pk.lora_linear`` (LoRA, rsLoRA) or ``pk.dora_linear`` (DoRA) over an ``nn.Linear`` base (``lora.Linear``),
* ``pk.qlora_linear`` over a bitsandbytes NF4 ``Linear4bit`` base, whichever class PEFT gave the layer
  (``lora.bnb.Linear4bit`` for a model loaded in 4-bit by transformers, ``lora.Linear`` around one built by hand):
  its codes read as they are, no re-quantization; dtypes as ``Linear4bit`` and PEFT have them,
* ``pk.multi_lora_linear`` for mixed-adapter batches (``adapter_names=``) of plain LoRA adapters of one rank.
Layers no kernel serves (8-bit or FP4 bases, DoRA over a 4-bit base, lora_bias, other layer types and LoRA variants)
keep PEFT's forward, and ``fuse`` logs which and why; so do calls no kernel serves (several active adapters summed,
merged or disabled adapters, mixed-adapter batches over quantized bases). Dropout masks come from peftkern's
generator, not PEFT's: the same distribution, other draws.
"""
from __future__ import annotations

import logging
import sys
import types

import torch
from torch import nn

from .. import _validate as V
from ..ops.lora import dora_linear, lora_linear
from ..ops.multi_lora import multi_lora_linear
from ..nn.lora import is_conv1d
from ..ops.nf4 import NF4Tensor, qlora_linear

logger = logging.getLogger("peftkern")


def _lora_classes():
    """PEFT's LoRA layer base class, and the classes whose forward ``_fused_forward`` stands in for."""
    from peft.tuners.lora.layer import Linear, LoraLayer

    classes = (Linear,)
    if "bitsandbytes" in sys.modules:
        from peft.tuners.lora import bnb as lora_bnb

        classes += (lora_bnb.Linear4bit,) if hasattr(lora_bnb, "Linear4bit") else ()
    return LoraLayer, classes


def _bnb_kind(base: nn.Module) -> str | None:
    """"4bit" / "8bit" for a bitsandbytes Linear4bit / Linear8bitLt base (both are ``nn.Linear`` subclasses)."""
    bnb = sys.modules.get("bitsandbytes")  # a model holding bitsandbytes layers has imported it
    if bnb is None:
        return None
    if isinstance(base, bnb.nn.Linear4bit):
        return "4bit"
    return "8bit" if isinstance(base, bnb.nn.Linear8bitLt) else None


def _dense(base: nn.Module) -> bool:
    return isinstance(base, nn.Linear) and _bnb_kind(base) is None


def _dense_weight(base: nn.Module) -> torch.Tensor | None:
    """The [out, in] weight of a dense base: an ``nn.Linear``'s, or the transposed view of a transformers ``Conv1D``'s
    (GPT-2's projections, which PEFT adapts with ``fan_in_fan_out``); None for any other base."""
    if _dense(base):
        return base.weight
    return base.weight.t() if is_conv1d(base) else None


def _adapter_left(layer, adapter: str, quantized: bool) -> str | None:
    """Why adapter ``adapter`` of ``layer`` runs on PEFT's forward, or None when a kernel serves it."""
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return "lora_bias=True"
    if layer.use_dora.get(adapter, False):
        return "DoRA over a 4-bit base" if quantized else None
    variant = getattr(layer, "lora_variant", {}).get(adapter)  # PEFT >= 0.15 (aLoRA, Arrow, ...)
    return None if variant is None else f"LoRA variant {type(variant).__name__}"


def _layer_left(layer, classes) -> str | None:
    """Why ``fuse`` leaves ``layer`` (a PEFT LoRA layer) to PEFT's forward, or None when it takes it."""
    base = layer.get_base_layer()
    kind = _bnb_kind(base)
    if kind == "8bit":
        return f"8-bit base (bitsandbytes {type(base).__name__})"
    if type(layer) not in classes:
        return f"PEFT {type(layer).__module__.removeprefix('peft.tuners.')}.{type(layer).__name__} layer"
    if kind == "4bit" and getattr(base.weight, "quant_type", None) != "nf4":
        return f"4-bit {getattr(base.weight, 'quant_type', None)} base (only NF4 is fused)"
    if kind is None and not isinstance(base, nn.Linear) and not is_conv1d(base):
        return f"{type(base).__name__} base (not an nn.Linear or Conv1D)"
    reasons = [_adapter_left(layer, a, kind == "4bit") for a in layer.lora_A]
    return None if None in reasons or not reasons else ", ".join(dict.fromkeys(reasons))


def _dropout_p(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _from_bnb_cpu_layout(packed: torch.Tensor, state) -> NF4Tensor:
    """The NF4Tensor of a state bitsandbytes repacked for its AVX512-bf16 CPU kernel (``packing_format_for_cpu``: an
    inference forward of ``Linear4bit`` on such a CPU does it, in place). The codes come in 32-byte tiles, one per 32
    rows x 2 columns: byte i holds (row i // 2, column i % 2) in its low nibble and row 16 + i // 2 in its high one;
    absmax is bf16 [K/blocksize, N], its double quantization decoded by bitsandbytes. Read as they are: the same
    codes, and the absmax bitsandbytes now computes with."""
    n, k = state.shape
    tiles = packed.view(torch.uint8).reshape(-1, 32)
    codes = torch.cat([tiles & 0xF, tiles >> 4], dim=1).reshape(n // 32, k // 2, 32, 2).transpose(1, 2)
    pairs = codes.reshape(-1, 2)
    return NF4Tensor((pairs[:, 0] << 4 | pairs[:, 1]).view(-1, 1), (n, k), state.original_dtype, state.blocksize,
                     absmax=state.absmax.t().reshape(-1).float(), code=state.code.float())


def _nf4_base(layer) -> NF4Tensor | None:
    """The layer's bitsandbytes NF4 base as an NF4Tensor (cached; rebuilt when bitsandbytes replaces the codes)."""
    base = layer.get_base_layer()
    state = getattr(getattr(base, "weight", None), "quant_state", None)
    if state is None or getattr(state, "quant_type", None) != "nf4":
        return None
    cpu_layout = bool(getattr(state, "packing_format_for_cpu", False))
    key = (base.weight.data_ptr(), cpu_layout)  # the cached NF4Tensor keeps the old storage: its address is not reused
    cached = getattr(layer, "_peftkern_nf4", None)
    if cached is None or cached[0] != key:
        read = _from_bnb_cpu_layout if cpu_layout else NF4Tensor.from_bnb
        cached = (key, read(base.weight.data, state))
        layer._peftkern_nf4 = cached
    return cached[1]


def _qlora(layer, q: NF4Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor | None:
    """``qlora_linear`` over the layer's ``bnb.nn.Linear4bit`` base, with PEFT's and bitsandbytes' dtypes.

    bitsandbytes casts x and the bias to its compute dtype; PEFT computes the LoRA term on x cast to the adapter's
    dtype; the output is in x's dtype; under ``torch.autocast`` both run in its dtype (here the op's autocast rule).
    One fused op sees one x, so it runs in the wider of x's dtype and the compute dtype: where x is wider (fp32
    hidden states over a bf16 compute dtype, outside autocast) the base product is more precise than bitsandbytes'
    rather than the LoRA term less precise than PEFT's (x rounded to bf16, the sum rounded to bf16: 2-4x PEFT's
    gradient error). None for float64, which no NF4 kernel takes."""
    base = layer.get_base_layer()
    compute = getattr(base, "compute_dtype", None)
    xc = x if compute is None else x.to(torch.promote_types(x.dtype, compute))
    if xc.dtype == torch.float64:
        return None
    bias = None if base.bias is None else base.bias.to(xc.dtype)
    y = qlora_linear(xc, q, bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter],
                     dropout_p=_dropout_p(layer.lora_dropout[adapter]), training=layer.training)
    return y.to(x.dtype)


def _mixed_batch(layer, x, adapter_names):
    """multi_lora_linear for a batch whose rows use different adapters, or None where it does not apply."""
    names = [a for a in dict.fromkeys(adapter_names) if a != "__base__"]
    base = layer.get_base_layer()
    if not _dense(base) or any(a not in layer.lora_A or _adapter_left(layer, a, False) or layer.use_dora.get(a, False)
                               for a in names):
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
    q = _nf4_base(self)
    if len(active) != 1 or _adapter_left(self, active[0], q is not None) is not None:
        return self._peftkern_peft_forward(x, *args, **kwargs)
    a = active[0]
    if q is not None:
        out = _qlora(self, q, x, a)
        return out if out is not None else self._peftkern_peft_forward(x, *args, **kwargs)
    A, B, s = self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a]
    p = _dropout_p(self.lora_dropout[a])
    base = self.get_base_layer()
    weight = _dense_weight(base)
    # under autocast the op casts both, as PEFT's F.linear does (a layer norm hands an fp32 x to a bf16 layer)
    if weight is not None and V.cast_dtype(weight) == V.cast_dtype(x) and not weight.requires_grad:
        if self.use_dora.get(a, False):
            return dora_linear(x, weight, base.bias, A, B, s, self.lora_magnitude_vector[a].weight,
                               dropout_p=p, training=self.training)
        return lora_linear(x, weight, base.bias, A, B, s, dropout_p=p, training=self.training)
    return self._peftkern_peft_forward(x, *args, **kwargs)


def _group(names: list[str]) -> list[str]:
    """Module names alike but for their first number, as one: ``m.layers.{0-2,5}.mlp.up_proj``."""
    groups: dict[tuple, list[int]] = {}
    for name in names:
        parts = name.split(".")
        i = next((j for j, p in enumerate(parts) if p.isdigit()), None)
        if i is None:
            groups[(name,)] = []
        else:
            groups.setdefault((".".join(parts[:i]), ".".join(parts[i + 1:])), []).append(int(parts[i]))
    out = []
    for key, numbers in groups.items():
        if len(key) == 1:
            out.append(key[0])
            continue
        numbers, runs = sorted(set(numbers)), []
        for n in numbers:
            if runs and n == runs[-1][1] + 1:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        span = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)
        out.append(".".join(p for p in (key[0], span if len(numbers) == 1 else f"{{{span}}}", key[1]) if p))
    return out


def fuse(peft_model: nn.Module) -> int:
    """Route every PEFT LoRA layer of ``peft_model`` that a kernel serves through peftkern's kernels, in place.

    Returns how many layers it took. Those it leaves to PEFT's forward are logged once, as a warning of the
    ``"peftkern"`` logger grouped by reason: the caller asked for speed and should know where it does not come.
    """
    lora_layer, classes = _lora_classes()
    count, left = 0, {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, lora_layer) or "_peftkern_peft_forward" in module.__dict__:
            continue
        reason = _layer_left(module, classes)
        if reason is not None:
            left.setdefault(reason, []).append(name.removeprefix("base_model.model."))
            continue
        module._peftkern_peft_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        count += 1
    if left:
        n = sum(map(len, left.values()))
        logger.warning("fuse: %d of %d PEFT LoRA layers left to PEFT's forward: %s", n, n + count,
                       "; ".join(f"{reason}: {', '.join(_group(names))}" for reason, names in left.items()))
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
