"""One entry point per method: ``pk.patch(model, method, calibration_data=None, **options)`` for the 18 methods of
``METHODS``, and ``save_adapter`` / ``load_adapter``.

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

import json
import os
import re
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from . import lifecycle
from .methods.adapters import AdapterFusion, add_adapters, add_serial, transformer_sites
from .methods.adalora import AdaLoRAAllocator, prepare_adalora
from .methods.prefix_tuning import PrefixTuning, add_prefix
from .methods.prompt_tuning import add_prompt, virtual_tokens
from .methods.selective import (bitfit, diff_pruning, diff_pruning_l0, diff_pruning_to_sparse, far_select,
                                fish_mask)
from .methods.sites import find_layers
from .methods.targets import freeze_except, replace_module, target_matcher
from .methods.unipelt import qv_targets, unipelt
from .nn import BottleneckAdapter, LoRALinear, QLoRALinear, RowDiffLinear, SparseDiffLinear
from .nn.lora import is_conv1d, linear_features

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
HEAD_NAMES = ("classifier", "score")  # PEFT's modules_to_save for sequence classification
# PEFT's task type by the model class's suffix (GPT-2's causal LM is GPT2LMHeadModel; T5 / BART's seq2seq LMs are
# ...ForConditionalGeneration): without it PEFT loads a plain PeftModel, whose forward puts no virtual tokens in
_TASKS = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM",
          "ForConditionalGeneration": "SEQ_2_SEQ_LM", "ForTokenClassification": "TOKEN_CLS",
          "ForQuestionAnswering": "QUESTION_ANS"}


def _heads(model: nn.Module, modules_to_save) -> list[str]:
    """The task head's modules: by default the model's children whose names end with a HEAD_NAMES entry, as PEFT's
    modules_to_save matches names by suffix (DistilBERT's ``pre_classifier`` with ``classifier``)."""
    if modules_to_save is None:
        return [n for n, m in model.named_children() if n.endswith(HEAD_NAMES)]
    names = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save)
    for h in names:
        try:
            model.get_submodule(h)
        except AttributeError:
            raise ValueError(f"modules_to_save names {h!r}, which is not a submodule of the model") from None
    return names


def _task_type(model: nn.Module) -> Optional[str]:
    name = type(model).__name__
    return next((task for suffix, task in _TASKS.items() if name.endswith(suffix)), None)


def _is_bnb_4bit(module: nn.Module) -> bool:
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


# --------------------------------------------------------------------------------------------------- LoRA family
def _lora_targets(model: nn.Module, target_modules, heads: list[str], quantized: bool) -> list[str]:
    """Names of the modules to adapt: every ``nn.Linear`` and transformers ``Conv1D`` (and bitsandbytes 4-bit linear
    for QLoRA) for ``"all-linear"`` except the heads and the output embeddings, else those ``target_modules``
    matches."""
    def linear(m):
        return (isinstance(m, nn.Linear) or is_conv1d(m)) and (quantized or not _is_bnb_4bit(m))

    def in_head(n):  # the heads train whole; PEFT puts no LoRA inside its modules_to_save either
        return any(n == h or n.startswith(h + ".") for h in heads)

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if target_modules == "all-linear":
        names = [n for n, m in model.named_modules() if linear(m) and m is not out_emb and not in_head(n)]
    else:
        match = target_matcher(target_modules)
        names = [n for n, m in model.named_modules() if n and match(n, m) and not in_head(n)]
        bad = [n for n in names if not linear(model.get_submodule(n))]
        if bad:
            kind = "torch.nn.Linear / transformers Conv1D" + (" or bitsandbytes Linear4bit" if quantized else
                                                               " (use method='qlora' for a 4-bit base)")
            raise ValueError(f"target_modules matched {bad[:3]}, which are not {kind}")
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no linear layer of the model")
    return names


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


