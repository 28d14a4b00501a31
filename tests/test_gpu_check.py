"""``peftkern gpu-check`` (``make gpu-check``): refuses plainly without CUDA; its pieces on real processes.

The check itself needs a CUDA machine (it runs the GPU tests, the AOT gate and the benchmarks there for minutes);
here: the command without CUDA (in process and as ``python -m peftkern.cli``, CUDA hidden so it holds on a GPU host
too), the test summary read from a real pytest run, and a step killed at its time limit.
"""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from peftkern import _gpu_check, cli

REPO = Path(__file__).resolve().parent.parent


def test_without_cuda_says_so_and_exits_nonzero(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = tmp_path / "gpu-check.json"
    assert cli.main(["gpu-check", "--json", str(report)]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("peftkern gpu-check: no CUDA device here") and "CUDA machine" in out.err
    assert out.out == "" and not report.exists()


def test_without_cuda_python_m():
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "peftkern.cli", "gpu-check"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "no CUDA device here" in done.stderr and done.stdout == ""


def test_pytest_summary_of_a_real_run(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest

        def test_ok():
            pass

        def test_wrong():
            assert 1 == 2, "one is not two"

        @pytest.mark.skip(reason="no")
        def test_skipped():
            pass

        @pytest.fixture
        def broken():
            raise RuntimeError("fixture down")

        def test_error(broken):
            pass
    """))
    xml = tmp_path / "report.xml"
    step = _gpu_check.run_step([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                                str(tmp_path / "test_sample.py")], 120)
    assert step["returncode"] == 1 and not step["timed_out"]
    summary = _gpu_check.pytest_summary(xml)
    assert {k: summary[k] for k in ("passed", "failed", "errors", "skipped")} == \
        {"passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    by_test = {f["test"].rsplit("::", 1)[1]: f for f in summary["failures"]}
    assert set(by_test) == {"test_wrong", "test_error"}
    assert by_test["test_wrong"]["kind"] == "failure" and "one is not two" in by_test["test_wrong"]["message"]
    assert by_test["test_error"]["kind"] == "error" and "fixture down" in by_test["test_error"]["message"]
    assert _gpu_check.pytest_summary(tmp_path / "missing.xml") is None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_step_killed_at_its_limit_with_its_children():
    """The kernels step compiles in worker processes: a step past its limit goes with all of them."""
    child = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; " \
            "time.sleep(60)']); print(c.pid, flush=True); time.sleep(60)"
    start = time.monotonic()
    step = _gpu_check.run_step([sys.executable, "-c", child], 3)
    assert step["timed_out"] and step["returncode"] != 0 and time.monotonic() - start < 30
    grandchild = int(step["output_tail"].split()[0])
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
    skipped = _gpu_check.run_step([sys.executable, "-c", "pass"], 0)
    assert skipped["timed_out"] and skipped["returncode"] is None and "budget" in skipped["output_tail"]


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="budget_s"):
        _gpu_check.check(0)
