"""The selective family: BitFit, FISH Mask, Diff Pruning and FAR, ending in few trainable weights per layer.

FISH Mask and Diff Pruning select entries and train them as :class:`~peftkern.nn.SparseDiffLinear` (values at fixed
indices: nnz-sized storage, optimizer state and gradient work); FAR selects whole FFN rows (nodes) and trains them
as one small dense block (:class:`~peftkern.nn.RowDiffLinear`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Optional

import torch
from torch import nn

from .. import _validate as V
from ..nn.lora import _check_linear, is_conv1d, out_in
from ..nn.sparse import RowDiffLinear, SparseDiffLinear
from .base import Method, MethodConfig, target_spec
from .sites import find_layers
from .targets import TargetSpec, freeze_except, linear_targets, replace_module


def _linears(model: nn.Module, target: Optional[str]) -> dict[str, nn.Module]:
    """The ``nn.Linear`` and transformers ``Conv1D`` modules whose names ``target`` fully matches (None: all)."""
    found = {n: m for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) or is_conv1d(m)) and (target is None or re.fullmatch(target, n))}
    if not found:
        raise ValueError(f"no nn.Linear matches target {target!r} (nor a transformers Conv1D)")
    return found


def bitfit(model: nn.Module, trainable_head: Iterable[str] = ("classifier",)) -> list[str]:
    """BitFit (Ben Zaken et al., 2022): only the bias terms (and the task head) train. Returns their names."""
    freeze_except(model, trainable_head)
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def replace_with_sparse(model: nn.Module, selections: dict[str, torch.Tensor]) -> dict[str, SparseDiffLinear]:
    """Replace each named Linear by a SparseDiffLinear (values 0) on its sorted flat indices."""
    out = {}
    for name, idx in selections.items():
        out[name] = SparseDiffLinear.from_linear(model.get_submodule(name), idx)
        replace_module(model, name, out[name])
    return out


def fish_mask(model: nn.Module, calibration_data: Iterable, loss_fn: Callable[[nn.Module, object], torch.Tensor],
              density: float, *, target: Optional[str] = None,
              trainable_head: Iterable[str] = ("classifier",)) -> dict[str, SparseDiffLinear]:
    """FISH Mask (Sung et al., 2021): the empirical Fisher of every targeted weight, the mean over calibration samples
    of the squared per-sample gradient; the globally top ``density`` fraction of entries across layers train as
    SparseDiffLinear. ``calibration_data`` yields single samples (batches of one) for ``loss_fn(model, sample)``.
    Returns the new layers by name; the rest of the model is frozen (the head stays trainable)."""
    V.number("density", density, low=0.0, high=1.0, low_open=True, high_open=False)
    linears = _linears(model, target)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in linears.values():
        m.weight.requires_grad_(True)
    fisher = {n: torch.zeros(out_in(m).shape, dtype=torch.float32, device=m.weight.device)  # [out, in]
              for n, m in linears.items()}
    count = 0
    for sample in calibration_data:
        model.zero_grad(set_to_none=True)
        loss_fn(model, sample).backward()
        for n, m in linears.items():
            fisher[n] += out_in(m, m.weight.grad).float().square()
        count += 1
    if count == 0:
        raise ValueError("calibration_data yielded no sample")
    model.zero_grad(set_to_none=True)
    scores = torch.cat([f.view(-1) for f in fisher.values()]) / count
    k = max(1, int(round(density * scores.numel())))
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.topk(scores, k).indices] = True
    selections, offset = {}, 0
    for n, f in fisher.items():
        sel = keep[offset: offset + f.numel()].nonzero().view(-1)
        offset += f.numel()
        if sel.numel():
            selections[n] = sel.to(f.device)
    freeze_except(model, trainable_head)
    return replace_with_sparse(model, selections)


class DiffPruningLinear(nn.Module):
    """Diff Pruning (Guo et al., 2021): ``y = x (W + z * w)^T + b`` with a dense diff ``w`` and hard-concrete gates
    ``z`` (stretch l = -1.5, r = 1.5, temperature beta, a log-alpha per entry); :meth:`l0` is the expected number of
    open gates (the differentiable L0 penalty). :meth:`to_sparse` projects ``z * w`` to its largest-magnitude entries
    for fixed-mask training as a SparseDiffLinear. ``linear``: an ``nn.Linear`` or a transformers ``Conv1D`` (the
    diff is [out, in] either way)."""

    def __init__(self, linear: nn.Module, *, beta: float = 2.0 / 3.0, l: float = -1.5, r: float = 1.5,
                 init_log_alpha: float = 5.0):
        super().__init__()
        _check_linear(linear)
        self.linear = linear
        for p in linear.parameters():
            p.requires_grad_(False)
        self.beta, self.l, self.r = float(beta), float(l), float(r)
        kw = dict(device=linear.weight.device, dtype=torch.float32)
        shape = out_in(linear).shape
        self.diff = nn.Parameter(torch.zeros(shape, **kw))
        self.log_alpha = nn.Parameter(torch.full(shape, float(init_log_alpha), **kw))

    @property
    def weight(self) -> nn.Parameter:
        """The frozen base weight, as stored (model code reads it: T5 casts its FFN input to ``wo.weight.dtype``)."""
        return self.linear.weight

    def gates(self) -> torch.Tensor:
        """A stochastic gate sample while training, the deterministic gate in eval."""
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp_(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.r - self.l) + self.l).clamp(0.0, 1.0)

    def l0(self) -> torch.Tensor:
        """Expected number of non-zero gates: sum sigmoid(log_alpha - beta log(-l / r))."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.l / self.r)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = out_in(self.linear)
        wide = torch.promote_types(w.dtype, torch.float32)
        return nn.functional.linear(x, (w.to(wide) + self.gates() * self.diff).to(w.dtype), self.linear.bias)

    @torch.no_grad()
    def eval_diff(self) -> torch.Tensor:
        """``z * w`` with the deterministic (eval) gates: the diff the layer adds in eval, fp32 [out, in]."""
        was = self.training
        self.eval()
        delta = self.gates() * self.diff
        self.train(was)
        return delta

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + z * w`` (eval gates) in W's dtype and stored layout, rounded once as the eval forward rounds it."""
        w = self.linear.weight
        return (w.to(torch.promote_types(w.dtype, torch.float32)) + out_in(self.linear, self.eval_diff())).to(w.dtype)

    @torch.no_grad()
    def to_sparse(self, density: float) -> SparseDiffLinear:
        """Magnitude projection: the top ``density`` fraction of |z w| (eval gates) as a SparseDiffLinear."""
        V.number("density", density, low=0.0, high=1.0, low_open=True, high_open=False)
        delta = self.eval_diff().view(-1)
        k = max(1, int(round(density * delta.numel())))
        idx = torch.topk(delta.abs(), k).indices.sort().values
        return SparseDiffLinear.from_linear(self.linear, idx, delta[idx].clone())


