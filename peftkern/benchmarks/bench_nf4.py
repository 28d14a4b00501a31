"""NF4 and QLoRA vs bitsandbytes and PEFT + bitsandbytes, side by side in one process: ratios first.

    python -m peftkern.benchmarks.bench_nf4 [--quick] [--json FILE]        (or: peftkern bench nf4 [--quick])

* quantize (double quant, blocksize 64) and dequantize of a bf16 weight: ``pk.nf4`` vs bitsandbytes' functional
  API on the same device (on a CPU: bitsandbytes' CPU kernels; shapes whose rows are whole blocks, where its CPU
  dequantize is right);
* a QLoRA layer's forward + backward (dx, dA, dB) in bf16 with fp32 adapters: ``QLoRALinear`` vs PEFT's LoRA over a
  ``bnb.nn.Linear4bit`` holding the same codes, and the bytes each keeps for backward (parameters excluded).
torchao's NF4Tensor is measured when torchao is installed.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch
from torch import nn

import peftkern as pk
from peftkern.benchmarks.common import add_roofline, format_table, run_context, standard_cli, write_results
from peftkern.measure import SavedBytes, fmt_bytes, interleaved_times, paired_ratio, summarize
from peftkern.peers import bnb_linear4bit, peft_on_layer

FULL_SHAPES = [(1024, 1024), (4096, 4096)]
QUICK_SHAPES = [(1024, 1024), (2048, 2048)]


def _ratio_row(times: dict, ours: str, peer: str) -> dict:
    so, sp = summarize(times[ours]), summarize(times[peer])
    return {"ratio": so["median_ms"] / sp["median_ms"], "ratio_paired": paired_ratio(times[ours], times[peer]),
            "ours_ms": so["median_ms"], "peer_ms": sp["median_ms"]}


def _torchao_to_nf4():
    """torchao's ``to_nf4`` (its module moved between releases), or None where torchao is not installed."""
    for mod in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
        try:
            return importlib.import_module(mod).to_nf4
        except Exception:
            continue
    return None


def bench_format(out_f: int, in_f: int, reps: int, device: str) -> list[dict]:
    import bitsandbytes.functional as F

    w = torch.randn(out_f, in_f, dtype=torch.bfloat16, device=device)
    q = pk.nf4.quantize(w, 64, True)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.packed, packed), "ours and bitsandbytes disagree"
    fns = {"q_ours": lambda: pk.nf4.quantize(w, 64, True),
           "q_bnb": lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
           "d_ours": lambda: q.dequantize(), "d_bnb": lambda: F.dequantize_4bit(packed, qs, quant_type="nf4")}
    to_nf4 = _torchao_to_nf4()
    if to_nf4 is not None:
        fns["q_torchao"] = lambda: to_nf4(w, 64, 256)
        nf4 = to_nf4(w, 64, 256)
        fns["d_torchao"] = lambda: nf4.get_original_weight()
    times = interleaved_times(fns, reps=reps, device=device)
    shape = f"{out_f}x{in_f}"
    # bytes a dequantization moves: the 4-bit codes and 8-bit scales read, the bf16 weight written
    moved = packed.numel() + q.qabsmax.numel() + q.absmax2.numel() * 4 + w.numel() * w.element_size()
    rows = [{"op": "quantize", "peer": "bitsandbytes", "shape": shape, **_ratio_row(times, "q_ours", "q_bnb")},
            {"op": "dequantize", "peer": "bitsandbytes", "shape": shape, **_ratio_row(times, "d_ours", "d_bnb")}]
    add_roofline(rows[1], device, rows[1]["ours_ms"] * 1e-3, bytes_moved=moved)
    if "q_torchao" in times:
        rows += [{"op": "quantize", "peer": "torchao", "shape": shape, **_ratio_row(times, "q_ours", "q_torchao")},
                 {"op": "dequantize", "peer": "torchao", "shape": shape, **_ratio_row(times, "d_ours", "d_torchao")}]
    return rows


