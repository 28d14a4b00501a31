"""The native libraries of csrc/: built by setup.py, exported launchers, no register spills; the CUDA launchers
against the torch path wherever a GPU exists (skipped elsewhere)."""
from __future__ import annotations

import re
import shutil

import pytest
import torch

import peftkern as pk
from peftkern import _native
from peftkern.ops.nf4 import cuda_impl
from peftkern.ops.nf4 import torch_impl as torch_impl_nf4
from peftkern.ops.sparse import cuda_impl as sparse_cuda_impl
from tests._helpers import requires_cuda

def test_cpu_library_built_and_exports():
    lib = _native.CPU.handle()
    for name in ("pk_nf4_quantize_cpu", "pk_nf4_dequantize_cpu"):
        assert hasattr(lib, name), name


def test_cuda_library_built_for_every_arch_without_spills():
    """The project's machines (CI's included) have nvcc: setup.py must have built the library."""
    assert shutil.which("nvcc"), "nvcc not found: the CUDA library cannot be built"
    assert _native.CUDA.path.exists(), _native.CUDA.load_error()
    log = (_native.LIB_DIR / "libpeftkern_cuda.resource-usage.txt").read_text()
    for arch in ("sm_80", "sm_86", "sm_89", "sm_90"):
        assert f"for '{arch}'" in log, arch
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills and all(s == ("0", "0") for s in spills), log
    lib = _native.CUDA.handle()  # loads without a GPU: the CUDA runtime is linked statically
    for name in (*cuda_impl._SIGNATURES, *sparse_cuda_impl._SIGNATURES):
        assert hasattr(lib, name), name


def test_auto_falls_back_along_its_order(monkeypatch):
    from peftkern import backend

    monkeypatch.setattr(backend, "_AUTO_ORDER", {"cpu": ("cuda", "triton", "torch")})
    impl = backend.fallback("nf4_matmul", "test", after="cuda", device=torch.device("cpu"))
    assert impl is backend.registered("nf4_matmul")["triton"]
    with pk.use_backend("cuda"), pytest.raises(ValueError, match="cannot run 'nf4_matmul'"):
        backend.fallback("nf4_matmul", "test", ValueError, after="cuda", device=torch.device("cpu"))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_cuda_nf4_matches_torch_path(dtype, double_quant):
    w = torch.randn(37, 1029, device="cuda").to(dtype)
    with pk.use_backend("torch"):
        ref = pk.nf4.quantize(w.cpu(), 64, double_quant)
        ref_w = ref.dequantize()
    with pk.use_backend("cuda"):
        q = pk.nf4.quantize(w, 64, double_quant)
        assert torch.equal(q.packed.cpu(), ref.packed)
        assert torch.equal(q.dequantize().cpu(), ref_w)
        x = torch.randn(3, 1029, device="cuda").to(dtype)
        y = pk.nf4_linear(x, q)
    expected = x.double() @ ref_w.double().t().cuda()
    assert (y.double() - expected).abs().max() <= 2e-2 * expected.abs().max()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_cuda_sparse_merge_matches_torch_path(dtype):
    w = torch.randn(37, 129).to(dtype)
    idx = torch.randperm(w.numel())[:200].sort().values
    vals = torch.randn(200)
    ref = w.clone()
    with pk.use_backend("torch"):
        pk.sparse.merge(ref, idx, vals, alpha=0.5)
    got = w.cuda()
    with pk.use_backend("cuda"):
        previous = pk.sparse.merge(got, idx.cuda(), vals.cuda(), alpha=0.5)
        assert torch.equal(got.cpu(), ref)
        pk.sparse.unmerge(got, idx.cuda(), vals.cuda(), alpha=0.5, previous=previous)
    assert torch.equal(got.cpu(), w)


# ---- CPU twins: the CUDA launchers' thread-to-data mapping, replayed in numpy on the same inputs, against the
# torch path (the arithmetic is the kernels': fp32 products, round-to-nearest casts)