def diff_pruning(model: nn.Module, *, target: Optional[str] = None,
                 trainable_head: Iterable[str] = ("classifier",), **gate_options) -> dict[str, DiffPruningLinear]:
    """Wrap the targeted Linears in DiffPruningLinear (the base frozen, the head trainable); returns them by name."""
    linears = _linears(model, target)
    freeze_except(model, trainable_head)
    wrapped = {n: DiffPruningLinear(m, **gate_options) for n, m in linears.items()}
    for n, m in wrapped.items():
        replace_module(model, n, m)
    return wrapped


def diff_pruning_l0(model: nn.Module) -> torch.Tensor:
    """The summed L0 penalty of every DiffPruningLinear in ``model``."""
    return sum((m.l0() for m in model.modules() if isinstance(m, DiffPruningLinear)), torch.zeros(()))


def diff_pruning_to_sparse(model: nn.Module, density: float) -> dict[str, SparseDiffLinear]:
    """Replace every DiffPruningLinear by its magnitude projection (fixed-mask training from here on)."""
    out = {}
    for n, m in list(model.named_modules()):
        if isinstance(m, DiffPruningLinear):
            out[n] = m.to_sparse(density)
            replace_module(model, n, out[n])
    return out


def far_select(model: nn.Module, primed_weights: dict[str, torch.Tensor], fraction: float,
               trainable_head: Iterable[str] = ("classifier",)) -> dict[str, RowDiffLinear]:
    """FAR (Vucetic et al., 2022): after priming steps that trained the FFN Linears named in ``primed_weights``
    (name -> weight before priming), rank each layer's rows (nodes) by the L1 change of their weights and train the
    top ``fraction`` of rows as a small dense block (RowDiffLinear), everything else frozen. The primed weights are
    restored first: the priming only chooses the nodes."""
    V.number("fraction", fraction, low=0.0, high=1.0, low_open=True, high_open=False)
    out = {}
    for n, before in primed_weights.items():
        linear = model.get_submodule(n)
        if not isinstance(linear, nn.Linear) and not is_conv1d(linear):
            raise TypeError(f"{n} must name an nn.Linear or a Conv1D, got {type(linear).__name__}")
        with torch.no_grad():
            change = out_in(linear, linear.weight.float() - before.float()).abs().sum(1)  # [out]: L1 per node
            linear.weight.copy_(before)
        k = max(1, int(round(fraction * change.numel())))
        out[n] = RowDiffLinear(linear, torch.topk(change, k).indices.sort().values)
    freeze_except(model, trainable_head)
    for n, m in out.items():
        replace_module(model, n, m)
    return out


