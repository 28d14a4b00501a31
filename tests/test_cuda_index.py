"""The CUDA launchers' index math (csrc/cuda/index_math.cuh), the very source nvcc builds into the kernels, compiled
into the CPU library and run here through its tracer (csrc/cpu/cuda_index.cpp): every kernel's grid covers each
element exactly once, in bounds, in the layout the torch path reads (byte i // 2, the even element in the high
nibble, block i // blocksize), at odd sizes and, window by window, at sizes past 2^31 (no data is allocated)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

import peftkern as pk
from peftkern import _native

KERNELS = {"quantize_scan": 0, "quantize_pairs": 1, "quantize_absmax": 2, "dequantize": 3, "gemv": 4, "sparse": 5}
FIELDS = ("block", "thread", "element", "byte", "shift", "scale", "a", "b", "code")  # see csrc/cpu/cuda_index.cpp
THREADS, WARP, NESTED = 256, 32, 256
MAX_GRID = 2**31 - 1


def _entry(name: str, argtypes: list, restype):
    fn = getattr(_native.CPU.handle(), name)
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def _problem(values) -> np.ndarray:
    return np.asarray([*values, *[0] * (5 - len(values))], dtype=np.int64)


def launch(kernel: str, *problem: int) -> tuple[int, int, int]:
    """(grid, log2 blocksize, log2 nested blocksize) the launcher of ``kernel`` uses; grid 0 where it refuses."""
    fn = _entry("pk_cuda_index_launch", [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
                ctypes.c_int64)
    p, shifts = _problem(problem), np.zeros(2, dtype=np.int32)
    grid = fn(KERNELS[kernel], p.ctypes.data, shifts[:1].ctypes.data, shifts[1:].ctypes.data)
    return grid, int(shifts[0]), int(shifts[1])


def trace(kernel: str, problem: tuple, first: int, last: int, packed: torch.Tensor | None = None
          ) -> dict[str, np.ndarray]:
    """Every access of the threads of CTAs [first, last) of ``kernel``'s grid over ``problem``, by field; with the
    ``packed`` codes of the problem, the code each access reads (or the byte it packs)."""
    fn = _entry("pk_cuda_index_trace", [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], ctypes.c_int64)
    p, codes = _problem(problem), None if packed is None else packed.contiguous()
    args = (KERNELS[kernel], p.ctypes.data, first, last, None if codes is None else codes.data_ptr())
    records = np.empty((4096, len(FIELDS)), dtype=np.int64)
    count = fn(*args, records.ctypes.data, len(records))
    if count > len(records):
        records = np.empty((count, len(FIELDS)), dtype=np.int64)
        count = fn(*args, records.ctypes.data, len(records))
    assert count >= 0, f"{kernel} {problem}: CTAs [{first}, {last}) refused"
    return dict(zip(FIELDS, records[:count].T))


def _exactly(values: np.ndarray, lo: int, hi: int, step: int = 1, what: str = "elements") -> None:
    expected = np.arange(lo, hi, step, dtype=np.int64)
    got = np.sort(values)
    assert len(got) == len(expected) and np.array_equal(got, expected), (
        f"{what}: {len(got)} visits of {len(expected)} in [{lo}, {hi}), first differences "
        f"{got[:4]} vs {expected[:4]}, last {got[-4:]} vs {expected[-4:]}")


def _per_cta(kernel: str, problem: tuple) -> tuple[int, int]:
    """(units per CTA, units in all): elements, or warps for the GEMV."""
    if kernel in ("quantize_scan", "quantize_pairs"):
        return problem[1], problem[0]
    if kernel == "dequantize":
        return 2 * THREADS, problem[0]
    if kernel == "gemv":
        return THREADS // WARP, problem[0] * problem[1]
    return THREADS, problem[0]


def check(kernel: str, problem: tuple, first: int, last: int) -> None:
    """The accesses of CTAs [first, last) are exactly their share of the problem, each where the layout says."""
    grid = launch(kernel, *problem)[0]
    per, total = _per_cta(kernel, problem)
    assert (grid - 1) * per < total <= grid * per, f"{kernel} {problem}: grid {grid} for {total} units of {per}"
    r = trace(kernel, problem, first, last)
    lo, hi = first * per, min(last * per, total)
    el, block, thread = r["element"], r["block"], r["thread"]
    if kernel == "quantize_scan":
        _exactly(el, lo, hi)
        assert np.array_equal(r["scale"], el // per) and np.array_equal(block, el // per)  # CTA j scans block j
    elif kernel == "quantize_pairs":
        _exactly(el, lo, hi + (hi & 1), 2, "pairs")  # an odd n's last element pairs with a pad
        assert np.array_equal(r["byte"], el // 2) and (r["shift"] == 4).all()
        assert np.array_equal(block, el // per) and np.array_equal(r["scale"], block)
    elif kernel == "quantize_absmax":
        _exactly(el, lo, hi)
        assert np.array_equal(r["a"], el // NESTED) and np.array_equal(r["a"], block)  # CTA j: nested block j
    elif kernel == "dequantize":
        _exactly(el, lo, hi)
        assert np.array_equal(r["byte"], el // 2) and np.array_equal(r["byte"], block * THREADS + thread)
        assert np.array_equal(r["shift"], np.where(el % 2 == 0, 4, 0))
        assert np.array_equal(r["scale"], el // problem[1])
        assert np.array_equal(r["a"], r["scale"] // problem[2] if problem[2] else np.full_like(el, -1))
    elif kernel == "gemv":
        _, C, K, blocksize, stride = problem
        warp = block * (THREADS // WARP) + thread // WARP
        _exactly(np.unique(warp), lo, hi, what="warps")
        m, c = r["b"] // C, r["b"] % C  # the output out[m, c] its warp reduces into
        assert np.array_equal(r["b"], warp), "warp w reduces out.flat[w]"
        k = r["a"] - m * stride
        assert ((k >= 0) & (k < K)).all() and np.array_equal(k % WARP, thread % WARP)
        assert np.array_equal(el, c * K + k) and np.array_equal(r["byte"], el // 2)
        assert np.array_equal(r["shift"], np.where(el % 2 == 0, 4, 0)) and np.array_equal(r["scale"], el // blocksize)
        _exactly(warp * K + k, lo * K, hi * K, what="(warp, k) pairs")
    else:
        _exactly(el, lo, hi)


def _whole_grid(kernel: str, *problem: int) -> None:
    check(kernel, problem, 0, launch(kernel, *problem)[0])


@pytest.mark.parametrize("n", [1, 2, 37, 64 * 5 + 1, 4099])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_quantize_grid_covers_every_element_once(n, blocksize):
    _whole_grid("quantize_scan", n, blocksize)
    _whole_grid("quantize_pairs", n, blocksize)


@pytest.mark.parametrize("blocks", [1, 255, 257, 1000])
def test_quantize_absmax_grid_covers_every_block_once(blocks):
    _whole_grid("quantize_absmax", blocks)


@pytest.mark.parametrize("n", [1, 37, 513, 64 * 256 * 2 + 3])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("nested", [0, NESTED], ids=["single", "double"])
def test_dequantize_grid_covers_every_element_once(n, blocksize, nested):
    _whole_grid("dequantize", n, blocksize, nested)


@pytest.mark.parametrize("M, C, K, stride", [(1, 1, 1, 1), (1, 5, 70, 70), (3, 7, 37, 40), (4, 9, 129, 129)])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_gemv_grid_covers_every_product_once(M, C, K, stride, blocksize):
    _whole_grid("gemv", M, C, K, blocksize, stride)


@pytest.mark.parametrize("nnz", [1, 255, 257, 1029])
def test_sparse_grid_covers_every_entry_once(nnz):
    _whole_grid("sparse", nnz)


# Past 2^31: elements, bytes, x / out offsets and global thread ids that int32 would wrap
BIG = [
    ("quantize_scan", (2**33 + 37, 64)),
    ("quantize_pairs", (2**33 + 37, 64)),
    ("quantize_absmax", (2**31 + 3,)),
    ("dequantize", (2**33 + 37, 64, NESTED)),
    ("dequantize", (2**32 + 1, 4096, 0)),
    ("gemv", (3, 2**30 + 3, 5, 64, 2**31 + 5)),  # 5 of 32 lanes busy; out and x offsets past 2^31
    ("gemv", (2, 2**21 + 1, 1031, 32, 1031)),     # W[c, k] at c K + k past 2^31
    ("sparse", (2**31 + 5,)),
]


@pytest.mark.parametrize("kernel, problem", BIG, ids=[f"{k}-{'x'.join(map(str, p))}" for k, p in BIG])
def test_grids_past_2_31_elements(kernel, problem):
    """Windows of CTAs at the start, where elements (and for the GEMV weight / x / out offsets), global thread ids
    and CTA offsets cross 2^31 and 2^32, and at the end of the grid."""
    grid = launch(kernel, *problem)[0]
    per = _per_cta(kernel, problem)[0]
    ctas = {0, grid - 1}
    for boundary in (2**31, 2**32):
        ctas |= {boundary // THREADS, boundary // per}  # the global thread id; the element (GEMV: output) index
        if kernel == "gemv":
            M, C, K, _, stride = problem
            ctas.add(boundary // K // per)  # W's flat index c K + k (row m = 0)
            m = -(-boundary // stride)  # x's offset m stride_xm + k
            ctas.add(m * C // per if m < M else 0)
    windows = sorted({min(max(cta - 1, 0), grid - 2) for cta in ctas if cta < grid})
    assert len(windows) >= 2, windows
    for first in windows:
        check(kernel, problem, first, first + 2)


def test_launchers_refuse_what_they_cannot_launch():
    assert launch("quantize_scan", 1000, 64) == (16, 6, -1)
    assert launch("dequantize", 1000, 4096, NESTED) == (2, 12, 8)
    for blocksize in (0, 1, 48, 96, -64):
        assert launch("quantize_scan", 1000, blocksize)[0] == 0, blocksize
        assert launch("dequantize", 1000, blocksize, 0)[0] == 0, blocksize
        assert launch("gemv", 1, 4, 250, blocksize, 250)[0] == 0, blocksize
    assert launch("dequantize", 1000, 64, 100)[0] == 0  # nested blocksize not a power of two
    assert launch("dequantize", 1000, 64, 0)[0] == 2  # not double-quantized: no nested blocksize
    for kernel, problem in [("quantize_scan", (0, 64)), ("quantize_absmax", (0,)), ("dequantize", (0, 64, 0)),
                            ("gemv", (0, 4, 4, 64, 4)), ("gemv", (1, 4, 0, 64, 4)), ("sparse", (0,))]:
        assert launch(kernel, *problem)[0] == 0, (kernel, problem)
    assert launch("sparse", MAX_GRID * THREADS)[0] == MAX_GRID  # gridDim.x's limit, and one CTA past it
    assert launch("sparse", MAX_GRID * THREADS + 1)[0] == 0
    assert launch("quantize_scan", (MAX_GRID + 1) * 32, 32)[0] == 0


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_traced_dequantize_reads_the_layout_of_the_torch_path(double_quant):
    """Decoding at the traced indices gives the torch path's weight bit for bit, the nested scale included."""
    w = torch.randn(37, 1029)  # odd count, blocks spanning rows, more than one nested block at blocksize 32
    q = pk.nf4.quantize(w, 32, double_quant=double_quant)
    with pk.use_backend("torch"):
        ref = q.dequantize().reshape(-1).numpy()
    problem = (w.numel(), 32, NESTED if double_quant else 0)
    r = trace("dequantize", problem, 0, launch("dequantize", *problem)[0], q.packed)
    if double_quant:
        code8, absmax2 = q.code8.numpy(), q.absmax2.numpy()
        scales = code8[q.qabsmax.numpy()[r["scale"]]] * absmax2[r["a"]] + q.offset.numpy()  # two fp32 roundings
    else:
        scales = q.absmax.numpy()[r["scale"]]
    out = np.full(w.numel(), np.nan, dtype=np.float32)
    out[r["element"]] = q.code.numpy()[r["code"]] * scales  # fp32, as the kernel multiplies
    assert np.array_equal(out, ref)


