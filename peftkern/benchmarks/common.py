"""Shared benchmark utilities: the run's allocator, metadata, results (JSON, CSV, plot) and command-line options.

What is measured and how (interleaved timing, bytes saved for backward) is :mod:`peftkern.measure`, shared with the
demo and the tests. Results go to ``benchmarks/results/`` of the source checkout when the package runs from one,
else of the current directory.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Callable, Optional

import torch

from peftkern._console import format_table  # noqa: F401  (the tables of the peftkern command)

_ROOT = Path(__file__).resolve().parent.parent.parent
CHECKOUT: Optional[Path] = _ROOT if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "peftkern").is_dir() else None


def results_dir() -> Path:
    """benchmarks/results/ of the source checkout the package runs from, else of the current directory."""
    return (CHECKOUT or Path.cwd()) / "benchmarks" / "results"


def steady_malloc() -> str:
    """Make glibc's malloc behave as in a long training run: blocks up to 32 MiB come from the heap and are reused
    (no fresh mmap + page faults per call), and the heap is not trimmed between calls.

    glibc raises its mmap threshold dynamically as large blocks are freed, so without this the cost of a call
    depends on what the process did before (measured here: the same config 0.87x in a fresh process, 1.07x after
    other configs). Fixing the thresholds removes that history; both implementations get the same allocator.
    Returns a description for the JSON ("default" where it does not apply).
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or torch.cuda.is_available():
        return "default"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return "default"
    return "glibc mallopt: M_MMAP_THRESHOLD=32MiB, M_TRIM_THRESHOLD=1GiB" if ok else "default"


# --------------------------------------------------------------------------------------------------- metadata
def git_commit() -> Optional[str]:
    """The checkout's commit (``-dirty`` with uncommitted changes); None for an installed package."""
    if CHECKOUT is None:
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=CHECKOUT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    cuda = torch.cuda.is_available()
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        # what torch uses of those flags: ATen's kernels, and the caps that emulate a smaller CPU
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_caps": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                                                "MKL_ENABLE_INSTRUCTIONS") if k in os.environ},
        "load_average_at_start": load,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "versions": {"torch": torch.__version__, "peft": _version("peft"), "transformers": _version("transformers"),
                     "triton": _version("triton"), "bitsandbytes": _version("bitsandbytes"),
                     "peftkern": _version("peftkern")},
    }


# --------------------------------------------------------------------------------------------------- output
def write_json(payload: dict, path: Optional[str | os.PathLike] = None, stem: str = "bench") -> Path:
    """Write ``payload`` to ``path`` or to :func:`results_dir`/<stem>-<date>-<commit>.json (gitignored)."""
    if path is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        commit = (payload.get("machine", {}).get("git_commit") or "nogit")[:12]
        path = results_dir() / f"{stem}-{stamp}-{commit}.json"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


# Dense bf16 tensor-core TFLOP/s and DRAM GB/s from the vendors' datasheets, matched against the device name.
GPU_PEAKS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0), "L40S": (362.0, 864.0),
             "L4": (121.0, 300.0), "A10": (125.0, 600.0), "RTX 4090": (165.0, 1008.0)}


def device_peak(device: str) -> tuple[Optional[float], Optional[float]]:
    """(TFLOP/s, GB/s) of the GPU in use, or (None, None) on a CPU or an unknown GPU."""
    if device != "cuda":
        return None, None
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in GPU_PEAKS.items() if key in name), (None, None))


def add_roofline(row: dict, device: str, seconds: float, flops: float = 0.0, bytes_moved: float = 0.0) -> dict:
    """Achieved TFLOP/s and GB/s of one call taking ``seconds``, and their share of the device's peak."""
    peak_flops, peak_bw = device_peak(device)
    if flops:
        row["TFLOPs"] = flops / seconds / 1e12
        if peak_flops:
            row["of_peak_flops"] = row["TFLOPs"] / peak_flops
    if bytes_moved:
        row["GBps"] = bytes_moved / seconds / 1e9
        if peak_bw:
            row["of_peak_bw"] = row["GBps"] / peak_bw
    return row