def bench_qlora(tokens: int, out_f: int, in_f: int, r: int, reps: int, device: str) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16, device=device)
    q4 = bnb_linear4bit(linear)
    ours = pk.nn.QLoRALinear.from_bnb(q4, r=r, lora_alpha=2 * r, lora_dropout=0.1)
    theirs = peft_on_layer(q4, r=r, lora_alpha=2 * r, lora_dropout=0.1)
    x = torch.randn(tokens, in_f, dtype=torch.bfloat16, device=device, requires_grad=True)
    g = torch.randn(tokens, out_f, dtype=torch.bfloat16, device=device)

    def step(m):
        x.grad = None
        m(x).backward(g)

    params = [t for m in (ours, theirs) for t in (*m.parameters(), *m.buffers())]  # weights, codes and scales
    saved = {}
    for name, m in (("ours", ours), ("peft", theirs)):
        with SavedBytes(exclude=params + [x]) as sb:
            y = m(x)
        y.backward(g)
        saved[name] = sb.total
    times = interleaved_times({"ours": lambda: step(ours), "peft": lambda: step(theirs)}, reps=reps, device=device)
    return {"shape": f"{tokens}x{in_f}x{out_f}", "r": r, **_ratio_row(times, "ours", "peft"),
            "saved_ours": saved["ours"], "saved_peft": saved["peft"]}


def run(quick: bool = False, json_path: Optional[str] = None, reps: Optional[int] = None, malloc: str = "steady",
        plot: Optional[str] = None, log=print) -> dict:
    device, malloc, info, where = run_context(malloc)
    reps = reps or (5 if quick else 11)
    log(f"# NF4 / QLoRA vs bitsandbytes and PEFT+bitsandbytes, {device}: {where}, "
        f"{info['torch_threads']} threads; torch {torch.__version__}, bitsandbytes {info['versions']['bitsandbytes']}")
    log(f"# median of {reps} interleaved repetitions; ratio < 1: ours faster")
    fmt = []
    for out_f, in_f in (QUICK_SHAPES if quick else FULL_SHAPES):
        fmt += bench_format(out_f, in_f, reps, device)
    log(format_table(fmt, [("op", "op"), ("peer", "peer"), ("shape", "weight"), ("ratio", "ours/peer"),
                           ("ratio_paired", "paired"), ("ours_ms", "ours ms"), ("peer_ms", "peer ms"),
                           ("GBps", "ours GB/s"), ("of_peak_bw", "of peak")]))
    layers = [bench_qlora(512, 1024, 1024, 16, reps, device)]
    if not quick:
        layers.append(bench_qlora(512, 4096, 4096, 16, reps, device))
    log("\n# QLoRA layer fwd+bwd, bf16 base, fp32 adapters r=16, dropout 0.1: QLoRALinear vs PEFT over Linear4bit")
    log(format_table([{**row, "saved": f"{fmt_bytes(row['saved_ours'])} / {fmt_bytes(row['saved_peft'])}"}
                      for row in layers],
                     [("shape", "tokens x in x out"), ("ratio", "ours/PEFT"), ("ratio_paired", "paired"),
                      ("ours_ms", "ours ms"), ("peer_ms", "PEFT ms"), ("saved", "saved ours / PEFT")]))
    path = write_results({"machine": info, "malloc": malloc, "reps": reps, "format": fmt, "qlora": layers},
                         fmt + layers, json_path, "bench_nf4", plot,
                         f"NF4 / QLoRA vs bitsandbytes, PEFT, torchao, {device}",
                         lambda r: f"{r.get('op', 'QLoRA layer')} {r['shape']} vs {r.get('peer', 'PEFT')}")
    log(f"\n# JSON: {path}")
    return {"format": fmt, "qlora": layers}


add_arguments, run_from_args, main = standard_cli(run, __doc__)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
