"""``peftkern gpu-check`` (``make gpu-check``): what only a GPU can confirm, in one run and one JSON report.

The interpreter runs the kernels with fp32 dots at 16/32-wide tiles and the ahead-of-time gate only compiles them;
neither runs bf16 through the real ``tl.dot`` at the GPU tile sizes, nor times anything. On a CUDA machine this runs,
each step in its own process and within its share of a time budget (default 450 s, so the whole stays under
8 minutes):

1. the GPU tests: pytest on :data:`GPU_TESTS`: the op and module tests, which put their tensors on
   ``tests/_helpers.DEVICE`` ("cuda" there), the CUDA-only tests, and the models under autocast and
   bitsandbytes' 4-bit loading on the device;
2. ``peftkern kernels``: the launchers' kernel launches compiled as the JIT would, for sm_80 and sm_90 (spills);
3. ``peftkern bench <family> --quick`` for every family, one process each (a failing family leaves the others' rows);

and writes the device, versions, commit, the test summary, the kernels table and the benchmark results to one JSON
file. It needs the source tree (tests/ are not installed). Without CUDA it says so and exits 2:
nothing it runs would tell anything about a GPU there.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

from .cli import BENCHMARKS

_REPO = Path(__file__).resolve().parent.parent  # the source checkout: tests/ are not installed

GPU_TESTS = ("tests/ops", "tests/nn", "tests/test_native.py", "tests/test_backend.py",
             "tests/integrations/test_autocast_models.py", "tests/integrations/test_peft_fuse_4bit.py")
DEFAULT_BUDGET_S = 450.0
# each step's share of the budget; time a step leaves unused passes to the next ones
SHARES = {"tests": 0.5, "kernels": 0.2, "bench": 0.3}
DEFAULT_JSON = _REPO / "benchmarks" / "results" / "gpu-check.json"
_TAIL = 4000


def no_cuda_reason() -> Optional[str]:
    """Why this machine cannot run the check (no CUDA device, no source tree), else None."""
    import torch

    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"no CUDA device here (torch {torch.__version__}, {built}, sees none); gpu-check runs the GPU "
                f"tests, `peftkern kernels` and `peftkern bench all --quick` on a CUDA machine, and has nothing to "
                f"check on this one")
    missing = [p for p in GPU_TESTS if not (_REPO / p).exists()]
    if missing:
        return f"needs the source tree (git checkout, pip install -e .): {', '.join(missing)} not found in {_REPO}"
    return None


def _env() -> dict:
    """The steps' environment: real kernels (no TRITON_INTERPRET), this tree importable, nothing downloaded."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_step(cmd: list[str], limit_s: float) -> dict:
    """Run ``cmd`` in the repository for at most ``limit_s`` seconds (its whole process group is killed past that:
    the kernels step has compile workers). Returns the command, exit status, seconds, whether it timed out and the
    tail of its output."""
    start = time.monotonic()
    if limit_s <= 0:
        return {"command": cmd, "returncode": None, "seconds": 0.0, "timed_out": True,
                "output_tail": "not run: the time budget was spent"}
    proc = subprocess.Popen(cmd, cwd=_REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out, timed_out = "", False
    try:
        out, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:  # past the limit, or interrupted (Ctrl-C reaches only this process: the step has its own session)
        if timed_out or proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    if timed_out:
        out, _ = proc.communicate()
    return {"command": cmd, "returncode": proc.returncode, "seconds": round(time.monotonic() - start, 1),
            "timed_out": timed_out, "output_tail": (out or "")[-_TAIL:]}


def pytest_summary(junit_xml: Path) -> Optional[dict]:
    """Counts, seconds and the failed tests (with the first line of their message) of a pytest JUnit XML report;
    None if pytest wrote none (killed at its time limit)."""
    if not junit_xml.exists():
        return None
    root = ET.parse(junit_xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for bad in (*case.findall("failure"), *case.findall("error")):
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": bad.tag,
                           "message": message[0][:500] if message else ""})
    return {"passed": count["tests"] - count["failures"] - count["errors"] - count["skipped"],
            "failed": count["failures"], "errors": count["errors"], "skipped": count["skipped"],
            "seconds": round(sum(float(s.get("time", 0)) for s in suites), 1), "failures": failed}


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _git_commit() -> Optional[str]:
    from .benchmarks.common import git_commit

    return git_commit()


