"""The native libraries of csrc/: built by setup.py, exported launchers, no register spills; the CUDA launchers
against the torch path wherever a GPU exists (skipped elsewhere). Their index math runs on the CPU in
tests/test_cuda_index.py."""
from __future__ import annotations

import re
import shutil

import pytest
import torch

import peftkern as pk
from peftkern import _native
from peftkern.ops.nf4 import cuda_impl
from peftkern.ops.sparse import cuda_impl as sparse_cuda_impl
from tests._helpers import requires_cuda

def test_cpu_library_built_and_exports():
    lib = _native.CPU.handle()
    for name in ("pk_nf4_quantize_cpu", "pk_nf4_dequantize_cpu", "pk_nf4_token", "pk_lora_token",
                 "pk_sparse_token", "pk_cuda_index_launch", "pk_cuda_index_trace"):
        assert hasattr(lib, name), name


def test_torch_nodes_built_for_this_torch(monkeypatch):
    """The project's install builds csrc/torch against its torch (no build isolation); the extension is used only
    under the torch it was built for, and not at all with the CPU libraries switched off."""
    nodes = _native.TORCH_NODES.module()
    assert nodes is not None, _native.TORCH_NODES.load_error()
    assert nodes.torch_version == torch.__version__
    for name in ("sparse_small", "sparse_small_forward", "sparse_small_dgrad", "sparse_small_vgrad"):
        assert hasattr(nodes, name), name
    monkeypatch.setattr(_native, "USE_CPU_LIBRARY", False)
    assert _native.TORCH_NODES.module() is None
    monkeypatch.setattr(_native, "USE_CPU_LIBRARY", True)
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    other = _native.TorchExtension("_torch_nodes")
    assert other.module() is None and "built for torch" in other.load_error()
    missing = _native.TorchExtension("_not_built")
    assert missing.module() is None and "not built" in missing.load_error()


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
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_cuda_nf4_matches_torch_path(dtype, double_quant, blocksize):
    w = torch.randn(37, 1029, device="cuda").to(dtype)
    with pk.use_backend("torch"):
        ref = pk.nf4.quantize(w.cpu(), blocksize, double_quant)
        ref_w = ref.dequantize()
    with pk.use_backend("cuda"):
        q = pk.nf4.quantize(w, blocksize, double_quant)
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
