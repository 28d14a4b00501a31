"""LoRA ops, every backend: forward and every gradient against reference.py in float64.

fp32 within 2e-5 of the largest reference value; fp16/bf16 (also with PEFT's fp32 adapters over a half base)
within 2x the error of eager PyTorch at that precision. Dropout: reproducible from torch's seed, the backward
uses the forward's mask, eval is exact, the keep rate is 1 - p. Triton runs on the CPU interpreter here: shapes
stay small.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import peftkern as pk
from peftkern.backend import interpret_mode, resolve
from peftkern.ops.lora import function
from peftkern.ops.lora.reference import lora_linear_reference
from tests._helpers import DEVICE, assert_close, backends, max_err, poison_, shape_id, token_kernel_declines

SCALING = 0.75
GRAD_NAMES = ("x", "lora_A", "lora_B", "rank_scale", "bias")

# (N, in, out, r): one row, odd sizes on every dim, a rank above one 16-wide chunk (the interpreter's BLOCK_R)
SHAPES = [(1, 37, 29, 1), (37, 130, 29, 4), (129, 64, 96, 16), (37, 64, 96, 40)]
SHAPE_IDS = [shape_id(N=n, I=i, O=o, R=r) for n, i, o, r in SHAPES]


@dataclass
class Case:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank_scale: torch.Tensor | None
    grad_y: torch.Tensor
    trainable: tuple = field(default=("x", "lora_A", "lora_B", "rank_scale", "bias"))

    def tensors(self) -> dict:
        return {"x": self.x, "weight": self.weight, "bias": self.bias, "lora_A": self.lora_A,
                "lora_B": self.lora_B, "rank_scale": self.rank_scale}


def make_case(N, I, O, R, *, dtype=torch.float32, adapter_dtype=None, bias=True, rank_scale=True, lead=None,
              seed=0) -> Case:
    """Random inputs drawn in fp64 and rounded to their dtype (so fp64 copies are the same values)."""
    adapter_dtype = adapter_dtype or dtype
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype, offset=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(DEVICE, dt)

    x_shape = (*lead, I) if lead else (N, I)
    return Case(
        x=rnd(*x_shape), weight=rnd(O, I, scale=I ** -0.5), bias=rnd(O) if bias else None,
        lora_A=rnd(R, I, scale=I ** -0.5, dt=adapter_dtype), lora_B=rnd(O, R, dt=adapter_dtype),
        rank_scale=rnd(R, scale=0.3, offset=1.0, dt=adapter_dtype) if rank_scale else None,
        grad_y=rnd(*x_shape[:-1], O))


def _leaves(case: Case, dtype=None) -> dict:
    out = {}
    for name, t in case.tensors().items():
        if t is not None:
            t = t.detach().to(dtype) if dtype is not None else t.detach().clone()
            t.requires_grad_(name in case.trainable)
        out[name] = t
    return out


def _grads(leaves: dict, case: Case) -> dict:
    return {n: leaves[n].grad for n in GRAD_NAMES if leaves.get(n) is not None and n in case.trainable}


def run_op(backend: str, case: Case, *, dropout_p=0.0, training=False, torch_seed=None, x=None):
    """pk.lora_linear on ``backend``: (y, {name: grad})."""
    t = _leaves(case)
    if x is not None:  # a caller-made (e.g. non-contiguous) view of the same values
        t["x"] = x.requires_grad_("x" in case.trainable)
    with pk.use_backend(backend):
        if torch_seed is not None:
            torch.manual_seed(torch_seed)
        y = pk.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING, dropout_p=dropout_p,
                           training=training, rank_scale=t["rank_scale"])
        y.backward(case.grad_y)
    return y.detach(), _grads(t, case)


def run_reference(case: Case, *, keep=None, dropout_p=0.0):
    """reference.py in fp64 on the same values: (y, {name: grad})."""
    t = _leaves(case, torch.float64)
    x = t["x"].reshape(-1, t["x"].shape[-1])
    keep = None if keep is None else keep.to(torch.float64)
    y = lora_linear_reference(x, t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING,
                              rank_scale=t["rank_scale"], keep_mask=keep, dropout_p=dropout_p)
    y = y.view(*case.x.shape[:-1], -1)
    y.backward(case.grad_y.to(torch.float64))
    return y.detach(), _grads(t, case)


def run_eager(case: Case, *, keep=None, dropout_p=0.0):
    """Eager PyTorch in the inputs' own dtypes, PEFT's way: the LoRA path in promote(x, A), summed, cast back."""
    t = _leaves(case)
    x = t["x"]
    ldt = torch.promote_types(x.dtype, t["lora_A"].dtype)
    xd = x.to(ldt)
    if keep is not None:
        xd = xd * keep.view(xd.shape).to(ldt) / (1.0 - dropout_p)
    h = xd @ t["lora_A"].t()
    if t["rank_scale"] is not None:
        h = h * t["rank_scale"]
    base = x @ t["weight"].t()
    if t["bias"] is not None:
        base = base + t["bias"]
    y = (base.to(ldt) + (h @ t["lora_B"].t()) * SCALING).to(x.dtype)
    y.backward(case.grad_y)
    return y.detach(), _grads(t, case)


def check_all(out, ref, eager=None, *, what=""):
    y, grads = out
    y_ref, grads_ref = ref
    y_eager, grads_eager = eager if eager is not None else (None, {})
    assert_close(y, y_ref, eager=y_eager, name=f"{what} y")
    assert set(grads) == set(grads_ref), f"{what}: gradients {sorted(grads)} != {sorted(grads_ref)}"
    for name in grads_ref:
        assert grads[name] is not None, f"{what}: no gradient for {name}"
        assert_close(grads[name], grads_ref[name], eager=grads_eager.get(name), name=f"{what} d{name}")


def _dtype_matches(out, case: Case):
    y, grads = out
    assert y.dtype == case.x.dtype
    for name, g in grads.items():
        assert g.dtype == getattr(case, name).dtype, f"d{name} is {g.dtype}, {name} is {getattr(case, name).dtype}"


# --------------------------------------------------------------------------------------------------- fp32


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("extras", ["bias+rank_scale", "plain"])
def test_fp32_forward_and_grads(backend, shape, extras):
    full = extras == "bias+rank_scale"
    case = make_case(*shape, bias=full, rank_scale=full)
    out = run_op(backend, case)
    _dtype_matches(out, case)
    check_all(out, run_reference(case), what=f"{backend} {extras}")


@pytest.mark.parametrize("backend", backends())
def test_frozen_bias_and_x_without_grad(backend):
    """Only the adapters train: no dx is computed (compute_dx=False), no bias gradient."""
    case = make_case(37, 64, 29, 4)
    case.trainable = ("lora_A", "lora_B")
    out = run_op(backend, case)
    assert set(out[1]) == {"lora_A", "lora_B"}
    check_all(out, run_reference(case), what=backend)


@pytest.mark.parametrize("backend", backends())
def test_3d_input(backend):
    case = make_case(None, 37, 29, 4, lead=(2, 19))
    out = run_op(backend, case)
    assert out[0].shape == (2, 19, 29) and out[1]["x"].shape == (2, 19, 37)
    check_all(out, run_reference(case), what=backend)


def _noncontiguous(kind: str, values: torch.Tensor) -> torch.Tensor:
    """A view with the same values as ``values`` [N, in] (or [b, s, in]) whose memory is not row-major."""
    if kind == "transposed":
        return values.t().contiguous().t()
    if kind == "sliced":  # every other column of a wider buffer: column stride 2
        wide = values.new_full((*values.shape[:-1], 2 * values.shape[-1] + 3), float("nan"))
        wide[..., 3::2] = values
        return wide[..., 3::2]
    if kind == "3d-rows":  # rows of a [b, s, in+5] buffer: flattening to 2-D stays a view with row stride in+5
        wide = values.new_full((*values.shape[:-1], values.shape[-1] + 5), float("nan"))
        wide[..., :values.shape[-1]] = values
        return wide[..., :values.shape[-1]]
    raise ValueError(kind)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("kind", ["transposed", "sliced", "3d-rows"])
def test_noncontiguous_x(backend, kind):
    case = make_case(None, 37, 29, 4, lead=(2, 19)) if kind == "3d-rows" else make_case(37, 130, 29, 4)
    x = _noncontiguous(kind, case.x)
    assert not x.is_contiguous() and torch.equal(x, case.x)
    out = run_op(backend, case, x=x)
    check_all(out, run_reference(case), what=f"{backend} {kind}")
    # dropout regenerates its mask from logical (row, col) positions, not from memory offsets
    x2 = _noncontiguous(kind, case.x)
    dropped = run_op(backend, case, x=x2, dropout_p=0.25, training=True, torch_seed=3)
    contiguous = run_op(backend, case, dropout_p=0.25, training=True, torch_seed=3)
    assert_close(dropped[0], contiguous[0].double(), name="y with dropout, non-contiguous vs contiguous x")


# ----------------------------------------------------------------------------------------- low precision

LOW_SHAPES = [(37, 130, 29, 4), (129, 64, 96, 16)]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", LOW_SHAPES, ids=[shape_id(N=n, I=i, O=o, R=r) for n, i, o, r in LOW_SHAPES])
@pytest.mark.parametrize("adapters", ["same", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision(backend, shape, adapters, dtype):
    """Within 2x eager PyTorch's error vs fp64; fp32 adapters over a half base (PEFT's default) included."""
    case = make_case(*shape, dtype=dtype, adapter_dtype=torch.float32 if adapters == "fp32" else dtype)
    out = run_op(backend, case)
    _dtype_matches(out, case)
    check_all(out, run_reference(case), run_eager(case), what=f"{backend} {dtype} adapters={adapters}")


@pytest.mark.parametrize("backend", backends())
def test_empty_batch(backend):
    case = make_case(0, 37, 29, 4)
    y, grads = run_op(backend, case, dropout_p=0.2, training=True, torch_seed=0)
    assert y.shape == (0, 29) and grads["x"].shape == (0, 37)
    assert not grads["lora_A"].any() and not grads["lora_B"].any() and not grads["rank_scale"].any()


# ----------------------------------------------------------------------------------------------- dropout


def _drawn_seed(torch_seed: int) -> int:
    """The dropout seed lora_linear draws after ``torch.manual_seed(torch_seed)``."""
    torch.manual_seed(torch_seed)
    return int(function.new_seed().item())


def _keep_mask(backend: str, seed: int, shape, p: float) -> torch.Tensor:
    with pk.use_backend(backend):
        _, mask_fn = resolve("lora_dropout_mask", torch.device(DEVICE))
        return mask_fn(seed, tuple(shape), p, torch.device(DEVICE))


@pytest.mark.parametrize("backend", backends())
def test_dropout_same_seed_same_output(backend):
    case = make_case(37, 64, 29, 4)
    a = run_op(backend, case, dropout_p=0.3, training=True, torch_seed=11)
    b = run_op(backend, case, dropout_p=0.3, training=True, torch_seed=11)
    c = run_op(backend, case, dropout_p=0.3, training=True, torch_seed=12)
    assert torch.equal(a[0], b[0])
    for name in a[1]:  # no atomics: split sums go to a workspace, then one sum, so gradients repeat bit for bit
        assert torch.equal(a[1][name], b[1][name]), f"d{name}"
    assert not torch.equal(a[0], c[0]), "another seed gave the same dropout"


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", [(37, 130, 29, 4), (129, 64, 96, 16)],
                         ids=[shape_id(N=37, I=130, O=29, R=4), shape_id(N=129, I=64, O=96, R=16)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16+fp32-adapters"])
def test_dropout_backward_uses_forward_mask(backend, shape, dtype):
    p, torch_seed = 0.4, 5
    if dtype == "fp32":
        case = make_case(*shape)
    else:
        case = make_case(*shape, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    keep = _keep_mask(backend, _drawn_seed(torch_seed), (shape[0], shape[1]), p)
    assert 0 < keep.sum() < keep.numel()
    out = run_op(backend, case, dropout_p=p, training=True, torch_seed=torch_seed)
    eager = run_eager(case, keep=keep, dropout_p=p) if dtype != "fp32" else None
    check_all(out, run_reference(case, keep=keep, dropout_p=p), eager, what=f"{backend} dropout {dtype}")


@pytest.mark.parametrize("backend", backends())
def test_dropout_off_in_eval_is_exact(backend):
    case = make_case(37, 64, 29, 4)
    evaluated = run_op(backend, case, dropout_p=0.5, training=False, torch_seed=1)
    plain = run_op(backend, case, dropout_p=0.0)
    assert torch.equal(evaluated[0], plain[0])
    for name in plain[1]:
        assert torch.equal(evaluated[1][name], plain[1][name]), name


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(backend, p):
    keep = _keep_mask(backend, 1234, (256, 200), p)
    assert keep.dtype == torch.bool and keep.shape == (256, 200)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)
    # no stripes: every row and column keeps about 1-p of its elements
    assert keep.float().mean(1).sub(1 - p).abs().max() < 0.2 and keep.float().mean(0).sub(1 - p).abs().max() < 0.2
    assert torch.equal(keep, _keep_mask(backend, 1234, (256, 200), p))
    assert not torch.equal(keep, _keep_mask(backend, 1235, (256, 200), p))


@pytest.mark.parametrize("backend", backends())
def test_dropout_mask_depends_on_the_flat_index_only(backend):
    """keep[i, j] is draw number i * in + j of the seed: the mask of [N, in] is the one of [1, N * in], reshaped.
    On Triton, widths that are multiples of 8 take one Philox call per 8 elements (64 and 4160 here), the others
    one per element (65, 130): the same draws."""
    p, seed = 0.3, 99
    keep = _keep_mask(backend, seed, (37, 130), p)
    flat = _keep_mask(backend, seed, (1, 37 * 130), p)
    assert torch.equal(keep.reshape(1, -1), flat)
    grouped = _keep_mask(backend, seed, (65, 64), p).reshape(1, -1)
    assert torch.equal(grouped, _keep_mask(backend, seed, (64, 65), p).reshape(1, -1))
    assert torch.equal(grouped, _keep_mask(backend, seed, (1, 65 * 64), p))


def _lag_correlation(bits: torch.Tensor, lag: int) -> float:
    """Pearson correlation of a 0/1 sequence with itself ``lag`` places on."""
    a, b = bits[:-lag], bits[lag:]
    return ((a - a.mean()) * (b - b.mean())).mean().item() / (a.std(unbiased=False) * b.std(unbiased=False)).item()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("shape", [(64, 256), (37, 130), (1, 8192)], ids=lambda s: shape_id(N=s[0], I=s[1]))
def test_dropout_mask_rate_and_independence(backend, p, shape):
    """The keep rate is 1 - p within 5 sigma, and draws are uncorrelated with their neighbours: 1 to 8 apart in the
    flat order (the Triton mask takes 8 elements from one Philox call: 4 words, both 16-bit halves of each, so lags
    1-7 pair draws of one call and lag 4 the two halves of one word), a row apart, and between two seeds."""
    keep = _keep_mask(backend, 2024, shape, p).double().reshape(-1).cpu()
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    bound = 5 / n ** 0.5  # the standard deviation of a sample correlation of n independent pairs is about n^-1/2
    lags = [*range(1, 9), *([shape[1]] if shape[0] > 1 else [])]
    correlations = {lag: _lag_correlation(keep, lag) for lag in lags}
    assert all(abs(c) < bound for c in correlations.values()), (correlations, bound)
    other = _keep_mask(backend, 2025, shape, p).double().reshape(-1).cpu()
    seeds = ((keep - keep.mean()) * (other - other.mean())).mean().item() / (keep.std() * other.std()).item()
    assert abs(seeds) < bound


@pytest.mark.parametrize("backend", backends())
def test_promote_output_keeps_the_lora_dtype(backend):
    """promote_output (DoRA's path): y in promote(x, A) = fp32 for a bf16 base under fp32 adapters."""
    case = make_case(37, 64, 29, 4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    x, W, b, A, B, e = (case.x, case.weight, case.bias, case.lora_A, case.lora_B, case.rank_scale)
    with pk.use_backend(backend):
        _, impl = resolve("lora_forward", x.device)
        y, h = impl(x, W, b, A, B, e, SCALING, 0.0, None, True)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    ref = run_reference(case)[0]
    # eager PEFT-style: the base GEMM rounded to bf16, the LoRA path and the sum in fp32
    eager = (x @ W.t() + b).float() + SCALING * ((x.float() @ A.t()) * e) @ B.t()
    assert max_err(y, ref) <= 2 * max_err(eager, ref) + 1e-6 * ref.abs().max().item()


# ------------------------------------------------------------------------------------ CPU one-token kernel

TOKEN_SHAPES = [(13, 7, 1), (37, 29, 3), (64, 96, 16), (130, 29, 40)]  # in below, at, past 16-wide chunks


TOKEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _token_case(I, O, R, bias, layout, dtype=torch.float32):
    """A one-token case (half x, W and b under fp32 adapters, as PEFT keeps them); the weight as LoRALinear passes a
    Conv1D's (the transpose of a row-major [in, out])."""
    case = make_case(1, I, O, R, dtype=dtype, adapter_dtype=torch.float32, bias=bias, rank_scale=bias, seed=I)
    if layout == "conv1d":
        case.weight = case.weight.t().contiguous().t()
    return case


@pytest.mark.parametrize("dtype", TOKEN_DTYPES.values(), ids=TOKEN_DTYPES.keys())
@pytest.mark.parametrize("layout", ["rows", "conv1d"])
@pytest.mark.parametrize("extras", [True, False], ids=["bias+rank_scale", "plain"])
@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=[shape_id(I=i, O=o, R=r) for i, o, r in TOKEN_SHAPES])
def test_cpu_token_kernel(shape, extras, layout, dtype):
    """One token through csrc/cpu's kernel (a CPU decode step): y (x's dtype) and h (fp32) against fp64, a half y
    within twice eager's error, every element written (NaN-poisoned outputs), an eager inference call the same bits,
    and the op (forward and gradients) at one row as right as at any other."""
    from peftkern.ops.lora import torch_impl

    case = _token_case(*shape, extras, layout, dtype)
    t = case.tensors()
    y, h = poison_(torch.empty(1, shape[1], dtype=dtype)), poison_(torch.empty(1, shape[2]))
    args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["rank_scale"], SCALING)
    assert torch_impl.lora_token(*args, out=(y, h)) is not None
    ref, eager = run_reference(case), run_eager(case)
    assert_close(y, ref[0], eager=eager[0], name="y")
    h_ref = t["x"].double() @ t["lora_A"].double().t()
    assert_close(h, h_ref, name="h")
    assert torch_impl.lora_token(*args, need_h=False)[1] is None
    with torch.inference_mode():
        direct = pk.lora_linear(t["x"][None], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING,
                                rank_scale=t["rank_scale"])
    assert torch.equal(direct, y[None])
    with pk.use_backend("torch"):
        check_all(run_op("torch", case), ref, eager, what="op")


