"""One entry point per method: ``pk.patch(model, method, calibration_data=None, **options)`` for the 18 methods of
``METHODS`` (or ``pk.patch(model, config)`` with a method's config object), and ``save_adapter`` / ``load_adapter``.
Each method's config and glue (a :class:`peftkern.methods.base.Method`) live beside its mechanism in
``peftkern.methods``; ``METHODS`` names them.

``patch`` freezes the model, adds only the method's parameters (the task head, if any, stays trainable) and keeps
the model itself, patched in place: the same object and class, its call, ``generate`` and the rest of its API (prompt
and prefix methods add their table as the submodule ``peftkern_prompt`` and a hook on the model's call).
``save_adapter`` writes ``adapter_model.safetensors`` (only the method's tensors and the head) and
``adapter_config.json``; ``load_adapter`` reads our files and PEFT's, patching an unpatched model from the saved config
first, and rejects what does not fit.

Saved layouts are PEFT's where PEFT has the method, so ``peft.PeftModel.from_pretrained`` loads them: LoRA / DoRA /
QLoRA ``base_model.model.<module>.lora_A.weight``, ``.lora_B.weight``, ``.lora_magnitude_vector`` and
``base_model.model.<head param>``; prompt, P-Tuning, prefix and P-Tuning v2 ``prompt_embeddings`` (what the model
sees: encoders and the prefix MLP are folded, as PEFT saves them) and ``base_model.<head param>``. The other methods
save the parameters they added under ``base_model.model.<name>`` (FISH Mask / FAR also their selected indices / rows)
(MAM and UniPELT: their prefix table too) with our config. The method and its options always go into the
safetensors header (``peftkern``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from . import lifecycle
from .methods.adalora import AdaLoraMethod
from .methods.adapters import AdapterDropMethod, AdapterFusionMethod, HoulsbyMethod, MamMethod, PfeifferMethod
from .methods.base import Method, MethodConfig, jsonable
from .methods.lora import DoraMethod, LoraMethod, QLoraMethod
from .methods.prefix_tuning import PrefixTuningMethod, PTuningV2Method
from .methods.prompt_tuning import PromptTuningMethod, PTuningMethod, virtual_tokens
from .methods.selective import BitFitMethod, DiffPruningMethod, FarMethod, FishMaskMethod
from .methods.targets import head_modules
from .methods.unipelt import UniPeltMethod

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# PEFT's task type by the model class's suffix (GPT-2's causal LM is GPT2LMHeadModel; T5 / BART's seq2seq LMs are
# ...ForConditionalGeneration): without it PEFT loads a plain PeftModel, whose forward puts no virtual tokens in
_TASKS = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM",
          "ForConditionalGeneration": "SEQ_2_SEQ_LM", "ForTokenClassification": "TOKEN_CLS",
          "ForQuestionAnswering": "QUESTION_ANS"}


def _task_type(model: nn.Module) -> Optional[str]:
    name = type(model).__name__
    return next((task for suffix, task in _TASKS.items() if name.endswith(suffix)), None)


# --------------------------------------------------------------------------------------------------- registry
METHODS: dict[str, Method] = {
    "lora": LoraMethod(),
    "dora": DoraMethod(),
    "qlora": QLoraMethod(),
    "prompt_tuning": PromptTuningMethod(),
    "p_tuning": PTuningMethod(),
    "prefix_tuning": PrefixTuningMethod(),
    "p_tuning_v2": PTuningV2Method(),
    "adapter_houlsby": HoulsbyMethod(),
    "adapter_pfeiffer": PfeifferMethod(),
    "adapter_drop": AdapterDropMethod(),
    "adapter_fusion": AdapterFusionMethod(),
    "adalora": AdaLoraMethod(),
    "bitfit": BitFitMethod(),
    "diff_pruning": DiffPruningMethod(),
    "fish_mask": FishMaskMethod(),
    "far": FarMethod(),
    "unipelt": UniPeltMethod(),
    "mam": MamMethod(),
}


def _record(model: nn.Module) -> dict:
    record = getattr(model, "peftkern_config", None)
    if record is None:
        raise ValueError("model was not patched by peftkern.patch (no peftkern_config)")
    return record


# --------------------------------------------------------------------------------------------------- public API
def patch(model: nn.Module, method: str | MethodConfig = "lora", calibration_data=None, **options) -> nn.Module:
    """Add ``method``'s parameters to ``model`` in place and freeze everything else but the task head; returns
    ``model``. ``method``: a name of ``METHODS`` with its options as keywords (``pk.patch(model, "lora", r=4)``) or a
    config object (``pk.patch(model, pk.LoraConfig(r=4))``); each method's options: its config class."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    name, config = _method_config(method, options)
    if getattr(model, "peftkern_config", None) is not None:
        raise ValueError(f"model is already patched (method {model.peftkern_config['method']!r})")
    spec = METHODS[name]
    if spec.calibrated is True and calibration_data is None:
        raise ValueError(f"method {name!r} needs calibration_data (an iterable of input batches with labels)")
    if not spec.calibrated and calibration_data is not None:
        raise ValueError(f"method {name!r} takes no calibration_data")
    return _apply(model, name, config, lambda heads: spec.apply(model, config, heads, calibration_data))


