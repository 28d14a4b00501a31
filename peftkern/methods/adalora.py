"""AdaLoRA (Zhang et al., ICLR 2023): adaptive rank allocation over :class:`~peftkern.nn.LoRALinear` layers.

Each adapted layer is in SVD form ``delta W = scaling * B diag(e) A`` with ``A = lora_A`` [r, in],
``B = lora_B`` [out, r] and ``e = rank_scale`` [r] (PEFT's ``lora_E``), so the forward pass runs on the fused
LoRA kernels. During training :class:`AdaLoRAAllocator` scores every triplet ``(A[i], e[i], B[:, i])`` by the
smoothed sensitivity ``|p * grad|`` of its entries and, following a cubic budget schedule, zeroes the ``e[i]`` of
the globally least important triplets, so the total rank shrinks from ``sum(init_r)`` to ``target_r * n_layers``.

Typical loop (the order PEFT documents: the allocator runs after the optimizer step, before ``zero_grad``)::

    layers = prepare_adalora(model, ["query", "value"], init_r=12, lora_alpha=32)
    alloc = AdaLoRAAllocator(model, target_r=4, total_step=T, tinit=200, tfinal=500, deltaT=10)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(T):
        loss = loss_fn(model(batch)) + alloc.orthogonal_regularization()
        loss.backward()
        opt.step()
        alloc.update_and_allocate(step)
        opt.zero_grad()

Behaviour matches PEFT's ``RankAllocator`` / ``AdaLoraModel.update_and_allocate`` (same budget schedule, same
scores, same masks when the scores are distinct), with these deliberate differences:

* ties: exactly ``budget`` triplets are kept (highest score first, ties broken by layer order then rank index);
  PEFT masks every score ``<=`` the threshold, which can keep fewer than the budget when scores tie;
* a budget equal to the total rank masks nothing (PEFT's ``kthvalue(k=0)`` raises when ``target_r == init_r``);
* a missing gradient counts as zero sensitivity (PEFT raises);
* if the call at ``global_step == total_step - tfinal`` is skipped, the final allocation happens at the first
  later call instead of never.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from torch import nn

from .. import _validate as V
from ..nn.lora import LoRALinear, is_conv1d
from .base import Method, MethodConfig, optional_integer, target_spec
from .targets import TargetSpec, freeze_except, linear_targets, name_matches, target_matcher

__all__ = ["AdaLoRAAllocator", "prepare_adalora", "adalora_scaling", "RANKNUM_EPS", "AdaLoraConfig", "AdaLoraMethod"]

#: PEFT divides the scaling by ``ranknum + 1e-5``; kept so outputs match PEFT's SVDLinear to rounding.
RANKNUM_EPS = 1e-5

def adalora_scaling(lora_alpha: float, r: int) -> float:
    """The ``LoRALinear.scaling`` of an AdaLoRA layer: ``lora_alpha / (r + 1e-5)`` with r the *allocated* rank.

    PEFT's SVDLinear multiplies by ``scaling / (ranknum + 1e-5)`` where ``ranknum`` is set to the layer's rank when
    the layer is created and never changed by masking (the AdaLoRA paper likewise keeps ``alpha / r`` fixed).
    peftkern folds the two into the single constant ``LoRALinear.scaling``; masking a triplet zeroes its
    ``rank_scale`` entry and leaves the scaling (and hence the surviving triplets' contribution) unchanged.
    """
    return float(lora_alpha) / (float(r) + RANKNUM_EPS)


# ----------------------------------------------------------------------------------------------------------------
# preparation
# ----------------------------------------------------------------------------------------------------------------

def prepare_adalora(model: nn.Module, target_modules: TargetSpec, *, init_r: int = 12, lora_alpha: float = 8,
                    lora_dropout: float = 0.0, trainable: Iterable[str] = (),
                    adapter_dtype: Optional[torch.dtype] = None) -> dict[str, LoRALinear]:
    """Replace the targeted ``nn.Linear`` modules of ``model`` (in place) by AdaLoRA-form :class:`LoRALinear`.

    ``target_modules``: a list of module names or dotted suffixes (``"query"`` matches ``encoder.0.attn.query``),
    a regex string that must match the full module name (as PEFT), or a callable ``(name, module) -> bool``.
    Every matched module must be an ``nn.Linear``; its weight and bias are shared, not copied, and frozen.

    Initialisation as PEFT's AdaLoRA: ``lora_A`` and ``lora_B`` ~ N(0, 0.02), ``rank_scale`` zeros (so the model's
    output is unchanged at first), ``scaling = adalora_scaling(lora_alpha, init_r)`` (see there: fixed, not
    rescaled when ranks get masked).

    Afterwards only the adapters (``lora_A``, ``lora_B``, ``rank_scale``) require grad, plus the parameters under
    the modules named in ``trainable`` (names or dotted suffixes of modules or parameters, e.g. ``["classifier"]``);
    the adapted layers' base weight and bias stay frozen in any case.

    Returns ``{module name: LoRALinear}`` in ``model.named_modules()`` order; pass ``model`` (or this dict) to
    :class:`AdaLoRAAllocator`.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    V.integer("init_r", init_r)
    V.number("lora_alpha", lora_alpha, low=0.0, low_open=True)
    V.number("lora_dropout", lora_dropout, low=0.0, high=1.0)
    if isinstance(trainable, str):
        trainable = [trainable]
    trainable = list(trainable)
    if not all(isinstance(k, str) and k for k in trainable):
        raise ValueError(f"trainable must be an iterable of non-empty module/parameter names, got {trainable!r}")
    matches = target_matcher(target_modules)

    targets = [(n, m) for n, m in model.named_modules() if n and matches(n, m)]
    if not targets:
        raise ValueError("target_modules matched no submodule of model")
    for n, m in targets:
        if not isinstance(m, nn.Linear) and not is_conv1d(m):
            raise ValueError(f"target_modules matched {n!r}, a {type(m).__name__}; only torch.nn.Linear and "
                             f"transformers' Conv1D are supported")

    layers: dict[str, LoRALinear] = {}
    for name, linear in targets:
        layer = LoRALinear.from_linear(linear, r=init_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                       adapter_dtype=adapter_dtype)
        layer.enable_rank_scale(0.0)
        with torch.no_grad():
            nn.init.normal_(layer.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(layer.lora_B, mean=0.0, std=0.02)
        layer.scaling = adalora_scaling(lora_alpha, init_r)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers[name] = layer

    adapter_ids = {id(p) for l in layers.values() for p in (l.lora_A, l.lora_B, l.rank_scale)}
    base_ids = {id(p) for l in layers.values() for p in (l.weight, l.bias) if p is not None}
    used = set()
    for pname, p in model.named_parameters():
        keep = id(p) in adapter_ids
        if not keep and id(p) not in base_ids and trainable:
            parts = pname.split(".")
            prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            hit = [k for k in trainable if any(name_matches(pre, k) for pre in prefixes)]
            used.update(hit)
            keep = bool(hit)
        p.requires_grad_(keep)
    missing = [k for k in trainable if k not in used]
    if missing:
        raise ValueError(f"trainable names {missing} matched no trainable-eligible parameter of model")
    return layers


# ----------------------------------------------------------------------------------------------------------------
# allocator
# ----------------------------------------------------------------------------------------------------------------

def _collect_layers(model) -> dict[str, LoRALinear]:
    def check(name, m):
        if not isinstance(m, LoRALinear):
            raise ValueError(f"model: layer {name!r} is a {type(m).__name__}, not a LoRALinear")
        if m.rank_scale is None:
            raise ValueError(f"model: layer {name!r} has no rank_scale (call enable_rank_scale() or prepare_adalora)")
        return m

    if isinstance(model, LoRALinear):
        return {"": check("", model)}
    if isinstance(model, nn.Module):
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.rank_scale is not None}
    elif isinstance(model, Mapping):
        layers = {str(n): check(str(n), m) for n, m in model.items()}
    elif isinstance(model, Iterable):
        layers = {str(i): check(str(i), m) for i, m in enumerate(model)}
    else:
        raise ValueError(f"model must be an nn.Module, a dict of LoRALinear or a list of LoRALinear, "
                         f"got {type(model).__name__}")
    if not layers:
        raise ValueError("model holds no LoRALinear layer with rank_scale (prepare it with prepare_adalora)")
    if len({id(m) for m in layers.values()}) != len(layers):
        raise ValueError("model lists the same LoRALinear layer twice")
    return layers


