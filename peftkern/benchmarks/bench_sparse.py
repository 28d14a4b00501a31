"""Sparse diff updates vs the dense masked-gradient approach, side by side in one process: ratios first.

    python -m peftkern.benchmarks.bench_sparse [--quick] [--json FILE]        (or: peftkern bench sparse [--quick])

The peer is what public Diff Pruning / FISH Mask code does: the whole weight trains, its gradient (a dense
[out, in] dW) is multiplied by a 0/1 mask in a hook. Ours: ``SparseDiffLinear`` (values at the indices, an SDDMM
for their gradient). A step is forward + backward with dx (a layer inside a network). Also reported: the bytes of
trainable state (parameters + AdamW moments) each keeps, and the forms the CPU path took (y and dx / d values:
``peftkern.ops.sparse.torch_impl``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import peftkern as pk
from peftkern.benchmarks.common import (add_roofline, format_table, peer_faster, run_context, standard_cli,
                                       write_results)
from peftkern.measure import fmt_bytes, interleaved_times, paired_ratio, summarize
from peftkern.ops.sparse import torch_impl

DENSITIES = (0.001, 0.01, 0.1)
WHY = ("ours runs y and dx as one GEMM each like the peer (on a copy of W with the values added, where W is small "
       "next to tokens x entries) and replaces the peer's dW GEMM by an SDDMM over the entries in fp32 (MKL's sparse "
       "kernels take no bf16): past a few % density that SDDMM costs about the GEMM it saves, and the copies of W "
       "(memory-bound) are left over; with more torch threads than free cores each of our more calls also waits "
       "for a preempted thread")


def bench(tokens: int, in_f: int, out_f: int, density: float, dtype, reps: int, device: str) -> dict:
    torch.manual_seed(0)
    nnz = max(1, int(density * in_f * out_f))
    idx = torch.randperm(in_f * out_f, device=device)[:nnz].sort().values
    ours = pk.nn.SparseDiffLinear.from_linear(nn.Linear(in_f, out_f, dtype=dtype, device=device), idx)
    dense = nn.Linear(in_f, out_f, dtype=dtype, device=device)
    mask = torch.zeros(out_f * in_f, dtype=dtype, device=device)
    mask[idx] = 1
    mask = mask.view(out_f, in_f)
    dense.weight.register_hook(lambda g: g * mask)
    dense.bias.requires_grad_(False)
    x = torch.randn(tokens, in_f, dtype=dtype, device=device, requires_grad=True)
    g = torch.randn(tokens, out_f, dtype=dtype, device=device)

    def step(m):
        x.grad = None
        for p in m.parameters():
            p.grad = None
        m(x).backward(g)

    times = interleaved_times({"ours": lambda: step(ours), "dense": lambda: step(dense)}, reps=reps, device=device)
    so, sd = summarize(times["ours"]), summarize(times["dense"])
    state = lambda params: sum(3 * p.numel() * 4 for p in params)  # noqa: E731  (fp32 param-sized AdamW moments x2)
    # ours: the forward and dgrad GEMMs plus nnz-sized work per token (two corrections and the SDDMM)
    flops = 4 * tokens * in_f * out_f + 6 * tokens * nnz
    forms = (f"{torch_impl.correction_form(tokens, nnz, (out_f, in_f), ours.weight.element_size())} / "
             f"{torch_impl.sddmm_form(tokens, nnz, (out_f, in_f))}")
    return add_roofline({"shape": f"{tokens}x{in_f}x{out_f}", "density": density,
            "dtype": str(dtype).removeprefix("torch."), "forms": forms,
            "ratio": so["median_ms"] / sd["median_ms"], "ratio_paired": paired_ratio(times["ours"], times["dense"]),
            "ours_ms": so["median_ms"], "dense_ms": sd["median_ms"],
            "state": f"{fmt_bytes(state([ours.values]))} / {fmt_bytes(state([dense.weight]))}"},
                        device, so["median_ms"] * 1e-3, flops=flops)


def run(quick: bool = False, json_path: Optional[str] = None, reps: Optional[int] = None, malloc: str = "steady",
        plot: Optional[str] = None, log=print) -> dict:
    device, malloc, info, where = run_context(malloc)
    reps = reps or (5 if quick else 9)
    log(f"# SparseDiffLinear vs dense masked gradient, fwd+bwd (dx), {device}: {where}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); median of {reps} interleaved repetitions; ratio < 1: ours faster")
    shapes = [(256, 1024, 1024)] if quick else [(256, 4096, 4096), (256, 1024, 1024)]
    rows = [bench(*shape, d, dtype, reps, device) for shape in shapes for dtype in (torch.float32, torch.bfloat16)
            for d in DENSITIES]
    log(format_table(rows, [("shape", "tokens x in x out"), ("dtype", "dtype"), ("density", "density"),
                            ("ratio", "ours/dense"), ("ratio_paired", "paired"), ("ours_ms", "ours ms"),
                            ("dense_ms", "dense ms"), ("TFLOPs", "ours TFLOP/s"), ("forms", "CPU forms"),
                            ("state", "trainable state ours / dense")]))
    log(peer_faster(rows, lambda r: f"{r['shape']} {r['dtype']} {100 * r['density']:g}%", "dense", WHY))
    path = write_results({"machine": info, "malloc": malloc, "reps": reps, "rows": rows}, rows, json_path,
                         "bench_sparse", plot, f"SparseDiffLinear vs dense masked gradient, {device}",
                         lambda r: f"{r['shape']} {r['dtype']} {100 * r['density']:g}%")
    log(f"\n# JSON: {path}")
    return {"rows": rows}


add_arguments, run_from_args, main = standard_cli(run, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
