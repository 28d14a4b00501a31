"""The ``peftkern`` command (``python -m peftkern.cli``): info, bench, demo, kernels, gpu-check.

    peftkern info [--json]            versions, backends (with the reason one is unavailable), CUDA library status
    peftkern bench [lora|nf4|prefix|sparse|adapter|methods|overhead|all] [--quick] [--json F] [--plot F.png]
    peftkern demo [--quick]           a real QLoRA fine-tune of all-MiniLM-L6-v2 on the CPU (peftkern/demo.py)
    peftkern kernels [--arch 80 90] [--json FILE]     compile the launchers' kernel launches as the JIT would (_aot.py)
    peftkern gpu-check [--json FILE] [--budget S]     on a CUDA machine: GPU tests, kernels, benches (_gpu_check.py)
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

BENCHMARKS = {"lora": "bench_lora", "nf4": "bench_nf4", "prefix": "bench_prefix", "sparse": "bench_sparse",
              "adapter": "bench_adapter", "methods": "bench_methods", "overhead": "bench_overhead"}


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _library_archs(path: Path) -> Optional[list[str]]:
    """SASS archs in the built CUDA library, from the ptxas report setup.py keeps beside it (None if unknown)."""
    report = path.with_name("libpeftkern_cuda.resource-usage.txt")
    if not path.exists() or not report.exists():
        return None
    return sorted(set(re.findall(r"for '(sm_\d+a?)'", report.read_text())))


def collect_info() -> dict:
    """Everything ``peftkern info`` prints, as a dict (the ``--json`` output)."""
    import torch

    import peftkern as pk
    from peftkern import _native

    backends = {name: {"available": st.available, "reason": st.reason}
                for name, st in pk.available_backends().items()}
    lib_path = _native.CUDA.path
    err = _native.CUDA.load_error()
    cuda = torch.cuda.is_available()
    devices = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            devices.append({"index": i, "name": torch.cuda.get_device_name(i), "arch": f"sm_{major}{minor}"})
    nvcc = shutil.which("nvcc")
    return {
        "peftkern": pk.__version__,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "peft": _version("peft"),
            "transformers": _version("transformers"),
            "bitsandbytes": _version("bitsandbytes"),
        },
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_available": cuda,
        "torch_cuda": torch.version.cuda,
        "devices": devices,
        "backend": pk.get_backend(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "backends": backends,
        "cuda_library": {"path": str(lib_path), "built": lib_path.exists(), "loaded": err is None, "error": err},
        "cpu_library": {"path": str(_native.CPU.path), "loaded": _native.CPU.load_error() is None,
                        "error": _native.CPU.load_error()},
        "torch_nodes": {"loaded": _native.TORCH_NODES.load_error() is None, "error": _native.TORCH_NODES.load_error()},
        "cuda_archs": {
            "devices": [d["arch"] for d in devices],
            "torch_built_for": list(torch.cuda.get_arch_list()) if cuda else [],
            "library": _library_archs(lib_path),
            "nvcc": nvcc,
        },
    }


def cmd_info(args) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from ._console import format_table

    v = info["versions"]
    print(f"peftkern {info['peftkern']}  (python {v['python']}, {info['platform']})")
    print(format_table([{"package": name, "version": v[name] or "not installed"}
                        for name in ("torch", "triton", "peft", "transformers", "bitsandbytes")],
                       [("package", "package"), ("version", "version")]))
    dev = ", ".join(f"{d['name']} ({d['arch']})" for d in info["devices"]) or "none"
    print(f"CUDA devices: {dev}; torch CUDA {info['torch_cuda'] or '-'}; CPU threads {info['cpu_threads']}")
    print(f"backend in force: {info['backend']}  (TRITON_INTERPRET={info['triton_interpret'] or 'unset'})")
    print(format_table([{"backend": name, "available": "yes" if st["available"] else "no", "reason": st["reason"]}
                        for name, st in info["backends"].items()],
                       [("backend", "backend"), ("available", "available"), ("reason", "why")]))
    lib = info["cuda_library"]
    state = "loaded" if lib["loaded"] else ("built, failed to load" if lib["built"] else "not built")
    print(f"CUDA library: {state}: {lib['path']}" + (f"\n  {lib['error']}" if lib["error"] else ""))
    cpu = info["cpu_library"]
    print(f"CPU library: {'loaded' if cpu['loaded'] else 'not loaded'}: {cpu['path']}"
          + (f"\n  {cpu['error']}" if cpu["error"] else ""))
    nodes = info["torch_nodes"]
    print(f"C++ autograd nodes (csrc/torch): {'loaded' if nodes['loaded'] else 'not loaded'}"
          + (f"\n  {nodes['error']}" if nodes["error"] else ""))
    archs = info["cuda_archs"]
    print(f"CUDA archs: devices {archs['devices'] or '-'}, library {archs['library'] or '-'}, "
          f"torch built for {archs['torch_built_for'] or '-'}, nvcc {archs['nvcc'] or 'not found'}")
    return 0


def _load_benchmark(name: str):
    """The benchmark module of a family: :mod:`peftkern.benchmarks` ships with the package, so an installed wheel
    runs them as a checkout does."""
    return importlib.import_module(f"peftkern.benchmarks.{BENCHMARKS[name]}")


def _per_family(path: Optional[str], family: str) -> Optional[str]:
    if not path:
        return path
    stem, dot, ext = path.rpartition(".")
    return f"{stem}-{family}.{ext}" if dot else f"{path}-{family}"


def cmd_bench(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    families = sorted(BENCHMARKS) if args.which == "all" else [args.which]
    for family in families:
        if len(families) > 1:
            print(f"\n## {family}")
        run_args = argparse.Namespace(**vars(args))
        if len(families) > 1:  # one JSON / plot per family beside the names given
            run_args.json, run_args.plot = (_per_family(path, family) for path in (args.json, args.plot))
        try:
            _load_benchmark(family).run_from_args(run_args)
        except ModuleNotFoundError as e:  # a peer that is not installed: say which, not a traceback
            if e.name is None or e.name.split(".")[0] == "peftkern":
                raise
            dist = e.name.split(".")[0].replace("_", "-")
            raise SystemExit(f"peftkern bench {family}: needs {dist}, which is not installed (pip install {dist})")
    return 0


def cmd_demo(args) -> int:
    from . import demo

    return demo.run_from_args(args)


def cmd_kernels(args) -> int:
    from . import _aot

    return _aot.run_from_args(args)


def cmd_gpu_check(args) -> int:
    from . import _gpu_check

    return _gpu_check.run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="peftkern", description="Fused kernels for parameter-efficient fine-tuning.")
    sub = ap.add_subparsers(dest="command", metavar="{info,bench,demo,kernels,gpu-check}")
    sub.required = True

    p = sub.add_parser("info", help="versions, backends, CUDA library status")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="benchmarks against the peers (peftkern/benchmarks/)")
    p.add_argument("which", nargs="?", default="lora", choices=sorted(BENCHMARKS) + ["all"])
    p.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    p.add_argument("--json", metavar="FILE", default=None, help="JSON output, a CSV beside it (default: "
                   "benchmarks/results/ of the source checkout, else of the current directory)")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="a bar chart of the ratios (matplotlib)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions per config (minimum)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16+fp32A", "bf16"])
    p.add_argument("--shapes", nargs="+", default=None, metavar="TxIxO", help="e.g. 512x1024x1024")
    p.add_argument("--no-model", action="store_true", help="skip the all-MiniLM-L6-v2 measurements")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--malloc", choices=["steady", "default"], default="steady",
                   help="steady (default): fixed glibc mmap/trim thresholds, as in a long training run")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="QLoRA fine-tune of all-MiniLM-L6-v2 on the CPU, against PEFT + bitsandbytes")
    from .demo import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("kernels", help="compile the kernels the launchers launch, as the JIT would (registers, spills)")
    if importlib.util.find_spec("triton") is not None:
        from ._aot import add_arguments as add_kernels_arguments

        add_kernels_arguments(p)
        p.set_defaults(func=cmd_kernels)
    else:
        p.set_defaults(func=lambda args: print("peftkern kernels: needs triton (pip install triton)",
                                               file=sys.stderr) or 2)

    p = sub.add_parser("gpu-check", help="on a CUDA machine: the GPU tests, kernels and quick benchmarks, one JSON "
                                         "report (exits 2 without CUDA)")
    from ._gpu_check import add_arguments as add_gpu_check_arguments

    add_gpu_check_arguments(p)
    p.set_defaults(func=cmd_gpu_check)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