def test_traced_gemv_multiplies_the_rows_the_torch_path_does():
    """Summed in fp64 over the traced accesses, the GEMV is x deq(W)^T of a strided x (fp64 reference)."""
    C, K = 7, 70
    q = pk.nf4.quantize(torch.randn(C, K), 64, double_quant=False)
    x_storage = torch.randn(3, K + 5)
    x = x_storage[:, :K]  # rows 75 apart
    problem = (3, C, K, 64, x.stride(0))
    r = trace("gemv", problem, 0, launch("gemv", *problem)[0], q.packed)
    w = (q.code.numpy()[r["code"]] * q.absmax.numpy()[r["scale"]]).astype(np.float64)
    y = np.zeros(3 * C)
    np.add.at(y, r["b"], w * x_storage.reshape(-1).numpy().astype(np.float64)[r["a"]])
    with pk.use_backend("torch"):
        ref = x.double() @ q.dequantize().double().t()
    np.testing.assert_allclose(y.reshape(3, C), ref.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [37, 1029 * 7])
def test_traced_quantize_packs_the_layout_of_the_torch_path(n):
    """The byte the quantize kernel packs of each pair's codes is the torch path's byte (pad included)."""
    q = pk.nf4.quantize(torch.randn(n), 64, double_quant=False)
    r = trace("quantize_pairs", (n, 64), 0, launch("quantize_pairs", n, 64)[0], q.packed)
    packed = q.packed.numpy().reshape(-1)
    _exactly(r["byte"], 0, len(packed), what="bytes")
    assert np.array_equal(r["code"], packed[r["byte"]])


def test_nf4_tensor_blocksizes_are_powers_of_two():
    """The CUDA kernels find an element's block by a shift: a blocksize bitsandbytes never makes is refused."""
    q = pk.nf4.quantize(torch.randn(8, 64), 64, double_quant=False)
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        pk.nf4.NF4Tensor(q.packed, q.shape, q.dtype, 48, absmax=torch.zeros(11))
    with pytest.raises(ValueError, match="nested_blocksize must be a power of two"):
        pk.nf4.NF4Tensor(q.packed, q.shape, q.dtype, 64, absmax=q.absmax, nested_blocksize=100)