def write_results(payload: dict, rows: list[dict], json_path, stem: str, plot_path=None, title: str = "",
                  label: Optional[Callable[[dict], str]] = None) -> Path:
    """The JSON (payload), a CSV of ``rows`` beside it, and with ``plot_path`` a bar chart of their ratios."""
    path = write_json(payload, json_path, stem)
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, (int, float, str))))
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if plot_path:
        plot_ratios(rows, plot_path, title, label or (lambda r: str(r.get("shape", ""))))
    return path


def peer_faster(rows: list[dict], label: Callable[[dict], str], peer: str, why: str) -> str:
    """A line naming the rows where ``peer`` is faster (paired ratio >= 1) and ``why``, or saying there are none."""
    slower = [f"{label(r)} ({r['ratio_paired']:.2f}x)" for r in rows if r["ratio_paired"] >= 1.0]
    if not slower:
        return f"# ours faster than {peer} at every row"
    return f"# {peer} faster at: {'; '.join(slower)}. Why: {why}"


def plot_ratios(rows: list[dict], path, title: str, label: Callable[[dict], str]) -> None:
    """Horizontal bars of ours/peer time per config (matplotlib, no display needed); < 1 is faster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    ratios = [r["ratio"] for r in rows]
    ax.barh(range(len(rows)), ratios, color=["tab:green" if v <= 1 else "tab:red" for v in ratios])
    ax.set_yticks(range(len(rows)), [label(r) for r in rows], fontsize=8)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel("time ours / peer (< 1: ours faster)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- command line
def add_standard_arguments(ap) -> None:
    """--quick, --json, --reps, --malloc: the options every benchmark takes."""
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    ap.add_argument("--json", metavar="FILE", default=None, help="where to write the JSON")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions per config")
    ap.add_argument("--malloc", choices=["steady", "default"], default="steady",
                    help="steady (default): fixed glibc mmap/trim thresholds, as in a long training run")
    ap.add_argument("--plot", metavar="FILE.png", default=None, help="a bar chart of the ratios")


def run_standard(run: Callable, args) -> dict:
    """``run(quick, json_path, reps, malloc)`` from parsed arguments (``peftkern bench``'s or the script's own)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return run(quick=args.quick, json_path=args.json, reps=args.reps, malloc=getattr(args, "malloc", "steady"),
               plot=getattr(args, "plot", None))


def run_context(malloc: str) -> tuple[str, str, dict, str]:
    """(device, allocator setting, machine info, a one-phrase description of the device) for a benchmark's run."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    malloc = steady_malloc() if malloc == "steady" and device == "cpu" else "default"
    info = machine_info()
    return device, malloc, info, info["cpu"] if device == "cpu" else info["gpu"]


def standard_cli(run: Callable, doc: str, threads: Optional[str] = None) -> tuple[Callable, Callable, Callable]:
    """(add_arguments, run_from_args, main) of a benchmark taking the standard options; with ``threads`` (its help
    text) also ``--threads``, handed to ``run`` as ``threads`` (default 1) instead of set for the whole process."""
    import argparse

    def add_arguments(ap) -> None:
        add_standard_arguments(ap)
        if threads is not None:
            ap.add_argument("--threads", type=int, default=None, help=threads)

    def run_from_args(args) -> dict:
        if threads is None:
            return run_standard(run, args)
        return run(quick=args.quick, json_path=args.json, reps=args.reps, malloc=args.malloc, plot=args.plot,
                   threads=args.threads or 1)

    def main(argv=None) -> int:
        ap = argparse.ArgumentParser(description=doc.splitlines()[0])
        add_arguments(ap)
        run_from_args(ap.parse_args(argv))
        return 0

    return add_arguments, run_from_args, main