def _lora_apply(model, o: dict, use_dora: bool = False, quantize: bool = False):
    heads = _heads(model, o["modules_to_save"])
    names = _lora_targets(model, o["target_modules"], heads, quantize)
    freeze_except(model, heads)
    lora = dict(r=o["r"], lora_alpha=o["lora_alpha"], lora_dropout=o["lora_dropout"], use_rslora=o["use_rslora"],
                adapter_dtype=o["adapter_dtype"])
    full_precision = _kept_in_full_precision(model) if quantize else None
    fan_in_fan_out = any(is_conv1d(model.get_submodule(n)) for n in names)
    for name in names:
        base = model.get_submodule(name)
        if not quantize or (full_precision(name) and not _is_bnb_4bit(base)):
            layer = LoRALinear.from_linear(base, use_dora=use_dora, **lora)
        elif _is_bnb_4bit(base):
            layer = QLoRALinear.from_bnb(base, **lora)
        else:
            layer = QLoRALinear.from_linear(base, blocksize=o["blocksize"], double_quant=o["double_quant"], **lora)
        replace_module(model, name, layer)
    lifecycle.route_adapter_names(model)
    return model, {"targets": names, "heads": heads, "fan_in_fan_out": fan_in_fan_out}


def _lora_tensors(model: nn.Module, record: dict) -> dict[str, torch.Tensor]:
    """The adapter's tensors (the layers' own, or those of the named adapter ``record`` describes)."""
    out = {}
    for name in record["targets"]:
        a = model.get_submodule(name).adapter(record.get("name", "default"))
        out[f"base_model.model.{name}.lora_A.weight"] = a.lora_A
        out[f"base_model.model.{name}.lora_B.weight"] = a.lora_B
        if a.lora_magnitude is not None:
            out[f"base_model.model.{name}.lora_magnitude_vector"] = a.lora_magnitude
    return out


def _lora_peft_config(model: nn.Module, record: dict) -> dict:
    o = record["options"]
    return {"peft_type": "LORA", "r": o.get("r", 8), "lora_alpha": o.get("lora_alpha", 8),
            "lora_dropout": o.get("lora_dropout", 0.0), "use_rslora": o.get("use_rslora", False),
            "use_dora": record["method"] == "dora", "target_modules": sorted(record["targets"]), "bias": "none",
            "fan_in_fan_out": record.get("fan_in_fan_out", False)}


# --------------------------------------------------------------------------------------------------- prompt family
def _prompt_apply(model, o: dict, add: Callable, **add_options):
    heads = _heads(model, o.pop("modules_to_save"))
    freeze_except(model, heads)
    if add is add_prefix:  # on encoder-decoders, the attentions PEFT's prefix reaches, so that PEFT loads the file
        add_options["attentions"] = "peft"
    add(model, **o, **add_options)
    return model, {"heads": heads}


def _prompt_tensors(model: nn.Module, record: dict) -> dict[str, torch.Tensor]:
    module = virtual_tokens(model)
    return {"prompt_embeddings": module.prefix() if isinstance(module, PrefixTuning) else module.prompts()}


def _prompt_peft_config(model: nn.Module, record: dict) -> dict:
    cfg, module = model.config, virtual_tokens(model)
    if isinstance(module, PrefixTuning):
        return {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": module.num_virtual_tokens,
                "token_dim": module.num_kv_heads * module.head_dim, "num_attention_heads": module.num_kv_heads,
                "num_layers": module.num_layers, "num_transformer_submodules": module.num_transformer_submodules,
                "prefix_projection": False}
    return {"peft_type": "P_TUNING" if module.encoder else "PROMPT_TUNING",
            "num_virtual_tokens": module.num_virtual_tokens, "token_dim": module.embedding.weight.shape[1],
            "num_attention_heads": cfg.num_attention_heads, "num_layers": cfg.num_hidden_layers,
            "num_transformer_submodules": module.num_transformer_submodules}


# --------------------------------------------------------------------------------------------------- adapters
def _added_tensors(model: nn.Module, record: dict) -> dict[str, torch.Tensor]:
    """The parameters the method added to the base model, under PEFT's ``base_model.model.`` prefix."""
    params = dict(model.named_parameters())
    return {f"base_model.model.{n}": params[n] for n in record["added"]}