def _density(name: str, value) -> None:
    V.number(name, value, low=0.0, high=1.0, low_open=True, high_open=False)


@dataclasses.dataclass(kw_only=True)
class BitFitConfig(MethodConfig):
    """BitFit's options: only the task head's (``modules_to_save``); every bias term trains."""


@dataclasses.dataclass(kw_only=True)
class DiffPruningConfig(MethodConfig):
    """Diff Pruning's options: gated dense diffs on ``target_modules`` (as :class:`LoraConfig`'s); with
    calibration data, ``steps`` passes over it (AdamW at ``lr``, L0 penalty weight ``l0_weight``), then the top
    ``density`` fraction of each diff trains as a sparse diff."""

    target_modules: TargetSpec = "all-linear"
    density: float = 0.005
    l0_weight: float = 1e-4
    lr: float = 1e-2
    steps: int = 1

    def __post_init__(self):
        super().__post_init__()
        self.target_modules = target_spec(self.target_modules)
        _density("density", self.density)
        V.number("l0_weight", self.l0_weight, low=0.0)
        V.number("lr", self.lr, low=0.0, low_open=True)
        V.integer("steps", self.steps)


@dataclasses.dataclass(kw_only=True)
class FishMaskConfig(MethodConfig):
    """FISH Mask's options: the top ``density`` fraction of ``target_modules``' weights by empirical Fisher
    information (from the calibration data) trains as sparse diffs."""

    density: float = 0.005
    target_modules: TargetSpec = "all-linear"

    def __post_init__(self):
        super().__post_init__()
        _density("density", self.density)
        self.target_modules = target_spec(self.target_modules)


@dataclasses.dataclass(kw_only=True)
class FarConfig(MethodConfig):
    """FAR's options: priming steps at ``priming_lr`` on the calibration data train the FFN linears
    (``target_modules``; None: every layer's FFN input and output linears), then the ``fraction`` of each one's rows
    that moved most trains."""

    fraction: float = 0.1
    target_modules: Optional[TargetSpec] = None
    priming_lr: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        _density("fraction", self.fraction)
        self.target_modules = target_spec(self.target_modules, none_ok=True)
        V.number("priming_lr", self.priming_lr, low=0.0, low_open=True)


class BitFitMethod(Method):
    """BitFit: the model's own bias terms train (a model without any raises)."""

    config_class = BitFitConfig

    def apply(self, model, config: BitFitConfig, heads, calibration_data=None) -> dict:
        trainable = bitfit(model, heads)
        biases = [n for n in trainable if not any(n.startswith(h + ".") for h in heads)]
        if not biases:
            raise ValueError("the model has no bias terms: BitFit has nothing to train (a Llama needs attention_bias / "
                             "mlp_bias in its config)")
        return {"biases": biases}

    def tensors(self, model, record) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        return {f"base_model.model.{n}": params[n] for n in record["biases"]}