@pytest.mark.parametrize("why", ["no-library", "large-weight", "A-transposed", "fp64", "bf16-adapters"])
def test_cpu_token_kernel_declines(why, monkeypatch):
    """Where the kernel does not apply, the torch path computes the token (as right)."""
    from peftkern.ops.lora import torch_impl

    dtype = {"fp64": torch.float64, "bf16-adapters": torch.bfloat16}.get(why, torch.float32)
    case = make_case(1, 37, 29, 3, dtype=dtype)
    token_kernel_declines(why, monkeypatch, 37 * 29)
    if why == "A-transposed":
        case.lora_A = case.lora_A.t().contiguous().t()
    t = case.tensors()
    args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["rank_scale"], SCALING)
    assert torch_impl.lora_token(*args) is None
    ref, eager = run_reference(case), run_eager(case)
    check_all(run_op("torch", case), ref, eager, what=why)


# ------------------------------------------------------------------------------- Triton launchers directly


def _triton():
    from peftkern.ops.lora import triton_impl

    return triton_impl


@pytest.mark.triton
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(37, 130, 29, 40), (1, 37, 29, 1)],
                         ids=[shape_id(N=37, I=130, O=29, R=40), shape_id(N=1, I=37, O=29, R=1)])
def test_triton_launchers_write_every_output(shape, dropout_p):
    """Each launcher into a NaN-poisoned buffer: every element written, each stage against fp64 math."""
    ti = _triton()
    N, I, O, R = shape
    case = make_case(*shape)
    x, W, b, A, B, e, g = (case.x, case.weight, case.bias, case.lora_A, case.lora_B, case.rank_scale, case.grad_y)
    seed = 77
    keep = (ti.dropout_keep_mask(seed, (N, I), dropout_p, x.device).double() if dropout_p
            else torch.ones(N, I, dtype=torch.float64, device=DEVICE))
    xd64 = x.double() * keep / (1 - dropout_p)
    d = lambda t: t.double()  # noqa: E731

    h = ti.shrink(x, A, dropout_p, seed, out=poison_(x.new_empty(N, R)))
    h64 = xd64 @ d(A).t()
    assert_close(h, h64, name="h")

    y = ti.fwd(x, W, b, h, e, B, SCALING, out=poison_(x.new_empty(N, O)))
    assert_close(y, d(x) @ d(W).t() + d(b) + SCALING * (d(h) * d(e)) @ d(B).t(), name="y")

    dh, de = ti.bwd_dh(g, B, h, e, SCALING, out_dh=poison_(x.new_empty(N, R)))
    dhe64 = SCALING * d(g) @ d(B)
    assert_close(dh, dhe64 * d(e), name="dh")
    assert_close(de, (dhe64 * d(h)).sum(0), name="d rank_scale")

    dA64 = d(dh).t() @ xd64
    dB64 = SCALING * d(g).t() @ (d(h) * d(e))
    for splits in (1, 2, 3):
        dA = ti.bwd_dA(dh, x, torch.float32, dropout_p, seed, splits=splits)
        assert dA.shape == (R, I) and dA.is_contiguous()
        assert_close(dA, dA64, name=f"dA {splits} splits")
        dB = ti.bwd_dB(g, h, e, SCALING, splits=splits)
        assert dB.shape == (O, R) and dB.is_contiguous()
        assert_close(dB, dB64, name=f"dB {splits} splits")

    dx = ti.bwd_dx(g, W, dh, A, torch.float32, dropout_p, seed, out=poison_(x.new_empty(N, I)))
    assert_close(dx, d(g) @ d(W) + (d(dh) @ d(A)) * keep / (1 - dropout_p), name="dx")


