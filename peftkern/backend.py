"""One registry: which implementation serves an op on which device.

Each op (``"lora_forward"``, ``"lora_backward"``, ...) has implementations registered per backend:

* ``"torch"``  - eager PyTorch, any device (the CPU path);
* ``"triton"`` - Triton kernels, CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` (how CI tests them);
* ``"cuda"``   - the CUDA library built from ``csrc/`` (ctypes), CUDA tensors.

The backend in force is, in order: ``use_backend(...)`` / ``set_backend(...)``, the ``PEFTKERN_BACKEND``
environment variable, else ``"auto"``. ``"auto"`` picks the best backend able to serve the op on the tensors'
device and falls back silently; a backend named explicitly either serves the op or raises.

The choice is thread-local, read once per forward at the API boundary and passed to the ops as an argument
(:func:`run`); autograd keeps it, so a backward serves from the same backend on any thread (PyTorch's CUDA
autograd worker never sees ``use_backend``) and regenerates the same dropout mask.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from typing import Callable, Iterator, NamedTuple, Optional

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("torch",)}
_CPU = torch.device("cpu")  # compared with ``==`` (~50 ns; ``device.type`` builds a str, ~270 ns)

_registry: dict[str, dict[str, Callable]] = {}


class _State(threading.local):
    backend: Optional[str] = None  # a class default: getattr of a missing thread-local attribute raises (~0.4 us)


_state = _State()


class BackendStatus(NamedTuple):
    available: bool
    reason: str  # why it is unavailable, or what it serves


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` on ``backend``."""
    _check_name(backend, BACKENDS)

    def wrap(fn: Callable) -> Callable:
        _registry.setdefault(op, {})[backend] = fn
        return fn

    return wrap


def registered(op: str) -> dict[str, Callable]:
    return dict(_registry.get(op, {}))


def ops() -> list[str]:
    return sorted(_registry)


def _check_name(name: str, choices: tuple[str, ...], what: str = "backend") -> str:
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(choices)}")
    return name


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - broken installs
        return f"triton failed to import: {e}"
    return None


def _cuda_library_error() -> str | None:
    from . import _native

    return _native.CUDA.load_error()


def _device_error(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda" or (device.type == "cpu" and interpret_mode()):
            return None
        return f"triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got {device.type}"
    return _cuda_library_error()


def available_backends() -> dict[str, BackendStatus]:
    """Each backend, whether it can run here, and the reason when it cannot."""
    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    out = {"torch": BackendStatus(True, "eager PyTorch on any device")}
    terr = _triton_import_error()
    if terr is None and cuda is None and not interpret_mode():
        terr = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"
    out["triton"] = BackendStatus(terr is None, terr or ("CUDA" if cuda is not None else "CPU interpreter"))
    cerr = _cuda_library_error() if cuda is not None else "no CUDA device"
    out["cuda"] = BackendStatus(cerr is None, cerr or "CUDA library")
    return out


def get_backend() -> str:
    explicit = _state.backend
    if explicit is not None:
        return explicit
    name = _env_backend() or "auto"
    return name if name in _CHOICES else _check_name(name, _CHOICES, "PEFTKERN_BACKEND")


_ENVIRON = getattr(os.environ, "_data", None)  # CPython's dict behind os.environ, keys encoded
_ENV_KEY = os.environ.encodekey("PEFTKERN_BACKEND") if _ENVIRON is not None else None


def _env_backend():
    """PEFTKERN_BACKEND as os.environ holds it now, or None. Read from the dict behind ``os.environ`` (what its
    ``get`` reads, ~35 ns) where there is one: ``os.environ.get`` of an unset variable raises and catches a KeyError
    (~0.7 us), on every op call: 3% of a tiny Llama's LoRA training step."""
    if _ENVIRON is None:
        return os.environ.get("PEFTKERN_BACKEND")
    value = _ENVIRON.get(_ENV_KEY)
    return None if value is None else os.environ.decodevalue(value)


def set_backend(name: str) -> None:
    """Force a backend for every op (``"auto"`` restores automatic choice)."""
    _state.backend = _check_name(name, _CHOICES)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    _check_name(name, _CHOICES)
    previous = _state.backend
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = previous


def resolve(op: str, device: torch.device, requested: str | None = None) -> tuple[str, Callable]:
    """The (backend name, implementation) that serves ``op`` for tensors on ``device`` under backend ``requested``
    (default: the one in force)."""
    impls = _registry.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    if requested is None:
        requested = get_backend()
    if requested != "auto":
        if requested not in impls:
            raise RuntimeError(f"backend {requested!r} has no implementation of {op!r} "
                               f"(it has: {', '.join(impls)})")
        err = _device_error(requested, device)
        if err:
            raise RuntimeError(f"backend {requested!r} cannot run {op!r}: {err}")
        return requested, impls[requested]
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        if name in impls and (name == "torch" or _device_error(name, device) is None):
            return name, impls[name]
    raise RuntimeError(f"no backend can run {op!r} on {device}")


def run(op: str, requested: str, device: torch.device, *args):
    """``op``'s implementation for ``device`` under backend ``requested`` (captured at the forward), called on
    ``args``; a fallback inside it follows ``requested`` too.

    (What :func:`use_backend` does, without its context manager: this runs on every call of every op.)"""
    previous = _state.backend
    _state.backend = requested
    try:
        if requested == "auto" and device == _CPU:
            return _registry[op]["torch"](*args)  # resolve's answer on a CPU (decode-sized calls count its call)
        return resolve(op, device, requested)[1](*args)
    finally:
        _state.backend = previous


def fallback(op: str, reason: str, error: type[Exception] = TypeError, *, after: str | None = None,
             device: torch.device | None = None) -> Callable:
    """The implementation of ``op`` that serves inputs the backend in force cannot (``reason``): the next one in
    "auto"'s order for ``device`` after backend ``after`` (given both), else torch's.

    Only ``"auto"`` falls back, silently; a backend named explicitly raises ``error`` instead.
    """
    requested = get_backend()
    if requested != "auto":
        raise error(f"backend {requested!r} cannot run {op!r} on these inputs: {reason} "
                    f"(use the 'torch' or 'auto' backend)")
    impls = _registry[op]
    if after is not None and device is not None:
        order = _AUTO_ORDER.get(device.type, ("torch",))
        for name in order[order.index(after) + 1:] if after in order else ():
            if name in impls and _device_error(name, device) is None:
                return impls[name]
    return impls["torch"]
