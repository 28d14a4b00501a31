"""LoRA, DoRA and QLoRA for ``pk.patch``: their configs and glue over :class:`~peftkern.nn.LoRALinear` and
:class:`~peftkern.nn.QLoRALinear`.

Each targeted linear (``nn.Linear`` or transformers' ``Conv1D``) is replaced by a LoRA layer that shares its weight;
QLoRA quantizes the base to NF4 first (a bitsandbytes 4-bit base keeps its codes), except the modules transformers'
4-bit loading keeps in full precision. Saved as PEFT saves LoRA (``base_model.model.<module>.lora_A.weight``,
``.lora_B.weight``, ``.lora_magnitude_vector``, PEFT's ``adapter_config.json`` with ``fan_in_fan_out`` for Conv1D
projections), so PEFT loads ours and we load PEFT's.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from .. import _validate as V
from .. import lifecycle
from ..nn import LoRALinear, QLoRALinear
from ..nn.lora import is_conv1d
from ..ops.nf4.function import BLOCKSIZES
from .base import Method, MethodConfig, floating_dtype, target_spec
from .targets import TargetSpec, freeze_except, is_bnb_4bit, linear_targets, replace_module


@dataclasses.dataclass(kw_only=True)
class LoraConfig(MethodConfig):
    """LoRA's options (PEFT's names). ``r``: the rank; ``lora_alpha``: the scale is ``lora_alpha / r`` (rsLoRA:
    ``lora_alpha / sqrt(r)``); ``lora_dropout``: dropout on the adapter's input; ``target_modules``:
    ``"all-linear"`` (every linear but the task head and the output embeddings), a regex matched against full module
    names, module-name suffixes, or a callable ``(name, module) -> bool``; ``use_rslora``; ``adapter_dtype``: the
    adapter's dtype (None: fp32 over a half-precision base, the base's otherwise, as PEFT)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: TargetSpec = "all-linear"
    use_rslora: bool = False
    adapter_dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        super().__post_init__()
        V.integer("r", self.r)
        V.number("lora_alpha", self.lora_alpha)
        V.number("lora_dropout", self.lora_dropout, low=0.0, high=1.0)
        self.target_modules = target_spec(self.target_modules)
        V.flag("use_rslora", self.use_rslora)
        self.adapter_dtype = floating_dtype("adapter_dtype", self.adapter_dtype)


@dataclasses.dataclass(kw_only=True)
class DoraConfig(LoraConfig):
    """DoRA's options: LoRA's (the weight's magnitude vector trains beside the adapter)."""


@dataclasses.dataclass(kw_only=True)
class QLoraConfig(LoraConfig):
    """QLoRA's options: LoRA's and the NF4 quantization of the base: ``blocksize`` (values per absmax),
    ``double_quant`` (the absmax themselves quantized to 8 bits)."""

    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self):
        super().__post_init__()
        V.one_of("blocksize", self.blocksize, BLOCKSIZES)
        V.flag("double_quant", self.double_quant)


def _kept_in_full_precision(model: nn.Module) -> Callable[[str], bool]:
    """Whether transformers' 4-bit loading leaves the module of that name unquantized: the class's
    ``_keep_in_fp32_modules`` (T5's ``wo``, whose input the model casts to ``wo.weight.dtype``) and what its
    quantizer never converts (``get_keys_to_not_convert``: tied weights, the output embeddings, the last module),
    matched by its rule (``should_convert_module``: a prefix up to a dot, a regex, or a suffix)."""
    keys = {*(getattr(model, "_keep_in_fp32_modules", None) or ()),
            *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())}
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # transformers < 5: its names for the same rules differ; the output embeddings by identity
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        keys |= {n for n, m in model.named_modules() if m is out_emb and out_emb is not None}
        return lambda name: any(name == k or name.endswith("." + k) or name.startswith(k + ".") for k in keys)
    if hasattr(model, "all_tied_weights_keys") and hasattr(model, "get_output_embeddings"):
        keys |= set(get_keys_to_not_convert(model))
    return lambda name: not should_convert_module(name, sorted(keys))


class LoraMethod(Method):
    """LoRA (Hu et al., 2022) on every targeted linear; ``model(**batch, adapter_names=[...])`` routes rows to named
    adapters (``peftkern.lifecycle``)."""

    config_class = LoraConfig
    use_dora = False
    quantize = False

    def apply(self, model, config: LoraConfig, heads, calibration_data=None) -> dict:
        names = linear_targets(model, config.target_modules, heads, self.quantize)
        freeze_except(model, heads)
        lora = dict(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                    use_rslora=config.use_rslora, adapter_dtype=config.adapter_dtype)
        full_precision = _kept_in_full_precision(model) if self.quantize else None
        fan_in_fan_out = any(is_conv1d(model.get_submodule(n)) for n in names)
        for name in names:
            base = model.get_submodule(name)
            if not self.quantize or (full_precision(name) and not is_bnb_4bit(base)):
                layer = LoRALinear.from_linear(base, use_dora=self.use_dora, **lora)
            elif is_bnb_4bit(base):
                layer = QLoRALinear.from_bnb(base, **lora)
            else:
                layer = QLoRALinear.from_linear(base, blocksize=config.blocksize, double_quant=config.double_quant,
                                                **lora)
            replace_module(model, name, layer)
        lifecycle.route_adapter_names(model)
        return {"targets": names, "fan_in_fan_out": fan_in_fan_out}

    def tensors(self, model, record) -> dict[str, torch.Tensor]:
        """The adapter's tensors (the layers' own, or those of the named adapter ``record`` describes)."""
        out = {}
        for name in record["targets"]:
            a = model.get_submodule(name).adapter(record.get("name", "default"))
            out[f"base_model.model.{name}.lora_A.weight"] = a.lora_A
            out[f"base_model.model.{name}.lora_B.weight"] = a.lora_B
            if a.lora_magnitude is not None:
                out[f"base_model.model.{name}.lora_magnitude_vector"] = a.lora_magnitude
        return out

    def peft_config(self, model, record) -> dict:
        o = record["options"]
        return {"peft_type": "LORA", "r": o.get("r", 8), "lora_alpha": o.get("lora_alpha", 8),
                "lora_dropout": o.get("lora_dropout", 0.0), "use_rslora": o.get("use_rslora", False),
                "use_dora": self.use_dora, "target_modules": sorted(record["targets"]), "bias": "none",
                "fan_in_fan_out": record.get("fan_in_fan_out", False)}


class DoraMethod(LoraMethod):
    """DoRA (Liu et al., 2024): LoRA on the direction, a trained magnitude per output feature."""

    config_class = DoraConfig
    use_dora = True


class QLoraMethod(LoraMethod):
    """QLoRA (Dettmers et al., 2023): LoRA over NF4 bases."""

    config_class = QLoraConfig
    quantize = True

