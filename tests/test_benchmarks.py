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
            ("prefix", "model step", "PEFT prefix tuning")} <= set(rows)
    for r in res["rows"]:
        assert r["ratio"] > 0 and r["ours_us"] > 0 and r["peer_us"] > 0 and r["met"] in ("yes", "no")
    assert len(json.loads((tmp_path / "o.json").read_text())["rows"]) == len(res["rows"])