_ADAPTER_OPTIONS = dict(reduction_factor=16, non_linearity="relu", layer_norm=False, modules_to_save=None, sites=None)


def _adapter_apply(model, o: dict, placement: str, **extra):
    heads = _heads(model, o.pop("modules_to_save"))
    freeze_except(model, heads)
    add_adapters(model, placement, **o, **extra)
    return model, {"heads": heads}


def _adapter_drop(model, o: dict):
    if o["skip_layers"] is None:  # resolved here so the saved options rebuild the same layers
        o["skip_layers"] = len(transformer_sites(model, o["sites"])) // 2
    opts = dict(o)
    return _adapter_apply(model, opts, opts.pop("placement"))


def _fusion(model, o: dict):
    """Stage 2: the adapters of earlier ``pk.save_adapter`` runs (directories; or ``num_adapters`` fresh ones, which
    a saved fusion then fills), frozen, under a trainable AdapterFusion at every FFN output."""
    heads = _heads(model, o.pop("modules_to_save"))
    freeze_except(model, heads)
    dirs, n, adapter_opts = o["adapters"], o["num_adapters"], dict(o["adapter_options"] or {})
    if dirs:
        metas = [_read_adapter(d)[2] for d in dirs]
        bad = [m.get("method") for m in metas if m.get("method") not in ("adapter_pfeiffer", "adapter_houlsby")]
        if bad:
            raise ValueError(f"adapters must be saved from adapter_pfeiffer / adapter_houlsby models, got {bad}")
        adapter_opts = {k: v for k, v in metas[0]["options"].items() if k in ("reduction_factor", "non_linearity",
                                                                                "layer_norm")}
        o["adapter_options"], o["num_adapters"], n = adapter_opts, len(dirs), len(dirs)
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ValueError(f"adapter_fusion needs adapters=[2+ directories] or num_adapters >= 2, got {dirs!r} / {n!r}")
    sites = transformer_sites(model, o["sites"])
    d = linear_features(sites[0]["ffn_out"])[1]
    per_site = [_fusion_site(site, d, n, adapter_opts) for site in sites]
    for i, directory in enumerate(dirs or []):
        tensors = _read_adapter(directory)[0]
        for name, adapters in zip([_site_name(model, s) for s in sites], per_site):
            prefix = f"base_model.model.{name}.adapter."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not state:
                raise ValueError(f"{directory}: no adapter at {name} (was it saved from this architecture?)")
            adapters[i].load_state_dict(state)
    o["adapters"] = None  # what was loaded is saved with the fusion; the directories are not needed again
    return model, {"heads": heads}


def _fusion_site(site: dict, hidden: int, n: int, options: dict):
    ref = site["ffn_out"].weight
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    adapters = [BottleneckAdapter(hidden, options.get("reduction_factor", 16), options.get("non_linearity", "relu"),
                                  layer_norm=options.get("layer_norm", False), device=ref.device, dtype=dtype)
                for _ in range(n)]
    add_serial(site["ffn_out"], AdapterFusion(adapters, hidden))
    return adapters


def _site_name(model: nn.Module, site: dict) -> str:
    return next(n for n, m in model.named_modules() if m is site["ffn_out"])


def _mam(model, o: dict):
    """MAM adapter (He et al., 2022): a parallel adapter beside every FFN and prefix tuning on attention."""
    heads = _heads(model, o.pop("modules_to_save"))
    freeze_except(model, heads)
    prefix = dict(num_virtual_tokens=o.pop("num_virtual_tokens"), prefix_projection=o.pop("prefix_projection"),
                  sites=o["sites"])
    add_adapters(model, "parallel", **o)
    add_prefix(model, **prefix)
    return model, {"heads": heads}


