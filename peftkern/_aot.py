"""Ahead-of-time compilation of the Triton kernels, no GPU needed: PTX and cubin per arch, registers and spills.

Each family's ``triton_impl`` (the module of its implementations registered for the "triton" backend, so a new
family cannot be missed) lists its kernels in ``KERNELS`` (:class:`KernelSpec`: the jit function, a
representative signature, its constexprs, launch options). :func:`compile_spec` compiles one for a CUDA
arch and reads the register and spill figures from the log of Triton's bundled ``ptxas -v`` (re-running it on
the PTX when Triton's cache served the cubin).

The compilation must run with ``TRITON_INTERPRET`` unset (with it set, the jit functions are interpreter
objects): :func:`report` runs :func:`main` with ``--json`` in a clean subprocess, so callers that interpret
(the tests) can use it too. ``python -c "import peftkern._aot as a; a.main()" [--arch 80 90]`` prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, NamedTuple

DEFAULT_ARCHS = (80, 90)


class KernelSpec(NamedTuple):
    """One jit kernel in a representative configuration (the launcher's GPU defaults)."""
    fn: Any  # the @triton.jit function
    signature: dict  # runtime argument -> Triton type ("*bf16", "*fp32", "i32", "fp32")
    constexprs: dict  # constexpr argument -> value
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple = ()  # runtime arguments hinted divisible by 16 (pointers, sizes, strides), as the JIT would
    variant: str = ""  # what this configuration represents, e.g. "bf16 x, fp32 adapters, dropout"

    @property
    def name(self) -> str:
        return self.fn.__name__


def kernel_modules() -> list[str]:
    """The modules of every implementation registered for the "triton" backend, in registration order."""
    import peftkern  # noqa: F401  (importing the package registers every family's implementations)
    from peftkern import backend

    mods = [backend.registered(op)["triton"].__module__ for op in backend.ops() if "triton" in backend.registered(op)]
    return list(dict.fromkeys(mods))


def kernel_specs() -> list[KernelSpec]:
    specs = []
    for mod in kernel_modules():
        specs.extend(importlib.import_module(mod).KERNELS)
    return specs


def _ast_source(spec: KernelSpec):
    import triton

    fn = spec.fn
    unknown = (set(spec.signature) | set(spec.constexprs)) - set(fn.arg_names)
    missing = set(fn.arg_names) - set(spec.signature) - set(spec.constexprs)
    if unknown or missing:
        raise ValueError(f"{spec.name}: signature does not match the kernel (unknown {sorted(unknown)}, "
                         f"missing {sorted(missing)})")
    signature = {a: ("constexpr" if a in spec.constexprs else spec.signature[a]) for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.aligned}
    return triton.compiler.ASTSource(fn, signature, dict(spec.constexprs), attrs)


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict | None:
    """Registers, spill bytes and stack frame from a ``ptxas -v`` log of one kernel (None if there are none)."""
    regs, spill = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log)
    if regs is None or spill is None:
        return None
    return {"registers": int(regs.group(1)), "stack_bytes": int(spill.group(1)),
            "spill_store_bytes": int(spill.group(2)), "spill_load_bytes": int(spill.group(3)),
            "spills": int(spill.group(2)) + int(spill.group(3))}


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Run Triton's bundled ``ptxas -v`` on ``ptx`` with the flags Triton's make_cubin passes."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    usage = parse_ptxas_log(log)
    if usage is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return usage


def compile_spec(spec: KernelSpec, arch: int) -> dict:
    """Compile ``spec`` for ``sm_<arch>``; the result row: kernel, arch, registers, spills, shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    start = time.perf_counter()
    log = io.StringIO()
    # Triton runs ptxas -v itself; its log is printed only when asked (and not at all on a cache hit)
    with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(_ast_source(spec), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{spec.name}: no cubin for sm_{arch}")
    usage = parse_ptxas_log(log.getvalue()) or ptxas_usage(compiled.asm["ptx"], arch)
    tiles = {k: v for k, v in spec.constexprs.items() if k.startswith("BLOCK_") or k == "GROUP_M"}
    return {"kernel": spec.name, "variant": spec.variant, "arch": arch, "gpu": sm_arch_from_capability(arch),
            "num_warps": spec.num_warps, "num_stages": spec.num_stages,
            "config": {**tiles, "num_warps": spec.num_warps, "num_stages": spec.num_stages},
            "shared_bytes": int(compiled.metadata.shared), **usage,
            "seconds": round(time.perf_counter() - start, 2)}


def _compile_job(index: int, arch: int) -> dict:
    return compile_spec(kernel_specs()[index], arch)


def compile_all(archs=DEFAULT_ARCHS, workers: int | None = None, progress: bool = False) -> list[dict]:
    """Every kernel of :func:`kernel_modules` for every arch, in ``workers`` processes (default: the CPUs, <= 8);
    ``progress``: a progress bar on a terminal."""
    from ._console import progress_bar

    if _interpreting():
        raise RuntimeError("unset TRITON_INTERPRET to compile ahead of time (or call peftkern._aot.report())")
    jobs = [(i, arch) for i in range(len(kernel_specs())) for arch in archs]
    workers = workers or min(8, os.cpu_count() or 1)
    with progress_bar(len(jobs), "compiling", progress) as step:
        if workers == 1:
            return [step(row["kernel"]) or row for row in map(_compile_job, *zip(*jobs))]
        # processes, not threads: Triton's compiler holds the GIL through most of a compile
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return [step(row["kernel"]) or row for row in pool.map(_compile_job, *zip(*jobs))]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def report(archs=DEFAULT_ARCHS, timeout: float | None = 600, workers: int | None = None) -> list[dict]:
    """:func:`compile_all` in a subprocess with ``TRITON_INTERPRET`` unset (safe from an interpreting process)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its current default
    code = (f"import json, peftkern._aot as a; "
            f"print(json.dumps(a.compile_all({tuple(archs)!r}, {workers!r})))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ahead-of-time compilation failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # the JSON line, after anything a compiler printed


def format_table(rows: list[dict]) -> str:
    from ._console import format_table as table

    cols = [("kernel", "kernel"), ("variant", "variant"), ("gpu", "arch"), ("num_warps", "warps"),
            ("registers", "regs"), ("spill", "spill st/ld B"), ("shared_bytes", "smem B")]
    return table([{**r, "spill": f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"} for r in rows], cols)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS),
                        help="compute capabilities (default: 80 90)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the rows as JSON to FILE")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: the CPUs, <= 8)")


def run_from_args(args) -> int:
    """Print the table (and write JSON); exit status 1 if a kernel spills (a compile failure raises)."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its current default
    rows = (report(args.arch, workers=args.workers) if _interpreting()
            else compile_all(args.arch, args.workers, progress=True))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    spilled = [f"{r['kernel']} ({r['variant']}, {r['gpu']})" for r in rows
               if r["spills"]]
    if spilled:
        print(f"register spills: {', '.join(spilled)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="peftkern kernels", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