class AdaLoRAAllocator:
    """AdaLoRA's rank allocator (PEFT's ``RankAllocator`` + ``AdaLoraModel.update_and_allocate``).

    Args:
        model: an ``nn.Module`` (every ``LoRALinear`` with ``rank_scale`` inside it is managed), a dict
            ``{name: LoRALinear}`` or a list of ``LoRALinear``.
        target_r: the average rank per layer at the end; the final budget is ``target_r * n_layers``.
        total_step: the number of training steps.
        init_r: the layers' initial rank; optional, checked against the layers when given (layers of different
            ranks are allowed when it is None; the initial budget is the sum of the layers' ranks).
        tinit: warm-up steps without masking (steps ``<= tinit``).
        tfinal: steps of final fine-tuning at the target budget: the final allocation happens at step
            ``total_step - tfinal`` and its masks are re-applied at every later step. With ``tfinal=0`` a loop over
            ``range(total_step)`` never reaches the final allocation (as in PEFT), so use ``tfinal >= 1``.
        deltaT: during the budgeting phase the masks are recomputed at steps divisible by ``deltaT``.
        beta1: EMA factor of the sensitivity ``|p * grad|``; beta2: EMA factor of its uncertainty.
        orth_reg_weight: the weight applied by :meth:`orthogonal_regularization`.

    Scores: for every entry of ``lora_A``, ``lora_B`` and ``rank_scale``, ``I = |p * p.grad|``,
    ``Ibar <- beta1 Ibar + (1 - beta1) I`` and ``U <- beta2 U + (1 - beta2) |I - Ibar|`` (new Ibar), score
    ``S = Ibar * U``. The importance of triplet i of a layer is ``S_e[i] + mean_j S_A[i, j] + mean_o S_B[o, i]``.
    """

    def __init__(self, model, *, target_r: int, total_step: int, init_r: Optional[int] = None, tinit: int = 0,
                 tfinal: int = 0, deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85,
                 orth_reg_weight: float = 0.5):
        self.layers = _collect_layers(model)
        V.integer("target_r", target_r)
        V.integer("total_step", total_step)
        V.integer("tinit", tinit, low=0)
        V.integer("tfinal", tfinal, low=0)
        V.integer("deltaT", deltaT)
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            V.number(name, beta, low=0.0, high=1.0, low_open=True, high_open=True)
        V.number("orth_reg_weight", orth_reg_weight, low=0.0)
        if init_r is not None:
            V.integer("init_r", init_r)
            bad = [n for n, l in self.layers.items() if l.r != init_r]
            if bad:
                raise ValueError(f"init_r={init_r} but layers {bad} have rank {[self.layers[n].r for n in bad]}")
        if tinit >= total_step - tfinal:
            raise ValueError(f"tinit ({tinit}) must be < total_step - tfinal ({total_step} - {tfinal}): "
                             "no budgeting phase is left")
        self.target_r, self.total_step, self.deltaT = target_r, total_step, deltaT
        self.tinit, self.tfinal = tinit, tfinal
        self.beta1, self.beta2, self.orth_reg_weight = float(beta1), float(beta2), float(orth_reg_weight)
        self.init_budget = sum(l.r for l in self.layers.values())
        self.target_budget = target_r * len(self.layers)
        if self.target_budget > self.init_budget:
            raise ValueError(f"target_r={target_r} exceeds the layers' average rank "
                             f"({self.init_budget} / {len(self.layers)} layers)")
        self._masks = {n: torch.ones(l.r, dtype=torch.bool) for n, l in self.layers.items()}
        self.budget = self.init_budget  # the budget of the masks now in force
        self.final_done = False
        self.reset_scores()

    # -- schedule -------------------------------------------------------------------------------------------------
    @property
    def final_step(self) -> int:
        return self.total_step - self.tfinal

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, mask_now)`` at ``step``, PEFT's formula.

        ``step <= tinit``: (init budget, False); ``step > total_step - tfinal``: (target budget, True); otherwise
        ``int((init - target) * (1 - (step - tinit) / (total_step - tfinal - tinit))**3 + target)`` and
        ``step % deltaT == 0``.
        """
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.final_step:
            return self.target_budget, True
        mul_coeff = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_budget - self.target_budget) * (mul_coeff ** 3) + self.target_budget)
        return budget, step % self.deltaT == 0

    # -- scores ---------------------------------------------------------------------------------------------------
    def reset_scores(self) -> None:
        """Forget the smoothed sensitivities (PEFT's ``reset_ipt``; done after the final allocation)."""
        self._ipt_avg: dict[str, list[torch.Tensor]] = {}
        self._ipt_unc: dict[str, list[torch.Tensor]] = {}

    @staticmethod
    def _params(layer: LoRALinear):
        return layer.lora_A, layer.lora_B, layer.rank_scale

    @torch.no_grad()
    def update_scores(self) -> None:
        """Fold the current ``|p * grad|`` into the EMAs (done by :meth:`update_and_allocate` before step
        ``total_step - tfinal``)."""
        b1, b2 = self.beta1, self.beta2
        for name, layer in self.layers.items():
            params = self._params(layer)
            if name not in self._ipt_avg:
                self._ipt_avg[name] = [torch.zeros_like(p) for p in params]
                self._ipt_unc[name] = [torch.zeros_like(p) for p in params]
            avg, unc = self._ipt_avg[name], self._ipt_unc[name]
            for k, p in enumerate(params):
                ipt = (p.detach() * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                avg[k] = b1 * avg[k] + (1 - b1) * ipt
                unc[k] = b2 * unc[k] + (1 - b2) * (ipt - avg[k]).abs()

    @torch.no_grad()
    def importance(self) -> dict[str, torch.Tensor]:
        """``{layer: [r] triplet importance}`` from the current scores (zeros before any update)."""
        out = {}
        for name, layer in self.layers.items():
            if name not in self._ipt_avg:
                out[name] = torch.zeros_like(layer.rank_scale.detach())
                continue
            sA, sB, se = (a * u for a, u in zip(self._ipt_avg[name], self._ipt_unc[name]))
            out[name] = se.view(-1) + (sA.mean(dim=1) + sB.mean(dim=0))
        return out

    # -- masks ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Keep the ``budget`` most important triplets over all layers; zero the other ``rank_scale`` entries."""
        V.integer("budget", budget, low=0)
        scores = self.importance()
        names = list(scores)
        dev = scores[names[0]].device
        flat = torch.cat([scores[n].reshape(-1).to(dev) for n in names])
        keep = torch.ones(flat.numel(), dtype=torch.bool, device=dev)
        if budget < flat.numel():
            order = torch.sort(flat, descending=True, stable=True).indices
            keep.zero_()
            keep[order[:budget]] = True
        keep = keep.cpu()
        start = 0
        for n in names:
            r = self.layers[n].r
            self._masks[n] = keep[start:start + r].clone()
            start += r
        self.budget = min(budget, flat.numel())
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the ``rank_scale`` entries of the masked triplets (in place)."""
        for n, layer in self.layers.items():
            m = self._masks[n]
            if not bool(m.all()):
                layer.rank_scale.masked_fill_(~m.to(layer.rank_scale.device), 0.0)

    def update_and_allocate(self, global_step: int) -> int:
        """One allocator step; call after ``optimizer.step()`` and before ``optimizer.zero_grad()``.

        Before ``total_step - tfinal``: update the scores and, when the schedule says so, mask to the scheduled
        budget. At ``total_step - tfinal`` (or the first call after it): mask to the target budget with the
        current scores and reset them. Later: re-apply the final masks (the optimizer revives masked entries).
        Returns the scheduled budget of this step.
        """
        V.integer("global_step", global_step, low=0)
        merged = [n for n, l in self.layers.items() if l.merged]
        if merged:
            raise RuntimeError(f"layers {merged} are merged; unmerge them before update_and_allocate")
        if global_step < self.final_step:
            self.update_scores()
            budget, mask_now = self.budget_schedule(global_step)
            if mask_now:
                self.mask_to_budget(budget)
            return budget
        if not self.final_done:
            self.mask_to_budget(self.target_budget)
            self.reset_scores()
            self.final_done = True
        else:
            self.apply_masks()
        return self.target_budget

    # -- reporting ------------------------------------------------------------------------------------------------
    @property
    def rank_pattern(self) -> dict[str, int]:
        """``{layer: current rank}`` (the number of unmasked triplets)."""
        return {n: int(m.sum()) for n, m in self._masks.items()}

    @property
    def rank_mask(self) -> dict[str, list[bool]]:
        """``{layer: [r] keep flags}``, the format of PEFT's ``AdaLoraConfig.rank_pattern``."""
        return {n: m.tolist() for n, m in self._masks.items()}

    @property
    def total_rank(self) -> int:
        return sum(self.rank_pattern.values())

    # -- regulariser ----------------------------------------------------------------------------------------------
    def orthogonal_regularization(self, squared: bool = False) -> torch.Tensor:
        """``orth_reg_weight * mean over the 2 * n_layers matrices of ||A A^T - I||_F and ||B^T B - I||_F``.

        This is PEFT's form (Frobenius norms, averaged over the ``lora_A`` and ``lora_B`` matrices, masked ranks
        included); ``squared=True`` uses the paper's squared norms instead. Add the result to the loss; it is
        differentiable in ``lora_A`` and ``lora_B``.
        """
        terms = []
        for layer in self.layers.values():
            A, B = layer.lora_A, layer.lora_B
            for cov in (A @ A.t(), B.t() @ B):
                d = cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                t = d.square().sum() if squared else torch.linalg.matrix_norm(d, ord="fro")
                terms.append(t.to(terms[0].device) if terms else t)
        return self.orth_reg_weight * (sum(terms) / len(terms))

    # -- checkpointing ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"ipt_avg": {n: [t.clone() for t in v] for n, v in self._ipt_avg.items()},
                "ipt_unc": {n: [t.clone() for t in v] for n, v in self._ipt_unc.items()},
                "masks": {n: m.clone() for n, m in self._masks.items()},
                "budget": self.budget, "final_done": self.final_done}

    def load_state_dict(self, state: dict) -> None:
        masks = state["masks"]
        if set(masks) != set(self.layers) or any(masks[n].shape != (l.r,) for n, l in self.layers.items()):
            raise ValueError("state: its masks do not match this allocator's layers and ranks")
        self._masks = {n: masks[n].to(torch.bool).cpu().clone() for n in self.layers}
        self._ipt_avg = {n: [t.clone() for t in v] for n, v in state["ipt_avg"].items()}
        self._ipt_unc = {n: [t.clone() for t in v] for n, v in state["ipt_unc"].items()}
        self.budget, self.final_done = int(state["budget"]), bool(state["final_done"])

    def __repr__(self) -> str:
        return (f"AdaLoRAAllocator(layers={len(self.layers)}, budget {self.init_budget}->{self.target_budget}, "
                f"tinit={self.tinit}, tfinal={self.tfinal}, deltaT={self.deltaT}, total_step={self.total_step}, "
                f"current total rank={self.total_rank})")


# ----------------------------------------------------------------------------------------------------------------
# pk.patch
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(kw_only=True)
class AdaLoraConfig(MethodConfig):
    """AdaLoRA's options (PEFT's names): layers of rank ``init_r`` on ``target_modules`` (as :class:`LoraConfig`'s)
    with ``lora_alpha`` / ``lora_dropout``; with ``total_step`` the allocator that brings the average rank down to
    ``target_r`` on the schedule ``tinit`` / ``tfinal`` / ``deltaT`` (see :class:`AdaLoRAAllocator`)."""

    init_r: int = 12
    target_r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: TargetSpec = "all-linear"
    total_step: Optional[int] = None
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1

    def __post_init__(self):
        super().__post_init__()
        V.integer("init_r", self.init_r)
        V.integer("target_r", self.target_r)
        V.number("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        V.number("lora_dropout", self.lora_dropout, low=0.0, high=1.0)
        self.target_modules = target_spec(self.target_modules)
        self.total_step = optional_integer("total_step", self.total_step)
        V.integer("tinit", self.tinit, low=0)
        V.integer("tfinal", self.tfinal, low=0)
        V.integer("deltaT", self.deltaT)


class AdaLoraMethod(Method):
    """AdaLoRA's SVD-form layers; with ``total_step`` the rank allocator rides along as ``model.peftkern_allocator``
    (call its ``update_and_allocate(step)`` after each optimizer step)."""

    config_class = AdaLoraConfig

    def apply(self, model, config: AdaLoraConfig, heads, calibration_data=None) -> dict:
        names = linear_targets(model, config.target_modules, heads)
        freeze_except(model, heads)
        prepare_adalora(model, names, init_r=config.init_r, lora_alpha=config.lora_alpha,
                        lora_dropout=config.lora_dropout, trainable=heads)
        if config.total_step is not None:
            model.peftkern_allocator = AdaLoRAAllocator(model, target_r=config.target_r, total_step=config.total_step,
                                                        tinit=config.tinit, tfinal=config.tfinal,
                                                        deltaT=config.deltaT)
        return {}
