"""The fused bottleneck adapter against reference.py in float64: forward and every gradient, every activation,
odd shapes, 3-D and non-contiguous inputs, without biases / residual, both backends; launchers on poisoned outputs;
the memory it keeps; bad input."""
from __future__ import annotations

import math

import pytest
import torch

import peftkern as pk
from peftkern.measure import SavedBytes
from peftkern.ops.adapter import function as adapter_fn, torch_impl
from peftkern.ops.adapter.reference import ACTIVATIONS, bottleneck_adapter_reference
from tests._helpers import DEVICE, assert_close, assert_within_eager, backends, op_backends, poison_, shape_id

ACTS = sorted(ACTIVATIONS)
SHAPES = [(1, 8, 1), (37, 24, 5), (64, 48, 20), (29, 40, 33)]  # N, D, M


def _params(N, D, M, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    wd = torch.randn(M, D, generator=g) / D ** 0.5
    wu = torch.randn(D, M, generator=g) / M ** 0.5
    bd = torch.randn(M, generator=g) if bias else None
    bu = torch.randn(D, generator=g) if bias else None
    return [t if t is None else t.to(DEVICE, dtype).requires_grad_() for t in (h, wd, bd, wu, bu)]


def _run(fn, params, act, residual, scale, grad):
    y = fn(*params, act, residual, scale)
    live = [p for p in params if p is not None]
    return [y, *torch.autograd.grad(y, live, grad)]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("N,D,M", SHAPES, ids=[shape_id(N=n, D=d, M=m) for n, d, m in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(backend, act, N, D, M, dtype):
    params = _params(N, D, M, dtype)
    grad = torch.randn(N, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    with pk.use_backend(backend):
        out = _run(pk.bottleneck_adapter, params, act, True, 0.5, grad)
    p64 = [p.detach().double().requires_grad_() for p in params]
    ref = _run(bottleneck_adapter_reference, p64, act, True, 0.5, grad.double())
    eager = _run(bottleneck_adapter_reference, params, act, True, 0.5, grad)
    for name, o, r, e in zip(("y", "dh", "dW_d", "db_d", "dW_u", "db_u"), out, ref, eager):
        assert o.dtype == dtype
        assert_close(o, r, eager=e, name=name)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("residual,bias", [(False, True), (True, False), (False, False)],
                         ids=["no-residual", "no-bias", "neither"])
def test_without_residual_or_biases(backend, residual, bias):
    params = _params(21, 32, 12, torch.float32, bias=bias)
    grad = torch.randn(21, 32, device=DEVICE)
    with pk.use_backend(backend):
        out = _run(pk.bottleneck_adapter, params, "gelu", residual, 2.0, grad)
    p64 = [p if p is None else p.detach().double().requires_grad_() for p in params]
    ref = _run(bottleneck_adapter_reference, p64, "gelu", residual, 2.0, grad.double())
    for o, r in zip(out, ref):
        assert_close(o, r)


@pytest.mark.parametrize("residual,bias", [(True, True), (False, True), (True, False)],
                         ids=["residual", "no-residual", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_with_b_up_folded_into_the_gemms(monkeypatch, residual, bias, dtype):
    """From FOLD_MIN elements of h on, the torch path adds h, b_u and the product in one addmm and takes db_u with
    dW_u from one GEMM: forward and every gradient against fp64 (bf16: within 2x eager's error)."""
    monkeypatch.setattr(torch_impl, "FOLD_MIN", 0)
    params = _params(37, 24, 5, dtype, bias=bias)
    grad = torch.randn(37, 24, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    with pk.use_backend("torch"):
        out = _run(pk.bottleneck_adapter, params, "gelu", residual, 0.5, grad)
    p64 = [p if p is None else p.detach().double().requires_grad_() for p in params]
    ref = _run(bottleneck_adapter_reference, p64, "gelu", residual, 0.5, grad.double())
    eager = _run(bottleneck_adapter_reference, params, "gelu", residual, 0.5, grad)
    for o, r, e in zip(out, ref, eager):
        assert o.dtype == dtype
        assert_close(o, r, eager=e)


GELU_SHAPES = [(1, 16, 6), (37, 24, 5), (5, 16, 1)]  # one row (broadcast to two), transposed, M = 1 (contiguous)


@pytest.mark.parametrize("native", [True, False], ids=["aten-kernel", "onednn"])
@pytest.mark.parametrize("N,D,M", GELU_SHAPES, ids=[shape_id(N=n, D=d, M=m) for n, d, m in GELU_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_gelu_on_strided_views(monkeypatch, native, N, D, M, dtype):
    """Below NATIVE_GELU_MAX elements of z the torch path runs GELU and its derivative on strided views (ATen's own
    kernel, not oneDNN's), from it on as they are (both sides of the switch): forward and every gradient against
    fp64 (bf16: within 2x eager's error)."""
    monkeypatch.setattr(torch_impl, "NATIVE_GELU_MAX", 1 << 14 if native else 0)
    calls = []
    strided = torch_impl._strided
    monkeypatch.setattr(torch_impl, "_strided", lambda *a: calls.append(a[0]) or strided(*a))
    params = _params(N, D, M, dtype)
    grad = torch.randn(N, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    with pk.use_backend("torch"):
        out = _run(pk.bottleneck_adapter, params, "gelu", True, 0.5, grad)
    assert len(calls) == (3 if native and M > 1 and DEVICE == "cpu" else 0)  # forward; backward: a and its derivative
    p64 = [p.detach().double().requires_grad_() for p in params]
    ref = _run(bottleneck_adapter_reference, p64, "gelu", True, 0.5, grad.double())
    eager = _run(bottleneck_adapter_reference, params, "gelu", True, 0.5, grad)
    for name, o, r, e in zip(("y", "dh", "dW_d", "db_d", "dW_u", "db_u"), out, ref, eager):
        assert o.dtype == dtype
        assert_close(o, r, eager=e, name=name)


@pytest.mark.parametrize("dims", [(24,), (2, 7, 24)])
def test_cpu_inference_runs_the_torch_implementation(dims, monkeypatch):
    """A call with neither autograd nor autocast, eager, under "auto", on the CPU runs torch's implementation itself
    (no op, no autograd node; through the function and the module): the registered op's y bit for bit. With grad,
    with a backend named, on CUDA: the op."""
    torch.manual_seed(0)
    module = pk.nn.BottleneckAdapter(24, bottleneck_size=6, non_linearity="gelu", device=DEVICE)
    torch.nn.init.normal_(module.up.weight)
    h = torch.randn(*dims, device=DEVICE)
    args = (h, module.down.weight, module.down.bias, module.up.weight, module.up.bias, "gelu", True, 0.5)
    entered = op_backends(monkeypatch, adapter_fn, "adapter_forward")
    with torch.no_grad():
        y, y_module = pk.bottleneck_adapter(*args), module(h)
        assert entered == ([] if DEVICE == "cpu" else ["auto", "auto"])
        with pk.use_backend("torch"):
            y_op, y_module_op = pk.bottleneck_adapter(*args), module(h)
    assert entered[-2:] == ["torch", "torch"]
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)
    torch.testing.assert_close(y_module, y_module_op, rtol=0, atol=0)
    assert y.shape == dims
    pk.bottleneck_adapter(*args)
    assert entered[-1] == "auto"


COMPOSITE_SHAPES = [((1, 24), 6), ((37, 24), 5), ((2, 7, 24), 6), ((64, 128), 1)]  # h's shape, M


@pytest.mark.parametrize("residual,bias", [(True, True), (True, False), (False, True)],
                         ids=["residual", "no-bias", "no-residual"])
@pytest.mark.parametrize("strided", [False, True], ids=["grad", "strided-grad"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,M", COMPOSITE_SHAPES, ids=["x".join(map(str, (*s, m))) for s, m in COMPOSITE_SHAPES])
def test_cpu_composite_is_the_op_under_torch_autograd(shape, M, act, residual, bias, strided, monkeypatch):
    """An eager fp32 call with grad on the CPU under "auto" with scale 1, up to COMPOSITE_MAX elements of h, runs
    torch's implementation under PyTorch's own autograd: y and every gradient (also for an upstream gradient with its
    first two dims swapped in memory) the registered op's bit for bit and fp64's within tolerance, the op never
    entered; autograd keeps at most z and a = act(z) beside h and the weights.
    Above the size switch, with another scale, a column-major weight or a backend named: the op."""
    N, D = math.prod(shape[:-1]), shape[-1]
    params = _params(N, D, M, torch.float32, bias=bias)
    params[0] = params[0].detach().view(shape).requires_grad_()
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    if strided:
        grad = grad.transpose(0, 1).contiguous().transpose(0, 1)
    entered = op_backends(monkeypatch, adapter_fn, "adapter_forward")
    if DEVICE != "cpu":  # off the CPU the call is the op's
        pk.bottleneck_adapter(*params, act, residual, 1.0)
        assert entered == ["auto"]
        return
    with SavedBytes(exclude=[p for p in params if p is not None]) as saved:
        y = pk.bottleneck_adapter(*params, act, residual, 1.0)
    live = [p for p in params if p is not None]
    out = [y, *torch.autograd.grad(y, live, grad)]
    assert entered == [] and len(saved.sizes) <= 2  # one row: a is the first of a two-row GELU result
    assert all(N * M * 4 <= n <= 2 * N * M * 4 for n in saved.sizes)
    with pk.use_backend("torch"):
        out_op = _run(pk.bottleneck_adapter, params, act, residual, 1.0, grad)
    p64 = [p if p is None else p.detach().double().requires_grad_() for p in params]
    ref = _run(bottleneck_adapter_reference, p64, act, residual, 1.0, grad.double())
    for name, o, o_op, r in zip(("y", "dh", "dW_d", "db_d", "dW_u", "db_u"), out, out_op, ref):
        torch.testing.assert_close(o, o_op, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        assert_close(o, r, name=name)
    _run(pk.bottleneck_adapter, params, act, residual, 0.5, grad)
    w_up = params[3].detach()
    w_up = torch.empty_strided(w_up.shape, (1, w_up.shape[0]), device=DEVICE).copy_(w_up).requires_grad_()
    column_major = [w_up if i == 3 else p for i, p in enumerate(params)]
    _run(pk.bottleneck_adapter, column_major, act, residual, 1.0, grad)
    monkeypatch.setattr(torch_impl, "COMPOSITE_MAX", N * D - 1)
    _run(pk.bottleneck_adapter, params, act, residual, 1.0, grad)
    assert entered == ["torch", "auto", "auto", "auto"]


@pytest.mark.parametrize("backend", backends())
def test_3d_and_non_contiguous(backend):
    h, wd, bd, wu, bu = _params(2 * 7 * 2, 24, 6, torch.float32)
    h3 = h.detach().view(2, 7, 48)[..., ::2].requires_grad_()  # [2, 7, 24], stride 2 in the last dim
    wu_t = wu.detach().t().contiguous().t().requires_grad_()  # a transposed (column-major) view
    with pk.use_backend(backend):
        y = pk.bottleneck_adapter(h3, wd, bd, wu_t, bu, "silu")
    assert y.shape == (2, 7, 24)
    ref = bottleneck_adapter_reference(h3.double(), wd.double(), bd.double(), wu_t.double(), bu.double(), "silu")
    assert_close(y, ref)
    leaves = (h3, wd, bd, wu_t, bu)
    g = torch.randn(2, 7, 24, device=DEVICE)
    (y * g).sum().backward()  # outside the block: the forward's backend serves it
    refs = [t.detach().double().requires_grad_() for t in leaves]
    (bottleneck_adapter_reference(*refs, "silu") * g.double()).sum().backward()
    for name, t, r in zip(("h", "w_down", "b_down", "w_up", "b_up"), leaves, refs):
        assert_close(t.grad, r.grad, name=f"d{name}")


@pytest.mark.triton
@pytest.mark.parametrize("residual", [True, False])
def test_launchers_write_every_output(residual):
    from peftkern.ops.adapter import triton_impl as ti

    N, D, M = 37, 40, 20
    h, wd, bd, wu, bu = (p if p is None else p.detach() for p in _params(N, D, M, torch.float32))
    g = torch.randn(N, D, device=DEVICE)
    y, z = ti.fwd(h, wd, bd, wu, bu, "tanh", residual, 0.5, out=poison_(h.new_empty(N, D)),
                  out_z=poison_(h.new_empty(N, M)))
    eager = torch_impl.forward(h, wd, bd, wu, bu, "tanh", residual, 0.5)
    ref = torch_impl.forward(*(t.double() for t in (h, wd, bd, wu, bu)), "tanh", residual, 0.5)
    for name, got, e, r in zip(("y", "z"), (y, z), eager, ref):
        assert_within_eager(got, r, e, name=name)
    dz, dh = ti.bwd_dz_dh(g, z, wd, wu, "tanh", residual, 0.5, out_dz=poison_(h.new_empty(N, M)),
                          out_dh=poison_(h.new_empty(N, D)))
    eager = torch_impl.backward(g, h, z, wd, wu, "tanh", residual, 0.5)
    ref = torch_impl.backward(*(t.double() for t in (g, h, z, wd, wu)), "tanh", residual, 0.5)
    assert_within_eager(dh, ref[0], eager[0], name="dh")
    dwu, dbu = ti.bwd_weight(g, z, 0.5, "tanh", True, True, False, torch.float32,
                             out=poison_(h.new_empty(D, M)), out_sum=poison_(h.new_empty(D)))
    dwd, dbd = ti.bwd_weight(h, dz, 1.0, "tanh", False, False, True, torch.float32,
                             out=poison_(h.new_empty(M, D)), out_sum=poison_(h.new_empty(M)))
    for name, got, e, r in zip(("dW_d", "db_d", "dW_u", "db_u"), (dwd, dbd, dwu, dbu), eager[1:], ref[1:]):
        assert_within_eager(got, r, e, name=name)


@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_keeps_only_z_beside_h(act):
    """Autograd keeps h and z [N, M] (plus the weights); an unfused eager adapter also keeps act's input / output."""
    N, D, M = 256, 64, 16
    h, wd, bd, wu, bu = _params(N, D, M, torch.float32)
    weights = [wd, bd, wu, bu]
    with SavedBytes(exclude=[h, *weights]) as ours:
        pk.bottleneck_adapter(h, wd, bd, wu, bu, act)
    with SavedBytes(exclude=[h, *weights]) as eager:
        bottleneck_adapter_reference(h, wd, bd, wu, bu, act)
    assert ours.total == N * M * 4
    assert eager.total >= 2 * N * M * 4


def test_torch_compile_fullgraph():
    params = _params(9, 16, 8, torch.float32)
    fn = torch.compile(lambda *p: pk.bottleneck_adapter(*p, "gelu"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(*params), pk.bottleneck_adapter(*params, "gelu"), rtol=0, atol=0)


def test_float64_through_triton_falls_back_only_when_automatic():
    params = [p.detach().double() for p in _params(5, 8, 4, torch.float32)]
    torch.testing.assert_close(pk.bottleneck_adapter(*params, "relu"),
                               bottleneck_adapter_reference(*params, "relu"))


def test_bad_input():
    h, wd, bd, wu, bu = (p.detach() for p in _params(4, 8, 3, torch.float32))
    with pytest.raises(ValueError, match="activation must be one of"):
        pk.bottleneck_adapter(h, wd, bd, wu, bu, "sigmoidish")
    with pytest.raises(ValueError, match="w_down .M, D. expects D=8"):
        pk.bottleneck_adapter(h[:, :6], wd, bd, wu, bu)
    with pytest.raises(ValueError, match="w_up"):
        pk.bottleneck_adapter(h, wd, bd, wu.t(), bu)
    with pytest.raises(ValueError, match="b_down"):
        pk.bottleneck_adapter(h, wd, bu, wu, bu)
    with pytest.raises(TypeError, match="w_up has dtype"):
        pk.bottleneck_adapter(h, wd, bd, wu.double(), bu)
    with pytest.raises(TypeError, match="residual must be a bool"):
        pk.bottleneck_adapter(h, wd, bd, wu, bu, residual=1)
    with pytest.raises(TypeError, match="scale must be a number"):
        pk.bottleneck_adapter(h, wd, bd, wu, bu, scale="2")
    assert torch.equal(pk.bottleneck_adapter(h, wd, bd, wu, bu, "swish"), pk.bottleneck_adapter(h, wd, bd, wu, bu,
                                                                                                  "silu"))