def check(budget_s: float = DEFAULT_BUDGET_S, families: Optional[list[str]] = None) -> dict:
    """Run the three steps on this CUDA machine within ``budget_s`` seconds; the report as a dict."""
    from .cli import collect_info

    if not budget_s > 0:
        raise ValueError(f"budget_s must be > 0 seconds, got {budget_s}")
    start = time.monotonic()
    deadlines, acc = {}, 0.0
    for step, share in SHARES.items():
        acc += share
        deadlines[step] = start + acc * budget_s

    def left(step: str) -> float:
        return deadlines[step] - time.monotonic()

    report = {"started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "commit": _git_commit(), "budget_s": budget_s, "info": collect_info()}
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="peftkern-gpu-check-") as tmp:
        tmp = Path(tmp)
        print(f"gpu-check: tests ({' '.join(GPU_TESTS)}), at most {left('tests'):.0f} s", flush=True)
        tests = run_step([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={tmp / 'tests.xml'}",
                          *GPU_TESTS], left("tests"))
        tests["summary"] = pytest_summary(tmp / "tests.xml")

        print(f"gpu-check: peftkern kernels, at most {left('kernels'):.0f} s", flush=True)
        kernels = run_step([py, "-m", "peftkern.cli", "kernels", "--json", str(tmp / "kernels.json")],
                           left("kernels"))
        kernels["rows"] = _read_json(tmp / "kernels.json")

        bench = {}
        for family in families or sorted(BENCHMARKS):
            print(f"gpu-check: peftkern bench {family} --quick, at most {left('bench'):.0f} s", flush=True)
            path = tmp / f"bench-{family}.json"
            bench[family] = run_step([py, "-m", "peftkern.cli", "bench", family, "--quick", "--json", str(path)],
                                     left("bench"))
            bench[family]["results"] = _read_json(path)
    report["steps"] = {"tests": tests, "kernels": kernels, "bench": bench}
    report["seconds"] = round(time.monotonic() - start, 1)
    report["ok"] = _passed(tests) and _passed(kernels) and all(_passed(b) for b in bench.values())
    return report


def _passed(step: dict) -> bool:
    return step["returncode"] == 0 and not step["timed_out"]


def _summary_lines(report: dict) -> list[str]:
    steps = report["steps"]
    t, k = steps["tests"], steps["kernels"]
    s = t["summary"]
    if s is None:
        lines = [f"tests: no report ({'timed out' if t['timed_out'] else 'pytest crashed'}, {t['seconds']} s)"]
    else:
        lines = [f"tests: {s['passed']} passed, {s['failed']} failed, {s['errors']} errors, {s['skipped']} skipped "
                 f"({t['seconds']} s)"]
        lines += [f"  FAILED {f['test']}: {f['message']}" for f in s["failures"]]
    spills = [f"{r['kernel']} ({r['variant']}, {r['gpu']})" for r in k["rows"] or [] if r.get("spills")]
    lines.append(f"kernels: {len(k['rows'] or [])} compiled, spills: {', '.join(spills) or 'none'}, "
                 f"exit {k['returncode']}{', timed out' if k['timed_out'] else ''} ({k['seconds']} s)")
    for name, b in steps["bench"].items():
        state = "ok" if _passed(b) else "timed out" if b["timed_out"] else f"FAILED (exit {b['returncode']})"
        lines.append(f"bench {name}: {state} ({b['seconds']} s)")
    return lines


def run_from_args(args) -> int:
    """Exit status 0 if every step passed, 1 if one failed or ran out of time, 2 without CUDA (nothing run)."""
    reason = no_cuda_reason()
    if reason is not None:
        print(f"peftkern gpu-check: {reason}", file=sys.stderr)
        return 2
    report = check(args.budget)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    devices = ", ".join(f"{d['name']} ({d['arch']})" for d in report["info"]["devices"])
    print("\n".join([f"gpu-check on {devices}, commit {report['commit']}, {report['seconds']} s:",
                     *_summary_lines(report), f"report: {path}", "OK" if report["ok"] else "FAILED"]))
    return 0 if report["ok"] else 1


def add_arguments(parser) -> None:
    parser.add_argument("--json", metavar="FILE", default=str(DEFAULT_JSON),
                        help="the report (default: benchmarks/results/gpu-check.json)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                        help=f"time for all steps (default {DEFAULT_BUDGET_S:.0f}), shared as "
                             + ", ".join(f"{step} {share * 100:.0f}%%" for step, share in SHARES.items())
                             + "; time a step leaves passes on")
