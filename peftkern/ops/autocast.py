"""Autocast rules for the custom ops, registered through torch.library so eager calls and torch.compile agree.

Under ``torch.autocast`` an op runs as ``F.linear`` does: its matmul inputs (the names given) are cast to the autocast
dtype (fp32 adapters too; the cast's backward returns their gradients in their own dtype), then the op runs with
autocast off. Inputs left out keep their dtype: NF4 scales and code tables, per-adapter scalings.
"""
from __future__ import annotations

import torch

_LIB = torch.library.Library("peftkern", "IMPL")
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone, as it does for F.linear


def register_autocast(op: str, cast: tuple[str, ...]) -> None:
    """``peftkern::op`` casts its arguments named in ``cast`` to the autocast dtype of their device (CPU and CUDA)."""
    overload = getattr(torch.ops.peftkern, op).default
    names = [a.name for a in overload._schema.arguments]
    unknown = set(cast) - set(names)
    if unknown:
        raise ValueError(f"peftkern::{op} has no argument(s) {sorted(unknown)}")
    positions = [i for i, n in enumerate(names) if n in cast]
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        _LIB.impl(op, _kernel(overload, positions, device_type, key), key, with_keyset=True)


def _kernel(overload, positions: list[int], device_type: str, key: str):
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        args = list(args)
        for i in positions:
            t = args[i]
            if isinstance(t, torch.Tensor) and t.device.type == device_type and t.dtype in _CASTABLE:
                args[i] = t.to(dtype)
        with torch._C._ExcludeDispatchKeyGuard(excluded):  # what torch.library.register_autocast does
            return overload(*args)

    return kernel
