"""LoRALinear: a drop-in nn.Linear with a LoRA (rsLoRA, DoRA, AdaLoRA-form) adapter on the fused kernels, and
the named adapters it (and QLoRALinear) can hold beside its own."""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from .. import _validate as V
from ..ops.lora import dora_linear, dora_weight_norm
from ..ops.lora.function import _check_lora_args, _lora_linear
from ..ops.multi_lora import multi_lora_linear


@functools.cache
def _conv1d_type() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections): ``y = x W + b`` with W stored [in, out] (PEFT's
    ``fan_in_fan_out``), a linear layer whose weight is the transpose of ``nn.Linear``'s."""
    cls = _conv1d_type()
    return cls is not None and isinstance(module, cls)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear``, a ``Conv1D`` or a layer that names them."""
    if is_conv1d(module):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def out_in(module: nn.Module, tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``tensor`` (default: the module's weight) laid out [out, in]: a transposed view for a ``Conv1D``, no copy."""
    t = module.weight if tensor is None else tensor
    return t.t() if is_conv1d(module) else t


def _member(module: nn.Module, name: str):
    """``getattr(module, name, None)``, a parameter or submodule read from the module's dicts: through
    ``nn.Module.__getattr__`` a read costs ~0.5 us, and a decode-sized layer's forward makes five (as long as its LoRA
    matmuls)."""
    params, modules = module._parameters, module._modules
    return params[name] if name in params else modules[name] if name in modules else getattr(module, name, None)


def _check_linear(linear: nn.Module) -> None:
    if not isinstance(linear, nn.Linear) and not is_conv1d(linear):
        raise TypeError(f"linear must be a torch.nn.Linear or a transformers Conv1D, got {type(linear).__name__}")


class AdapterTensors(NamedTuple):
    """One adapter of a layer, whichever holds it."""
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    scaling: float
    lora_dropout: float
    lora_magnitude: Optional[torch.Tensor]  # DoRA's [out]
    rank_scale: Optional[torch.Tensor]  # AdaLoRA's [r]

    def folded_A(self) -> torch.Tensor:
        """``diag(rank_scale) A``: the down projection with AdaLoRA's per-rank scale in it."""
        return self.lora_A if self.rank_scale is None else self.lora_A * self.rank_scale[:, None]


class LoRAAdapter(nn.Module):
    """A named adapter beside a layer's own (``pk.load_adapter(model, dir, adapter_name=...)``): ``lora_A`` [r, in],
    ``lora_B`` [out, r] and, for DoRA, ``lora_magnitude`` [out] (PEFT layouts), zeros until loaded, frozen."""

    def __init__(self, in_features: int, out_features: int, *, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False, device=None, dtype=None):
        super().__init__()
        V.integer("r", r)
        V.number("lora_alpha", lora_alpha)
        V.number("lora_dropout", lora_dropout, low=0.0, high=1.0)
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        kw = dict(device=device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, **kw), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **kw), requires_grad=False)
        self.lora_magnitude = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if use_dora else None

    def tensors(self) -> AdapterTensors:
        return AdapterTensors(self.lora_A, self.lora_B, self.scaling, self.lora_dropout, self.lora_magnitude, None)


