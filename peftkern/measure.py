"""How peftkern is measured against its peers: the bytes autograd saves for backward, and interleaved timings.

One implementation each, shared by the demo, the benchmarks (:mod:`peftkern.benchmarks`) and the tests, so that
every number the project reports is counted and timed the same way.

Timing rules (DESIGN.md section 6): the implementations being compared run side by side in one process, their
repetitions interleaved (A B B A A B ...) so that a change of machine load hits both alike; we report the
median wall clock of each and their ratio. On a CUDA device ``triton.testing.do_bench`` times each repetition
(median of its own inner runs, CUDA events, L2 flushed) and the repetitions are interleaved the same way.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn


# --------------------------------------------------------------------------------------------------- memory
class SavedBytes:
    """Unique storages autograd saves for backward while active (``saved_tensors_hooks``).

    ``exclude``: tensors whose storages are not counted (parameters, or a layer's input). ``total`` is the sum of
    the unique storages' sizes, ``sizes`` lists them; ``storages`` maps storage pointer -> (nbytes, shape, dtype)
    of the largest tensor saved on it (the shape tells an input-sized mask or copy from a small view). Storages stay
    alive until backward, so their pointers identify them within one forward.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self._ctx = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr != 0 and ptr not in self.skip:
            seen = self.storages.get(ptr)
            if seen is None or t.numel() > math.prod(seen[1]):
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
        return sum(self.sizes)

    @property
    def sizes(self) -> list[int]:
        return [n for n, _, _ in self.storages.values()]

    def largest(self, k: int = 5) -> list[tuple[int, tuple[int, ...], torch.dtype]]:
        return sorted(self.storages.values(), key=lambda v: -v[0])[:k]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0
    return f"{n:.2f} GiB"


def describe_storages(storages: Iterable[tuple[int, tuple[int, ...], torch.dtype]]) -> list[str]:
    """``SavedBytes.storages`` entries as "[shape] dtype size" strings."""
    return [f"{list(shape)} {str(dt).replace('torch.', '')} {fmt_bytes(n)}" for n, shape, dt in storages]


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


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; an NF4 weight counts its [out, in] values, not its packed bytes."""
    from .nn import NF4Linear

    packed = {id(m.weight): m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(packed.get(id(p), p.numel()) for p in model.parameters())


# --------------------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_times(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2,
                      device: str = "cpu", min_time_s: float = 0.0,
                      cpu_times: Optional[dict[str, list[float]]] = None) -> dict[str, list[float]]:
    """Seconds per call of each fn, ``reps`` samples each, the calls interleaved (the order alternates each round).

    CPU: wall clock (``time.perf_counter``) around one call; if ``cpu_times`` is given it also receives the
    process CPU time of each call (``time.process_time``: all threads, time spent preempted by other processes
    not counted; OpenMP spin-waits are). CUDA: ``triton.testing.do_bench`` (median of its own repetitions, ms)
    per sample when triton is importable, else CUDA events. ``min_time_s`` adds rounds until every fn has been
    timed for at least that long in total (more samples for fast configs).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    bench = _do_bench() if device == "cuda" else None
    out: dict[str, list[float]] = {n: [] for n in names}
    if cpu_times is not None:
        cpu_times.update({n: [] for n in names})
    r = 0
    while r < reps or (min_time_s and min(sum(v) for v in out.values()) < min_time_s and r < 50 * reps):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            if bench is not None:
                out[n].append(bench(fns[n]) * 1e-3)
            elif device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[n]()
                end.record()
                torch.cuda.synchronize()
                out[n].append(start.elapsed_time(end) * 1e-3)
            else:
                c0, t0 = time.process_time(), time.perf_counter()
                fns[n]()
                out[n].append(time.perf_counter() - t0)
                if cpu_times is not None:
                    cpu_times[n].append(time.process_time() - c0)
        r += 1
    return out


_BF16_PROBE: dict[str, dict] = {}


def bf16_matmul_speed(device: str = "cpu") -> dict:
    """Whether bf16 matmuls are fast on ``device``, from a timed probe: ``fast``, ``bf16_over_fp32`` (time ratio of
    one 256^3 product), ``bf16_ms``, ``fp32_ms``, ``cpu_capability`` and ``why`` (a phrase for a benchmark's output).

    Why a probe and not the CPU flags: torch sends a bf16 matmul to oneDNN's AVX-512-bf16 / AMX kernels where it
    finds them (measured here, AVX-512 bf16: about half fp32's time) and emulates it elsewhere (an AVX2-only Zen 3:
    about 10x fp32's time; this machine under ``ONEDNN_MAX_CPU_ISA=AVX2``: 60x at 1024^3, 160x at 256^3), and the
    environment can cap what the hardware has. "Fast" is at most 2x fp32's time. One thread (a second one waiting
    for a core another process holds stalls a call by milliseconds); the fastest of 3 calls each, once per process
    (~0.3 s where emulated). A CUDA device is fast without a probe.
    """
    if device != "cpu":
        return {"fast": True, "bf16_over_fp32": None, "bf16_ms": None, "fp32_ms": None, "cpu_capability": None,
                "why": f"bf16 matmuls on {device}"}
    if "cpu" not in _BF16_PROBE:
        best, threads = {}, torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                for dtype in (torch.float32, torch.bfloat16):
                    a, b = torch.randn(2, 256, 256).to(dtype)
                    samples = []
                    for _ in range(4):
                        t0 = time.perf_counter()
                        torch.mm(a, b)
                        samples.append(time.perf_counter() - t0)
                    best[dtype] = min(samples[1:])
        finally:
            torch.set_num_threads(threads)
        ratio = best[torch.bfloat16] / best[torch.float32]
        fast = ratio <= 2.0
        capability = torch.backends.cpu.get_cpu_capability()
        why = (f"a bf16 matmul takes {ratio:.3g}x fp32's time on this CPU (256^3 probe, ATen {capability}): "
               + ("bf16 is fast here" if fast else "bf16 is emulated here (no AVX-512 bf16 / AMX kernels)"))
        _BF16_PROBE["cpu"] = {"fast": fast, "bf16_over_fp32": ratio, "bf16_ms": 1e3 * best[torch.bfloat16],
                              "fp32_ms": 1e3 * best[torch.float32], "cpu_capability": capability, "why": why}
    return dict(_BF16_PROBE["cpu"])


def _do_bench():
    try:
        from triton.testing import do_bench
    except Exception:  # pragma: no cover - triton missing or broken
        return None
    return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")


def summarize(samples: Sequence[float]) -> dict:
    """median / min / p25 / p75 in milliseconds."""
    ms = sorted(s * 1e3 for s in samples)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "p25_ms": q[0], "p75_ms": q[2], "n": len(ms)}


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of per-round ratios a_i / b_i (rounds interleave a and b, so each pair saw similar load)."""
    return statistics.median(x / y for x, y in zip(a, b))


def compare_step_time(ours: nn.Module, peft_model: nn.Module, batch: dict, reps: int = 8) -> dict:
    """Median wall clock of a training step (forward, loss, backward) of two models on ``batch``, interleaved after
    one warm-up round; ``ratio`` = ours / PEFT's median, ``ratio_paired`` the median of the rounds' ratios.

    Runs under ``torch.random.fork_rng``: the caller's random state is left as it was (dropout draws from it)."""
    def step(model: nn.Module) -> None:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    ours.train()
    peft_model.train()
    with torch.random.fork_rng(devices=[]):
        t = interleaved_times({"ours": lambda: step(ours), "peft": lambda: step(peft_model)}, reps, warmup=1)
    ours_ms, peft_ms = (statistics.median(t[k]) * 1e3 for k in ("ours", "peft"))
    return {"ours_ms": ours_ms, "peft_ms": peft_ms, "ratio": ours_ms / peft_ms,
            "ratio_paired": paired_ratio(t["ours"], t["peft"]), "reps": reps}
