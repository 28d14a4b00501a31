"""NF4 format: bit-exact with bitsandbytes (codes, packing, absmax, double quant, dequantization) and with the
element-by-element reference; lossless to_bnb / from_bnb; storage; bad input."""
from __future__ import annotations

import pytest
import torch
import bitsandbytes.backends.default.ops as default_ops
import bitsandbytes.functional as bnbF

import peftkern as pk
from peftkern import _native
from peftkern.ops.nf4 import torch_impl
from peftkern.ops.nf4.reference import (blockwise8_quantize_reference, nf4_dequantize_reference,
                                        nf4_quantize_reference)
from tests._helpers import DEVICE, backends, poison_, shape_id, torch_variant_or_backend

# the torch backend runs the csrc/cpu kernels on a CPU when built; "torch-pure" switches them off
IMPLS = [*backends(), "torch-pure"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# odd counts, a partial last block, blocks spanning rows, a single block, one element, 3-D
SHAPES = [(64, 64), (37, 29), (1, 33), (130,), (5, 1000), (3, 7, 11), (1,)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)


@pytest.fixture
def impl(request, monkeypatch):
    """Runs the test body under the backend (or torch path) named by the ``backend`` parameter."""
    with torch_variant_or_backend(request.node.callspec.params["backend"], "torch-pure", monkeypatch, _native,
                                  "USE_CPU_LIBRARY") as name:
        yield name


def test_cpu_library_is_built():
    assert _native.CPU.load_error() is None  # setup.py builds it wherever a C++ compiler exists (CI included)


def _bnb_generic_dequantize(packed, qs) -> torch.Tensor:
    """bitsandbytes' generic torch path (not its CPU kernel, wrong when blocks span rows), run eagerly."""
    absmax = qs.absmax
    if qs.nested:
        absmax = default_ops._dequantize_blockwise_compute.__wrapped__(
            qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize, torch.float32) + qs.offset
    return default_ops._dequantize_4bit_compute.__wrapped__(
        packed.view(-1), absmax, qs.code, qs.blocksize, qs.shape, qs.dtype).view(qs.shape)


def test_code_tables_are_bitsandbytes():
    assert torch.equal(torch_impl.nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(torch_impl.dynamic_code(), bnbF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("backend", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(S="x".join(map(str, s))))
def test_quantize_matches_bitsandbytes(shape, blocksize, dtype, backend, impl):
    w = _weight(shape, dtype)
    packed, qs = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    q = pk.nf4.quantize(w, blocksize, double_quant=True)
    plain = pk.nf4.quantize(w, blocksize, double_quant=False)
    assert torch.equal(q.packed, packed)  # the same codes, packing and odd-count padding
    assert torch.equal(q.offset, qs.offset) and torch.equal(q.absmax2, qs.state2.absmax)
    # the nested 8-bit codes follow the CUDA rule (exact nearest, ties to even); bitsandbytes' CPU build uses an
    # approximate table, so they are checked against the reference instead
    q8, absmax2 = blockwise8_quantize_reference(_plain_absmax(w, blocksize) - q.offset.cpu(), torch_impl.dynamic_code())
    assert torch.equal(q.qabsmax.cpu(), q8) and torch.equal(q.absmax2.cpu(), absmax2)
    assert torch.equal(plain.absmax, bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")[1].absmax)


def _plain_absmax(w, blocksize):
    """The reference's absmax of w (a CPU tensor: the reference runs element by element on the host)."""
    return nf4_quantize_reference(w.cpu(), torch_impl.nf4_code(), blocksize)[1]


@pytest.mark.parametrize("backend", IMPLS)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(S="x".join(map(str, s))))
def test_dequantize_bitsandbytes_state_bit_for_bit(shape, blocksize, dtype, double_quant, backend, impl):
    w = _weight(shape, dtype, seed=1)
    packed, qs = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    ours = pk.nf4.NF4Tensor.from_bnb(packed, qs).dequantize()
    ref = _bnb_generic_dequantize(packed, qs)
    assert ours.dtype == dtype and ours.shape == w.shape
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("backend", IMPLS)
@pytest.mark.parametrize("blocksize", [32, 64, 128], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("shape", [(37, 29), (3, 7, 11), (65,)], ids=lambda s: shape_id(S="x".join(map(str, s))))
def test_matches_reference(shape, blocksize, backend, impl):
    w = _weight(shape, torch.bfloat16, seed=2)
    code = torch_impl.nf4_code()
    packed, absmax = nf4_quantize_reference(w.cpu(), code, blocksize)
    q = pk.nf4.quantize(w, blocksize, double_quant=False)
    assert torch.equal(q.packed.cpu(), packed) and torch.equal(q.absmax.cpu(), absmax)
    assert torch.equal(q.dequantize().cpu(),
                       nf4_dequantize_reference(packed, absmax, code, blocksize, w.shape, w.dtype))


@pytest.mark.parametrize("backend", IMPLS)
def test_ties_go_to_the_lower_nf4_code_and_zero_blocks_to_zero(backend, impl):
    code = torch_impl.nf4_code()
    mids = (code[:-1] + code[1:]) / 2
    w = torch.cat([mids, torch.ones(1), torch.zeros(64 - 16)])  # absmax 1: s = the midpoints themselves
    q = pk.nf4.quantize(torch.cat([w, torch.zeros(64)]).to(DEVICE), 64, double_quant=False)
    codes = torch.stack([q.packed.view(-1) >> 4, q.packed.view(-1) & 0xF], 1).view(-1)
    assert codes[:15].tolist() == list(range(15))  # a midpoint k gets code k, not k + 1
    assert (codes[64:] == 7).all() and q.absmax[1] == 0  # an all-zero block decodes to zeros
    assert (q.dequantize()[64:] == 0).all()


@pytest.mark.parametrize("backend", backends())
def test_nested_ties_go_to_the_even_index(backend):
    code8 = torch_impl.dynamic_code()
    mids = (code8[:-1] + code8[1:]) / 2
    ties = [k for k in range(255) if code8[k] < mids[k] < code8[k + 1] and mids[k] - code8[k] == code8[k + 1] - mids[k]]
    assert len(ties) > 100  # most fp32 midpoints of the dynamic map are exact ties
    m = mids[ties[:8]]
    # offset = mean = 0 exactly and absmax2 = 1, so the scaled values are the midpoints themselves
    absmax = torch.cat([m, -m, torch.tensor([1.0, -1.0])])
    with pk.use_backend(backend):
        _, impl = pk.backend.resolve("nf4_quantize_absmax", torch.device(DEVICE))
        q, absmax2, offset = impl(absmax.to(DEVICE), code8.to(DEVICE))
    assert offset == 0 and absmax2.tolist() == [1.0]
    even = [k + (k % 2) for k in ties[:8]]
    assert q[:8].tolist() == even
    assert torch.equal(q.cpu(), blockwise8_quantize_reference(absmax - offset.cpu(), code8)[0])


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_to_bnb_from_bnb_lossless(double_quant):
    w = _weight((37, 29), torch.bfloat16, seed=3)
    q = pk.nf4.quantize(w, 64, double_quant)
    packed, qs = q.to_bnb()
    assert qs.quant_type == "nf4" and qs.nested == double_quant and qs.shape == w.shape and qs.dtype == w.dtype
    # bitsandbytes reads our state to the same values
    assert torch.equal(_bnb_generic_dequantize(packed, qs), q.dequantize())
    back = pk.nf4.NF4Tensor.from_bnb(packed, qs)
    for name in ("packed", "absmax", "qabsmax", "absmax2", "offset", "code", "code8"):
        a, b = getattr(q, name), getattr(back, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    # through bitsandbytes' own serialisation (the transformers checkpoint format)
    sd = qs.as_dict(packed=True)
    qs2 = bnbF.QuantState.from_dict({k: v.clone() if torch.is_tensor(v) else v for k, v in sd.items()}, DEVICE)
    assert torch.equal(pk.nf4.NF4Tensor.from_bnb(packed, qs2).dequantize(), q.dequantize())


def test_storage_bits_per_parameter():
    w = torch.randn(1024, 1024, device=DEVICE)
    assert pk.nf4.quantize(w, 64, double_quant=True).bits_per_parameter() <= 4 + 8 / 64 + 32 / (64 * 256) + 1e-3
    assert pk.nf4.quantize(w, 64, double_quant=False).bits_per_parameter() == 4.5


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on NaN/Inf, in the interpreter
@pytest.mark.parametrize("backend", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_refused(bad, dtype, backend, impl):
    w = _weight((3, 70), dtype)
    w[1, 65] = bad
    with pytest.raises(ValueError, match="w contains NaN or Inf"):
        pk.nf4.quantize(w, 64)


def test_bad_input():
    with pytest.raises(ValueError, match="blocksize"):
        pk.nf4.quantize(torch.randn(64), blocksize=48)
    with pytest.raises(TypeError, match="w must be float32"):
        pk.nf4.quantize(torch.randn(64, dtype=torch.float64))
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        pk.nf4.quantize([1.0])
    with pytest.raises(ValueError, match="empty"):
        pk.nf4.quantize(torch.randn(0, 4))
    with pytest.raises(TypeError, match="q must be an NF4Tensor"):
        pk.nf4.dequantize(torch.randn(4))
    packed, qs = bnbF.quantize_4bit(torch.randn(64), blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type must be 'nf4'"):
        pk.nf4.NF4Tensor.from_bnb(packed, qs)
    q = pk.nf4.quantize(torch.randn(64), 64, double_quant=False)
    with pytest.raises(ValueError, match="absmax must have shape"):
        pk.nf4.NF4Tensor(q.packed, (64,), torch.float32, 32, absmax=q.absmax)


@pytest.mark.triton
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_triton_launchers_write_every_output(double_quant):
    from peftkern.ops.nf4 import triton_impl

    w = _weight((37, 29), torch.bfloat16, seed=4)
    ref = pk.nf4.quantize(w, 32, double_quant)
    packed = poison_(torch.empty_like(ref.packed))
    absmax = poison_(w.new_empty(ref.packed.numel() * 2 // 32 + 1, dtype=torch.float32))
    triton_impl.quantize_absmax_blocks(w, 32, ref.code, out=packed, out_absmax=absmax)
    assert torch.equal(packed, ref.packed) and torch.equal(absmax.cpu(), _plain_absmax(w, 32))
    out = poison_(w.new_empty(37, 29))
    triton_impl.dequantize_into(ref, torch.bfloat16, out=out)
    with pk.use_backend("torch"):
        assert torch.equal(out, ref.dequantize())
    for rows in (2, 19):  # the GEMV and the tiled matmul
        x = torch.randn(rows, 29, dtype=torch.bfloat16, device=DEVICE)
        y = poison_(x.new_empty(rows, 37))
        args = (ref.packed, ref.block_absmax(), ref.code, 32, [37, 29], torch.bfloat16)
        triton_impl.matmul(x, *args, True, None, out=y)
        assert torch.isfinite(y).all()
        dx = poison_(x.new_empty(rows, 29))
        triton_impl.matmul(y, *args, False, None, out=dx)
        assert torch.isfinite(dx).all()
        # QLoRA's epilogue: + 0.5 (h e) B^T
        h, B, e = (torch.randn(rows, 4, device=DEVICE), torch.randn(37, 4, device=DEVICE),
                   torch.rand(4, device=DEVICE) + 0.5)
        term = triton_impl.LoRATerm(h, e, B, B.stride(1), B.stride(0), 0.5, torch.float32)
        yl = poison_(x.new_empty(rows, 37))
        triton_impl.matmul(x, *args, True, None, term, out=yl)
        expected = x.float() @ ref.dequantize().float().t() + 0.5 * (h * e) @ B.t()
        assert (yl.float() - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.triton
@pytest.mark.parametrize("shape, blocksize", [((48, 128), 32), ((48, 128), 64), ((48, 96), 32), ((37, 130), 32)],
                         ids=["aligned-b32", "aligned-b64", "aligned-partial-tile", "blocks-span-rows"])
@pytest.mark.parametrize("weight_dtype, dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                 (torch.float16, torch.float16)],
                         ids=["bf16-fp32", "fp32-bf16", "fp16"])
def test_triton_matmul_decodes_bitsandbytes_values(shape, blocksize, weight_dtype, dtype):
    """The matmuls' in-register decode is the dequantized weight bit for bit: one-hot rows of ``a`` pick W's
    columns (forward) and rows (dgrad) exactly, on the GEMV (3 rows) and the tiled matmul (37 rows), for rows of
    whole blocks (each byte loaded once, one absmax per block or per tile row, a tile past the last column) and for
    blocks spanning rows (per-element decode); W rounded to its dtype, then to the compute dtype."""
    from peftkern.ops.nf4 import triton_impl

    out_f, in_f = shape
    q = pk.nf4.quantize(_weight(shape, weight_dtype, seed=5), blocksize, double_quant=False)
    with pk.use_backend("torch"):
        w = q.dequantize().to(dtype)
    args = (q.packed, q.absmax, q.code, blocksize, list(shape), weight_dtype)
    gen = torch.Generator().manual_seed(0)
    for rows in (3, 37):
        picks = torch.randperm(in_f, generator=gen)[:rows].to(DEVICE)
        y = triton_impl.matmul(torch.eye(in_f, dtype=dtype, device=DEVICE)[picks], *args, True)
        assert torch.equal(y, w.t()[picks]), f"forward, {rows} rows"
        picks = torch.randperm(out_f, generator=gen)[:rows].to(DEVICE)
        dx = triton_impl.matmul(torch.eye(out_f, dtype=dtype, device=DEVICE)[picks], *args, False)
        assert torch.equal(dx, w[picks]), f"dgrad, {rows} rows"


@pytest.mark.triton
@pytest.mark.parametrize("transpose_w", [True, False], ids=["forward", "dgrad"])
def test_triton_nf4_matmul_dequantizes_first_above_128_rows(transpose_w, monkeypatch):
    """Past DEQUANTIZE_ROWS rows the Triton op dequantizes W (its kernel, bit-exact) and runs the dense GEMM the
    torch path runs, never the in-register matmul: the same bits as the torch backend."""
    from peftkern.ops.nf4 import triton_impl

    def in_register(*args, **kwargs):
        raise AssertionError("the in-register matmul ran past DEQUANTIZE_ROWS rows")

    monkeypatch.setattr(triton_impl, "matmul", in_register)
    rows = triton_impl.DEQUANTIZE_ROWS + 5
    q = pk.nf4.quantize(_weight((48, 96), torch.bfloat16, seed=6), 64)
    a = torch.randn(rows, 48 if not transpose_w else 96, dtype=torch.bfloat16, device=DEVICE)
    bias = torch.randn(48, dtype=torch.bfloat16, device=DEVICE) if transpose_w else None
    results = []
    for backend in ("triton", "torch"):
        with pk.use_backend(backend):
            _, impl = pk.backend.resolve("nf4_matmul", a.device)
            results.append(impl(a, q.packed, q.block_absmax(), q.code, 64, [48, 96], torch.bfloat16, transpose_w,
                                bias))
    assert torch.equal(*results)
