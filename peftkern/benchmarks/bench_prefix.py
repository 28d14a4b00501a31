"""Prefix attention vs SDPA on concatenated keys (what users do today), side by side in one process: ratios first.

    python -m peftkern.benchmarks.bench_prefix [--quick] [--json FILE]        (or: peftkern bench prefix [--quick])

A step is forward + backward (dq, dk, dv and the prefix gradients) of causal attention with a shared prefix, GQA
(8 query heads over 2 key/value heads) and a padded batch row. The peer concatenates the prefix before the keys
(expanding it over the batch and the KV heads over their query heads, as PEFT's past_key_values path ends up doing)
and calls ``F.scaled_dot_product_attention`` with the boolean visibility mask. Saved bytes: unique storages autograd
keeps for backward, the inputs excluded.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import peftkern as pk
from peftkern.benchmarks.common import (add_roofline, format_table, peer_faster, run_context, standard_cli,
                                       write_results)
from peftkern.measure import SavedBytes, fmt_bytes, interleaved_times, paired_ratio, summarize

FULL = [(4, 512, 32, 64), (2, 1024, 64, 64), (1, 2048, 128, 128)]  # (B, S, P, D)
QUICK = [(2, 256, 32, 64), (1, 1024, 64, 64)]
HQ, HKV = 8, 2
WHY = ("both run PyTorch's CPU flash kernel; ours makes several times more calls (query blocks, the prefix's "
       "matmuls, the merges), and with more torch threads than free cores each call waits for a preempted thread "
       "(with --threads 1 ours was faster at every shape here)")


def sdpa_concat(q, k, v, prefix_k, prefix_v, key_padding_mask):
    B, Hq, S, D = q.shape
    P = prefix_k.shape[-2]
    g = Hq // k.shape[1]
    keys = torch.cat([prefix_k.expand(B, *prefix_k.shape), k], 2).repeat_interleave(g, 1)
    values = torch.cat([prefix_v.expand(B, *prefix_v.shape), v], 2).repeat_interleave(g, 1)
    visible = torch.ones(B, 1, S, P + S, dtype=torch.bool, device=q.device)
    visible[..., P:] = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    visible[..., P:] &= ~key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)


def ours(q, k, v, prefix_k, prefix_v, key_padding_mask):
    return pk.prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=key_padding_mask)


def bench(B, S, P, D, dtype, reps, device) -> dict:
    torch.manual_seed(0)
    q = torch.randn(B, HQ, S, D, dtype=dtype, device=device, requires_grad=True)
    k, v = (torch.randn(B, HKV, S, D, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(HKV, P, D, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    kpm = torch.zeros(B, S, dtype=torch.bool, device=device)
    kpm[-1, : S // 4] = True
    kpm[-1, S // 4:] = False
    inputs = (q, k, v, prefix_k, prefix_v, kpm)
    g = torch.randn(B, HQ, S, D, dtype=dtype, device=device)
    leaves = inputs[:5]

    def step(fn):
        for t in leaves:
            t.grad = None
        fn(*inputs).backward(g)

    saved = {}
    for name, fn in (("ours", ours), ("sdpa", sdpa_concat)):
        with SavedBytes(exclude=leaves) as sb:
            out = fn(*inputs)
        out.backward(g)
        saved[name] = sb.total
    times = interleaved_times({"ours": lambda: step(ours), "sdpa": lambda: step(sdpa_concat)}, reps=reps,
                              device=device)
    so, sp = summarize(times["ours"]), summarize(times["sdpa"])
    # forward 4 B Hq S D (P + S / 2) (causal); the backward recomputes the scores and adds three products: 2.5x
    flops = 3.5 * 4 * B * HQ * S * D * (P + S / 2)
    return add_roofline({"shape": f"B{B} S{S} P{P} D{D}", "dtype": str(dtype).removeprefix("torch."),
            "ratio": so["median_ms"] / sp["median_ms"], "ratio_paired": paired_ratio(times["ours"], times["sdpa"]),
            "ours_ms": so["median_ms"], "sdpa_ms": sp["median_ms"], "saved_ours": saved["ours"],
            "saved_sdpa": saved["sdpa"], "saved": f"{fmt_bytes(saved['ours'])} / {fmt_bytes(saved['sdpa'])}"},
                        device, so["median_ms"] * 1e-3, flops=flops)


def run(quick: bool = False, json_path: Optional[str] = None, reps: Optional[int] = None, malloc: str = "steady",
        plot: Optional[str] = None, log=print) -> dict:
    device, malloc, info, where = run_context(malloc)
    reps = reps or (5 if quick else 9)
    log(f"# prefix attention vs SDPA on concatenated keys, fwd+bwd, causal, GQA {HQ}/{HKV} heads, shared prefix, "
        f"{device}: {where}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); median of {reps} "
        f"interleaved repetitions")
    rows = [bench(B, S, P, D, dtype, reps, device) for B, S, P, D in (QUICK if quick else FULL)
            for dtype in (torch.float32, torch.bfloat16)]
    log(format_table(rows, [("shape", "shape"), ("dtype", "dtype"), ("ratio", "ours/SDPA"),
                            ("ratio_paired", "paired"), ("ours_ms", "ours ms"), ("sdpa_ms", "SDPA ms"),
                            ("TFLOPs", "ours TFLOP/s"), ("saved", "saved ours / SDPA")]))
    log(peer_faster(rows, lambda r: f"{r['shape']} {r['dtype']}", "SDPA", WHY))
    path = write_results({"machine": info, "malloc": malloc, "reps": reps, "rows": rows}, rows, json_path,
                         "bench_prefix", plot, f"prefix attention vs SDPA on concatenated keys, {device}",
                         lambda r: f"{r['shape']} {r['dtype']}")
    log(f"\n# JSON: {path}")
    return {"rows": rows}


add_arguments, run_from_args, main = standard_cli(run, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
