"""LoRALinear vs PEFT's LoRA layer, side by side in one process: fwd+bwd time and bytes saved for backward.

    python -m peftkern.benchmarks.bench_lora [--quick] [--json FILE]        (or: peftkern bench lora [--quick])

Both layers wrap the same frozen ``nn.Linear`` and hold the same adapter (PEFT via ``peft.get_peft_model`` on a
module holding the linear; ours ``LoRALinear.from_linear``). A step is forward + backward of one layer with
``x.requires_grad`` (a layer inside a network: dx, dA, dB). Repetitions are interleaved; the table gives the ratio
ours/PEFT of the median wall clock (< 1: ours faster) first, then the absolute medians.

dtypes: ``fp32``; ``bf16+fp32A`` = bf16 base with fp32 adapters (PEFT's default, ``autocast_adapter_dtype=True``);
``bf16`` = pure bf16 (PEFT with ``autocast_adapter_dtype=False``). On a CPU that emulates bf16 matmuls (no AVX-512 bf16
or AMX: ``measure.bf16_matmul_speed`` times one) the bf16 rows run at smaller shapes, and the output says so.

Memory (saved-tensor hooks, unique storages, parameters excluded):
* ``all``   - every storage a layer's forward keeps for backward, its input x included;
* ``added`` - what the layer keeps beyond its input x (x is usually kept by the layer before it anyway);
* ``qkv``   - three adapted projections reading the same x (attention's query/key/value), all storages;
* model     - the real all-MiniLM-L6-v2 with LoRA on query/key/value/attention-out/intermediate/output
              (36 projections), one training forward, total unique bytes, vs PEFT on the same modules and vs a
              full fine-tune of the same model (the floor: the activations any training keeps).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

import torch
from torch import nn

from peftkern import peers
from peftkern.benchmarks.common import add_roofline, format_table, machine_info, steady_malloc, write_results
from peftkern.measure import (SavedBytes, bf16_matmul_speed, compare_step_time, describe_storages, fmt_bytes,
                              interleaved_times, paired_ratio, summarize)

DTYPES = {  # name: (base dtype, adapters in fp32?)
    "fp32": (torch.float32, True),
    "bf16+fp32A": (torch.bfloat16, True),
    "bf16": (torch.bfloat16, False),
}
FULL_SHAPES = [(512, 1024, 1024), (2048, 1024, 1024), (512, 4096, 4096), (2048, 4096, 4096)]
QUICK_SHAPES = [(512, 1024, 1024), (2048, 1024, 1024)]
# the bf16 rows where the CPU emulates bf16 matmuls (measure.bf16_matmul_speed): at the quick shapes each bf16 row
# took 1.4-5.7 s a step on an AVX2-only EPYC, about 10 minutes for --quick; these take ~0.15 s
SLOW_BF16_FULL_SHAPES = [(128, 512, 512), (512, 1024, 1024)]
SLOW_BF16_QUICK_SHAPES = [(128, 512, 512)]
QUICK_QKV, FULL_QKV = (512, 1024), (2048, 1024)  # tokens, d of the three projections' memory table
DROPOUTS = (0.0, 0.1)


class _Holder(nn.Module):
    def __init__(self, linears: dict[str, nn.Linear]):
        super().__init__()
        for k, v in linears.items():
            setattr(self, k, v)
        self.names = list(linears)

    def forward(self, x):
        outs = [getattr(self, n)(x) for n in self.names]
        return outs[0] if len(outs) == 1 else torch.stack(outs)


class _Ours(nn.Module):
    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__()
        self.layers = nn.ModuleDict(layers)

    def forward(self, x):
        outs = [m(x) for m in self.layers.values()]
        return outs[0] if len(outs) == 1 else torch.stack(outs)


def build_pair(in_f: int, out_f: int, r: int, dropout: float, dtype: str, n_proj: int = 1, device: str = "cpu",
               seed: int = 0):
    """(peft_model, ours, peft_lora_params, our_lora_params): same frozen base linears, same adapters."""
    import peft
    import peftkern as pk

    base_dtype, fp32_adapters = DTYPES[dtype]
    torch.manual_seed(seed)
    names = ["proj"] if n_proj == 1 else ["query", "key", "value"][:n_proj]
    linears = {n: nn.Linear(in_f, out_f, device=device, dtype=base_dtype) for n in names}
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=names)
    pm = peft.get_peft_model(_Holder(linears), cfg, autocast_adapter_dtype=fp32_adapters)
    ours, pp, op = {}, [], []
    for n in names:
        layer = pm.base_model.model.get_submodule(n)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            B.normal_(0, 0.02)  # a trained adapter, not PEFT's zero init: every path computes real values
        m = pk.nn.LoRALinear.from_linear(layer.base_layer, r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                         adapter_dtype=A.dtype)
        with torch.no_grad():
            m.lora_A.copy_(A)
            m.lora_B.copy_(B)
        ours[n] = m
        pp += [A, B]
        op += [m.lora_A, m.lora_B]
    ours = _Ours(ours)
    pm.train()
    ours.train()
    return pm, ours, pp, op


def _step(module, x, g, params):
    for p in params:
        p.grad = None
    x.grad = None
    module(x).backward(g)


def check_agreement(pm, ours, pp, op, x, g) -> float:
    """Max relative difference of y, dx, dA, dB between ours and PEFT at dropout 0 (eval-mode forward math)."""
    diffs = []
    for m in (pm, ours):
        m.eval()
    outs = []
    for m, ps in ((pm, pp), (ours, op)):
        xx = x.detach().clone().requires_grad_(True)
        y = m(xx)
        grads = torch.autograd.grad(y, [xx, *ps], g)
        outs.append([y.detach(), *grads])
    for a, b in zip(*outs):
        diffs.append(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item())
    for m in (pm, ours):
        m.train()
    return max(diffs)


def layer_memory(pm, ours, pp, op, x) -> dict:
    """Saved-for-backward bytes of one forward: all storages, and storages beyond the input x; ours and PEFT."""
    out = {}
    for name, m, ps in (("peft", pm, pp), ("ours", ours, op)):
        frozen = [p for p in m.parameters()]
        with SavedBytes(exclude=frozen + list(ps)) as all_:
            y_all = m(x)
        with SavedBytes(exclude=frozen + list(ps) + [x]) as added:
            y_add = m(x)
        del y_all, y_add
        out[name] = {"all": all_.total, "added": added.total, "saved": describe_storages(all_.storages.values())}
    return out


def bench_layer(n_tok: int, in_f: int, out_f: int, r: int, dropout: float, dtype: str, reps: int,
                device: str, min_time_s: float) -> dict:
    pm, ours, pp, op = build_pair(in_f, out_f, r, dropout, dtype, device=device)
    base_dtype = DTYPES[dtype][0]
    torch.manual_seed(1)
    x = torch.randn(n_tok, in_f, device=device, dtype=base_dtype, requires_grad=True)
    g = torch.randn(n_tok, out_f, device=device, dtype=base_dtype)
    agree = check_agreement(pm, ours, pp, op, x, g) if dropout == 0.0 else None
    cpu: dict[str, list[float]] = {}
    times = interleaved_times({"ours": lambda: _step(ours, x, g, op), "peft": lambda: _step(pm, x, g, pp)},
                              reps=reps, device=device, min_time_s=min_time_s, cpu_times=cpu)
    so, sp = summarize(times["ours"]), summarize(times["peft"])
    cpu_ratio = summarize(cpu["ours"])["median_ms"] / summarize(cpu["peft"])["median_ms"] if cpu else None
    mem = layer_memory(pm, ours, pp, op, x)
    return {
        "tokens": n_tok, "in": in_f, "out": out_f, "r": r, "dropout": dropout, "dtype": dtype,
        "ratio": so["median_ms"] / sp["median_ms"], "ratio_paired": paired_ratio(times["ours"], times["peft"]),
        "ratio_min": so["min_ms"] / sp["min_ms"], "ratio_cpu": cpu_ratio,
        "ours_ms": so["median_ms"], "peft_ms": sp["median_ms"], "ours": so, "peft": sp,
        "ours_cpu": summarize(cpu["ours"]) if cpu else None, "peft_cpu": summarize(cpu["peft"]) if cpu else None,
        "max_rel_diff_p0": agree,
        "mem_all_ours": mem["ours"]["all"], "mem_all_peft": mem["peft"]["all"],
        "mem_added_ours": mem["ours"]["added"], "mem_added_peft": mem["peft"]["added"],
        "saved_ours": mem["ours"]["saved"], "saved_peft": mem["peft"]["saved"],
    }


def qkv_memory(n_tok: int, d: int, r: int, dropout: float, dtype: str, device: str) -> dict:
    """Three adapted projections on one x (query/key/value): all unique saved storages, x included."""
    pm, ours, pp, op = build_pair(d, d, r, dropout, dtype, n_proj=3, device=device)
    x = torch.randn(n_tok, d, device=device, dtype=DTYPES[dtype][0], requires_grad=True)
    mem = layer_memory(pm, ours, pp, op, x)
    return {"tokens": n_tok, "d": d, "r": r, "dropout": dropout, "dtype": dtype,
            "ours": mem["ours"]["all"], "peft": mem["peft"]["all"],
            "ratio": mem["ours"]["all"] / mem["peft"]["all"]}


def model_memory(batch: int, seq: int, r: int, dropout: float, seed: int = 0) -> dict:
    """all-MiniLM-L6-v2, one training forward: LoRALinear vs PEFT on the same 36 projections vs full fine-tune."""
    torch.manual_seed(seed)
    ids = torch.randint(1000, 20000, (batch, seq))
    mem = peers.compare_saved_bytes({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, r=r,
                                    lora_alpha=2 * r, lora_dropout=dropout, seed=seed)
    return {"batch": batch, "seq": seq, "r": r, "dropout": dropout, "ours": mem["ours_bytes"],
            "peft": mem["peft_bytes"], "floor": mem["floor_bytes"], "ratio": mem["ratio"],
            "lora_ours": mem["lora_ours_bytes"], "lora_peft": mem["lora_peft_bytes"]}


def model_step_time(batch: int, seq: int, r: int, dropout: float, reps: int, seed: int = 0) -> dict:
    """fwd+bwd of the whole MiniLM classifier, LoRALinear vs PEFT, interleaved."""
    torch.manual_seed(seed)
    ids = torch.randint(1000, 20000, (batch, seq))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch,))}
    ours = peers.load_classifier(seed=seed)
    peers.apply_lora(ours, r=r, lora_alpha=2 * r, lora_dropout=dropout)
    pm = peers.apply_peft(peers.load_classifier(seed=seed), r=r, lora_alpha=2 * r, lora_dropout=dropout)
    peers.copy_lora_to_peft(ours, pm)
    st = compare_step_time(ours, pm, inputs, reps)
    return {"batch": batch, "seq": seq, "r": r, "dropout": dropout, "ratio": st["ratio"],
            "ratio_paired": st["ratio_paired"], "ours_ms": st["ours_ms"], "peft_ms": st["peft_ms"]}


COLUMNS = [("shape", "tokens x in x out"), ("dtype", "dtype"), ("dropout", "p"), ("ratio", "ours/PEFT"),
           ("ratio_paired", "paired"), ("ratio_min", "min/min"), ("ratio_cpu", "cpu-time"), ("ours_ms", "ours ms"),
           ("peft_ms", "PEFT ms"), ("TFLOPs", "ours TFLOP/s"),
           ("mem_all", "saved all ours/PEFT"), ("mem_added", "added beyond x ours/PEFT")]


def run(quick: bool = False, json_path: Optional[str] = None, reps: Optional[int] = None,
        shapes: Optional[list] = None, dtypes: Optional[list] = None, model: bool = True, r: int = 16,
        malloc: str = "steady", plot: Optional[str] = None, log=print) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    malloc = steady_malloc() if malloc == "steady" else "default"
    dtypes = dtypes or list(DTYPES)
    bf16 = bf16_matmul_speed(device)
    slow_bf16 = not bf16["fast"] and shapes is None
    usual = shapes or (QUICK_SHAPES if quick else FULL_SHAPES)
    small = SLOW_BF16_QUICK_SHAPES if quick else SLOW_BF16_FULL_SHAPES
    shapes_of = {dt: small if slow_bf16 and DTYPES[dt][0] == torch.bfloat16 else usual for dt in dtypes}
    reps = reps or (7 if quick else 15)
    min_time_s = 0.3 if quick else 1.5
    info = machine_info()
    log(f"# LoRALinear vs PEFT LoRA (r={r}), fwd+bwd, {device}: {info['cpu'] if device == 'cpu' else info['gpu']}, "
        f"{info['torch_threads']} threads; torch {info['versions']['torch']}, peft {info['versions']['peft']}; "
        f"commit {info['git_commit']}")
    log(f"# allocator: {malloc}")
    log(f"# {'wall-clock' if device == 'cpu' else 'triton do_bench'} median of >= {reps} interleaved repetitions; "
        f"ratio < 1: ours faster. 'paired' = median of per-round ratios; 'min/min' = ratio of fastest runs; "
        f"'cpu-time' = ratio of median process CPU times (ignores time preempted by other processes).")
    if any(DTYPES[dt][0] == torch.bfloat16 for dt in dtypes):
        log(f"# bf16 rows at {', '.join('x'.join(map(str, s)) for s in (small if slow_bf16 else usual))}: "
            f"{bf16['why']}" + ("; --shapes runs them at any shape" if slow_bf16 else ""))
    rows = []
    for n_tok, in_f, out_f in dict.fromkeys(shape for dt in dtypes for shape in shapes_of[dt]):
        for dtype in (dt for dt in dtypes if (n_tok, in_f, out_f) in shapes_of[dt]):
            for p in DROPOUTS:
                row = bench_layer(n_tok, in_f, out_f, r, p, dtype, reps, device, min_time_s)
                row["shape"] = f"{n_tok}x{in_f}x{out_f}"
                # fwd + bwd: base GEMM and dgrad (no dW), LoRA shrink / expand forward and their three backward GEMMs
                add_roofline(row, device, row["ours_ms"] * 1e-3,
                             flops=4 * n_tok * in_f * out_f + 6 * n_tok * r * (in_f + out_f))
                row["mem_all"] = f"{fmt_bytes(row['mem_all_ours'])} / {fmt_bytes(row['mem_all_peft'])}"
                row["mem_added"] = f"{fmt_bytes(row['mem_added_ours'])} / {fmt_bytes(row['mem_added_peft'])}"
                rows.append(row)
                tol = 1e-4 if dtype == "fp32" else 5e-2
                if row["max_rel_diff_p0"] is not None and row["max_rel_diff_p0"] > tol:
                    log(f"# WARNING: ours and PEFT disagree at p=0 ({row['max_rel_diff_p0']:.2e} relative, y/dx/dA/dB)")
                table = format_table([row], COLUMNS, min_widths={"dtype": max(map(len, DTYPES))})
                log(table.splitlines()[-1] if len(rows) > 1 else table)
    worst = max(rows, key=lambda rw: rw["ratio"])
    log(f"\n# worst ratio: {worst['ratio']:.3f} at {worst['shape']} {worst['dtype']} p={worst['dropout']}; "
        f"geometric mean of ratios: {_gmean([rw['ratio'] for rw in rows]):.3f}")
    for dt in dtypes:
        sel = [rw["ratio"] for rw in rows if rw["dtype"] == dt]
        log(f"#   {dt:11s} ratios: max {max(sel):.3f}, geomean {_gmean(sel):.3f}")

    qkv = []
    for dtype in ("fp32", "bf16+fp32A"):
        n_tok, d = SLOW_BF16_QUICK_SHAPES[0][:2] if slow_bf16 and dtype != "fp32" else QUICK_QKV if quick else FULL_QKV
        for p in DROPOUTS:
            qkv.append(qkv_memory(n_tok, d, r, p, dtype, device))
    log("\n# three adapted projections on one x (query/key/value), all unique saved storages incl. x:")
    log(format_table([{**q, "ours_b": fmt_bytes(q["ours"]), "peft_b": fmt_bytes(q["peft"])} for q in qkv],
                     [("tokens", "tokens"), ("d", "d"), ("dtype", "dtype"), ("dropout", "p"), ("ratio", "ours/PEFT"),
                      ("ours_b", "ours"), ("peft_b", "PEFT")]))

    models, model_times = [], []
    if model:
        b, s = (8, 64) if quick else (16, 128)
        for p in DROPOUTS:
            models.append(model_memory(b, s, 8, p))
        log(f"\n# all-MiniLM-L6-v2, LoRA r=8 on 36 projections, one training forward ({b} x {s} tokens), unique "
            f"saved bytes (parameters excluded). floor = the same model training the 36 projection weights "
            f"instead (each keeps only its input): what the model itself keeps; LoRA = total - floor:")
        for m in models:
            m["lora_ratio"] = m["lora_ours"] / m["lora_peft"] if m["lora_peft"] else None
        log(format_table([{**m, **{k: fmt_bytes(m[k]) for k in ("ours", "peft", "floor", "lora_ours", "lora_peft")}}
                          for m in models],
                         [("dropout", "p"), ("ratio", "total ours/PEFT"), ("ours", "ours"), ("peft", "PEFT"),
                          ("floor", "floor"), ("lora_ratio", "LoRA ours/PEFT"), ("lora_ours", "LoRA ours"),
                          ("lora_peft", "LoRA PEFT")]))
        if device == "cpu":
            for p in DROPOUTS:
                model_times.append(model_step_time(b, s, 8, p, reps=5 if quick else 9))
            log("\n# all-MiniLM-L6-v2 training step (fwd+bwd) time, same model/batch:")
            log(format_table(model_times, [("batch", "batch"), ("seq", "seq"), ("dropout", "p"),
                                           ("ratio", "ours/PEFT"), ("ratio_paired", "paired"),
                                           ("ours_ms", "ours ms"), ("peft_ms", "PEFT ms")]))

    payload = {"benchmark": "lora_linear_vs_peft", "quick": quick, "device": device, "r": r, "malloc": malloc,
               "machine": info, "bf16_matmul": bf16,
               "layers": rows, "qkv_memory": qkv, "model_memory": models, "model_step_time": model_times}
    path = write_results(payload, rows, json_path, "bench_lora" + ("-quick" if quick else ""), plot,
                         f"LoRALinear vs PEFT, fwd+bwd, r={r}, {device}",
                         lambda rw: f"{rw['shape']} {rw['dtype']} p={rw['dropout']}")
    log(f"\n# JSON: {path}")
    payload["json_path"] = str(path)
    return payload


def _gmean(vals):
    import math

    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions (a minute or two)")
    ap.add_argument("--json", metavar="FILE", default=None,
                    help="where to write the JSON (default: benchmarks/results/bench_lora-<date>-<commit>.json)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions per config (minimum)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None)
    ap.add_argument("--shapes", nargs="+", default=None, metavar="TxIxO", help="e.g. 512x1024x1024")
    ap.add_argument("--no-model", action="store_true", help="skip the all-MiniLM-L6-v2 measurements")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--malloc", choices=["steady", "default"], default="steady",
                    help="steady (default): fixed glibc mmap/trim thresholds, as in a long training run")
    ap.add_argument("--plot", metavar="FILE.png", default=None, help="a bar chart of the ratios")


def run_from_args(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes else None
    return run(quick=args.quick, json_path=args.json, reps=args.reps, shapes=shapes, dtypes=args.dtypes,
               model=not args.no_model, malloc=getattr(args, "malloc", "steady"), plot=getattr(args, "plot", None))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    run_from_args(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
