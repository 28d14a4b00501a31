"""Lazy ctypes loader of the CUDA library built from csrc/ into peftkern/_lib/."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

LIB_DIR = Path(__file__).parent / "_lib"
LIB_NAME = "libpeftkern_cuda.so"


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    path = LIB_DIR / LIB_NAME
    if not path.exists():
        return None, f"CUDA library not built ({path} missing; build with nvcc via setup.py)"
    try:
        return ctypes.CDLL(str(path)), None
    except OSError as e:
        return None, f"CUDA library failed to load: {e}"


def load_error() -> str | None:
    return _load()[1]


def library() -> ctypes.CDLL:
    lib, err = _load()
    if lib is None:
        raise RuntimeError(err)
    return lib
