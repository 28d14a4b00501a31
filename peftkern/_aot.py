"""Ahead-of-time compilation of the Triton kernels, no GPU needed: PTX and cubin per arch, registers and spills.

The gate compiles what the launchers launch, as Triton's JIT would compile it. Each family's ``triton_impl`` (the
module of its implementations registered for the "triton" backend, so a new family cannot be missed) lists
``AOT_SCENARIOS``: representative training steps ({variant: function}) that call its launchers on aligned CPU
tensors of real model sizes. :func:`kernel_specs` runs them with every ``kernel[grid](...)`` recorded instead of
launched (:func:`record_launches`) and hands each launch to Triton's own binder (``triton.runtime.jit``), so a
:class:`KernelSpec` carries the launcher's tiles, warps and stages and the JIT's specialization: the
``tt.divisibility`` marks of 16-byte aligned pointers and of ints divisible by 16, and ints equal to 1 turned into
constants. Without those marks Triton emits scalar loads and no pipelining: other kernels than the ones that run.
:func:`compile_spec` compiles one spec for its arch and reads the register and spill figures from the log of
Triton's bundled ``ptxas -v`` (re-running it on the PTX when Triton's cache served the cubin).

The compilation must run with ``TRITON_INTERPRET`` unset (with it set, the jit functions are interpreter
objects): :func:`report` runs :func:`compile_all` in a clean subprocess, so callers that interpret (the tests)
can use it too. ``python -c "import peftkern._aot as a; a.main()" [--arch 80 90]`` prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
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
from unittest import mock

DEFAULT_ARCHS = (80, 90)
# SMs of the GPU each arch stands for (A100, H100 SXM): launchers that split work to fill the device size their
# grids, and so some runtime ints, by it
SM_COUNTS = {80: 108, 90: 132}
PROGRAMS_PER_SM = 4  # triton_launch.programs_wanted's rule on a GPU


class KernelSpec(NamedTuple):
    """One kernel launch as Triton's JIT compiles it for ``sm_<arch>``: the jit function (by module and name, so a
    spec pickles to a compile worker) and the ``ASTSource`` arguments and options ``JITFunction.run`` derives from
    the launch's arguments."""
    module: str
    name: str
    variant: str  # the scenario that launched it, e.g. "bf16 base, fp32 adapters r16, dropout"
    arch: int
    signature: dict  # argument -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # (argument index,) -> value: constexpr arguments and the runtime ints the JIT fixes (== 1)
    attrs: dict  # (argument index,) -> [["tt.divisibility", 16]] or []: the JIT's marks of every runtime argument
    options: dict  # the parsed compile options (num_warps, num_stages, ...)

    @property
    def fn(self):
        return getattr(importlib.import_module(self.module), self.name)

    def divisible(self) -> list[str]:
        """The runtime arguments marked divisible by 16 (aligned pointers, sizes and strides)."""
        names = self.fn.arg_names
        return [names[path[0]] for path, marks in self.attrs.items() if ["tt.divisibility", 16] in marks]

    def specialized(self) -> dict:
        """The runtime arguments the JIT turned into constants (ints equal to 1, None)."""
        params = self.fn.params
        return {params[path[0]].name: value for path, value in self.constexprs.items()
                if not params[path[0]].is_constexpr}


def kernel_modules() -> list[str]:
    """The modules of every implementation registered for the "triton" backend, in registration order."""
    import peftkern  # noqa: F401  (importing the package registers every family's implementations)
    from peftkern import backend

    mods = [backend.registered(op)["triton"].__module__ for op in backend.ops() if "triton" in backend.registered(op)]
    return list(dict.fromkeys(mods))


class Launch(NamedTuple):
    """One ``kernel[grid](*args, **kwargs)`` call, recorded instead of run (:func:`record_launches`)."""
    kernel: Any  # the jit (or interpreted) function
    args: tuple
    kwargs: dict
    callers: tuple  # the code objects of the calling frames, innermost first


@contextlib.contextmanager
def record_launches(sm_count: int):
    """Within the block, ``kernel[grid](*args, **kwargs)`` of every Triton kernel (jit or interpreted) appends a
    :class:`Launch` to the yielded list instead of launching, and the launchers size their grids for a GPU of
    ``sm_count`` SMs (on CPU tensors ``programs_wanted`` answers the interpreter's 2)."""
    from triton.runtime.jit import KernelInterface

    from .ops import triton_launch

    launches: list[Launch] = []

    def record(kernel, *args, **kwargs):
        frame, callers = sys._getframe(1), []
        while frame is not None:
            callers.append(frame.f_code)
            frame = frame.f_back
        launches.append(Launch(kernel, args, kwargs, tuple(callers)))

    wanted = triton_launch.programs_wanted
    users = [m for name, m in list(sys.modules.items())
             if name.startswith("peftkern.ops.") and getattr(m, "programs_wanted", None) is wanted]
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(
            KernelInterface, "__getitem__", lambda kernel, grid: functools.partial(record, kernel)))
        for m in users:
            stack.enter_context(mock.patch.object(m, "programs_wanted", lambda device: PROGRAMS_PER_SM * sm_count))
        yield launches


