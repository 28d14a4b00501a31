"""Per-call overhead: every family at its smallest shapes against its peer, side by side in one process: ratios.

    python -m peftkern.benchmarks.bench_overhead [--quick] [--json FILE]        (or: peftkern bench overhead [--quick])

At decode and small-layer sizes a call is mostly Python and dispatch, not arithmetic: what a layer costs before its
matmuls decides a decoding model's tokens per second (7 adapted projections x 32 layers a token). Each row is the
time of ours over the peer's, the two interleaved (one sample = as many calls as fill ~20 ms, 5 with --quick, 4x
that for the model rows), the median of the per-round ratios (< 1: ours faster), with the target of issue 15. One
torch thread by default (``--threads``): these calls are too small to split, and a second thread waiting for a core
another process holds stalls them by milliseconds.

* ``decode``: one call in ``torch.inference_mode`` on x [1, 256] -> 256 (r = 8, bottleneck 16; prefix attention a
  forward at its layer shape); LoRA also against a plain ``nn.Linear`` (target: within 2x), each family against its
  peer (target: at or below); sparse diffs (1% density) against the plain ``nn.Linear`` too, their only peer at
  decode, so LoRA's target (issue 15: "the same for ... sparse diffs"): within 2x;
* ``layer``: forward + backward at 16 x 64 -> 64 (r = 8, bottleneck 8; prefix attention B 1, S 16, P 8, 4 query
  heads over 2 key/value heads, D 16; sparse diffs at 1% density) (target: at or below the peer);
* ``model``: a training step (forward, loss, backward) of a tiny Llama (2 layers, hidden 32; 64 for QLoRA, whose
  bitsandbytes peer needs rows of whole 64-value blocks) patched by ``pk.patch`` vs ``peft.get_peft_model`` on
  all its linear layers (prefix attention: ``p_tuning_v2`` vs PEFT's prefix tuning); ``generate``: greedy decoding
  of 16 tokens with a KV cache through the LoRA and QLoRA models (target: at or below: more tokens per second).

Peers: PEFT's ``lora.Linear`` (LoRA, DoRA), over bitsandbytes' ``Linear4bit`` for QLoRA (the model loaded in 4 bits
by transformers, as users load it); the eager adapter ``nn.Linear -> GELU -> nn.Linear + h`` (PEFT has no bottleneck
adapter); SDPA on concatenated keys (prefix attention); the dense masked gradient (sparse diffs; its decode is the
plain ``nn.Linear``).
"""
from __future__ import annotations

import copy
import tempfile
import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

import peftkern as pk
from peftkern.benchmarks.bench_adapter import Unfused
from peftkern.benchmarks.bench_prefix import sdpa_concat
from peftkern.benchmarks.common import format_table, run_context, standard_cli, write_results
from peftkern.measure import interleaved_times, paired_ratio, summarize
from peftkern.peers import bnb_linear4bit, peft_on_layer

FAMILIES = ("lora", "qlora", "dora", "adapter", "prefix", "sparse")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------------------------------- timing
def _repeated(fns: dict[str, Callable], seconds: float) -> tuple[dict[str, Callable], int]:
    """Each fn as one that calls it n times, n such that the slowest takes about ``seconds`` (one sample of a
    microsecond call times many); n."""
    slowest = 0.0
    for fn in fns.values():
        fn()
        t0 = time.perf_counter()
        fn()
        slowest = max(slowest, time.perf_counter() - t0)
    n = max(1, round(seconds / max(slowest, 1e-7)))

    def repeat(fn):
        def many():
            for _ in range(n):
                fn()
        return many

    return {k: repeat(fn) for k, fn in fns.items()}, n