def _method_config(method: str | MethodConfig, options: dict) -> tuple[str, MethodConfig]:
    """(name, config) of ``patch``'s ``method`` and options; a config object is copied, so what the method resolves
    from the model (set on its config) stays off the caller's."""
    if isinstance(method, MethodConfig):
        if options:
            raise ValueError(f"options {sorted(options)} given beside a config object; set them in the config")
        name = next((n for n, m in METHODS.items() if type(method) is m.config_class), None)
        if name is None:
            raise TypeError(f"method: {type(method).__name__} is the config of no method of peftkern.patching.METHODS")
        return name, dataclasses.replace(method)
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    return method, METHODS[method].config_class.from_dict(options)


def _apply(model: nn.Module, method: str, config: MethodConfig, apply: Callable[[list[str]], dict]) -> nn.Module:
    """``apply(heads)`` with what ``merge`` / ``unpatch`` / ``disable`` undo tracked, then the record
    ``model.peftkern_config`` (method, options, heads, added parameters and what ``apply`` returned)."""
    heads = head_modules(model, config.modules_to_save)
    # the base's parameters stay referenced until the comparison, so a freed one's id() cannot come back as a new one;
    # a base wrapped by a layer changes its name but not its object, a base swapped for its NF4 form keeps its name
    base = dict(model.named_parameters())
    base_ids = {id(p) for p in base.values()}
    tracker = lifecycle.Tracker(model)
    record = apply(heads)
    added = [n for n, p in model.named_parameters() if id(p) not in base_ids and n not in base]
    del base
    model.peftkern_config = {"method": method, "options": config.to_dict(), "heads": heads, "added": added, **record}
    tracker.finish(model)
    return model


def _expected(model: nn.Module, record: dict) -> dict[str, torch.Tensor]:
    spec = METHODS[record["method"]]
    out = dict(spec.tensors(model, record))
    for head in record["heads"]:
        for name, p in model.get_submodule(head).named_parameters():
            out[f"{spec.head_prefix}{head}.{name}"] = p
    return out


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: Optional[str] = None) -> Path:
    """Write the method's tensors and the head to ``directory/adapter_model.safetensors`` and ``adapter_config.json``
    beside it (PEFT's, where PEFT has the method); ``adapter_name``: that named adapter's instead (no head). Returns
    the weights' path."""
    from safetensors.torch import save_file

    record = lifecycle.adapter_record(model, adapter_name or "default")
    tensors = {k: v.detach().contiguous().clone() for k, v in _expected(model, record).items()}
    meta = {"method": record["method"], "options": jsonable(record["options"])}
    peft_config = METHODS[record["method"]].peft_config(model, record)
    config = {"task_type": _task_type(model), "inference_mode": True, "modules_to_save": record["heads"] or None,
              "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
              **(peft_config if peft_config is not None else {"peft_type": None, "peftkern": meta})}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    path = out / WEIGHTS_NAME
    save_file(tensors, str(path), metadata={"format": "pt", "peftkern": json.dumps(meta)})
    return path


