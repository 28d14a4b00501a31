"""The selective family: BitFit, FISH Mask, Diff Pruning and FAR, ending in few trainable weights per layer.

FISH Mask and Diff Pruning select entries and train them as :class:`~peftkern.nn.SparseDiffLinear` (values at fixed
indices: nnz-sized storage, optimizer state and gradient work); FAR selects whole FFN rows (nodes) and trains them
as one small dense block (:class:`~peftkern.nn.RowDiffLinear`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Optional

import torch
from torch import nn

from .. import _validate as V
from ..nn.lora import _check_linear, is_conv1d, out_in
from ..nn.sparse import RowDiffLinear, SparseDiffLinear
from .targets import freeze_except, replace_module


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