def compare(family: str, what: str, shape: str, ours: Callable, peer: Callable, peer_name: str, target: float,
            reps: int, seconds: float, device: str, inference: bool = False) -> dict:
    """The row of ``ours`` vs ``peer`` (each a no-argument call): per-call times and their paired ratio."""
    with torch.inference_mode(inference):
        fns, n = _repeated({"ours": ours, "peer": peer}, seconds)
        times = interleaved_times(fns, reps=reps, warmup=1, device=device)
    so, sp = summarize(times["ours"]), summarize(times["peer"])
    ratio = paired_ratio(times["ours"], times["peer"])
    return {"family": family, "what": what, "shape": shape, "peer": peer_name, "ratio": ratio, "target": target,
            "met": "yes" if ratio <= target else "no", "ours_us": 1e3 * so["median_ms"] / n,
            "peer_us": 1e3 * sp["median_ms"] / n, "calls_per_sample": n}


def _step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable:
    """A forward + backward of ``module`` on ``x`` (gradients dropped each time)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(g)

    return step


def _train_step(model: nn.Module, batch: dict) -> Callable:
    """Forward, loss, backward; the gradients dropped as an optimizer's ``zero_grad`` does (by parameter, not by
    walking the modules as ``model.zero_grad``, which costs PEFT's many more modules more)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        model(**batch).loss.backward()
        for p in params:
            p.grad = None

    return step


# --------------------------------------------------------------------------------------------------- models
def _quiet(fn: Callable):
    with warnings.catch_warnings():  # deprecation noise from inside peft / transformers / bitsandbytes
        warnings.simplefilter("ignore")
        return fn()


def tiny_llama(hidden: int = 32, device: str = "cpu") -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).to(device)


def _batch(device: str, batch: int = 2, seq: int = 16) -> dict:
    ids = torch.randint(3, 100, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    return {"input_ids": ids, "labels": ids}


def _peft_llama(model: nn.Module, **lora) -> nn.Module:
    import peft

    return _quiet(lambda: peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                                      **lora)))


def _llama_4bit(hidden: int, device: str) -> nn.Module:
    """The tiny Llama saved and loaded by transformers in NF4 with double quantization (bitsandbytes' Linear4bit)."""
    import transformers

    with tempfile.TemporaryDirectory() as path:
        tiny_llama(hidden).save_pretrained(path)
        transformers.utils.logging.disable_progress_bar()
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True)
        return _quiet(lambda: transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, device_map=device))


def _random_lora_B(model: nn.Module) -> nn.Module:
    """lora_B away from its zero init (so that the adapter's arithmetic is not skipped anywhere)."""
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


# --------------------------------------------------------------------------------------------------- families
def _lora_layers(family: str, device: str) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """(ours at 256, peer at 256, ours at 64, peer at 64) for lora / dora / qlora; the peer is PEFT's LoRA layer
    itself (not the PeftModel around it, whose call adds its own overhead)."""
    out = []
    for d in (256, 64):
        torch.manual_seed(0)
        base = nn.Linear(d, d, device=device)
        if family == "qlora":
            ours, peer = pk.nn.QLoRALinear.from_linear(base, r=8), peft_on_layer(bnb_linear4bit(base), r=8,
                                                                                 lora_alpha=8)
        else:
            dora = family == "dora"
            ours = pk.nn.LoRALinear.from_linear(copy.deepcopy(base), r=8, use_dora=dora)
            peer = _quiet(lambda: peft_on_layer(base, r=8, lora_alpha=8, use_dora=dora))
        out += [_random_lora_B(ours), _random_lora_B(peer).base_model.model.proj]
    return tuple(out)


