"""The forward decides, the backward follows: the backend (and dropout seed) that served a forward serves its backward,
also when the backward runs outside the ``use_backend`` block or on another thread (PyTorch's CUDA autograd worker).
And what a forward and backward run every step never waits for the GPU (no host sync)."""
import threading

import pytest
import torch

import peftkern as pk
from peftkern import backend

from .._helpers import DEVICE, no_host_syncs, requires_cuda

BACKWARD_OPS = ("lora_backward", "qlora_backward", "multi_lora_backward", "nf4_matmul", "adapter_backward",
                "prefix_attention_backward", "sparse_masked_grad", "sparse_diff_dgrad")


def _lora():
    x = torch.randn(2, 7, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(20, 24, device=DEVICE)
    b = torch.randn(20, device=DEVICE)
    A = torch.randn(4, 24, device=DEVICE, requires_grad=True)
    B = torch.randn(20, 4, device=DEVICE, requires_grad=True)
    return x, w, b, A, B


def case_lora():
    x, w, b, A, B = _lora()
    return (x, A, B), lambda: pk.lora_linear(x, w, b, A, B, 0.5, dropout_p=0.3, training=True)


def case_dora():
    x, w, _, A, B = _lora()
    m = (w.norm(dim=1) * 1.1).requires_grad_(True)
    return (x, A, B, m), lambda: pk.dora_linear(x, w, None, A, B, 0.5, m, dropout_p=0.3, training=True)


def case_qlora():
    x, w, b, A, B = _lora()
    q = pk.nf4.quantize(w, 64)
    return (x, A, B), lambda: pk.qlora_linear(x, q, b, A, B, 0.5, dropout_p=0.3, training=True)


def case_nf4():
    x, w, b, _, _ = _lora()
    q = pk.nf4.quantize(w, 64)
    return (x,), lambda: pk.nf4_linear(x, q, b)


def case_multi_lora():
    x, w, b, _, _ = _lora()
    A = torch.randn(2, 4, 24, device=DEVICE, requires_grad=True)
    B = torch.randn(2, 20, 4, device=DEVICE, requires_grad=True)
    return (x, A, B), lambda: pk.multi_lora_linear(x, w, b, A, B, [0.5, 2.0], [1, 0])


def case_adapter():
    h = torch.randn(2, 7, 24, device=DEVICE, requires_grad=True)
    wd = torch.randn(6, 24, device=DEVICE, requires_grad=True)
    wu = torch.randn(24, 6, device=DEVICE, requires_grad=True)
    return (h, wd, wu), lambda: pk.bottleneck_adapter(h, wd, None, wu, None, "gelu")


def case_prefix():
    q = torch.randn(2, 4, 5, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 5, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(2, 2, 5, 16, device=DEVICE, requires_grad=True)
    pk_ = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    pv = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    return (q, k, v, pk_, pv), lambda: pk.prefix_attention(q, k, v, pk_, pv)


def case_sparse():
    x, w, b, _, _ = _lora()
    idx = torch.tensor([0, 5, 77, 130, 479], device=DEVICE)
    values = torch.randn(5, device=DEVICE, requires_grad=True)
    return (x, values), lambda: pk.sparse_diff_linear(x, w, b, idx, values)


CASES = {"lora": case_lora, "dora": case_dora, "qlora": case_qlora, "nf4": case_nf4, "multi_lora": case_multi_lora,
         "adapter": case_adapter, "prefix": case_prefix, "sparse": case_sparse}


@pytest.fixture
def served(monkeypatch):
    """op -> the backends that served its calls (the registry's implementations wrapped)."""
    calls: dict[str, list[str]] = {}
    for op in BACKWARD_OPS:
        for name, fn in backend.registered(op).items():
            def spy(*args, _op=op, _name=name, _fn=fn):
                calls.setdefault(_op, []).append(_name)
                return _fn(*args)
            monkeypatch.setitem(backend._registry[op], name, spy)
    return calls


def _grads(leaves, loss_fn, backward):
    for t in leaves:
        t.grad = None
    backward(loss_fn)
    return [t.grad.clone() for t in leaves]


def _in_thread(fn):
    """``fn`` on a new thread with the caller's intra-op thread count (OpenMP's is per thread: a new one starts at the
    machine's default, and CPU reductions split by thread count round differently)."""
    errors = []
    threads = torch.get_num_threads()

    def target():
        try:
            torch.set_num_threads(threads)
            fn()
        except BaseException as e:  # re-raised on the caller's thread
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("where", ["outside", "thread"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chosen,other", [pytest.param("triton", "torch", marks=pytest.mark.triton),
                                          pytest.param("torch", "triton", marks=pytest.mark.triton)])
def test_backward_follows_forward(case, where, chosen, other, served, monkeypatch):
    """Forward under ``use_backend(chosen)``, backward where ``other`` is in force (outside the block, or on a thread
    whose default is ``other``): the backward runs on ``chosen`` and its gradients (the same dropout mask) equal those
    of a backward inside the block."""
    monkeypatch.setenv("PEFTKERN_BACKEND", other)  # the default outside the block, on every thread
    torch.manual_seed(0)
    leaves, forward = CASES[case]()
    g = torch.randn_like(forward())

    def inside(fn):
        torch.manual_seed(1)
        with pk.use_backend(chosen):
            (fn() * g).sum().backward()

    def split(fn):
        torch.manual_seed(1)
        with pk.use_backend(chosen):
            y = fn()
        (_in_thread if where == "thread" else lambda f: f())(lambda: (y * g).sum().backward())

    expected = _grads(leaves, forward, inside)
    served.clear()
    got = _grads(leaves, forward, split)
    assert served and all(set(names) == {chosen} for names in served.values()), served
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"grad {i}: {m}")


def test_backward_ops_have_their_forwards_backends():
    """auto resolves a forward and its backward alike only if both have the same implementations."""
    pairs = [(op.replace("_backward", "_forward"), op) for op in BACKWARD_OPS if op.endswith("_backward")]
    pairs += [("sparse_diff_forward", "sparse_masked_grad"), ("sparse_diff_forward", "sparse_diff_dgrad")]
    for fwd, bwd in pairs:
        assert set(backend.registered(fwd)) == set(backend.registered(bwd)), (fwd, bwd)


@pytest.mark.triton
@pytest.mark.parametrize("case", list(CASES))
def test_triton_implementations_never_sync_the_host(case, monkeypatch):
    """A Triton forward and backward with every op implementation run inside no_host_syncs: none calls what would wait
    for a GPU (the checks before them read host tensors, or, for the sparse indices, run once per tensor)."""
    for impls in backend._registry.values():
        for name, fn in impls.items():
            def checked(*args, _fn=fn):
                with no_host_syncs():
                    return _fn(*args)
            monkeypatch.setitem(impls, name, checked)
    torch.manual_seed(0)
    leaves, forward = CASES[case]()
    with pk.use_backend("triton"):
        forward().sum().backward()
    assert all(t.grad is not None for t in leaves)


@requires_cuda
@pytest.mark.parametrize("name", ["triton", "auto"])  # auto: the CUDA library's launchers where it has the op
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_forward_and_backward_never_wait_for_the_gpu(case, name):
    """torch.cuda.set_sync_debug_mode("error") raises on nothing in a forward and backward (after a first one, which
    compiles the kernels and checks the sparse indices)."""
    torch.manual_seed(0)
    leaves, forward = CASES[case]()
    with pk.use_backend(name):
        forward().sum().backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            forward().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
