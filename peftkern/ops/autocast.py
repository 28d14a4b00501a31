"""Autocast rules for the custom ops, registered through torch.library so eager calls and torch.compile agree.

Under ``torch.autocast`` an op runs as ``F.linear`` does: its matmul inputs (the names given) are cast to the autocast
dtype (fp32 adapters too; the cast's backward returns their gradients in their own dtype), then the op runs with
autocast off. Inputs left out keep their dtype: NF4 scales and code tables, per-adapter scalings.

The eager path of an op (:mod:`peftkern.ops.custom_op`) applies the same rule through :func:`eager_cast`.
"""
from __future__ import annotations

import torch

_LIB = torch.library.Library("peftkern", "IMPL")
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone, as it does for F.linear
# the autocast dispatch keys in the dispatcher's order (AutocastCUDA runs before AutocastCPU)
_KEYS = (("cuda", "AutocastCUDA"), ("cpu", "AutocastCPU"))


def register_autocast(op: str, cast: tuple[str, ...]) -> list[int]:
    """``peftkern::op`` casts its arguments named in ``cast`` to the autocast dtype of their device (CPU and CUDA).
    Returns their positions."""
    overload = getattr(torch.ops.peftkern, op).default
    names = [a.name for a in overload._schema.arguments]
    unknown = set(cast) - set(names)
    if unknown:
        raise ValueError(f"peftkern::{op} has no argument(s) {sorted(unknown)}")
    positions = [i for i, n in enumerate(names) if n in cast]
    for device_type, key in _KEYS:
        _LIB.impl(op, _kernel(overload, positions, device_type, key), key, with_keyset=True)
    return positions


def _cast(args: list, positions, device_type: str) -> None:
    """Cast ``args[i]`` for i in ``positions`` in place: floating tensors on ``device_type`` to its autocast dtype."""
    dtype = torch.get_autocast_dtype(device_type)
    for i in positions:
        t = args[i]
        if isinstance(t, torch.Tensor) and t.device.type == device_type and t.dtype in _CASTABLE:
            args[i] = t.to(dtype)


def _kernel(overload, positions: list[int], device_type: str, key: str):
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args):
        args = list(args)
        _cast(args, positions, device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):  # what torch.library.register_autocast does
            return overload(*args)

    return kernel


def eager_cast(args: tuple, positions) -> tuple[tuple, "torch._C.DispatchKeySet | None"]:
    """What the registered rule does to an eager call: (the arguments cast, the autocast keys to exclude while the op
    runs, None if none). A device type's rule applies where its autocast is on and a tensor argument is on it, as
    the dispatcher runs its key."""
    excluded = None
    out = list(args)
    for device_type, key in _KEYS:
        if torch.is_autocast_enabled(device_type) and any(
                isinstance(t, torch.Tensor) and t.device.type == device_type for t in args):
            _cast(out, positions, device_type)
            k = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
            excluded = k if excluded is None else excluded | k
    return tuple(out), excluded
