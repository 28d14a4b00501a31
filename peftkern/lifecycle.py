"""The life of a ``pk.patch`` model after training, as PEFT users know it: :func:`merge` (PEFT's
``merge_and_unload``), :func:`unpatch` (``unload``) and :func:`disable` (``disable_adapter``).

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
from typing import Iterator, Optional

import torch
from torch import nn

from . import patching
from .methods.selective import DiffPruningLinear
from .methods.targets import replace_module
from .nn import LoRALinear, QLoRALinear, RowDiffLinear, SparseDiffLinear

_HOOKS = ("_forward_hooks", "_forward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
_ATTRIBUTES = ("peftkern_config", "peftkern_allocator", "_peftkern_changes")  # what patch sets on the model
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
        """Record on ``patched`` what the method changed in the model given to :class:`Tracker`."""
        inner = patching._inner(patched)
        held = _storages(itertools.chain(inner.parameters(), inner.buffers()))
        replaced: dict[str, Optional[nn.Module]] = {}
        children, hooks = [], []
        for name, module in self.modules.items():
            if any(name[:i] in replaced for i, c in enumerate(name) if c == "."):
                continue
            if name and inner.get_submodule(name) is not module:
                # a module whose tensors the patched model no longer holds is let go (QLoRA frees the fp weights)
                own = _storages(itertools.chain(module.parameters(), module.buffers()))
                replaced[name] = module if own <= held else None
                continue
            children += [(module, c) for c in module._modules if c not in self.children[name]]
            hooks += [(module, kind, i) for kind in _HOOKS for i in getattr(module, kind)
                      if i not in self.hooks[name][kind]]
        trained = {n: p.detach().clone() for n, p in inner.named_parameters()
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


def _unmerge(inner: nn.Module, changes: Changes) -> None:
    """Layers merged by hand (``LoRALinear.merge()``) give their base weights back first (exactly)."""
    for name in changes.replaced:
        for module in inner.get_submodule(name).modules():
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
    inner = patching._inner(model)
    if inner is not model:
        return "its virtual tokens / prefix live outside the weights"
    if changes.hooks or changes.children:
        return "its adapters are modules of their own, not a weight update"
    odd = [type(m).__name__ for m in map(inner.get_submodule, changes.replaced) if type(m) not in _FOLDABLE]
    if odd:
        return f"its {odd[0]} layers are not a weight update"
    return None


def _detach(model: nn.Module, inner: nn.Module, changes: Changes) -> None:
    """Remove what patch added besides the layers (children, hooks, attention choice, flags, attributes)."""
    for module, child in changes.children:
        delattr(module, child)
    for module, kind, hook_id in changes.hooks:
        getattr(module, kind).pop(hook_id, None)
        for flags in _HOOK_FLAGS:
            getattr(module, flags, {}).pop(hook_id, None)
    for config, value in changes.attention:
        config._attn_implementation_internal = value
    for name, p in inner.named_parameters():
        if name in changes.requires_grad and p.is_floating_point():
            p.requires_grad_(changes.requires_grad[name])
    for module in inner.modules():
        module.__dict__.pop("peftkern_prefix", None)
    for attr in _ATTRIBUTES:
        model.__dict__.pop(attr, None)
        inner.__dict__.pop(attr, None)


def unpatch(model: nn.Module) -> nn.Module:
    """The model as it was before ``pk.patch`` (PEFT's ``unload``): every replaced module put back, hooks, added
    modules and the prefix attention registration removed (``config._attn_implementation`` as before), each
    parameter's ``requires_grad`` as before, and the base parameters patch left trainable (the task head, BitFit's
    biases) reset to their values at patch time: every base weight bit-identical, the same ``state_dict`` keys.
    Returns the transformers model (the prompt / prefix wrapper is dropped); everything the method trained is lost.

    QLoRA: patch quantized the base and kept no full-precision copy (that memory is what QLoRA saves), so its
    layers come back as the 4-bit base alone, a :class:`pk.nn.NF4Linear` holding the same codes (state_dict in
    bitsandbytes' 4-bit format), or the very ``bitsandbytes.nn.Linear4bit`` the model had where patch took one.
    """
    changes = _changes(model)
    inner = patching._inner(model)
    _unmerge(inner, changes)
    for name, original in changes.replaced.items():
        replace_module(inner, name, _base_form(inner.get_submodule(name), original))
    params = dict(inner.named_parameters())
    with torch.no_grad():
        for name, value in changes.trained_in_place.items():
            params[name].copy_(value)
    _detach(model, inner, changes)
    return inner


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
    _detach(model, model, changes)
    return model


def _passthrough(*args) -> None:
    """A forward (pre-)hook that changes nothing."""
    return None


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[nn.Module]:
    """``with pk.disable(model):`` the base model's outputs (PEFT's ``disable_adapter``): within the block the
    replaced modules stand in their place again (QLoRA: the 4-bit base alone), patch's hooks pass through, the
    attention implementation is the base's, a prompt / prefix wrapper calls the model directly, and the base
    parameters the method trains in place (head, BitFit's biases) hold their values from patch time. All of it comes
    back when the block ends, also on an exception (what the block did to those in-place parameters is lost).
    Layers merged by hand are unmerged."""
    changes = _changes(model)
    inner = patching._inner(model)
    _unmerge(inner, changes)
    with contextlib.ExitStack() as undo:
        for name, original in changes.replaced.items():
            layer = inner.get_submodule(name)
            replace_module(inner, name, _base_form(layer, original))
            undo.callback(replace_module, inner, name, layer)
        for module, kind, hook_id in changes.hooks:
            hooks = getattr(module, kind)
            if hook_id in hooks:
                undo.callback(hooks.__setitem__, hook_id, hooks[hook_id])
                hooks[hook_id] = _passthrough
        for config, value in changes.attention:
            undo.callback(setattr, config, "_attn_implementation_internal", config._attn_implementation_internal)
            config._attn_implementation_internal = value
        params = dict(inner.named_parameters())
        with torch.no_grad():
            for name, value in changes.trained_in_place.items():
                undo.callback(params[name].data.copy_, params[name].detach().clone())
                params[name].data.copy_(value)
        if inner is not model:
            own = model.__dict__.get("forward")
            model.forward = inner.__call__
            undo.callback(_restore_forward, model, own)
        yield model


def _restore_forward(model: nn.Module, own) -> None:
    if own is None:
        del model.forward
    else:
        model.forward = own
