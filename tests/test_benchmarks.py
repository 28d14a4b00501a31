"""The benchmark harness: roofline figures, JSON + CSV, the ratio plot (what every family's benchmark writes)."""
from __future__ import annotations

import csv
import json

from peftkern.benchmarks import common


def test_roofline_and_results_files(tmp_path):
    row = common.add_roofline({"shape": "a", "ratio": 0.8}, "cpu", seconds=0.5, flops=2e12, bytes_moved=1e9)
    assert row["TFLOPs"] == 4.0 and row["GBps"] == 2.0 and "of_peak_flops" not in row  # no peak known on a CPU
    rows = [row, {"shape": "b", "ratio": 1.3, "nested": {"x": 1}}]
    path = common.write_results({"rows": rows}, rows, tmp_path / "r.json", "bench_x", tmp_path / "r.png", "title")
    assert json.loads(path.read_text())["rows"][1]["ratio"] == 1.3
    with open(path.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    assert [r["shape"] for r in table] == ["a", "b"] and "nested" not in table[0]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peer_faster_names_the_rows_the_peer_wins_and_why():
    rows = [{"shape": s, "ratio_paired": r} for s, r in (("a", 0.8), ("b", 1.25), ("c", 1.0))]
    line = common.peer_faster(rows, lambda r: r["shape"], "SDPA", "the reason")
    assert line == "# SDPA faster at: b (1.25x); c (1.00x). Why: the reason"
    assert common.peer_faster(rows[:1], lambda r: r["shape"], "SDPA", "the reason") == \
        "# ours faster than SDPA at every row"


def test_adapter_benchmark_runs_and_reports_what_it_measures(tmp_path, monkeypatch):
    """bench_adapter end to end on small shapes: a ratio per row, fewer saved bytes than the eager adapter, and
    AdapterDrop's step time; the JSON holds both tables."""
    from peftkern.benchmarks import bench_adapter

    monkeypatch.setattr(bench_adapter, "QUICK", [(256, 64, 8)])
    res = bench_adapter.run(quick=True, reps=2, json_path=str(tmp_path / "a.json"), log=lambda s: None)
    assert len(res["rows"]) == len(bench_adapter.DTYPES)
    for row in res["rows"]:
        assert row["ratio"] > 0 and row["saved_ours"] < row["saved_eager"]
    assert res["adapter_drop"][0]["dropped"] == 3 and res["adapter_drop"][0]["ratio"] > 0
    payload = json.loads((tmp_path / "a.json").read_text())
    assert {"rows", "adapter_drop", "machine"} <= set(payload)


def test_overhead_benchmark_runs_every_family(tmp_path):
    """bench_overhead end to end at the smallest sizes: a row per target of issue 15 for each family (LoRA's decode
    call also against nn.Linear, its model step and decoding against PEFT), each with its ratio and per-call times."""
    from peftkern.benchmarks import bench_overhead

    res = bench_overhead.run(quick=True, reps=2, seconds=5e-4, json_path=str(tmp_path / "o.json"), log=lambda s: None)
    rows = {(r["family"], r["what"], r["peer"]): r for r in res["rows"]}
    assert {r["family"] for r in res["rows"]} == set(bench_overhead.FAMILIES)
    assert rows["lora", "decode", "nn.Linear"]["target"] == 2.0
    assert {("lora", "model step", "PEFT"), ("lora", "generate 16 tokens", "PEFT"), ("qlora", "model step", "PEFT"),
            ("qlora", "generate 16 tokens", "PEFT"), ("prefix", "model step", "PEFT prefix tuning")} <= set(rows)
    for r in res["rows"]:
        assert r["ratio"] > 0 and r["ours_us"] > 0 and r["peer_us"] > 0 and r["met"] in ("yes", "no")
    assert len(json.loads((tmp_path / "o.json").read_text())["rows"]) == len(res["rows"])


def test_bf16_probe_tells_an_emulated_bf16_matmul():
    """``measure.bf16_matmul_speed``: consistent with its own timings, measured once a process; with oneDNN and ATen
    capped at AVX2 (no bf16 instructions, as on an AVX2-only CPU) it finds bf16 slow and says why."""
    import os
    import subprocess
    import sys

    from peftkern import measure

    probe = measure.bf16_matmul_speed()
    assert probe["fast"] == (probe["bf16_over_fp32"] <= 2.0) and probe["bf16_ms"] > 0 and probe["fp32_ms"] > 0
    assert measure.bf16_matmul_speed() == probe and measure.bf16_matmul_speed("cuda")["fast"] is True
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "import json; from peftkern import measure; print(json.dumps(measure.bf16_matmul_speed()))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    capped = json.loads(done.stdout.splitlines()[-1])
    assert capped["fast"] is False and capped["bf16_over_fp32"] > 2.0 and "emulated" in capped["why"]


def test_lora_benchmark_sizes_bf16_rows_for_a_cpu_that_emulates_them(tmp_path, monkeypatch):
    """Where bf16 matmuls are slow, ``bench lora`` runs its bf16 rows at the small shapes, the fp32 rows at the usual
    ones, says so with the probe's reason, and records the probe in the JSON."""
    from peftkern.benchmarks import bench_lora

    slow = {"fast": False, "bf16_over_fp32": 30.0, "why": "bf16 is emulated here (test)"}
    monkeypatch.setattr(bench_lora, "bf16_matmul_speed", lambda device: slow)
    monkeypatch.setattr(bench_lora, "QUICK_SHAPES", [(32, 64, 64)])
    monkeypatch.setattr(bench_lora, "SLOW_BF16_QUICK_SHAPES", [(16, 32, 32)])
    monkeypatch.setattr(bench_lora, "QUICK_QKV", (32, 64))
    lines = []
    res = bench_lora.run(quick=True, reps=1, dtypes=["fp32", "bf16"], model=False, r=4,
                         json_path=str(tmp_path / "l.json"), log=lines.append)
    shapes = {(r["dtype"], r["shape"]) for r in res["layers"]}
    assert shapes == {("fp32", "32x64x64"), ("bf16", "16x32x32")}
    assert "# bf16 rows at 16x32x32: bf16 is emulated here (test); --shapes runs them at any shape" in lines
    assert {(q["dtype"], q["tokens"], q["d"]) for q in res["qkv_memory"]} == {("fp32", 32, 64), ("bf16+fp32A", 16, 32)}
    assert json.loads((tmp_path / "l.json").read_text())["bf16_matmul"] == slow
    monkeypatch.setattr(bench_lora, "bf16_matmul_speed", lambda device: {**slow, "fast": True})
    res = bench_lora.run(quick=True, reps=1, dtypes=["bf16"], model=False, r=4, json_path=str(tmp_path / "f.json"),
                         log=lambda s: None)
    assert {r["shape"] for r in res["layers"]} == {"32x64x64"}