def _from_peft_config(cfg: dict, model: nn.Module) -> tuple[str, dict]:
    """(method, options) that rebuild what a PEFT adapter_config.json describes."""
    kind = cfg.get("peft_type")
    saved = tuple(cfg.get("modules_to_save") or ())  # matched by name suffix, as PEFT does
    heads = [n for n, _ in model.named_modules() if n and n.endswith(saved)]
    if kind == "LORA":
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise ValueError("LoRA adapters with rank_pattern / alpha_pattern are not supported")
        opts = {k: cfg[k] for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules") if k in cfg}
        return ("dora" if cfg.get("use_dora") else "lora"), {**opts, "modules_to_save": list(dict.fromkeys(heads))}
    opts = {"num_virtual_tokens": cfg["num_virtual_tokens"], "modules_to_save": list(dict.fromkeys(heads))}
    if kind == "PROMPT_TUNING":
        return "prompt_tuning", opts
    if kind == "P_TUNING":
        return "p_tuning", {**opts, "encoder": str(cfg.get("encoder_reparameterization_type", "MLP")).lower()}
    if kind == "PREFIX_TUNING":
        return "p_tuning_v2", opts  # the saved table is the MLP's output
    raise ValueError(f"adapter peft_type {kind!r} is not supported; supported: LORA, PROMPT_TUNING, P_TUNING, "
                     f"PREFIX_TUNING")


def load_adapter(model: nn.Module, directory: str | os.PathLike, method: Optional[str] = None,
                 adapter_name: Optional[str] = None, **options) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` or by PEFT's ``save_pretrained`` into ``model``.

    An unpatched model is patched first from the saved config (``method`` / ``options`` override it: e.g.
    ``method="qlora"`` puts a PEFT LoRA adapter on NF4 weights). Missing or unexpected tensors and shape mismatches
    raise ``ValueError``. ``adapter_name`` (other than ``"default"``, the first adapter's name): a LoRA-family
    adapter added beside those a lora / dora / qlora model holds (``pk.set_adapter`` activates it; see
    ``peftkern.lifecycle``). Returns the (patched) model."""
    if adapter_name not in (None, "default"):
        if method is not None or options:
            raise ValueError(f"a named adapter takes its method and options from its file; got method={method!r}, "
                             f"options {sorted(options)}")
        return lifecycle.load_named(model, directory, adapter_name)
    tensors, config, saved = read_adapter(directory)
    if getattr(model, "peftkern_config", None) is None:
        name, opts = (saved["method"], saved["options"]) if saved else _from_peft_config(config, model)
        name = method or name
        if name not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
        spec = METHODS[name]
        cfg = spec.config_class.from_dict({**{k: v for k, v in opts.items() if k in spec.defaults}, **options})
        model = _apply(model, name, cfg, lambda heads: spec.rebuild(model, cfg, heads, tensors))
    elif method is not None and method != model.peftkern_config["method"]:
        raise ValueError(f"method {method!r} does not match the model's ({model.peftkern_config['method']!r})")
    record = lifecycle.adapter_record(model, "default")
    expected = _expected(model, record)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter in {str(directory)!r} does not fit the model: missing {missing[:4]}"
                         f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{'...' if len(unexpected) > 4 else ''}")
    bad = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
           if tuple(tensors[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"adapter shapes do not match the model: {bad[:4]}")
    with torch.no_grad():
        for k, v in expected.items():
            if k == "prompt_embeddings":  # a folded table, not a live parameter
                module = virtual_tokens(model)
                module.load_prompt_embeddings(tensors[k].to(module.embedding.weight.dtype))
            else:
                v.copy_(tensors[k])
    return model


def read_adapter(directory) -> tuple[dict[str, torch.Tensor], dict, Optional[dict]]:
    """(tensors, adapter_config.json, peftkern's saved method and options or None for a PEFT file)."""
    from safetensors import safe_open

    directory = Path(directory)
    if not (directory / WEIGHTS_NAME).is_file() or not (directory / CONFIG_NAME).is_file():
        raise ValueError(f"directory {str(directory)!r} must hold {WEIGHTS_NAME} and {CONFIG_NAME}")
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved = json.loads(meta["peftkern"]) if "peftkern" in meta else None
    return tensors, json.loads((directory / CONFIG_NAME).read_text()), saved
