"""Kernel families: one folder each (reference, torch impl, Triton kernels and launchers, autograd, functional API)."""
import importlib.util


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None