# --------------------------------------------------------------------------------------------------- AdaLoRA, selective
def _adalora(model, o: dict):
    """AdaLoRA's SVD-form layers; with ``total_step`` the rank allocator rides along as ``model.peftkern_allocator``
    (call its ``update_and_allocate(step)`` after each backward)."""
    heads = _heads(model, o["modules_to_save"])
    names = _lora_targets(model, o["target_modules"], heads, False)
    freeze_except(model, heads)
    prepare_adalora(model, names, init_r=o["init_r"], lora_alpha=o["lora_alpha"], lora_dropout=o["lora_dropout"],
                    trainable=heads)
    if o["total_step"] is not None:
        model.peftkern_allocator = AdaLoRAAllocator(model, target_r=o["target_r"], total_step=o["total_step"],
                                                    tinit=o["tinit"], tfinal=o["tfinal"], deltaT=o["deltaT"])
    return model, {"heads": heads}


def _bitfit(model, o: dict):
    heads = _heads(model, o["modules_to_save"])
    trainable = bitfit(model, heads)
    biases = [n for n in trainable if not any(n.startswith(h + ".") for h in heads)]
    if not biases:
        raise ValueError("the model has no bias terms: BitFit has nothing to train (a Llama needs attention_bias / "
                         "mlp_bias in its config)")
    return model, {"heads": heads, "biases": biases}


def _bitfit_tensors(model: nn.Module, record: dict) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {f"base_model.model.{n}": params[n] for n in record["biases"]}


