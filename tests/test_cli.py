"""The ``peftkern`` command: ``info --json`` and an end-to-end ``demo --quick`` (real model, real training)."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from peftkern import cli

REPO = Path(__file__).resolve().parent.parent


def _check_info(info):
    assert {"backends", "cuda_library", "cuda_archs", "versions"} <= set(info)
    assert set(info["backends"]) == {"torch", "triton", "cuda"}
    for st in info["backends"].values():
        assert isinstance(st["available"], bool) and isinstance(st["reason"], str) and st["reason"]
    assert info["backends"]["torch"]["available"] is True
    assert info["backends"]["cuda"]["available"] == (torch.cuda.is_available() and info["cuda_library"]["loaded"])
    assert {"path", "built", "loaded", "error"} <= set(info["cuda_library"])
    assert info["cuda_library"]["loaded"] == (info["cuda_library"]["error"] is None)
    assert {"python", "torch", "triton", "peft", "transformers"} <= set(info["versions"])
    assert info["versions"]["torch"] == torch.__version__


def test_info_json_in_process(capsys):
    assert cli.main(["info", "--json"]) == 0
    _check_info(json.loads(capsys.readouterr().out))


def test_info_json_python_m():
    """``python -m peftkern.cli`` works and prints only JSON on stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "peftkern.cli", "info", "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    _check_info(json.loads(out.stdout))


def test_info_text(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "backend" in text and "available" in text and "torch" in text and "CUDA library" in text


def test_unknown_subcommand_fails():
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code != 0


def test_bench_subcommand_parses():
    args = cli.build_parser().parse_args(["bench", "--quick", "--json", "x.json"])
    assert args.which == "lora" and args.quick and args.json == "x.json" and args.func is cli.cmd_bench
    args = cli.build_parser().parse_args(["bench", "all", "--quick", "--plot", "r.png", "--json", "r.json"])
    assert args.which == "all" and args.plot == "r.png"
    assert cli._per_family("r.png", "nf4") == "r-nf4.png" and cli._per_family(None, "nf4") is None
    for family in cli.BENCHMARKS:
        assert callable(cli._load_benchmark(family).run_from_args), family


def test_bench_names_a_missing_peer(monkeypatch):
    """A peer that is not installed stops ``peftkern bench`` with its name and how to get it, not a traceback."""
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ModuleNotFoundError
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "lora", "--quick", "--no-model", "--shapes", "8x16x16", "--dtypes", "fp32", "--reps", "1"])
    assert str(e.value) == "peftkern bench lora: needs peft, which is not installed (pip install peft)"


