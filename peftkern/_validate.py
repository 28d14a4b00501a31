"""Argument checks at the API boundary: every error names the argument."""
from __future__ import annotations

import operator
from typing import Callable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, t, *, ndim: int | None = None, min_ndim: int | None = None, floating: bool = True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def shape(name: str, t: torch.Tensor, expected: tuple[int, ...], meaning: str = "") -> None:
    if t.shape != tuple(expected):
        hint = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{hint}, got {tuple(t.shape)}")


def same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``t``'s device, or None where it is off."""
    device_type = t.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_dtype(t: torch.Tensor) -> torch.dtype:
    """``t``'s dtype once autocast has cast it (as it casts ``F.linear``'s inputs: floating, not float64)."""
    dtype = autocast_dtype(t)
    return dtype if dtype is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t.dtype


def same_dtype(ref_name: str, ref: torch.Tensor, *, autocast: bool = False, **others: torch.Tensor | None) -> None:
    """Equal dtypes; with ``autocast`` the dtypes the op sees after its autocast rule cast them."""
    if autocast and torch._C._is_any_autocast_enabled():
        expected = cast_dtype(ref)
        for name, t in others.items():
            if t is not None and cast_dtype(t) != expected:
                raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
        return
    expected = ref.dtype
    for name, t in others.items():
        if t is not None and t.dtype != expected:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def number(name: str, v, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v}")
    return v


def integer(name: str, v, *, low: int = 1) -> int:
    """An int (not a bool) >= ``low``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        what = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return v


def flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def one_of(name: str, v, choices: tuple):
    if v not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {v!r}")
    return v


# ------------------------------------------------------------------------------------------- checks run once
_accepted: dict = {}
_ACCEPTED_MAX = 4096
_ACCEPTED_PER_MODULE = 64  # input shapes a module remembers (sequence lengths vary)
_MISSING = object()
_VALUES = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.Size)


class _Unkeyed(Exception):
    """An argument whose signature is not known (it is then checked on every call)."""


def _signature(a):
    """What a check may read of an argument that is neither a tensor nor a value of ``_VALUES`` (see
    :func:`checked`): of an object with shape / dtype / device (an NF4Tensor, a tensor subclass) those, and
    requires_grad where it has one."""
    try:
        return type(a), tuple(a.shape), a.dtype, a.device, getattr(a, "requires_grad", None)
    except (AttributeError, TypeError):
        raise _Unkeyed from None


def _value(a):
    return type(a), a


# what checked() keys an argument by, by its type: one C-level attrgetter per tensor (~3x faster than the attributes
# read in Python), requires_grad only where grad mode is on
_TENSOR = operator.attrgetter("dtype", "device", "shape")
_TENSOR_GRAD = operator.attrgetter("dtype", "device", "shape", "requires_grad")
_KEYS = {**{t: _value for t in _VALUES}, torch.Tensor: _TENSOR, torch.nn.Parameter: _TENSOR}
_KEYS_GRAD = {**_KEYS, torch.Tensor: _TENSOR_GRAD, torch.nn.Parameter: _TENSOR_GRAD}


def _autocast_mode() -> tuple:
    """The autocast dtype of each device type, None where autocast is off there."""
    return tuple(torch.get_autocast_dtype(d) if torch.is_autocast_enabled(d) else None for d in ("cpu", "cuda"))


def checked(check: Callable, *args):
    """``check(*args)``, or its result from an earlier call with arguments of the same signature.

    Why: the full checks cost 6-10 us of Python per call, as much as a decode-sized layer's arithmetic. They read only
    metadata: of a tensor its dtype, device, shape, and requires_grad where grad mode is on (a frozen weight matters
    only to a backward), never its values; a number, string, dtype or torch.Size itself (with its type: ``True`` is
    not ``1``); of an NF4Tensor what :func:`_signature` keeps; grad mode and the autocast dtypes. So a signature that
    passed once passes again. A check that raised is not remembered; arguments of another kind (lists) are checked on
    every call. Under ``torch.compile`` the checks run as they are (Dynamo folds them at tracing; it would guard on the
    remembered signatures and recompile when they grow).
    """
    if torch.compiler.is_compiling():
        return check(*args)
    grad = torch.is_grad_enabled()
    keys = _KEYS_GRAD if grad else _KEYS
    try:
        key = (check, grad, torch._C._is_any_autocast_enabled() and _autocast_mode(),
               *[keys.get(type(a), _signature)(a) for a in args])
    except _Unkeyed:
        return check(*args)
    result = _accepted.get(key, _MISSING)
    if result is not _MISSING:
        return result
    result = check(*args)
    if len(_accepted) >= _ACCEPTED_MAX:
        _accepted.clear()
    _accepted[key] = result
    return result


class ChecksPerState:
    """A module mixin: :meth:`checked` runs a check of the module's call once per signature of its input and weight
    for the module's current state.

    Why: what ``checked`` keys a decode-sized LoRA call by (five tensors, three numbers) costs ~3 us of Python, a
    third of the call's matmuls. The rest of what the check reads is the module's own (adapters, scalings, bias): it
    changes through setattr (a parameter replaced, ``load_state_dict(assign=True)``, ``train()``) or ``_apply``
    (``.to()``, ``.half()``), and both forget what was accepted. Not seen: ``p.data = t`` on an adapter (a weight's
    is: it is in the key), after which torch's own errors name no argument.
    """

    def checked(self, check: Callable, x, weight, *state):
        """``check(x, weight, *state)``, or its result from an earlier call for this state with x and weight of the same
        signature."""
        if torch.compiler.is_compiling():
            return check(x, weight, *state)
        grad = torch.is_grad_enabled()
        keys = _KEYS_GRAD if grad else _KEYS
        try:
            key = (check, grad, torch._C._is_any_autocast_enabled() and _autocast_mode(),
                   keys.get(type(x), _signature)(x), keys.get(type(weight), _signature)(weight))
        except _Unkeyed:
            return check(x, weight, *state)
        accepted = self.__dict__.get("_accepted_calls")
        result = _MISSING if accepted is None else accepted.get(key, _MISSING)
        if result is _MISSING:
            result = check(x, weight, *state)
            if accepted is None or len(accepted) >= _ACCEPTED_PER_MODULE:
                accepted = self.__dict__["_accepted_calls"] = {}
            accepted[key] = result
        return result

    _per_state: tuple[str, ...] = ("_accepted_calls",)  # what a module keeps for its state, forgotten with it

    def _forget_state(self) -> None:
        for name in self._per_state:
            self.__dict__.pop(name, None)

    def __setattr__(self, name, value):
        self._forget_state()
        super().__setattr__(name, value)

    def __getstate__(self):
        """Pickled and deep-copied without what it keeps for its state (a C++ object there does not pickle)."""
        return {k: v for k, v in self.__dict__.items() if k not in self._per_state}

    def _apply(self, fn, recurse=True):
        self._forget_state()
        return super()._apply(fn, recurse)
