"""Kernel families: one folder each (reference, torch impl, Triton kernels and launchers, autograd, functional API)."""
