"""The life of a ``pk.patch`` model after training, as PEFT users know it: :func:`merge` (PEFT's
``merge_and_unload``), :func:`unpatch` (``unload``), :func:`disable` (``disable_adapter``), and several named LoRA
adapters in one model (``pk.load_adapter(..., adapter_name=)``, :func:`set_adapter`, :func:`delete_adapter`,
``model(**batch, adapter_names=[...])``).

``pk.patch`` records what it changes (:class:`Changes`, kept on the patched model as ``_peftkern_changes``) so that
these undo exactly that and nothing a user did to the model: the modules it replaced (kept when they hold nothing the
patched layers do not share, i.e. always but for QLoRA's full-precision weights), the children and forward hooks it
added to base modules, each config's attention implementation, ``requires_grad`` of every base parameter, and copies
of the base parameters it leaves trainable in place (the task head, BitFit's biases: small).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from . import patching
from .methods.prompt_tuning import virtual_tokens
from .methods.selective import DiffPruningLinear
from .methods.targets import replace_module
from .nn import LoRALinear, QLoRALinear, RowDiffLinear, SparseDiffLinear
from .nn.lora import NamedAdapters

_HOOKS = ("_forward_hooks", "_forward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
_ATTRIBUTES = ("peftkern_config", "peftkern_allocator", "_peftkern_changes")  # what patch sets on the model
_NAMED = ("lora", "dora", "qlora")  # the methods whose models hold several named adapters
_FOLDABLE = (LoRALinear, QLoRALinear, SparseDiffLinear, RowDiffLinear, DiffPruningLinear)


@dataclasses.dataclass
class Changes:
    """What ``pk.patch`` changed in the base model (names relative to the transformers model)."""
    replaced: dict[str, Optional[nn.Module]]  # module name -> the module it replaced, None where not kept
    children: list[tuple[nn.Module, str]]  # (base module, name of the child patch added to it)
    hooks: list[tuple[nn.Module, str, int]]  # (base module, "_forward_hooks" | "_forward_pre_hooks", hook id)
    requires_grad: dict[str, bool]  # every base parameter's flag before patch
    trained_in_place: dict[str, torch.Tensor]  # base parameters left trainable: their values at patch time
    attention: list[tuple[object, Optional[str]]]  # (config, its _attn_implementation_internal before patch)


def _configs(model: nn.Module) -> list:
    """Every config of ``model``'s modules and their sub-configs, once each (where the attention choice lives)."""
    todo = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation_internal")]
    seen, out = set(), []
    while todo:
        config = todo.pop()
        if id(config) not in seen:
            seen.add(id(config))
            out.append(config)
            todo += [getattr(config, k) for k in getattr(config, "sub_configs", {}) if getattr(config, k, None)]
    return out


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


class Tracker:
    """The model as it is before a method is applied; :meth:`finish` turns the difference into :class:`Changes`.
    Holds references only (no copies) until then."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters())
        self.requires_grad = {n: p.requires_grad for n, p in self.params.items()}
        self.children = {n: set(m._modules) for n, m in self.modules.items()}
        self.hooks = {n: {kind: set(getattr(m, kind)) for kind in _HOOKS} for n, m in self.modules.items()}
        self.attention = [(c, c._attn_implementation_internal) for c in _configs(model)]

    def finish(self, patched: nn.Module) -> Changes:
        """Record on ``patched`` (the model given to :class:`Tracker`) what the method changed in it."""
        held = _storages(itertools.chain(patched.parameters(), patched.buffers()))
        replaced: dict[str, Optional[nn.Module]] = {}
        children, hooks = [], []
        for name, module in self.modules.items():
            if any(name[:i] in replaced for i, c in enumerate(name) if c == "."):
                continue
            if name and patched.get_submodule(name) is not module:
                # a module whose tensors the patched model no longer holds is let go (QLoRA frees the fp weights)
                own = _storages(itertools.chain(module.parameters(), module.buffers()))
                replaced[name] = module if own <= held else None
                continue
            children += [(module, c) for c in module._modules if c not in self.children[name]]
            hooks += [(module, kind, i) for kind in _HOOKS for i in getattr(module, kind)
                      if i not in self.hooks[name][kind]]
        trained = {n: p.detach().clone() for n, p in patched.named_parameters()
                   if p.requires_grad and self.params.get(n) is p}
        changes = Changes(replaced, children, hooks, self.requires_grad, trained, self.attention)
        patched._peftkern_changes = changes
        return changes


def _changes(model: nn.Module) -> Changes:
    patching._record(model)
    changes = getattr(model, "_peftkern_changes", None)
    if changes is None:
        raise ValueError("model has no record of what pk.patch changed (_peftkern_changes); patch it with pk.patch")
    return changes


def _base_form(layer: nn.Module, original: Optional[nn.Module]) -> nn.Module:
    """What stands for the base where ``layer`` is: the module it replaced, or QLoRA's NF4 base alone."""
    if original is not None:
        return original
    if isinstance(layer, QLoRALinear):
        return layer.base_layer()
    raise RuntimeError(f"no base module was kept for a {type(layer).__name__}")