def _twin_dequantize(packed, absmax, code, n, blocksize):
    """nf4_dequantize_kernel: thread t owns byte t, writes elements 2t (high nibble) and 2t + 1 (low) when < n."""
    import numpy as np

    b = packed.reshape(-1).numpy().astype(np.int64)
    out = np.zeros(n, dtype=np.float32)
    for t in range((n + 1) // 2):
        for h in range(2):
            i = 2 * t + h
            if i < n:
                nib = b[t] >> 4 if h == 0 else b[t] & 0xF
                out[i] = np.float32(code[nib]) * np.float32(absmax[i // blocksize])
    return torch.from_numpy(out)


def _twin_gemv(x, packed, absmax, code, blocksize, C, K):
    """nf4_gemv_kernel: warp (m, c), lane l sums k = l, l + 32, ... of x[m, k] W[c, k]; a butterfly reduction."""
    import numpy as np

    b = packed.reshape(-1).numpy().astype(np.int64)
    out = np.zeros((x.shape[0], C), dtype=np.float32)
    for m in range(x.shape[0]):
        for c in range(C):
            lanes = np.zeros(32, dtype=np.float32)
            for lane in range(32):
                for k in range(lane, K, 32):
                    i = c * K + k
                    nib = b[i >> 1] & 0xF if i & 1 else b[i >> 1] >> 4
                    w = np.float32(code[nib]) * np.float32(absmax[i // blocksize])
                    lanes[lane] += w * np.float32(x[m, k])
            for offset in (16, 8, 4, 2, 1):  # __shfl_xor_sync butterfly: every lane ends with the total
                lanes = lanes + lanes[np.arange(32) ^ offset]
            out[m, c] = lanes[0]
    return torch.from_numpy(out)


def test_cpu_twin_of_the_cuda_dequantize_mapping():
    w = torch.randn(7, 37)  # odd count, blocks spanning rows
    q = pk.nf4.quantize(w, 32, double_quant=False)
    with pk.use_backend("torch"):
        ref = q.dequantize().view(-1)
    got = _twin_dequantize(q.packed, q.absmax.numpy(), q.code.numpy(), w.numel(), 32)
    assert torch.equal(got, ref)


def test_cpu_twin_of_the_cuda_gemv_mapping():
    w = torch.randn(5, 70)
    q = pk.nf4.quantize(w, 64, double_quant=False)
    x = torch.randn(3, 70)
    got = _twin_gemv(x.numpy(), q.packed, q.absmax.numpy(), q.code.numpy(), 64, 5, 70)
    with pk.use_backend("torch"):
        ref = pk.nf4_linear(x, q)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # the same products, another summation order


def test_cpu_twin_of_the_cuda_quantize_mapping():
    """nf4_quantize_kernel: one CTA of 256 threads per block; thread t packs the pairs starting at start + 2t,
    + 512, ... up to the block's end (the odd last element paired with a 0.0 code)."""
    import numpy as np

    w = torch.randn(3, 45)
    n, bs, threads = w.numel(), 64, 256
    code = torch_impl_nf4.nf4_code().numpy()
    mids = (code[:-1] + code[1:]) / np.float32(2)
    f = w.reshape(-1).numpy()
    packed = np.zeros((n + 1) // 2, dtype=np.uint8)
    absmax = np.zeros(-(-n // bs), dtype=np.float32)
    for blk in range(len(absmax)):
        start, end = blk * bs, min(blk * bs + bs, n)
        am = np.float32(np.abs(f[start:end]).max())
        absmax[blk] = am
        inv = np.float32(1) / max(am, np.float32(1e-38))
        pairs_end = min(end + (end & 1), n + (n & 1))
        for t in range(threads):
            for i in range(start + 2 * t, pairs_end, 2 * threads):
                q = [int((min(max(np.float32(f[j] * inv), -1), 1) > mids).sum()) if j < n else 7
                     for j in (i, i + 1)]
                packed[i // 2] = (q[0] << 4) | q[1]
    ref = pk.nf4.quantize(w, bs, double_quant=False)
    assert torch.equal(torch.from_numpy(packed), ref.packed.view(-1))
    assert torch.equal(torch.from_numpy(absmax), ref.absmax)