class _Selection(Method):
    """A method that trains entries it selected: its file holds each selected layer's positions (``buffer`` of its
    ``layer_type``) beside the trained values, and those rebuild the layers without calibration."""

    layer_type: type = SparseDiffLinear
    buffer = "indices"

    def selected_layer(self, linear: nn.Module, positions: torch.Tensor) -> nn.Module:
        return SparseDiffLinear.from_linear(linear, positions)

    def tensors(self, model, record) -> dict[str, torch.Tensor]:
        out = super().tensors(model, record)
        for name, m in model.named_modules():
            if isinstance(m, self.layer_type):
                out[f"base_model.model.{name}.{self.buffer}"] = getattr(m, self.buffer)
        return out

    def rebuild(self, model, config, heads, tensors) -> dict:
        prefix, suffix = "base_model.model.", "." + self.buffer
        chosen = {k[len(prefix):-len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)}
        freeze_except(model, heads)
        for name, positions in chosen.items():
            replace_module(model, name, self.selected_layer(model.get_submodule(name), positions))
        return {}


def _pattern(names: list[str]) -> str:
    return "|".join(re.escape(n) for n in names)


class DiffPruningMethod(_Selection):
    """Diff Pruning (Guo et al., 2021). Without ``calibration_data``: gated dense diffs to train with
    ``pk.methods.diff_pruning_l0(model)`` times a weight added to the loss. With it: that stage runs on the batches,
    the diffs are projected to their top ``density`` entries, and the model trains those as sparse diffs
    (``sparse_diff_linear``) from there."""

    config_class = DiffPruningConfig
    calibrated = "optional"

    def apply(self, model, config: DiffPruningConfig, heads, calibration_data=None) -> dict:
        names = linear_targets(model, config.target_modules, heads)
        diff_pruning(model, target=_pattern(names), trainable_head=heads)
        if calibration_data is None:
            return {}
        head_params = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
        gated = [p for p in model.parameters() if p.requires_grad and id(p) not in head_params]
        opt = torch.optim.AdamW(gated, lr=config.lr, weight_decay=0.0)
        for _ in range(config.steps):
            for batch in calibration_data:
                (model(**batch).loss + config.l0_weight * diff_pruning_l0(model)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad = None
        diff_pruning_to_sparse(model, config.density)
        freeze_except(model, heads)
        for m in model.modules():
            if isinstance(m, SparseDiffLinear):
                m.values.requires_grad_(True)
        return {}

    def rebuild(self, model, config, heads, tensors) -> dict:
        """A saved projected (sparse) Diff Pruning rebuilds at its indices; a saved gated one is just applied."""
        if any(k.endswith(".indices") for k in tensors):
            return super().rebuild(model, config, heads, tensors)
        return self.apply(model, config, heads)


def _samples(calibration_data: Iterable) -> Iterator[dict]:
    """Single-row batches out of ``calibration_data`` (dicts of [B, ...] tensors, or such dicts one row each)."""
    for batch in calibration_data:
        if not isinstance(batch, dict):
            raise TypeError(f"calibration_data must yield dicts of model inputs, got {type(batch).__name__}")
        n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
        for i in range(n):
            yield {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class FishMaskMethod(_Selection):
    """FISH Mask (Sung et al., 2021) from the calibration data's per-sample gradients."""

    config_class = FishMaskConfig
    calibrated = True

    def apply(self, model, config: FishMaskConfig, heads, calibration_data=None) -> dict:
        names = linear_targets(model, config.target_modules, heads)
        fish_mask(model, _samples(calibration_data), lambda m, sample: m(**sample).loss, config.density,
                  target=_pattern(names), trainable_head=heads)
        return {}


class FarMethod(_Selection):
    """FAR: priming steps on the calibration data train the FFN linears, the rows that moved most are kept as small
    dense blocks, and the primed weights are restored."""

    config_class = FarConfig
    calibrated = True
    layer_type = RowDiffLinear
    buffer = "rows"

    def selected_layer(self, linear: nn.Module, positions: torch.Tensor) -> nn.Module:
        return RowDiffLinear(linear, positions)

    def apply(self, model, config: FarConfig, heads, calibration_data=None) -> dict:
        if config.target_modules is None:
            names = [n for layer in find_layers(model) for n in (*layer.ffn_in, layer.ffn_out)]
        else:
            names = linear_targets(model, config.target_modules, heads)
        weights = [model.get_submodule(n).weight for n in names]
        primed = {n: w.detach().clone() for n, w in zip(names, weights)}
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        opt = torch.optim.AdamW(weights, lr=config.priming_lr, weight_decay=0.0)
        steps = 0
        for batch in calibration_data:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
        if steps == 0:
            raise ValueError("calibration_data yielded no batch")
        far_select(model, primed, config.fraction, trainable_head=heads)
        return {}