def _unmerge(model: nn.Module, changes: Changes) -> None:
    """Layers merged by hand (``LoRALinear.merge()``) give their base weights back first (exactly)."""
    for name in changes.replaced:
        for module in model.get_submodule(name).modules():
            if callable(getattr(module, "unmerge", None)):
                module.unmerge()


def _fold(layer: nn.Module, original: Optional[nn.Module], dtype: Optional[torch.dtype]) -> nn.Module:
    """The plain module with ``layer``'s update folded into its weight (in place where the weight is shared)."""
    if isinstance(layer, QLoRALinear):
        return layer.merge(dtype)
    if isinstance(layer, (LoRALinear, DiffPruningLinear)):
        original.weight.copy_(layer.merged_weight())
    elif isinstance(layer, (SparseDiffLinear, RowDiffLinear)):
        layer.merge()  # in place into the shared weight
    return original


def _why_not_foldable(model: nn.Module, changes: Changes) -> Optional[str]:
    if virtual_tokens(model) is not None:
        return "its virtual tokens / prefix live outside the weights"
    if any(_method_hooks(changes)) or changes.children:
        return "its adapters are modules of their own, not a weight update"
    odd = [type(m).__name__ for m in map(model.get_submodule, changes.replaced) if type(m) not in _FOLDABLE]
    if odd:
        return f"its {odd[0]} layers are not a weight update"
    return None


def _detach(model: nn.Module, changes: Changes) -> None:
    """Remove what patch added besides the layers (children, hooks, attention choice, flags, attributes)."""
    for module, child in changes.children:
        delattr(module, child)
    for module, kind, hook_id in changes.hooks:
        getattr(module, kind).pop(hook_id, None)
        for flags in _HOOK_FLAGS:
            getattr(module, flags, {}).pop(hook_id, None)
    for config, value in changes.attention:
        config._attn_implementation_internal = value
    for name, p in model.named_parameters():
        if name in changes.requires_grad and p.is_floating_point():
            p.requires_grad_(changes.requires_grad[name])
    for module in model.modules():
        module.__dict__.pop("peftkern_prefix", None)
        module.__dict__.pop("peftkern_prefix_gate", None)
    for attr in _ATTRIBUTES:
        model.__dict__.pop(attr, None)


def unpatch(model: nn.Module) -> nn.Module:
    """The model as it was before ``pk.patch`` (PEFT's ``unload``): every replaced module put back, hooks, added
    modules and the prefix attention registration removed (``config._attn_implementation`` as before), each
    parameter's ``requires_grad`` as before, and the base parameters patch left trainable (the task head, BitFit's
    biases) reset to their values at patch time: every base weight bit-identical, the same ``state_dict`` keys.
    Returns the model (the same object); everything the method trained is lost.

    QLoRA: patch quantized the base and kept no full-precision copy (that memory is what QLoRA saves), so its
    layers come back as the 4-bit base alone, a :class:`pk.nn.NF4Linear` holding the same codes (state_dict in
    bitsandbytes' 4-bit format), or the very ``bitsandbytes.nn.Linear4bit`` the model had where patch took one.
    """
    changes = _changes(model)
    _unmerge(model, changes)
    for name, original in changes.replaced.items():
        replace_module(model, name, _base_form(model.get_submodule(name), original))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in changes.trained_in_place.items():
            params[name].copy_(value)
    _detach(model, changes)
    return model


