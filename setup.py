"""Builds the native library of csrc/cpu next to the package (peftkern/_lib/), loaded with ctypes at run time.

It is an optional extension: without a C++ compiler the install still succeeds and the torch backend runs its
pure-PyTorch path (``peftkern info`` says which). The sources export extern "C" functions only (no Python module).
"""
import os

from setuptools import Extension, setup

os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "peftkern", "_lib"), exist_ok=True)
skip = os.environ.get("PEFTKERN_SKIP_CPU_BUILD", "0") not in ("", "0")
ext_modules = [] if skip else [
    Extension("peftkern._lib.libpeftkern_cpu", sources=["csrc/cpu/nf4_cpu.cpp"], language="c++",
              extra_compile_args=["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"], extra_link_args=["-fopenmp"], libraries=["m"],
              optional=True),
]

setup(ext_modules=ext_modules)