def jit_specialization(kernel, args: tuple, kwargs: dict, arch: int) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) that ``JITFunction.run`` compiles for ``kernel[grid](*args,
    **kwargs)`` on ``sm_<arch>``: Triton's own binder and ``_pack_args``, with the knobs ``run`` adds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import create_function_from_signature

    backend = triton.compiler.make_backend(GPUTarget("cuda", arch, 32))
    knobs = triton.knobs
    kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, dict(options.__dict__)


def scenario_launches(arch: int) -> list[tuple[str, Launch]]:
    """(variant, launch) of every family's ``AOT_SCENARIOS`` sized for ``sm_<arch>``; the variant names the
    scenario and the function it called that launched the kernel (an op or a launcher)."""
    out = []
    for module in kernel_modules():
        for scenario, run in importlib.import_module(module).AOT_SCENARIOS.items():
            code = getattr(run, "func", run).__code__
            with record_launches(SM_COUNTS[arch]) as launches:
                run()
            for launch in launches:
                called = launch.callers[launch.callers.index(code) - 1].co_name
                out.append((f"{scenario}: {called}", launch))
    return out


def kernel_specs(arch: int) -> list[KernelSpec]:
    """The distinct compilations of every family's ``AOT_SCENARIOS`` on ``sm_<arch>``, in launch order (a spec
    launched again, by the same scenario or another, is listed once under its first variant)."""
    if _interpreting():
        raise RuntimeError("unset TRITON_INTERPRET to specialize like the JIT (or call peftkern._aot.report())")
    specs: dict[str, KernelSpec] = {}
    for variant, (kernel, args, kwargs, _) in scenario_launches(arch):
        spec = KernelSpec(kernel.fn.__module__, kernel.fn.__name__, variant, arch,
                          *jit_specialization(kernel, args, kwargs, arch))
        compiled = (spec.signature, spec.constexprs, spec.attrs, spec.options)
        specs.setdefault(repr((spec.module, spec.name, *(sorted(d.items()) for d in compiled))), spec)
    return list(specs.values())


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


def ptxas_usage(ptx: str, arch: int, fp_fusion: bool = True) -> dict:
    """Run Triton's bundled ``ptxas -v`` on ``ptx`` with the flags Triton's make_cubin passes."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o",
               os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    usage = parse_ptxas_log(log)
    if usage is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return usage


def compile_spec(spec: KernelSpec) -> dict:
    """Compile ``spec`` for its arch; the result row: kernel, variant, arch, launch config, the JIT's marks,
    registers, spills, shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    start = time.perf_counter()
    log = io.StringIO()
    source = triton.compiler.ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs)
    # Triton runs ptxas -v itself; its log is printed only when asked (and not at all on a cache hit)
    with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(source, target=GPUTarget("cuda", spec.arch, 32), options=spec.options)
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{spec.name}: no cubin for sm_{spec.arch}")
    usage = (parse_ptxas_log(log.getvalue())
             or ptxas_usage(compiled.asm["ptx"], spec.arch, spec.options.get("enable_fp_fusion", True)))
    names = spec.fn.arg_names
    tiles = {names[path[0]]: v for path, v in spec.constexprs.items()
             if names[path[0]].startswith("BLOCK_") or names[path[0]] == "GROUP_M"}
    warps, stages = spec.options["num_warps"], spec.options["num_stages"]
    return {"kernel": spec.name, "variant": spec.variant, "arch": spec.arch,
            "gpu": sm_arch_from_capability(spec.arch), "num_warps": warps, "num_stages": stages,
            "config": {**tiles, "num_warps": warps, "num_stages": stages},
            "divisible": spec.divisible(), "specialized": spec.specialized(),
            "shared_bytes": int(compiled.metadata.shared), **usage, "seconds": round(time.perf_counter() - start, 2)}


def compile_all(archs=DEFAULT_ARCHS, workers: int | None = None, progress: bool = False) -> list[dict]:
    """Every spec of :func:`kernel_specs` for every arch, in ``workers`` processes (default: the CPUs, <= 8);
    ``progress``: a progress bar on a terminal."""
    from ._console import progress_bar

    specs = [spec for arch in archs for spec in kernel_specs(arch)]
    workers = workers or min(8, os.cpu_count() or 1)
    with progress_bar(len(specs), "compiling", progress) as step:
        if workers == 1:
            return [step(row["kernel"]) or row for row in map(compile_spec, specs)]
        # processes, not threads: Triton's compiler holds the GIL through most of a compile
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return [step(row["kernel"]) or row for row in pool.map(compile_spec, specs)]


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

    cols = [("kernel", "kernel"), ("variant", "variant"), ("gpu", "arch"), ("tiles", "tiles"),
            ("num_warps", "warps"), ("num_stages", "stages"), ("registers", "regs"), ("spill", "spill st/ld B"),
            ("shared_bytes", "smem B")]
    return table([{**r, "spill": f"{r['spill_store_bytes']}/{r['spill_load_bytes']}",
                   "tiles": "x".join(str(v) for k, v in r["config"].items() if k.startswith("BLOCK_"))}
                  for r in rows], cols)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), choices=sorted(SM_COUNTS),
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
    spilled = [f"{r['kernel']} ({r['variant']}, {r['gpu']})" for r in rows if r["spills"]]
    if spilled:
        print(f"register spills: {', '.join(spilled)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="peftkern kernels", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
