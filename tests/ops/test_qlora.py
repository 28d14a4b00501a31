"""nf4_linear and qlora_linear: forward and every gradient against fp64 math on the dequantized weight; QLoRA equals
the LoRA op on the dequantized weight (same dropout mask); no dequantized weight is kept for backward; bad input."""
from __future__ import annotations

import pytest
import torch

import peftkern as pk
from peftkern.measure import SavedBytes
from peftkern.ops.lora.reference import lora_linear_reference
from tests._helpers import DEVICE, assert_close, backends, poison_, shape_id, token_kernel_declines

SCALING = 0.75
# (N, in, out, r); 160 rows: past the Triton path's DEQUANTIZE_ROWS, where it dequantizes W for the LoRA kernels
SHAPES = [(1, 37, 29, 1), (37, 130, 29, 4), (2 * 9, 64, 96, 16), (2 * 80, 64, 96, 8)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _case(N, I, O, R, dtype, *, blocksize=64, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE) * scale  # noqa: E731
    q = pk.nf4.quantize(rnd(O, I, scale=I ** -0.5).to(dtype), blocksize)
    adt = torch.float32 if dtype != torch.float32 else dtype  # PEFT's fp32 adapters over a half base
    x_shape = (*lead, I) if lead else (N, I)
    return dict(q=q, x=rnd(*x_shape).to(dtype), bias=rnd(O).to(dtype), A=rnd(R, I, scale=I ** -0.5).to(adt),
                B=rnd(O, R).to(adt), e=(1 + 0.3 * rnd(R)).to(adt), g=rnd(*x_shape[:-1], O).to(dtype))


def _run(fn, c, *, to=None, **kw):
    cast = (lambda t: t) if to is None else (lambda t: t.to(to))
    leaves = {k: cast(c[k]).detach().requires_grad_() for k in ("x", "bias", "A", "B", "e")}
    y = fn(leaves, **kw)
    y.backward(cast(c["g"]))
    return (y.detach(), *(leaves[k].grad for k in ("x", "A", "B", "e", "bias")))


def _ours(leaves, c, **kw):
    return pk.qlora_linear(leaves["x"], c["q"], leaves["bias"], leaves["A"], leaves["B"], SCALING,
                           rank_scale=leaves["e"], **kw)


def _reference(leaves, c):
    w = c["q"].dequantize().double()
    x = leaves["x"]
    y = lora_linear_reference(x.reshape(-1, x.shape[-1]), w, leaves["bias"], leaves["A"], leaves["B"], SCALING,
                              rank_scale=leaves["e"])
    return y.view(*x.shape[:-1], -1)


def _eager(leaves, c):
    """PEFT's way in the inputs' dtypes: base in x's dtype, LoRA path in promote(x, A), summed and cast back."""
    x = leaves["x"]
    w = c["q"].dequantize().to(x.dtype)
    base = torch.nn.functional.linear(x, w, leaves["bias"])
    ldt = torch.promote_types(x.dtype, leaves["A"].dtype)
    lora = ((x.to(ldt) @ leaves["A"].t()) * leaves["e"]) @ leaves["B"].t() * SCALING
    return (base.to(ldt) + lora).to(x.dtype)


NAMES = ("y", "dx", "dA", "dB", "de", "db")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("dims", SHAPES, ids=lambda d: shape_id(N=d[0], I=d[1], O=d[2], R=d[3]))
def test_qlora_forward_and_grads(dims, dtype, backend):
    c = _case(*dims, dtype, lead=(2, dims[0] // 2) if dims[0] % 2 == 0 else None)
    with pk.use_backend(backend):
        out = _run(lambda t: _ours(t, c), c)
    ref = _run(lambda t: _reference(t, c), c, to=torch.float64)
    eager = _run(lambda t: _eager(t, c), c)
    for name, o, r, e in zip(NAMES, out, ref, eager):
        assert o.dtype == e.dtype, name
        assert_close(o, r, eager=e, name=name)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("rows", [3, 37], ids=lambda n: f"N{n}")  # the GEMV and the tiled matmul
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_nf4_linear_forward_and_dx(dtype, rows, backend):
    c = _case(rows, 130, 29, 4, dtype, blocksize=32)

    def run(fn, to=None):
        x = (c["x"] if to is None else c["x"].to(to)).detach().requires_grad_()
        b = (c["bias"] if to is None else c["bias"].to(to)).detach().requires_grad_()
        y = fn(x, b)
        y.backward(c["g"] if to is None else c["g"].to(to))
        return y.detach(), x.grad, b.grad

    with pk.use_backend(backend):
        out = run(lambda x, b: pk.nf4_linear(x, c["q"], b))
    ref = run(lambda x, b: torch.nn.functional.linear(x, c["q"].dequantize().double(), b), torch.float64)
    eager = run(lambda x, b: torch.nn.functional.linear(x, c["q"].dequantize().to(x.dtype), b))
    for name, o, r, e in zip(("y", "dx", "db"), out, ref, eager):
        assert_close(o, r, eager=e, name=name)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("rows", [37, 160], ids=lambda n: f"N{n}")
def test_qlora_is_lora_on_the_dequantized_weight(p, rows, backend):
    """pk.lora_linear over dequant(W), same dropout mask (same torch seed): the same bits on the torch path and on
    Triton past 128 rows (the same LoRA kernels on the dequantized weight); on Triton below, whose QLoRA fuses the
    LoRA term into the NF4 matmul, the same fp32 sums in another order."""
    from peftkern.ops.nf4.triton_impl import DEQUANTIZE_ROWS

    dtype = torch.bfloat16 if backend == "torch" else torch.float32
    c = _case(rows, 64, 29, 4, dtype)
    w = c["q"].dequantize()
    results = []
    with pk.use_backend(backend):
        for fn in (lambda t: _ours(t, c, dropout_p=p, training=True),
                   lambda t: pk.lora_linear(t["x"], w, t["bias"], t["A"], t["B"], SCALING, rank_scale=t["e"],
                                            dropout_p=p, training=True)):
            torch.manual_seed(7)
            results.append(_run(fn, c))
    for name, a, b in zip(NAMES, *results):
        if backend == "torch" or rows > DEQUANTIZE_ROWS:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * b.abs().max().item(), msg=name)


# (in, out, blocksize): blocks spanning rows and rows starting mid-byte (odd in), one block a row, several, and blocks
# spanning rows of whole 16-element runs (the AVX-512 path that decodes beside the sums)
TOKEN_SHAPES = [(37, 29, 64), (64, 96, 64), (130, 29, 32), (48, 33, 32)]


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x-fp32", "x-bf16"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-absmax"])
@pytest.mark.parametrize("lora", [True, False], ids=["qlora", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("dims", TOKEN_SHAPES, ids=[shape_id(I=i, O=o, B=b) for i, o, b in TOKEN_SHAPES])
def test_cpu_token_kernel(dims, dtype, lora, nested, x_dtype):
    """One token through csrc/cpu's NF4 kernel (a CPU decode step of a 4-bit model; x and its bias fp32 or bf16, the
    adapters fp32): the bits of the LoRA kernel over the dequantized weight cast to x's dtype (each value decoded
    exactly), every output written (NaN-poisoned), right against fp64 (bf16: within twice eager's error); an
    inference call under auto runs it on the weight's own state."""
    from peftkern.ops.lora import torch_impl as lora_impl
    from peftkern.ops.nf4 import torch_impl

    I, O, blocksize = dims
    g = torch.Generator().manual_seed(I)
    q = pk.nf4.quantize((torch.randn(O, I, generator=g) * I ** -0.5).to(dtype), blocksize, double_quant=nested)
    x, bias, A, B, e = (torch.randn(*s, generator=g) for s in ((1, I), (O,), (3, I), (O, 3), (3,)))
    x, bias = x.to(x_dtype), bias.to(x_dtype)
    adapter = (A, B, e, SCALING) if lora else None
    y, h = poison_(torch.empty(1, O, dtype=x_dtype)), poison_(torch.empty(1, 3))
    state = (q.packed, q.block_absmax(), q.code, blocksize, q.shape, q.dtype, bias)
    out = torch_impl.nf4_token(x, *state, adapter, out=(y, h) if lora else y)
    assert (out[0] if lora else out) is y
    w = q.dequantize().to(x_dtype)
    if lora:
        expect = lora_impl.lora_token(x, w, bias, A, B, e, SCALING)
        assert torch.equal(y, expect[0]) and torch.equal(h, expect[1])
        ref = lora_linear_reference(x.double(), w.double(), bias.double(), A.double(), B.double(), SCALING,
                                    rank_scale=e.double())
        eager = (torch.nn.functional.linear(x, w, bias).float() + SCALING * ((x.float() @ A.t()) * e) @ B.t())
    else:
        ref = x.double() @ w.double().t() + bias.double()
        eager = torch.nn.functional.linear(x, w, bias)
    assert_close(y, ref, eager=eager.to(x_dtype), name="y")
    with torch.inference_mode():
        direct = (pk.qlora_linear(x[None], q, bias, A, B, SCALING, rank_scale=e) if lora
                  else pk.nf4_linear(x[None], q, bias))
    assert torch.equal(direct, y[None])


@pytest.mark.parametrize("why", ["no-library", "bf16-adapters", "strided-x"])
def test_cpu_token_kernel_declines(why, monkeypatch):
    """Where the NF4 kernel does not apply (the library off, adapters cast to half, a strided x) the op's torch path
    computes the token, as right (within twice eager's error: an NF4 weight has no size limit)."""
    from peftkern.ops.nf4 import torch_impl

    c = _case(1, 64, 29, 4, torch.bfloat16)
    token_kernel_declines(why, monkeypatch, 64 * 29)
    if why == "bf16-adapters":
        c.update({k: c[k].to(torch.bfloat16) for k in ("A", "B", "e")})
    x = torch.stack([c["x"], c["x"]], -1)[..., 0] if why == "strided-x" else c["x"]
    q = c["q"]
    assert torch_impl.nf4_token(x, q.packed, q.block_absmax(), q.code, 64, q.shape, q.dtype, c["bias"],
                                (c["A"], c["B"], c["e"], SCALING)) is None
    out = _run(lambda t: _ours(t, c), c)
    ref = _run(lambda t: _reference(t, c), c, to=torch.float64)
    eager = _run(lambda t: _eager(t, c), c)
    for name, o, r, e in zip(NAMES, out, ref, eager):
        assert_close(o, r, eager=e, name=name)


def test_cpu_token_kernel_threads_give_the_same_bits():
    """From 2^18 weight elements the rows are split over torch's thread count: the same bits as one thread."""
    from peftkern.ops.nf4 import torch_impl

    q = pk.nf4.quantize(torch.randn(512, 512) / 23)
    x = torch.randn(1, 512)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(torch_impl.nf4_token(x, q.packed, q.block_absmax(), q.code, 64, q.shape, q.dtype, None))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*outs)


def test_qlora_keeps_no_dequantized_weight_for_backward():
    N, I, O, R = 64, 512, 384, 8
    c = _case(N, I, O, R, torch.bfloat16)
    x = c["x"].requires_grad_()
    params = [c["A"].requires_grad_(), c["B"].requires_grad_()]
    with SavedBytes(exclude=params) as saved:
        y = pk.qlora_linear(x, c["q"], None, *params, SCALING, dropout_p=0.1, training=True)
    dense = O * I * 2
    assert max(saved.sizes) < dense, "a dequantized weight was saved for backward"
    # x, h [N, r] fp32, the seed, and the 4-bit state (packed codes, decoded absmax, code table)
    packed = c["q"].packed.numel()
    assert saved.total <= N * I * 2 + N * R * 4 + 8 + packed + c["q"].block_absmax().numel() * 4 + 64
    y.float().sum().backward()


def test_bad_input():
    c = _case(3, 64, 29, 4, torch.float32)
    q, x, A, B = c["q"], c["x"], c["A"], c["B"]
    with pytest.raises(TypeError, match="weight must be an NF4Tensor"):
        pk.qlora_linear(x, q.dequantize(), None, A, B, 1.0)
    with pytest.raises(ValueError, match="x has 63 features"):
        pk.nf4_linear(torch.randn(3, 63, device=DEVICE), q)
    with pytest.raises(TypeError, match="float64"):
        pk.nf4_linear(x.double(), q)
    with pytest.raises(ValueError, match="lora_A must have shape"):
        pk.qlora_linear(x, q, None, torch.randn(4, 65, device=DEVICE), B, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        pk.qlora_linear(x, q, None, A, B, 1.0, dropout_p=1.0, training=True)
    with pytest.raises(ValueError, match="bias must have shape"):
        pk.nf4_linear(x, q, torch.randn(5, device=DEVICE))
    with pytest.raises(ValueError, match="2-D"):
        pk.nf4_linear(x, pk.nf4.quantize(torch.randn(2, 29, 64, device=DEVICE)))