def bench_lora_family(family: str, reps: int, seconds: float, device: str) -> list[dict]:
    ours256, peer256, ours64, peer64 = _lora_layers(family, device)
    x1 = torch.randn(1, 256, device=device)
    x16 = torch.randn(16, 64, device=device, requires_grad=True)
    g16 = torch.randn(16, 64, device=device)
    peer = "PEFT + bnb Linear4bit" if family == "qlora" else "PEFT lora.Linear"
    rows = []
    if family == "lora":
        linear = nn.Linear(256, 256, device=device)
        rows.append(compare(family, "decode", "1x256", lambda: ours256(x1), lambda: linear(x1), "nn.Linear", 2.0,
                            reps, seconds, device, inference=True))
    rows.append(compare(family, "decode", "1x256", lambda: ours256(x1), lambda: peer256(x1), peer, 1.0, reps, seconds,
                        device, inference=True))
    rows.append(compare(family, "layer fwd+bwd", "16x64", _step(ours64, x16, g16), _step(peer64, x16, g16), peer, 1.0,
                        reps, seconds, device))
    hidden = 64 if family == "qlora" else 32
    ours_model = pk.patch(tiny_llama(hidden, device), family, target_modules=LLAMA_TARGETS)
    if family == "qlora":
        peer_model = _peft_llama(_llama_4bit(hidden, device))
    else:
        peer_model = _peft_llama(tiny_llama(hidden, device), use_dora=family == "dora")
    for m in (ours_model, peer_model):
        _random_lora_B(m)
    batch = _batch(device)
    rows.append(compare(family, "model step", f"llama h{hidden} 2x16", _train_step(ours_model, batch),
                        _train_step(peer_model, batch), "PEFT", 1.0, reps, seconds * 4, device))
    if family in ("lora", "qlora"):
        prompt = batch["input_ids"][:1, :4]

        def generate(model):
            model.eval()
            model.generation_config.eos_token_id = None
            return lambda: model.generate(input_ids=prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)

        rows.append(compare(family, "generate 16 tokens", f"llama h{hidden} 1x4", generate(ours_model),
                            generate(peer_model), "PEFT", 1.0, reps, seconds * 4, device, inference=True))
    return rows


def bench_adapter(reps: int, seconds: float, device: str) -> list[dict]:
    rows = []
    for what, (n, d, m) in (("decode", (1, 256, 16)), ("layer fwd+bwd", (16, 64, 8))):
        torch.manual_seed(0)
        ours = pk.nn.BottleneckAdapter(d, bottleneck_size=m, non_linearity="gelu", device=device)
        nn.init.normal_(ours.up.weight, std=0.02)
        peer = Unfused(ours)
        h = torch.randn(n, d, device=device, requires_grad=what != "decode")
        if what == "decode":
            rows.append(compare("adapter", what, f"{n}x{d}x{m}", lambda: ours(h), lambda: peer(h), "eager adapter",
                                1.0, reps, seconds, device, inference=True))
        else:
            g = torch.randn(n, d, device=device)
            rows.append(compare("adapter", what, f"{n}x{d}x{m}", _step(ours, h, g), _step(peer, h, g),
                                "eager adapter", 1.0, reps, seconds, device))
    return rows


def bench_prefix(reps: int, seconds: float, device: str) -> list[dict]:
    torch.manual_seed(0)
    B, S, P, D = 1, 16, 8, 16
    q = torch.randn(B, 4, S, D, device=device, requires_grad=True)
    k, v = (torch.randn(B, 2, S, D, device=device, requires_grad=True) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(2, P, D, device=device, requires_grad=True) for _ in range(2))
    kpm = torch.zeros(B, S, dtype=torch.bool, device=device)
    inputs = (q, k, v, prefix_k, prefix_v)
    g = torch.randn_like(q)

    def ours():
        return pk.prefix_attention(*inputs, key_padding_mask=kpm)

    def peer():
        return sdpa_concat(*inputs, kpm)

    def step(fn):
        def run():
            for t in inputs:
                t.grad = None
            fn().backward(g)
        return run

    shape = f"B{B} S{S} P{P} D{D}"
    rows = [compare("prefix", "forward", shape, ours, peer, "SDPA on concatenated keys", 1.0, reps, seconds, device,
                    inference=True),
            compare("prefix", "layer fwd+bwd", shape, step(ours), step(peer), "SDPA on concatenated keys", 1.0, reps,
                    seconds, device)]
    import peft

    ours_model = pk.patch(tiny_llama(32, device), "p_tuning_v2", num_virtual_tokens=P)
    peer_model = _quiet(lambda: peft.get_peft_model(tiny_llama(32, device), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P)))
    batch = _batch(device)
    rows.append(compare("prefix", "model step", "llama h32 2x16", _train_step(ours_model, batch),
                        _train_step(peer_model, batch), "PEFT prefix tuning", 1.0, reps, seconds * 4, device))
    return rows