def _diff_pruning(model, o: dict):
    """Diff Pruning (Guo et al., 2021). Without ``calibration_data``: gated dense diffs to train with
    ``pk.methods.diff_pruning_l0(model)`` times a weight added to the loss. With it: that stage runs on the batches
    (``steps`` passes, AdamW at ``lr``, L0 weight ``l0_weight``), the diffs are projected to their top ``density``
    entries, and the model trains those as sparse diffs (``sparse_diff_linear``) from there."""
    heads = _heads(model, o["modules_to_save"])
    names = _lora_targets(model, o["target_modules"], heads, False)
    diff_pruning(model, target="|".join(re.escape(n) for n in names), trainable_head=heads)
    data = o.get("calibration_data")
    if data is not None:
        head_params = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
        gated = [p for p in model.parameters() if p.requires_grad and id(p) not in head_params]
        opt = torch.optim.AdamW(gated, lr=o["lr"], weight_decay=0.0)
        for _ in range(o["steps"]):
            for batch in data:
                (model(**batch).loss + o["l0_weight"] * diff_pruning_l0(model)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad = None
        diff_pruning_to_sparse(model, o["density"])
        freeze_except(model, heads)
        for m in model.modules():
            if isinstance(m, SparseDiffLinear):
                m.values.requires_grad_(True)
    return model, {"heads": heads}


def _rebuild_diff_pruning(model, o: dict, tensors: dict):
    """A saved projected (sparse) Diff Pruning rebuilds at its indices; a saved gated one is just applied."""
    if any(k.endswith(".indices") for k in tensors):
        return _rebuild_sparse(SparseDiffLinear.from_linear, "indices")(model, o, tensors)
    return _diff_pruning(model, o)


def _samples(calibration_data):
    """Single-row batches out of ``calibration_data`` (dicts of [B, ...] tensors, or such dicts one row each)."""
    for batch in calibration_data:
        if not isinstance(batch, dict):
            raise TypeError(f"calibration_data must yield dicts of model inputs, got {type(batch).__name__}")
        n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
        for i in range(n):
            yield {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _fish_mask(model, o: dict):
    heads = _heads(model, o["modules_to_save"])
    names = _lora_targets(model, o["target_modules"], heads, False)
    fish_mask(model, _samples(o["calibration_data"]), lambda m, sample: m(**sample).loss, o["density"],
              target="|".join(re.escape(n) for n in names), trainable_head=heads)
    return model, {"heads": heads}


def _far(model, o: dict):
    """FAR: priming steps on ``calibration_data`` train the FFN linears (``target_modules``; None: every layer's FFN
    input and output linears, as the model's sites give them), the rows that moved most are kept as small dense
    blocks, and the primed weights are restored."""
    heads = _heads(model, o["modules_to_save"])
    if o["target_modules"] is None:
        names = [n for layer in find_layers(model) for n in (*layer.ffn_in, layer.ffn_out)]
    else:
        names = _lora_targets(model, o["target_modules"], heads, False)
    weights = [model.get_submodule(n).weight for n in names]
    primed = {n: w.detach().clone() for n, w in zip(names, weights)}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    opt = torch.optim.AdamW(weights, lr=o["priming_lr"], weight_decay=0.0)
    steps = 0
    for batch in o["calibration_data"]:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    if steps == 0:
        raise ValueError("calibration_data yielded no batch")
    far_select(model, primed, o["fraction"], trainable_head=heads)
    return model, {"heads": heads}


def _structure_tensors(layer_type: type, buffer: str) -> Callable:
    """The added parameters plus each selected layer's ``buffer`` (its indices / rows), which rebuild the layers."""
    def tensors(model, record):
        out = _added_tensors(model, record)
        for name, m in model.named_modules():
            if isinstance(m, layer_type):
                out[f"base_model.model.{name}.{buffer}"] = getattr(m, buffer)
        return out
    return tensors


def _rebuild_sparse(layer_cls, buffer: str) -> Callable:
    """``apply`` from a saved file: the layers at the saved ``buffer`` positions, without calibration."""
    def rebuild(model, o: dict, tensors: dict):
        heads = _heads(model, o["modules_to_save"])
        prefix, suffix = "base_model.model.", "." + buffer
        chosen = {k[len(prefix):-len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)}
        freeze_except(model, heads)
        for name, idx in chosen.items():
            replace_module(model, name, layer_cls(model.get_submodule(name), idx))
        return model, {"heads": heads}
    return rebuild


def _unipelt(model, o: dict):
    """UniPELT; its gated LoRA on ``target_modules`` (None: every self-attention's query and value projections, or
    their slices of a fused qkv projection), its adapters and prefix at the model's sites (``sites``)."""
    heads = _heads(model, o.pop("modules_to_save"))
    target_modules = o.pop("target_modules")
    if target_modules is None:
        targets = qv_targets(find_layers(model, o["sites"]))
    else:
        targets = _lora_targets(model, target_modules, heads, False)
    freeze_except(model, heads)
    return unipelt(model, lora_targets=targets, **o), {"heads": heads}


# --------------------------------------------------------------------------------------------------- registry
class Method(NamedTuple):
    apply: Callable[[nn.Module, dict], tuple[nn.Module, dict]]  # (model, options) -> (patched, record)
    defaults: dict  # every option and its default
    tensors: Callable[[nn.Module, dict], dict]  # the method's tensors under their saved names (live)
    peft_config: Optional[Callable[[nn.Module, dict], dict]] = None  # PEFT's adapter_config.json fields, if PEFT has it
    head_prefix: str = "base_model.model."  # where PEFT saves the head's parameters
    calibrated: bool | str = False  # True: needs calibration_data (batches of inputs with labels); "optional"
    rebuild: Optional[Callable[[nn.Module, dict, dict], tuple[nn.Module, dict]]] = None  # apply from saved tensors


_LORA_OPTIONS = dict(r=8, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", use_rslora=False,
                     modules_to_save=None, adapter_dtype=None)
_PROMPT_OPTIONS = dict(num_virtual_tokens=20, modules_to_save=None)
_PROMPT = dict(tensors=_prompt_tensors, peft_config=_prompt_peft_config, head_prefix="base_model.")

METHODS: dict[str, Method] = {
    "lora": Method(_lora_apply, _LORA_OPTIONS, _lora_tensors, _lora_peft_config),
    "dora": Method(lambda m, o: _lora_apply(m, o, use_dora=True), _LORA_OPTIONS, _lora_tensors, _lora_peft_config),
    "qlora": Method(lambda m, o: _lora_apply(m, o, quantize=True), {**_LORA_OPTIONS, "blocksize": 64,
                                                                     "double_quant": True},
                    _lora_tensors, _lora_peft_config),
    "prompt_tuning": Method(lambda m, o: _prompt_apply(m, o, add_prompt),
                            {**_PROMPT_OPTIONS, "init": "random", "init_text": None, "tokenizer": None}, **_PROMPT),
    "p_tuning": Method(lambda m, o: _prompt_apply(m, o, add_prompt),
                       {**_PROMPT_OPTIONS, "encoder": "mlp", "encoder_hidden_size": None, "encoder_num_layers": 2,
                        "encoder_dropout": 0.0}, **_PROMPT),
    "prefix_tuning": Method(lambda m, o: _prompt_apply(m, o, add_prefix),
                            {**_PROMPT_OPTIONS, "prefix_projection": True, "encoder_hidden_size": None, "sites": None},
                            **_PROMPT),
    "p_tuning_v2": Method(lambda m, o: _prompt_apply(m, o, add_prefix, prefix_projection=False),
                          {**_PROMPT_OPTIONS, "sites": None}, **_PROMPT),
    "adapter_houlsby": Method(lambda m, o: _adapter_apply(m, o, "houlsby"),
                              {**_ADAPTER_OPTIONS, "non_linearity": "swish"}, _added_tensors),
    "adapter_pfeiffer": Method(lambda m, o: _adapter_apply(m, o, "pfeiffer"), _ADAPTER_OPTIONS, _added_tensors),
    "adapter_drop": Method(_adapter_drop, {**_ADAPTER_OPTIONS, "placement": "pfeiffer", "skip_layers": None,
                                           "drop_prob": 0.0}, _added_tensors),
    "adapter_fusion": Method(_fusion, dict(adapters=None, num_adapters=None, adapter_options=None,
                                           modules_to_save=None, sites=None), _added_tensors),
    "adalora": Method(_adalora, dict(init_r=12, target_r=8, lora_alpha=8, lora_dropout=0.0,
                                     target_modules="all-linear", total_step=None, tinit=0, tfinal=0, deltaT=1,
                                     modules_to_save=None), _added_tensors),
    "bitfit": Method(_bitfit, dict(modules_to_save=None), _bitfit_tensors),
    "diff_pruning": Method(_diff_pruning, dict(target_modules="all-linear", density=0.005, l0_weight=1e-4, lr=1e-2,
                                               steps=1, modules_to_save=None),
                           _structure_tensors(SparseDiffLinear, "indices"), calibrated="optional",
                           rebuild=_rebuild_diff_pruning),
    "fish_mask": Method(_fish_mask, dict(density=0.005, target_modules="all-linear", modules_to_save=None),
                        _structure_tensors(SparseDiffLinear, "indices"), calibrated=True,
                        rebuild=_rebuild_sparse(SparseDiffLinear.from_linear, "indices")),
    "far": Method(_far, dict(fraction=0.1, target_modules=None, priming_lr=1e-4, modules_to_save=None),
                  _structure_tensors(RowDiffLinear, "rows"), calibrated=True,
                  rebuild=_rebuild_sparse(RowDiffLinear, "rows")),
    "unipelt": Method(_unipelt, dict(r=8, lora_alpha=16, target_modules=None, sites=None,
                                     num_virtual_tokens=10, reduction_factor=16, non_linearity="relu",
                                     modules_to_save=None), _added_tensors),
    "mam": Method(_mam, dict(num_virtual_tokens=30, prefix_projection=False, reduction_factor=4,
                             non_linearity="relu", scale=4.0, modules_to_save=None, sites=None), _added_tensors),
}


def _record(model: nn.Module) -> dict:
    record = getattr(model, "peftkern_config", None)
    if record is None:
        raise ValueError("model was not patched by peftkern.patch (no peftkern_config)")
    return record


# --------------------------------------------------------------------------------------------------- public API
def patch(model: nn.Module, method: str = "lora", calibration_data=None, **options) -> nn.Module:
    """Add ``method``'s parameters to ``model`` in place and freeze everything else but the task head; returns
    ``model``. ``options``: the method's (``pk.patching.METHODS``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if getattr(model, "peftkern_config", None) is not None:
        raise ValueError(f"model is already patched (method {model.peftkern_config['method']!r})")
    spec = METHODS[method]
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {sorted(spec.defaults)}")
    if spec.calibrated is True and calibration_data is None:
        raise ValueError(f"method {method!r} needs calibration_data (an iterable of input batches with labels)")
    if not spec.calibrated and calibration_data is not None:
        raise ValueError(f"method {method!r} takes no calibration_data")

    def apply(m, o):
        if calibration_data is not None:
            o["calibration_data"] = calibration_data
        return spec.apply(m, o)

    return _apply(model, method, {**spec.defaults, **options}, apply)


def _apply(model: nn.Module, method: str, opts: dict, apply: Callable) -> nn.Module:
    # the base's parameters stay referenced until the comparison, so a freed one's id() cannot come back as a new one;
    # a base wrapped by a layer changes its name but not its object, a base swapped for its NF4 form keeps its name
    base = dict(model.named_parameters())
    base_ids = {id(p) for p in base.values()}
    tracker = lifecycle.Tracker(model)  # what merge / unpatch / disable undo
    applied = dict(opts)
    patched, record = apply(model, applied)
    opts.update({k: v for k, v in applied.items() if k in opts})  # what the method resolved (e.g. fusion's sizes)
    added = [n for n, p in patched.named_parameters() if id(p) not in base_ids and n not in base]
    del base
    patched.peftkern_config = {"method": method, "options": opts, "heads": [], "added": added, **record}
    tracker.finish(patched)
    return patched


def _expected(model: nn.Module, record: dict) -> dict[str, torch.Tensor]:
    spec = METHODS[record["method"]]
    out = dict(spec.tensors(model, record))
    for head in record["heads"]:
        for name, p in model.get_submodule(head).named_parameters():
            out[f"{spec.head_prefix}{head}.{name}"] = p
    return out


def _jsonable(options: dict) -> dict:
    """The options JSON can hold (dtypes by name); others (a tokenizer, a callable target) are dropped."""
    out = {}
    for k, v in options.items():
        if isinstance(v, torch.dtype):
            v = str(v).replace("torch.", "")
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: Optional[str] = None) -> Path:
    """Write the method's tensors and the head to ``directory/adapter_model.safetensors`` and ``adapter_config.json``
    beside it (PEFT's, where PEFT has the method); ``adapter_name``: that named adapter's instead (no head). Returns
    the weights' path."""
    from safetensors.torch import save_file

    record = lifecycle.adapter_record(model, adapter_name or "default")
    tensors = {k: v.detach().contiguous().clone() for k, v in _expected(model, record).items()}
    meta = {"method": record["method"], "options": _jsonable(record["options"])}
    peft_config = METHODS[record["method"]].peft_config
    config = {"task_type": _task_type(model), "inference_mode": True, "modules_to_save": record["heads"] or None,
              "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
              **(peft_config(model, record) if peft_config else {"peft_type": None, "peftkern": meta})}
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
    tensors, config, saved = _read_adapter(directory)
    if getattr(model, "peftkern_config", None) is None:
        if saved:
            name, opts = saved["method"], saved["options"]
            if isinstance(opts.get("adapter_dtype"), str):
                opts["adapter_dtype"] = getattr(torch, opts["adapter_dtype"])
        else:
            name, opts = _from_peft_config(config, model)
        name = method or name
        if name not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
        spec = METHODS[name]
        unknown = sorted(set(options) - set(spec.defaults))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method {name!r}; valid options: {sorted(spec.defaults)}")
        opts = {**spec.defaults, **{k: v for k, v in opts.items() if k in spec.defaults}, **options}
        if spec.rebuild is not None:  # the saved structure (selected entries) instead of a calibration pass
            model = _apply(model, name, opts, lambda m, o: spec.rebuild(m, o, tensors))
        else:
            model = patch(model, name, **opts)
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


def _read_adapter(directory) -> tuple[dict[str, torch.Tensor], dict, Optional[dict]]:
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
