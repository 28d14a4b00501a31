"""Builds the native libraries of csrc/ next to the package (peftkern/_lib/), loaded with ctypes at run time.

* csrc/cpu  -> libpeftkern_cpu (C++, OpenMP): NF4 quantize / dequantize and the one-token LoRA and sparse-diff
  forwards; an optional extension: without a C++ compiler the install still succeeds and the torch backend runs its
  pure-PyTorch paths. It also carries the CUDA launchers' index math
  (csrc/cuda/index_math.cuh) behind a tracer the tests run on the CPU.
* csrc/torch -> _torch_nodes (a torch C++ extension, pybind11): C++ autograd nodes for small eager CPU layers, built
  against the torch the build sees (``pip install --no-build-isolation``, as the Makefile installs; pip's isolated
  build has no torch and skips it) and loaded only under that torch's version; optional, as libpeftkern_cpu.
* csrc/cuda -> libpeftkern_cuda.so (nvcc; extern "C" launchers, no torch headers) for sm_80/86/89/90 + PTX, built
  wherever nvcc is found (PEFTKERN_SKIP_CUDA_BUILD=1 skips it); ptxas' register/spill report is kept beside it
  (libpeftkern_cuda.resource-usage.txt) and a failed compile fails the install.
``peftkern info`` says what was built and why not.
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_SOURCES = ["csrc/cuda/nf4.cu", "csrc/cuda/sparse.cu"]
CUDA_ARCHS = ("80", "86", "89", "90")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


class BuildNative(build_ext):
    def run(self):
        super().run()
        self._build_cuda()

    def _build_cuda(self):
        nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                        if os.environ.get("CUDA_HOME") else None)
        if _flag("PEFTKERN_SKIP_CUDA_BUILD") or not nvcc or not os.path.exists(nvcc):
            print("peftkern: nvcc not found (or PEFTKERN_SKIP_CUDA_BUILD=1): the CUDA library is not built",
                  file=sys.stderr)
            return
        lib_dir = os.path.join(ROOT if self.inplace else self.build_lib, "peftkern", "_lib")
        os.makedirs(lib_dir, exist_ok=True)
        out = os.path.join(lib_dir, "libpeftkern_cuda.so")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
        gencode.append(f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}")  # PTX, newer GPUs
        cmd = [nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", "--resource-usage", *gencode, "-o", out,
               *[os.path.join(ROOT, s) for s in CUDA_SOURCES]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{done.stdout}\n{done.stderr}")
        with open(os.path.join(lib_dir, "libpeftkern_cuda.resource-usage.txt"), "w") as f:
            f.write(done.stdout + done.stderr)


def _torch_nodes() -> list:
    """The csrc/torch extension, where torch can be imported here."""
    try:
        import torch
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        print("peftkern: torch is not importable in this build environment (pip's build isolation): the C++ autograd "
              "nodes are not built; pip install --no-build-isolation builds them", file=sys.stderr)
        return []
    flags = ["-O3", "-g0", "-std=c++20", "-ffp-contract=off", "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=_torch_nodes", f'-DPK_TORCH_VERSION="{torch.__version__}"',
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    return [CppExtension("peftkern._lib._torch_nodes", ["csrc/torch/sparse_small.cpp"], extra_compile_args=flags,
                         optional=True)]


os.makedirs(os.path.join(ROOT, "peftkern", "_lib"), exist_ok=True)
ext_modules = [] if _flag("PEFTKERN_SKIP_CPU_BUILD") else _torch_nodes() + [
    Extension("peftkern._lib.libpeftkern_cpu", sources=["csrc/cpu/nf4_cpu.cpp", "csrc/cpu/token_cpu.cpp", "csrc/cpu/cuda_index.cpp"],
              depends=["csrc/cuda/index_math.cuh", "csrc/cpu/token.h"], language="c++",
              extra_compile_args=["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"], extra_link_args=["-fopenmp"],
              libraries=["m"], optional=True),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildNative})
