"""The fused bottleneck adapter vs an unfused eager adapter (nn.Linear -> activation -> nn.Linear + residual), and
AdapterDrop's speed-up on a whole model, side by side in one process: ratios first.

    python -m peftkern.benchmarks.bench_adapter [--quick] [--json FILE]        (or: peftkern bench adapter [--quick])

A layer step is forward + backward (dh and every adapter gradient). Saved bytes: unique storages autograd keeps
for backward, h and the weights excluded. AdapterDrop: a training step (forward, loss, backward) of a BERT-style
classifier with Pfeiffer adapters in every layer vs none in the lower half (``pk.patch(model, "adapter_drop")``),
the same batch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import peftkern as pk
from peftkern.benchmarks.common import (add_roofline, format_table, peer_faster, run_context, standard_cli,
                                       write_results)
from peftkern.measure import SavedBytes, fmt_bytes, interleaved_times, paired_ratio, summarize

FULL = [(4096, 768, 48), (4096, 1024, 64), (16384, 768, 48)]  # (tokens, hidden, bottleneck)
QUICK = [(2048, 768, 48), (4096, 1024, 64)]
DTYPES = (torch.float32, torch.bfloat16)
WHY = ("both run the same four GEMMs, nearly all of the time; ours saves a pass over [N, D] each way (the "
       "residual and b_u ride in the GEMMs), a few percent that noise or a busy core (more torch threads than free "
       "cores) can hide")


class Unfused(nn.Module):
    """What a user writes without us: two nn.Linear around an activation, plus the residual."""

    def __init__(self, adapter: pk.nn.BottleneckAdapter):
        super().__init__()
        self.down, self.up, self.act = adapter.down, adapter.up, nn.GELU()

    def forward(self, h):
        return h + self.up(self.act(self.down(h)))


def bench_layer(n: int, d: int, m: int, dtype, reps: int, device: str) -> dict:
    torch.manual_seed(0)
    fused = pk.nn.BottleneckAdapter(d, bottleneck_size=m, non_linearity="gelu", device=device, dtype=dtype)
    nn.init.normal_(fused.up.weight, std=0.02)
    unfused = Unfused(fused)
    h = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(n, d, device=device, dtype=dtype)
    params = list(fused.parameters())

    def step(mod):
        h.grad = None
        for p in params:
            p.grad = None
        mod(h).backward(g)

    saved = {}
    for name, mod in (("ours", fused), ("eager", unfused)):
        with SavedBytes(exclude=[h, *params]) as sb:
            y = mod(h)
        y.backward(g)
        saved[name] = sb.total
    times = interleaved_times({"ours": lambda: step(fused), "eager": lambda: step(unfused)}, reps=reps,
                              device=device)
    so, se = summarize(times["ours"]), summarize(times["eager"])
    return add_roofline({"shape": f"{n}x{d}x{m}", "dtype": str(dtype).removeprefix("torch."),
                         "ratio": so["median_ms"] / se["median_ms"],
                         "ratio_paired": paired_ratio(times["ours"], times["eager"]), "ours_ms": so["median_ms"],
                         "eager_ms": se["median_ms"], "saved_ours": saved["ours"], "saved_eager": saved["eager"],
                         "saved": f"{fmt_bytes(saved['ours'])} / {fmt_bytes(saved['eager'])}"},
                        device, so["median_ms"] * 1e-3, flops=3 * 4 * n * d * m)  # 2 GEMMs fwd, 4 bwd


def _bert(layers: int, device: str):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=layers, num_attention_heads=6,
                                  intermediate_size=1536, max_position_embeddings=256, num_labels=2)
    return transformers.BertForSequenceClassification(cfg).to(device)


def bench_adapter_drop(layers: int, batch: int, seq: int, reps: int, device: str) -> dict:
    """Step time with adapters in all layers vs none in the lower half (no backward below the first adapter)."""
    models = {"all": pk.patch(_bert(layers, device), "adapter_pfeiffer"),
              "drop": pk.patch(_bert(layers, device), "adapter_drop", skip_layers=layers // 2)}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (batch, seq), generator=g).to(device)
    labels = torch.randint(0, 2, (batch,), generator=g).to(device)

    def step(model):
        model.train()
        model(input_ids=ids, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)

    times = interleaved_times({k: (lambda m=m: step(m)) for k, m in models.items()}, reps=reps, device=device)
    sd, sa = summarize(times["drop"]), summarize(times["all"])
    return {"layers": layers, "batch": batch, "seq": seq, "dropped": layers // 2,
            "ratio": sd["median_ms"] / sa["median_ms"], "drop_ms": sd["median_ms"], "all_ms": sa["median_ms"]}


def run(quick: bool = False, json_path: Optional[str] = None, reps: Optional[int] = None, malloc: str = "steady",
        plot: Optional[str] = None, log=print) -> dict:
    device, malloc, info, where = run_context(malloc)
    reps = reps or (5 if quick else 9)
    log(f"# fused bottleneck adapter (GELU) vs eager Linear -> GELU -> Linear + h, fwd+bwd, {device}: {where}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median of {reps} interleaved repetitions; "
        f"ratio < 1: ours faster")
    rows = [bench_layer(n, d, m, dtype, reps, device) for n, d, m in (QUICK if quick else FULL) for dtype in DTYPES]
    log(format_table(rows, [("shape", "tokens x D x M"), ("dtype", "dtype"), ("ratio", "ours/eager"),
                            ("ratio_paired", "paired"), ("ours_ms", "ours ms"), ("eager_ms", "eager ms"),
                            ("TFLOPs", "ours TFLOP/s"), ("saved", "saved ours / eager")]))
    log(peer_faster(rows, lambda r: f"{r['shape']} {r['dtype']}", "eager", WHY))
    drop = [bench_adapter_drop(layers, 8, 128, reps, device) for layers in ((6,) if quick else (6, 12))]
    log("\n# AdapterDrop: training step with adapters in the upper half only vs in every layer (BERT, hidden 384)")
    log(format_table(drop, [("layers", "layers"), ("dropped", "without adapters"), ("batch", "batch"),
                            ("seq", "seq"), ("ratio", "drop/all"), ("drop_ms", "drop ms"), ("all_ms", "all ms")]))
    path = write_results({"machine": info, "malloc": malloc, "reps": reps, "rows": rows, "adapter_drop": drop},
                         rows, json_path, "bench_adapter", plot, f"fused bottleneck adapter vs eager, {device}",
                         lambda r: f"{r['shape']} {r['dtype']}")
    log(f"\n# JSON: {path}")
    return {"rows": rows, "adapter_drop": drop}


add_arguments, run_from_args, main = standard_cli(run, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