def test_bench_runs_from_an_installed_wheel(tmp_path):
    """``peftkern bench`` from the wheel of this tree, unpacked as site-packages, the checkout off sys.path: the
    benchmarks come from the wheel and the results go to the current directory's benchmarks/results/."""
    src, site, work = tmp_path / "src", tmp_path / "site", tmp_path / "work"
    shutil.copytree(REPO / "peftkern", src / "peftkern", ignore=shutil.ignore_patterns("__pycache__", "_lib"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    env = {**os.environ, "PEFTKERN_SKIP_CPU_BUILD": "1", "PEFTKERN_SKIP_CUDA_BUILD": "1", "HF_HUB_OFFLINE": "1"}
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(src)], env=env, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("peftkern-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    assert {f"peftkern/benchmarks/{mod}.py" for mod in cli.BENCHMARKS.values()} <= names
    assert not any(n.startswith("benchmarks/") for n in names)

    work.mkdir()
    argv = ["bench", "lora", "--quick", "--no-model", "--shapes", "16x32x32", "--dtypes", "fp32", "--reps", "1"]
    script = ("import json, sys\n"
              "from peftkern import cli\n"
              f"rc = cli.main({argv!r})\n"
              "mod = sys.modules['peftkern.benchmarks.bench_lora'].__file__\n"
              "print(json.dumps({'rc': rc, 'module': mod, 'path': sys.path}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=work, env={**env, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["rc"] == 0 and Path(out["module"]).is_relative_to(site)
    assert REPO not in {(work / p).resolve() for p in out["path"]}
    (result,) = (work / "benchmarks" / "results").glob("bench_lora-*.json")
    payload = json.loads(result.read_text())
    assert result.name.endswith("-nogit.json") and payload["machine"]["git_commit"] is None
    assert payload["layers"] and all(r["ratio"] > 0 for r in payload["layers"])


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    """``peftkern demo --quick`` through the CLI on a smaller set: the loss falls, the adapter reloads (ours, PEFT)."""
    out_json = tmp_path / "demo.json"
    rc = cli.main(["demo", "--quick", "--n-train", "160", "--n-eval", "32", "--out", str(tmp_path / "adapter"),
                   "--json", str(out_json), "--threads", "1"])
    assert rc == 0
    log = capsys.readouterr().out
    res = json.loads(out_json.read_text())

    # the loss falls: per epoch, and the last steps against the first ones
    losses = res["losses"]
    assert len(losses) == 2 * 10 and len(res["epoch_losses"]) == 2
    assert res["epoch_losses"][-1] < res["epoch_losses"][0]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert all(x == x for x in losses)  # no NaN

    # QLoRA: NF4 projections (bitsandbytes' codes bit for bit), a small trainable fraction of the real model
    assert res["method"] == "qlora" and res["adapted_modules"] == 36 and res["same_codes_as_bnb"] is True
    assert 0 < res["trainable"] < 0.05 * res["total"]
    assert res["weight_bytes"]["nf4"] < 0.15 * res["weight_bytes"]["fp32"]

    # memory vs PEFT + bitsandbytes on the same model and batch
    mem = res["saved_bytes"]
    assert mem["ours_bytes"] < mem["peft_bytes"]
    assert mem["lora_ours_bytes"] <= 0.5 * mem["lora_peft_bytes"]

    # the adapter file exists; pk.load_adapter reproduces our model exactly, PEFT over bitsandbytes' 4-bit model
    # up to bitsandbytes' bf16 rounding of the scales on the CPU (exactness vs PEFT: tests/test_patching.py)
    adapter = Path(res["adapter_path"])
    assert adapter.exists() and (adapter.parent / "adapter_config.json").exists()
    assert res["reload_max_diff"] == 0.0
    assert res["peft_reload_max_diff"] < 0.05 and res["peft_reload_agreement"] >= 0.95
    for phrase in ("1 CPU threads", "trainable parameters", "loss", "eval accuracy before", "eval accuracy after",
                   "bytes saved for backward", "adapter saved"):
        assert phrase in log


def test_demo_threads_must_be_positive():
    with pytest.raises(ValueError, match="--threads must be a positive int"):
        cli.main(["demo", "--threads", "0"])


def test_demo_is_deterministic_and_adapter_is_not_a_noop(tmp_path):
    """Same seed, same losses; the saved adapter changes the model (the PEFT reload check is not vacuous)."""
    from safetensors.torch import load_file

    from peftkern import demo

    def run(sub):
        cfg = demo.DemoConfig(n_train=32, n_eval=16, epochs=1, compare_peft=False, seed=3,
                              out_dir=str(tmp_path / sub))
        return demo.run_demo(cfg, log=lambda s: None)

    a, b = run("a"), run("b")
    assert a.losses == b.losses and a.acc_after == b.acc_after
    sd = load_file(a.adapter_path)
    lora_b = [v for k, v in sd.items() if k.endswith("lora_B.weight")]
    assert len(lora_b) == 36 and all(v.abs().max() > 0 for v in lora_b)  # trained away from PEFT's zero init
    assert all(k.startswith("base_model.model.") for k in sd)


@pytest.mark.triton
def test_kernels_subcommand_writes_json(tmp_path, capsys, monkeypatch, aot_rows):
    """``peftkern kernels --arch 80 --json FILE``: a table on stdout, the rows in FILE, exit 0 (nothing spills).
    The compilation is the session's (``aot_rows``, the same ``_aot.report`` the kernels gate tests)."""
    from peftkern import _aot

    monkeypatch.setattr(_aot, "report", lambda archs, **kw: [r for r in aot_rows if r["arch"] in archs])
    out = tmp_path / "kernels.json"
    assert cli.main(["kernels", "--arch", "80", "--json", str(out)]) == 0
    assert "lora_fwd_kernel" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert rows and {"kernel", "arch", "registers", "spills", "shared_bytes", "config"} <= set(rows[0])
    assert all(r["spills"] == 0 for r in rows)
    assert {r["arch"] for r in rows} == {80}
    assert all(r["config"]["num_warps"] >= 1 for r in rows)
