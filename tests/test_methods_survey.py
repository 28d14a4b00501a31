"""Every method of pk.patch on a tiny BERT classifier and a tiny Llama (peftkern/benchmarks/bench_methods.py): the loss
falls and only the method's parameters (and the head) move; a few on the real all-MiniLM-L6-v2 learn the demo's task."""
from __future__ import annotations

import pytest

import peftkern as pk
from peftkern.benchmarks import bench_methods


def test_every_method_trains_both_architectures():
    res = bench_methods.run(quick=True, minilm=False, log=lambda s: None)
    rows = res["rows"]
    assert {(r["method"], r["arch"]) for r in rows} == {(m, a) for m in pk.patching.METHODS for a in ("bert", "llama")}
    assert len(pk.patching.METHODS) == 18
    for r in rows:
        assert r["loss_last"] < r["loss_first"], r
        assert r["only_method"], r
        assert 0 < r["trainable"] < r["total"], r


@pytest.mark.slow
def test_methods_on_the_real_minilm():
    rows = bench_methods.run_minilm(["adapter_pfeiffer", "unipelt"], 192, log=lambda s: None)
    for r in rows:
        assert r["loss_last"] < r["loss_first"] and r["acc_after"] >= r["acc_before"] + 20, r
