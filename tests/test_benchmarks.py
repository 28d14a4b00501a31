"""The benchmark harness: roofline figures, JSON + CSV, the ratio plot (what every family's benchmark writes)."""
from __future__ import annotations

import csv
import json

from benchmarks import common


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