@pytest.mark.triton
def test_triton_bf16_outputs_round_to_nearest_even():
    """bf16 y, h, dx are the fp32 results rounded to nearest even, as on a GPU (the interpreter's own cast
    truncates, so the launchers stage bf16 outputs through fp32 there)."""
    if not interpret_mode():
        pytest.skip("checks the interpreter's bf16 staging (a GPU's bf16 dots round differently from fp32 ones)")
    ti = _triton()
    case = make_case(37, 64, 29, 16, dtype=torch.bfloat16)
    x, W, b, A, B, e, g = (case.x, case.weight, case.bias, case.lora_A, case.lora_B, case.rank_scale, case.grad_y)
    f = lambda t: t.float()  # noqa: E731  the same values in fp32: in the interpreter the same fp32 arithmetic
    h = ti.shrink(x, A, 0.0, None, out=poison_(x.new_empty(37, 16)))
    assert torch.equal(h, ti.shrink(f(x), f(A), 0.0, None).bfloat16())
    y = ti.fwd(x, W, b, h, e, B, SCALING, out=poison_(x.new_empty(37, 29)))
    assert torch.equal(y, ti.fwd(f(x), f(W), f(b), f(h), f(e), f(B), SCALING).bfloat16())
    dh = ti.bwd_dh(g, B, h, e, SCALING)[0]
    dx = ti.bwd_dx(g, W, dh, A, torch.bfloat16, 0.0, None, out=poison_(x.new_empty(37, 64)))
    assert torch.equal(dx, ti.bwd_dx(f(g), f(W), dh, f(A), torch.float32, 0.0, None).bfloat16())


@pytest.mark.triton
def test_explicit_triton_refuses_float64_auto_falls_back(monkeypatch):
    case = make_case(37, 64, 29, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        run_op("triton", case)
    # "auto" picks triton where it can run (a GPU); with the kernels unable to serve float64 it falls back to torch
    monkeypatch.setattr(pk.backend, "_AUTO_ORDER", {DEVICE: ("triton", "torch")})
    out = run_op("auto", case)
    ref = run_reference(case)
    assert max_err(out[0], ref[0]) < 1e-12
    for name, g in out[1].items():
        assert max_err(g, ref[1][name]) < 1e-12, name