class NamedAdapters(V.ChecksPerState):
    """Several adapters on one LoRA layer, PEFT's way: the layer's own tensors are adapter ``"default"`` (their names
    and layouts unchanged), the others :class:`LoRAAdapter` s in ``lora_adapters`` (made with the first).
    ``active_adapter`` serves a call; ``adapter_names`` (set for each model call by ``pk.patch``'s hook: one name per
    row, ``"__base__"`` for none) a batch whose rows use different adapters, on :func:`multi_lora_linear`."""

    active_adapter = "default"
    adapter_names: Optional[list] = None

    def _adapters(self) -> list[AdapterTensors]:
        extra = self._modules.get("lora_adapters") or {}
        return [a for a in [self.adapter("default"), *(self.adapter(n) for n in extra)] if a is not None]

    def add_adapter(self, name: str, **options) -> LoRAAdapter:
        """A new, zero, frozen :class:`LoRAAdapter` ``name`` (``options``: its r, lora_alpha, ...) in the dtype and
        on the device of the layer's adapters."""
        ref = self._adapters()[0].lora_A
        if "lora_adapters" not in self._modules:
            self.lora_adapters = nn.ModuleDict()
        self.lora_adapters[name] = LoRAAdapter(self.in_features, self.out_features, device=ref.device,
                                               dtype=ref.dtype, **options)
        return self.lora_adapters[name]

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s tensors (``"default"``: the layer's own ``lora_*`` become None)."""
        if name == "default":
            for attr in ("lora_A", "lora_B", "lora_magnitude", "rank_scale"):
                if getattr(self, attr, None) is not None:
                    setattr(self, attr, None)
            return
        extra = self._modules.get("lora_adapters")
        if extra is not None and name in extra:
            del extra[name]
            if not extra:
                del self.lora_adapters

    def adapter(self, name: str) -> Optional[AdapterTensors]:
        """Adapter ``name``'s tensors, None where this layer has no such adapter (it then computes the base alone)."""
        if name == "default":
            # read from the parameter dict: LoRALinear registers these names (None included), so a value cannot
            # hide as a plain attribute; QLoRALinear has no magnitude or rank scale
            params = self._parameters
            lora_A = params.get("lora_A")
            if lora_A is None:
                return None
            return AdapterTensors(lora_A, params["lora_B"], self.scaling, self.lora_dropout,
                                  params.get("lora_magnitude"), params.get("rank_scale"))
        extra = self._modules.get("lora_adapters")
        return extra[name].tensors() if extra is not None and name in extra else None

    def delta_weight(self) -> torch.Tensor:
        """The active adapter's ``scaling * B diag(rank_scale) A`` in the adapters' dtype, [out, in]."""
        a = self.adapter(self.active_adapter)
        if a is None:
            return self._adapters()[0].lora_A.new_zeros(self.out_features, self.in_features)
        return a.scaling * (a.lora_B @ a.folded_A())

    def mixed_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Row i through adapter ``adapter_names[i]`` (``"__base__"``, or one this layer lacks: the base alone), all
        in one :func:`multi_lora_linear` (ranks zero-padded to the largest). As in PEFT, not with DoRA adapters and
        not over merged weights."""
        names = self.adapter_names
        if getattr(self, "merged", False):
            raise ValueError("adapter_names needs unmerged layers: this layer was merged (call unmerge())")
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names must hold one name per row: {len(names)} names for a batch of "
                             f"{x.shape[0]}")
        used = {n: a for n in dict.fromkeys(names) if n != "__base__" and (a := self.adapter(n)) is not None}
        dora = [n for n, a in used.items() if a.lora_magnitude is not None]
        if dora:
            raise ValueError(f"adapter_names cannot route rows to DoRA adapters ({dora}), as in PEFT")
        if not used:
            return nn.functional.linear(x, weight, bias)
        r = max(a.lora_A.shape[0] for a in used.values())
        A = torch.stack([nn.functional.pad(a.folded_A(), (0, 0, 0, r - a.lora_A.shape[0])) for a in used.values()])
        B = torch.stack([nn.functional.pad(a.lora_B, (0, r - a.lora_B.shape[1])) for a in used.values()])
        order = list(used)
        ids = [order.index(n) if n in used else -1 for n in names]
        return multi_lora_linear(x, weight, bias, A, B, [a.scaling for a in used.values()], ids)


class LoRALinear(NamedAdapters, nn.Module):
    """``y = x W^T + b + scaling * (dropout(x) A^T [* rank_scale]) B^T`` with W (and b) frozen.

    Parameter layouts and initialisation follow PEFT: ``lora_A`` [r, in] kaiming-uniform(a=sqrt(5)),
    ``lora_B`` [out, r] zeros, ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). With ``use_dora`` a
    trainable ``lora_magnitude`` [out] starts at the row norms of W. ``rank_scale`` [r] (AdaLoRA's singular
    values) is created by :meth:`enable_rank_scale`. Adapters over a half-precision base are kept in fp32, as PEFT
    does, unless ``adapter_dtype`` says otherwise. More adapters by name beside this one: :class:`NamedAdapters`.

    Wrapping a transformers ``Conv1D`` (GPT-2), ``weight`` stays the Conv1D's own [in, out] parameter
    (``fan_in_fan_out``, as PEFT) and the ops read it through the transposed view :attr:`base_weight`.
    """

    fan_in_fan_out = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False,
                 device=None, dtype=None, adapter_dtype: Optional[torch.dtype] = None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init(base.weight, base.bias, r, lora_alpha, lora_dropout, use_rslora, use_dora, adapter_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False,
                    adapter_dtype: Optional[torch.dtype] = None) -> "LoRALinear":
        """Wrap an existing ``nn.Linear`` or transformers ``Conv1D``; its weight and bias tensors are shared, not
        copied."""
        _check_linear(linear)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.fan_in_fan_out = is_conv1d(linear)
        self._init(linear.weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora, use_dora, adapter_dtype)
        return self

    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen weight as [out, in] (for a wrapped ``Conv1D`` a transposed view of ``weight``: no copy)."""
        weight = _member(self, "weight")
        return weight.t() if self.fan_in_fan_out else weight

    def _init(self, weight, bias, r, lora_alpha, lora_dropout, use_rslora, use_dora, adapter_dtype):
        V.integer("r", r)
        V.number("lora_alpha", lora_alpha)
        V.number("lora_dropout", lora_dropout, low=0.0, high=1.0)
        out_features, in_features = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha, self.lora_dropout = lora_alpha, float(lora_dropout)
        self.use_rslora, self.use_dora = use_rslora, use_dora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.weight.requires_grad_(False)
        self.register_parameter("bias", bias)
        if bias is not None:
            self.bias.requires_grad_(False)
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        kw = dict(device=weight.device, dtype=adapter_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_parameter("lora_magnitude", None)  # registered: forward reads the parameter dict alone
        self.register_parameter("rank_scale", None)
        if use_dora:
            self.lora_magnitude = nn.Parameter(self._weight_norm().to(adapter_dtype))
        self.merged = False
        self._unmerged_weight: Optional[torch.Tensor] = None

    def enable_rank_scale(self, init: float = 0.0) -> nn.Parameter:
        """Add AdaLoRA's per-rank scale ``rank_scale`` [r] (SVD form ``B diag(e) A``), initialised to ``init``."""
        if self.use_dora:
            raise ValueError("rank_scale (AdaLoRA) cannot be combined with use_dora")
        self.rank_scale = nn.Parameter(torch.full((self.r,), float(init), device=self.lora_A.device,
                                                  dtype=self.lora_A.dtype))
        return self.rank_scale

    def _weight_norm(self, a: Optional[AdapterTensors] = None) -> torch.Tensor:
        a = a or self.adapter(self.active_adapter)
        return dora_weight_norm(self.base_weight, a.lora_A, a.lora_B, a.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self._parameters  # not through nn.Module.__getattr__ (~0.2 us a read: decode calls count them)
        weight, bias = params["weight"], params["bias"]
        if self.fan_in_fan_out:
            weight = weight.t()
        if self.adapter_names is not None:
            return self.mixed_forward(x, weight, bias)
        a = None if self.merged else self.adapter(self.active_adapter)
        if a is None:
            return nn.functional.linear(x, weight, bias)
        if a.lora_magnitude is not None:
            return dora_linear(x, weight, bias, a.lora_A, a.lora_B, a.scaling, a.lora_magnitude,
                               dropout_p=a.lora_dropout, training=self.training)
        # the layer's own adapter is checked once per state (ChecksPerState); a named one's tensors live elsewhere
        check = self.checked if self.active_adapter == "default" else V.checked
        direct = check(_check_lora_args, x, weight, bias, a.lora_A, a.lora_B, a.scaling, a.lora_dropout,
                       a.rank_scale)
        return _lora_linear(x, weight, bias, a.lora_A, a.lora_B, a.scaling, a.lora_dropout, self.training,
                            a.rank_scale, False, direct)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``weight`` with the active adapter folded in (DoRA: each row rescaled to its magnitude), computed in the
        wider of the two dtypes and returned in the weight's dtype and stored layout; ``weight`` itself is left as
        it is."""
        a = self.adapter(self.active_adapter)
        if a is None:
            return self.weight.detach().clone()
        w = self.base_weight.to(torch.promote_types(self.weight.dtype, a.lora_A.dtype)) + self.delta_weight()
        if a.lora_magnitude is not None:
            w = w * (a.lora_magnitude / self._weight_norm(a))[:, None]
        return (w.t() if self.fan_in_fan_out else w).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (a copy of the original is kept so :meth:`unmerge` restores it exactly)."""
        if self.merged:
            return
        self._unmerged_weight = self.weight.detach().clone()
        self.weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, scaling={self.scaling:g}, dropout={self.lora_dropout}, dora={self.use_dora}, "
                f"merged={self.merged}")