def merge(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Fold the method into the weights and return the plain transformers model (PEFT's ``merge_and_unload``): no
    peftkern module, hook or record left, ``requires_grad`` as before patch, the same outputs (eval).

    LoRA, rsLoRA, DoRA and AdaLoRA add their update into the base weight in place; Diff Pruning (with its eval
    gates), FISH Mask and FAR add their sparse / row diffs; BitFit's biases and a trained task head already are
    the model's own. QLoRA's layers become ``nn.Linear`` in ``dtype`` (default the layer's compute dtype, else the
    dtype its weight was quantized from) holding dequant(W) + the update, rounded once. Methods that are not a
    weight update (prompt, prefix, adapters, AdapterFusion, MAM, UniPELT) raise ``ValueError``."""
    changes = _changes(model)
    method = model.peftkern_config["method"]
    reason = _why_not_foldable(model, changes)
    if reason:
        raise ValueError(f"method {method!r} cannot be merged into the weights: {reason} "
                         f"(pk.unpatch gives the base model back)")
    if dtype is not None and method != "qlora":
        raise ValueError(f"dtype chooses the dtype of QLoRA's dequantized bases; method {method!r} merges into the "
                         f"base weights as they are")
    _unmerge(model, changes)
    with torch.no_grad():
        for name, original in changes.replaced.items():
            replace_module(model, name, _fold(model.get_submodule(name), original, dtype))
    _detach(model, changes)
    return model


def _method_hooks(changes: Changes) -> Iterator[tuple[dict, int, Callable]]:
    """(hook dict, id, hook) of the hooks patch added that compute the method (not the adapter_names routing)."""
    for module, kind, hook_id in changes.hooks:
        hook = getattr(module, kind).get(hook_id)
        if hook is not None and hook not in (_route_adapter_names, _end_routing):
            yield getattr(module, kind), hook_id, hook


def _passthrough(*args) -> None:
    """A forward (pre-)hook that changes nothing."""
    return None


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[nn.Module]:
    """``with pk.disable(model):`` the base model's outputs (PEFT's ``disable_adapter``): within the block the
    replaced modules stand in their place again (QLoRA: the 4-bit base alone), patch's hooks pass through (no
    virtual tokens, no prefix), the attention implementation is the base's, and the base
    parameters the method trains in place (head, BitFit's biases) hold their values from patch time. All of it comes
    back when the block ends, also on an exception (what the block did to those in-place parameters is lost).
    Layers merged by hand are unmerged."""
    changes = _changes(model)
    _unmerge(model, changes)
    with contextlib.ExitStack() as undo:
        for name, original in changes.replaced.items():
            layer = model.get_submodule(name)
            replace_module(model, name, _base_form(layer, original))
            undo.callback(replace_module, model, name, layer)
        for hooks, hook_id, hook in _method_hooks(changes):
            undo.callback(hooks.__setitem__, hook_id, hook)
            hooks[hook_id] = _passthrough
        for config, value in changes.attention:
            undo.callback(setattr, config, "_attn_implementation_internal", config._attn_implementation_internal)
            config._attn_implementation_internal = value
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in changes.trained_in_place.items():
                undo.callback(params[name].data.copy_, params[name].detach().clone())
                params[name].data.copy_(value)
        yield model


# --------------------------------------------------------------------------------------------------- named adapters
def route_adapter_names(model: nn.Module) -> None:
    """Let ``model(**batch, adapter_names=[...])`` reach the LoRA layers for that call (``pk.patch`` does this for
    lora / dora / qlora; the hooks are patch's)."""
    model.register_forward_pre_hook(_route_adapter_names, with_kwargs=True)
    model.register_forward_hook(_end_routing, always_call=True)


def _route_adapter_names(model: nn.Module, args, kwargs):
    """Take ``adapter_names`` out of the model's call and hand it to every LoRA layer (PEFT's rules: known names or
    ``"__base__"``, one per row, inference only)."""
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return args, kwargs
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must be a list of adapter names (str), one per row, got {names!r}")
    if model.training:
        raise ValueError("adapter_names is for inference, as in PEFT: call model.eval() first")
    known = set(adapters(model)) | {"__base__"}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"adapter_names names unknown adapter(s) {unknown}; the model has {sorted(known)}")
    ref = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
    if isinstance(ref, torch.Tensor) and ref.shape[0] != len(names):
        raise ValueError(f"adapter_names must hold one name per row: {len(names)} names for a batch of "
                         f"{ref.shape[0]}")
    for layer in _layers(model):
        layer.adapter_names = list(names)
    model.__dict__["_peftkern_routed"] = True
    return args, kwargs


def _end_routing(model: nn.Module, args, output):
    """After the call (also a failed one): the layers serve plain calls again."""
    if model.__dict__.pop("_peftkern_routed", False):
        for layer in _layers(model):
            layer.adapter_names = None


def adapters(model: nn.Module) -> list[str]:
    """The names of the adapters ``model`` holds, ``"default"`` (unless deleted) first."""
    record = patching._record(model)
    return ["default"] * (not record.get("default_deleted")) + list(record.get("adapters", {}))


def adapter_record(model: nn.Module, name: str) -> dict:
    """The record of adapter ``name`` as ``pk.save_adapter`` reads it (method, options, targets, heads)."""
    if name not in adapters(model):
        raise ValueError(f"adapter_name {name!r} is not one of the model's adapters {adapters(model)}")
    record = patching._record(model)
    return record if name == "default" else record["adapters"][name]


def _layers(model: nn.Module) -> list[NamedAdapters]:
    return [m for m in model.modules() if isinstance(m, NamedAdapters)]


def load_named(model: nn.Module, directory, name: str) -> nn.Module:
    """``pk.load_adapter(model, directory, adapter_name=name)``: a LoRA / rsLoRA / DoRA adapter (ours or PEFT's)
    beside those the model holds, frozen and inactive until :func:`set_adapter` (PEFT's ``load_adapter``). It may
    cover fewer modules than the model's LoRA layers (the others give the base alone for it), not others; its file
    must hold no head (the model's one head serves all its adapters)."""
    record = getattr(model, "peftkern_config", None)
    if record is None:
        raise ValueError(f"adapter_name={name!r} adds an adapter beside the model's: load the first one without "
                         f"adapter_name (it is 'default')")
    if record["method"] not in _NAMED:
        raise ValueError(f"adapter_name: several adapters need a LoRA-family model {list(_NAMED)}, this one is "
                         f"{record['method']!r}")
    if not isinstance(name, str) or not name or "." in name or name in adapters(model) + ["__base__"]:
        raise ValueError(f"adapter_name must be a new name without '.', not one of {adapters(model) + ['__base__']},"
                         f" got {name!r}")
    tensors, config, saved = patching.read_adapter(directory)
    method, opts = (saved["method"], saved["options"]) if saved else patching._from_peft_config(config, model)
    if method not in _NAMED or (method == "dora" and record["method"] == "qlora"):
        raise ValueError(f"{str(directory)!r} holds a {method!r} adapter; a {record['method']!r} model takes LoRA"
                         f"{'' if record['method'] == 'qlora' else ' or DoRA'} adapters by name")
    keys = {k: re.fullmatch(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)", k)
            for k in tensors}
    other = sorted(k for k, m in keys.items() if m is None)
    if other:
        raise ValueError(f"{str(directory)!r} holds tensors besides LoRA's ({other[:4]}): a named adapter brings no "
                         f"head of its own")
    targets = sorted({m.group(1) for m in keys.values()})
    modules = dict(model.named_modules())
    bad = [t for t in targets if not isinstance(modules.get(t), NamedAdapters)]
    if bad:
        raise ValueError(f"{str(directory)!r} adapts {bad[:4]}, which are not LoRA layers of this model")
    defaults = patching.METHODS[method].defaults
    opts = {**defaults, **{k: v for k, v in opts.items() if k in defaults}}
    options = {k: opts[k] for k in ("r", "lora_alpha", "lora_dropout", "use_rslora")}
    r, use_dora = options["r"], method == "dora"
    expected = {}
    for t in targets:
        layer = modules[t]
        expected[f"base_model.model.{t}.lora_A.weight"] = (r, layer.in_features)
        expected[f"base_model.model.{t}.lora_B.weight"] = (layer.out_features, r)
        if use_dora:
            expected[f"base_model.model.{t}.lora_magnitude_vector"] = (layer.out_features,)
    wrong = [f"{k}: file {tuple(v.shape)} vs {expected.get(k)}" for k, v in tensors.items()
             if tuple(v.shape) != expected.get(k)] + [f"{k} missing" for k in expected if k not in tensors]
    if wrong:
        raise ValueError(f"adapter in {str(directory)!r} does not fit the model: {wrong[:4]}")
    with torch.no_grad():
        for t in targets:
            added = modules[t].add_adapter(name, use_dora=use_dora, **options)
            added.lora_A.copy_(tensors[f"base_model.model.{t}.lora_A.weight"])
            added.lora_B.copy_(tensors[f"base_model.model.{t}.lora_B.weight"])
            if use_dora:
                added.lora_magnitude.copy_(tensors[f"base_model.model.{t}.lora_magnitude_vector"])
    record.setdefault("adapters", {})[name] = {"method": method, "options": opts, "targets": targets, "heads": [],
                                               "name": name}
    return model


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the one the model's calls use and the one that trains (its tensors require grad, the
    other adapters' do not), as PEFT's ``set_adapter``."""
    if name not in adapters(model):
        raise ValueError(f"adapter_name {name!r} is not one of the model's adapters {adapters(model)}")
    for layer in _layers(model):
        layer.active_adapter = name
        for other in adapters(model):
            a = layer.adapter(other)
            for t in (a.lora_A, a.lora_B, a.lora_magnitude, a.rank_scale) if a is not None else ():
                if t is not None:
                    t.requires_grad_(other == name)
    model.peftkern_config["active_adapter"] = name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (``"default"`` too: the layers' own ``lora_*`` become None and
    ``pk.save_adapter`` then needs an ``adapter_name``), as PEFT's ``delete_adapter``; not the active one."""
    if name not in adapters(model):
        raise ValueError(f"adapter_name {name!r} is not one of the model's adapters {adapters(model)}")
    record = model.peftkern_config
    if name == record.get("active_adapter", "default"):
        raise ValueError(f"adapter_name {name!r} is the active adapter; set_adapter another one before deleting it")
    for layer in _layers(model):
        layer.remove_adapter(name)
    if name == "default":
        record["default_deleted"] = True
    else:
        del record["adapters"][name]
