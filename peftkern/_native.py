"""Lazy loaders of the native libraries built from csrc/ into peftkern/_lib/ by setup.py.

``CPU``: csrc/cpu (C++ with OpenMP, built by the machine's C++ compiler; ctypes), the torch backend's fast paths on a
CPU. ``TORCH_NODES``: csrc/torch (a torch extension), C++ autograd nodes for small eager CPU layers. ``CUDA``:
csrc/cuda (built by nvcc; ctypes), the "cuda" backend. Any may be missing; callers fall back or report why.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
from pathlib import Path
from typing import Optional

import torch

LIB_DIR = Path(__file__).parent / "_lib"


class Library:
    def __init__(self, stem: str, build_hint: str):
        self.stem, self.build_hint = stem, build_hint

    @property
    def path(self) -> Path:
        """The built file: ``<stem>.so``, or the name setuptools gives an extension (``<stem>.cpython-...so``)."""
        found = sorted(LIB_DIR.glob(f"{self.stem}*.so"))
        return found[0] if found else LIB_DIR / f"{self.stem}.so"

    @functools.cached_property
    def _loaded(self) -> tuple[Optional[ctypes.CDLL], Optional[str]]:
        path = self.path
        if not path.exists():
            return None, f"{self.stem} not built ({path} missing; {self.build_hint})"
        try:
            return ctypes.CDLL(str(path)), None
        except OSError as e:
            return None, f"{self.stem} failed to load: {e}"

    def load_error(self) -> Optional[str]:
        return self._loaded[1]

    def handle(self) -> ctypes.CDLL:
        lib, err = self._loaded
        if lib is None:
            raise RuntimeError(err)
        return lib


CPU = Library("libpeftkern_cpu", "pip install -e . builds it with the machine's C++ compiler")
USE_CPU_LIBRARY = True  # tests switch it off to check the pure PyTorch paths
CUDA = Library("libpeftkern_cuda", "build with nvcc via setup.py")


class TorchExtension:
    """A torch C++ extension in peftkern/_lib, imported on first use and only under the torch it was built against
    (its ``torch_version``): another torch's C++ ABI may differ."""

    def __init__(self, name: str):
        self.name = name

    @functools.cached_property
    def _loaded(self) -> tuple[Optional[object], Optional[str]]:
        try:
            module = importlib.import_module(f"peftkern._lib.{self.name}")
        except ImportError as e:
            return None, (f"{self.name} not built or not loadable ({e}; pip install --no-build-isolation -e . builds it "
                          "against the installed torch)")
        if module.torch_version != torch.__version__:
            return None, f"{self.name} was built for torch {module.torch_version}, this is {torch.__version__}: rebuild"
        return module, None

    def load_error(self) -> Optional[str]:
        return self._loaded[1]

    def module(self):
        """The extension module, or None: not built, built for another torch, or switched off (``USE_CPU_LIBRARY``)."""
        return self._loaded[0] if USE_CPU_LIBRARY else None


TORCH_NODES = TorchExtension("_torch_nodes")


def cpu_function(t, name: str, argtypes: list):
    """Entry point ``name`` of the CPU library (its ctypes argtypes set on first use; it returns an int status) for a
    CPU tensor ``t``, or None: not built, switched off, or ``t`` on another device."""
    if not USE_CPU_LIBRARY or t.device.type != "cpu" or CPU.load_error() is not None:
        return None
    fn = getattr(CPU.handle(), name)
    if fn.argtypes is None:
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


TOKEN_MAX_WEIGHT = 1 << 20  # W elements up to which one token takes the CPU library's kernels (fp32: 0.6x torch's ops'
# time here from 256^2 to 2048^2, one thread or two, as fast at 4096^2: larger weights keep torch's threaded GEMV)


def ptr(t) -> Optional[int]:
    """``t.data_ptr()``, None for None (a null pointer)."""
    return None if t is None else t.data_ptr()


def packed(t, dtype: torch.dtype = torch.float32) -> bool:
    """None, or a tensor of ``dtype`` with its elements packed in row-major order (what the CPU kernels read)."""
    return t is None or (t.dtype == dtype and t.is_contiguous())


CPU_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the CPU kernels' dtype codes


def token_weight_layout(weight) -> Optional[int]:
    """How the CPU token kernels read an [out, in] weight of at most ``TOKEN_MAX_WEIGHT`` elements: 0 row-major, 1 the
    transpose of a row-major [in, out] one (a transformers Conv1D's, as layers pass it); None: neither."""
    if weight.numel() > TOKEN_MAX_WEIGHT:
        return None
    if weight.is_contiguous():
        return 0
    return 1 if weight.t().is_contiguous() else None


def cuda_call(name: str, argtypes: list, *args) -> None:
    """Run launcher ``name`` of the CUDA library on torch's current stream (``argtypes`` without the trailing
    stream); a non-zero cudaError_t raises."""
    fn = getattr(CUDA.handle(), name)
    if fn.argtypes is None:
        fn.argtypes, fn.restype = [*argtypes, ctypes.c_void_p], ctypes.c_int
    err = fn(*args, torch.cuda.current_stream().cuda_stream)
    if err != 0:
        raise RuntimeError(f"{name} failed with cudaError {err}")