def bench_sparse(reps: int, seconds: float, device: str) -> list[dict]:
    rows = []
    for what, (n, d) in (("decode", (1, 256)), ("layer fwd+bwd", (16, 64))):
        torch.manual_seed(0)
        nnz = max(1, d * d // 100)
        idx = torch.randperm(d * d, device=device)[:nnz].sort().values
        ours = pk.nn.SparseDiffLinear.from_linear(nn.Linear(d, d, device=device), idx)
        with torch.no_grad():
            ours.values.normal_(0, 0.02)
        dense = nn.Linear(d, d, device=device)
        x = torch.randn(n, d, device=device, requires_grad=what != "decode")
        if what == "decode":
            rows.append(compare("sparse", what, f"{n}x{d} 1%", lambda: ours(x), lambda: dense(x), "nn.Linear", 2.0,
                                reps, seconds, device, inference=True))
            continue
        mask = torch.zeros(d * d, device=device)
        mask[idx] = 1
        dense.weight.register_hook(lambda grad, mask=mask.view(d, d): grad * mask)
        dense.bias.requires_grad_(False)
        g = torch.randn(n, d, device=device)
        rows.append(compare("sparse", what, f"{n}x{d} 1%", _step(ours, x, g), _step(dense, x, g),
                            "dense masked gradient", 1.0, reps, seconds, device))
    return rows


def bench_family(family: str, reps: int, seconds: float, device: str) -> list[dict]:
    if family in ("lora", "qlora", "dora"):
        return bench_lora_family(family, reps, seconds, device)
    return {"adapter": bench_adapter, "prefix": bench_prefix, "sparse": bench_sparse}[family](reps, seconds, device)


def run(quick: bool = False, json_path: Optional[str] = None, reps: Optional[int] = None, malloc: str = "steady",
        plot: Optional[str] = None, log=print, families: tuple[str, ...] = FAMILIES,
        seconds: Optional[float] = None, threads: int = 1) -> dict:
    device, malloc, info, where = run_context(malloc)
    reps = reps or (5 if quick else 15)
    seconds = seconds or (0.005 if quick else 0.02)
    log(f"# per-call overhead at the smallest shapes, ours / peer time (< 1: ours faster), {device}: {where}; "
        f"torch {torch.__version__}, {threads} thread(s); median of {reps} interleaved rounds")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = [row for family in families for row in bench_family(family, reps, seconds, device)]
    finally:
        torch.set_num_threads(before)
    log(format_table(rows, [("family", "family"), ("what", "what"), ("shape", "shape"), ("peer", "peer"),
                            ("ratio", "ours/peer"), ("target", "target"), ("met", "met"), ("ours_us", "ours us"),
                            ("peer_us", "peer us")]))
    path = write_results({"machine": info, "malloc": malloc, "reps": reps, "rows": rows}, rows, json_path,
                         "bench_overhead", plot, f"per-call overhead vs the peers, {device}",
                         lambda r: f"{r['family']} {r['what']} {r['shape']} vs {r['peer']}")
    log(f"\n# JSON: {path}")
    return {"rows": rows}


add_arguments, run_from_args, main = standard_cli(run, __doc__,
                                                  threads="torch threads (default 1, see the module docstring)")


if __name__ == "__main__":
    raise SystemExit(main())
