"""Multi-adapter LoRA (one adapter per sequence, SGMV): every backend against the fp64 per-sequence reference, against
single-adapter lora_linear, against PEFT's mixed-batch inference, under torch.compile, and bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkern as pk
from peftkern.backend import run
from peftkern.ops.multi_lora import multi_lora_linear
from peftkern.ops.multi_lora.reference import multi_lora_linear_reference
from tests._helpers import (DEVICE, assert_close, assert_within_eager, backends, no_host_syncs, on_device, poison_,
                            requires_cuda, shape_id)

I, O = 37, 29
SCALINGS = [0.5, 2.0, 1.5]


def _data(B, S, R, N, *, dtype=torch.float32, adapter_dtype=None, bias=True, seed=0):
    """Inputs in the given dtypes (x [B, S, I] or [B, I] when S is None) and the upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if S is None else (B, S)
    adt = adapter_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dt)

    return dict(x=rnd(*lead, I), weight=rnd(O, I, scale=I ** -0.5), bias=rnd(O) if bias else None,
                lora_A=rnd(N, R, I, scale=I ** -0.5, dt=adt), lora_B=rnd(N, O, R, scale=R ** -0.5, dt=adt),
                scalings=SCALINGS[:N], grad=rnd(*lead, O))


def _run(fn, d, ids, *, bias_grad=False, to=None):
    """(y, dx, dA, dB[, db]) of fn on the inputs of ``d`` (cast with ``to`` first: e.g. to fp64 for the reference)."""
    cast = (lambda t: t) if to is None else (lambda t: None if t is None else t.to(to))
    x = cast(d["x"]).detach().requires_grad_()
    A = cast(d["lora_A"]).detach().requires_grad_()
    Bm = cast(d["lora_B"]).detach().requires_grad_()
    b = cast(d["bias"])
    leaves = [x, A, Bm]
    if b is not None and bias_grad:
        b = b.detach().requires_grad_()
        leaves.append(b)
    y = fn(x, cast(d["weight"]), b, A, Bm, d["scalings"], ids)
    grads = torch.autograd.grad(y, leaves, cast(d["grad"]).to(y.dtype), allow_unused=True, materialize_grads=True)
    return (y.detach(),) + tuple(grads)


NAMES = ("y", "dx", "dA", "dB", "db")


def _check(out, ref, eager=None, **kw):
    for i, (o, r) in enumerate(zip(out, ref)):
        assert_close(o, r, eager=None if eager is None else eager[i], name=NAMES[i], **kw)


def _ids_id(ids):
    return "ids" + ",".join(map(str, ids))


# (B, S, R, N, adapter_ids): odd shapes; -1 mixed in; repeated adapters; unused adapters; 2-D x (S None)
CASES = [
    (1, 1, 1, 1, [0]),
    (1, 7, 4, 2, [-1]),
    (2, 7, 1, 3, [2, 0]),
    (3, 7, 4, 2, [1, -1, 1]),
    (4, 1, 8, 3, [-1, -1, -1, -1]),
    (5, 7, 8, 3, [2, 0, -1, 2, 0]),
    (5, 7, 4, 1, [0, 0, -1, 0, 0]),
    (5, None, 4, 3, [1, -1, 1, 2, 1]),
    (3, None, 8, 2, [0, 0, 0]),
    (2, 7, 20, 2, [1, 0]),  # rank above the interpreter's 16-wide rank chunk: chunk loops and rank grid columns
]
CASE_IDS = [shape_id(B=B, **({"S": S} if S else {}), I=I, O=O, R=R, N=N) + "-" + _ids_id(ids)
            for B, S, R, N, ids in CASES]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("B, S, R, N, ids", CASES, ids=CASE_IDS)
def test_fp32_matches_reference(backend, B, S, R, N, ids):
    d = _data(B, S, R, N, seed=B * 100 + R)
    ref = _run(multi_lora_linear_reference, d, ids, bias_grad=True, to=torch.float64)
    with pk.use_backend(backend):
        out = _run(multi_lora_linear, d, torch.tensor(ids), bias_grad=True)
    _check(out, ref)
    for a in set(range(N)) - set(ids):  # adapters no sequence uses get exactly zero gradient
        assert out[2][a].abs().max() == 0 and out[3][a].abs().max() == 0


LOW = [
    pytest.param(torch.bfloat16, None, id="bf16"),
    pytest.param(torch.float16, None, id="fp16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-fp32adapters"),
    pytest.param(torch.float16, torch.float32, id="fp16-fp32adapters"),
]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype, adapter_dtype", LOW)
@pytest.mark.parametrize("B, S, R, N, ids", [CASES[5], CASES[7]], ids=[CASE_IDS[5], CASE_IDS[7]])
def test_low_precision_within_2x_eager(backend, dtype, adapter_dtype, B, S, R, N, ids):
    """Error vs fp64 (on the same rounded inputs) at most 2x that of eager PyTorch at the same precision (PEFT's
    mixed-dtype recipe when the adapters are fp32); fp32 adapter gradients to fp32 accuracy (2e-5)."""
    d = _data(B, S, R, N, dtype=dtype, adapter_dtype=adapter_dtype, seed=7)
    ref = _run(multi_lora_linear_reference, d, ids, bias_grad=True, to=torch.float64)
    eager = _run(multi_lora_linear_reference, d, ids, bias_grad=True)
    with pk.use_backend(backend):
        out = _run(multi_lora_linear, d, torch.tensor(ids), bias_grad=True)
    assert out[0].dtype == dtype and out[2].dtype == d["lora_A"].dtype
    _check(out, ref, eager)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("B, S", [(0, 7), (2, 0), (0, None)], ids=["B0-S7", "B2-S0", "B0-2d"])
def test_empty(backend, B, S):
    d = _data(B, S, 4, 2)
    ids = torch.zeros(B, dtype=torch.int64)
    with pk.use_backend(backend):
        y, dx, dA, dB = _run(multi_lora_linear, d, ids)
    assert y.shape == d["grad"].shape and dx.shape == d["x"].shape
    assert dA.abs().sum() == 0 and dB.abs().sum() == 0


@pytest.mark.parametrize("backend", backends())
def test_noncontiguous_inputs(backend):
    d = _data(4, 7, 4, 3, seed=3)
    ids = [1, -1, 2, 1]
    ref = _run(multi_lora_linear_reference, d, ids, to=torch.float64)
    nc = dict(d)
    nc["x"] = torch.cat([d["x"], d["x"]], -1)[..., :I]  # rows strided by 2*I
    nc["weight"] = d["weight"].t().contiguous().t()  # column-major W
    nc["lora_A"] = d["lora_A"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not nc["x"].is_contiguous() and not nc["weight"].is_contiguous()
    with pk.use_backend(backend):
        _check(_run(multi_lora_linear, nc, torch.tensor(ids)), ref)
        # 2-D x that is a transposed view
        d2 = _data(5, None, 4, 3, seed=4)
        ids2 = [0, 2, -1, 0, 1]
        ref2 = _run(multi_lora_linear_reference, d2, ids2, to=torch.float64)
        d2["x"] = d2["x"].t().contiguous().t()
        assert not d2["x"].is_contiguous()
        _check(_run(multi_lora_linear, d2, ids2), ref2)


@pytest.mark.parametrize("backend", backends())
def test_partial_gradients(backend):
    """Only x needs a gradient (frozen adapters), or only the adapters (x a constant)."""
    d = _data(3, 7, 4, 2, seed=5)
    ids = torch.tensor([1, -1, 0])
    ref = _run(multi_lora_linear_reference, d, ids, to=torch.float64)
    with pk.use_backend(backend):
        x = d["x"].clone().requires_grad_()
        y = multi_lora_linear(x, d["weight"], d["bias"], d["lora_A"], d["lora_B"], d["scalings"], ids)
        (dx,) = torch.autograd.grad(y, x, d["grad"])
        assert_close(dx, ref[1], name="dx")
        A, Bm = d["lora_A"].clone().requires_grad_(), d["lora_B"].clone().requires_grad_()
        y = multi_lora_linear(d["x"], d["weight"], d["bias"], A, Bm, torch.tensor(d["scalings"]), ids)
        dA, dB = torch.autograd.grad(y, (A, Bm), d["grad"])
        assert_close(dA, ref[2], name="dA")
        assert_close(dB, ref[3], name="dB")
        with torch.no_grad():
            assert_close(multi_lora_linear(d["x"], d["weight"], d["bias"], A, Bm, d["scalings"], ids), ref[0])


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("a", [0, 2])
def test_all_ids_equal_is_lora_linear(backend, a):
    """Every sequence on adapter a: multi_lora_linear and lora_linear (its own kernels) both within 2x the error of
    eager fp32 PyTorch against fp64; two fp32 paths are not compared with each other (their roundings differ)."""
    d = _data(3, 7, 4, 3, seed=11)
    ids = [a] * 3
    ref = _run(multi_lora_linear_reference, d, ids, bias_grad=True, to=torch.float64)
    eager = _run(multi_lora_linear_reference, d, ids, bias_grad=True)
    with pk.use_backend(backend):
        out = _run(multi_lora_linear, d, torch.full((3,), a), bias_grad=True)

        x = d["x"].clone().requires_grad_()
        A = d["lora_A"][a].clone().requires_grad_()
        Bm = d["lora_B"][a].clone().requires_grad_()
        b = d["bias"].clone().requires_grad_()
        y = pk.lora_linear(x, d["weight"], b, A, Bm, SCALINGS[a])
        single = (y.detach(),) + torch.autograd.grad(y, (x, A, Bm, b), d["grad"])
    for i, name in enumerate(NAMES):
        pick = (lambda t: t[a]) if name in ("dA", "dB") else (lambda t: t)  # noqa: E731
        assert_within_eager(out[i], ref[i], eager[i], name=f"multi_lora_linear {name}")
        assert_within_eager(single[i], pick(ref[i]), pick(eager[i]), name=f"lora_linear {name}")
    others = [i for i in range(3) if i != a]
    assert out[2][others].abs().max() == 0 and out[3][others].abs().max() == 0


# ------------------------------------------------------------------------------------------------- PEFT mixed batch


class _Net(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.proj = nn.Linear(I, O, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def _peft_model(dtype):
    """PEFT model with adapters "a0" (r 4) and "a1" (r 2): different ranks and alphas, random B (not PEFT's zeros)."""
    import peft
    torch.manual_seed(0)
    model = peft.get_peft_model(_Net(dtype).to(DEVICE), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]),
                                adapter_name="a0")
    model.add_adapter("a1", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        for name in ("a0", "a1"):
            layer.lora_B[name].weight.normal_(0, 0.5)
    return model.eval(), layer


def _stack(layer, names):
    """PEFT's per-adapter weights stacked; a lower rank is padded with zero rows of A / columns of B."""
    r = max(layer.r[n] for n in names)
    first = layer.lora_A[names[0]].weight
    A = torch.zeros(len(names), r, I, dtype=first.dtype, device=first.device)
    B = torch.zeros(len(names), O, r, dtype=A.dtype)
    for i, n in enumerate(names):
        A[i, :layer.r[n]] = layer.lora_A[n].weight.detach()
        B[i, :, :layer.r[n]] = layer.lora_B[n].weight.detach()
    return A, B, [layer.scaling[n] for n in names]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-base-fp32adapters"])
@pytest.mark.parametrize("S", [7, None], ids=["3d", "2d"])
def test_matches_peft_mixed_batch(backend, dtype, S):
    model, layer = _peft_model(dtype)
    names = ["a0", "a1"]
    A, B, scal = _stack(layer, names)
    assert A.dtype == torch.float32  # PEFT keeps adapters in fp32 over a half base
    adapter_names = ["a1", "__base__", "a0", "a1", "a0"]
    ids = torch.tensor([names.index(n) if n in names else -1 for n in adapter_names])
    x = torch.randn((5, S, I) if S else (5, I), generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    with torch.no_grad():
        peft_y = model(x, adapter_names=adapter_names)
        W, b = layer.base_layer.weight, layer.base_layer.bias
        with pk.use_backend(backend):
            y = multi_lora_linear(x, W, b, A, B, scal, ids)
        ref = multi_lora_linear_reference(x.double(), W.double(), b.double(), A.double(), B.double(), scal, ids)
    assert_within_eager(y, ref, peft_y, name="y vs PEFT")


# ------------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", backends())
def test_torch_compile_fullgraph(backend):
    d = _data(4, 7, 4, 3, seed=13)
    scal = torch.tensor(d["scalings"])

    def f(x, weight, bias, A, B, s, ids):
        return multi_lora_linear(x, weight, bias, A, B, s, ids) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    with pk.use_backend(backend):
        for ids in ([1, -1, 2, 1], [0, 0, -1, 2]):  # new ids, same graph
            d["scalings"] = scal
            eager = _run(f, d, torch.tensor(ids))
            out = _run(compiled, d, torch.tensor(ids))
            for name, o, e in zip(NAMES, out, eager):
                torch.testing.assert_close(o, e, rtol=1e-6, atol=1e-6, msg=name)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------- Triton internals


@pytest.mark.parametrize("ids, S, block_m", [([2, -1, 0, 2, -1, 0, 0], 5, 4), ([-1] * 3, 7, 16), ([1, 1], 1, 2),
                                             ([0, 3, 3, 1, 0], 9, 8)])
def test_plan_covers_rows_once(ids, S, block_m):
    """Every sorted row in exactly one block; a block lies inside one adapter's segment; segments match the ids."""
    from peftkern.ops.multi_lora.triton_impl import plan

    n = 4
    p = plan(torch.tensor(ids, device=DEVICE), S, n, torch.device(DEVICE), block_m=block_m)
    assert p.perm.device.type == p.table.device.type == p.segs.device.type == torch.device(DEVICE).type
    tok_adapter = torch.tensor(ids).repeat_interleave(S)
    perm = p.perm.long().cpu()
    assert sorted(perm.tolist()) == list(range(len(ids) * S))
    seen = torch.zeros(len(ids) * S, dtype=torch.int64)
    for start, end, a in p.table.tolist():
        assert 0 <= end - start <= block_m
        rows = perm[start:end]
        seen[rows] += 1
        assert (tok_adapter[rows] == a).all()
    assert (seen == 1).all()
    for a, (start, end) in enumerate(p.segs.tolist()):
        assert sorted(perm[start:end].tolist()) == (tok_adapter == a).nonzero().view(-1).tolist()


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_kernels_write_every_output(dtype):
    """Launchers handed NaN-poisoned buffers: every element of h, y and dx is written."""
    from peftkern.ops.multi_lora import triton_impl as ti

    d = _data(5, 7, 4, 3, dtype=dtype, adapter_dtype=torch.float32, seed=17)
    ids = torch.tensor([2, -1, 0, 2, -1])
    x = d["x"].reshape(35, I)
    p = ti.plan(ids, 7, 3, x.device)
    scal = torch.tensor(d["scalings"], device=DEVICE)
    h = ti.shrink(x, d["lora_A"], p, out=poison_(x.new_empty(35, 4, dtype=torch.float32)))
    y = ti.forward_gemm(x, d["weight"], d["bias"], h, d["lora_B"], scal, p, out=poison_(x.new_empty(35, O)))
    g = d["grad"].reshape(35, O)
    dh = ti.grad_shrink(g, d["lora_B"], scal, torch.float32, p)
    dx = ti.dgrad(g, d["weight"], dh, d["lora_A"], p, out=poison_(x.new_empty(35, I)))
    for name, t in (("h", h), ("y", y), ("dx", dx)):
        assert torch.isfinite(t).all(), name
    assert (h.view(5, 7, 4)[1] == 0).all() and (h.view(5, 7, 4)[4] == 0).all()  # base-only rows: h = 0


# ------------------------------------------------------------------------------------------------- host syncs


@pytest.mark.parametrize("op", ["bincount", "tolist", "bool", "mask-index", "int"])
def test_no_host_syncs_catches_what_syncs(op):
    """The checker below fails on the ops that read a GPU tensor back to the host."""
    t = torch.tensor([2, 0, 1])
    calls = {"bincount": lambda: torch.bincount(t), "tolist": t.tolist, "bool": lambda: bool(t.any()),
             "mask-index": lambda: t[t > 0], "int": lambda: int(t[0])}
    with pytest.raises(AssertionError, match="host syncs"), no_host_syncs():
        calls[op]()


@pytest.mark.triton
@pytest.mark.parametrize("ids_on", ["host", "device"])
def test_triton_path_never_syncs_the_host(ids_on):
    """plan and every launcher, forward and backward, with the ids on the host or the device: none of the ops that
    would wait for a GPU (checked here as the ops called; on CUDA by the next tests). The range check of adapter_ids
    comes before, in function.py."""
    d = _data(3, 5, 4, 3, seed=19)
    ids = torch.tensor([2, -1, 2], device="cpu" if ids_on == "host" else DEVICE)
    scal = torch.tensor(d["scalings"], device=DEVICE)
    args = (d["x"], d["weight"], d["bias"], d["lora_A"], d["lora_B"], scal, ids)
    with no_host_syncs():
        y, h = run("multi_lora_forward", "triton", d["x"].device, *args)
        grads = run("multi_lora_backward", "triton", d["x"].device, d["grad"], *args[:2], *args[3:], h, True, True)
    ref = _run(multi_lora_linear_reference, d, ids.tolist(), to=torch.float64)
    _check((y, *grads), ref)


@requires_cuda
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("ids", [[2, -1, 0, 2, -1], torch.tensor([2, -1, 0, 2, -1])], ids=["list", "cpu-tensor"])
def test_cuda_forward_and_backward_never_wait_for_the_gpu(backend, ids):
    """With the ids on the host, torch.cuda.set_sync_debug_mode("error") raises on nothing in a forward and backward
    (after a first call, which compiles the kernels)."""
    d = _data(5, 7, 4, 3, seed=19)
    with pk.use_backend(backend):
        _run(multi_lora_linear, d, ids, bias_grad=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = _run(multi_lora_linear, d, ids, bias_grad=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _check(out, _run(multi_lora_linear_reference, d, list(ids), bias_grad=True, to=torch.float64))


@requires_cuda
def test_cuda_graph_captures_the_triton_forward():
    """With ids and scalings on the GPU, a CUDA graph captures the forward (no sync inside; the range check is
    skipped while capturing) and replays it for other ids written into the same ids tensor."""
    d = _data(5, 7, 4, 3, seed=23)
    ids = torch.tensor([2, -1, 0, 2, -1], device=DEVICE)
    args = (d["x"], d["weight"], d["bias"], d["lora_A"], d["lora_B"], torch.tensor(d["scalings"], device=DEVICE))
    with pk.use_backend("triton"), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            multi_lora_linear(*args, ids)  # compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = multi_lora_linear(*args, ids)
        for new in ([0, 1, -1, 1, 2], [-1, -1, 2, 2, 0]):
            ids.copy_(torch.tensor(new))
            graph.replay()
            ref = multi_lora_linear_reference(*(t.double() for t in args[:5]), d["scalings"], new)
            assert_close(y, ref, name=f"replayed y, ids {new}")


# ------------------------------------------------------------------------------------------------- bad input


def _args(**over):
    """Valid arguments on DEVICE with ``over`` replacing some (their CPU tensors moved to DEVICE too)."""
    a = dict(x=torch.randn(3, 5, 8), weight=torch.randn(6, 8), bias=torch.randn(6), lora_A=torch.randn(2, 4, 8),
             lora_B=torch.randn(2, 6, 4), scalings=[1.0, 0.5], adapter_ids=torch.tensor([0, -1, 1]))
    a.update(over)
    return on_device(a)


@pytest.mark.parametrize("over, exc, match", [
    (dict(x=torch.randn(3, 5, 7)), ValueError, "x has 7 features"),
    (dict(x=torch.randn(3, 5, 2, 8)), ValueError, r"x must be \[batch, seq, in\] or \[batch, in\]"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(3, 5, 8, dtype=torch.int64)), TypeError, "x must be float"),
    (dict(weight=torch.randn(6, 8, 1)), ValueError, "weight must be 2-D"),
    (dict(bias=torch.randn(5)), ValueError, "bias must have shape"),
    (dict(bias=torch.randn(6, dtype=torch.float64)), TypeError, "bias has dtype"),
    (dict(weight=torch.randn(6, 8, dtype=torch.bfloat16)), TypeError, "weight has dtype"),
    (dict(lora_A=torch.randn(4, 8)), ValueError, "lora_A must be 3-D"),
    (dict(lora_A=torch.randn(2, 4, 9)), ValueError, "lora_A must have shape"),
    (dict(lora_A=torch.randn(0, 4, 8), lora_B=torch.randn(0, 6, 4), scalings=[]), ValueError,
     "lora_A holds no adapter"),
    (dict(lora_A=torch.randn(2, 0, 8), lora_B=torch.randn(2, 6, 0)), ValueError, "r=0"),
    (dict(lora_B=torch.randn(3, 6, 4)), ValueError, "lora_B must have shape"),
    (dict(lora_B=torch.randn(2, 6, 3)), ValueError, "lora_B must have shape"),
    (dict(lora_B=torch.randn(2, 6, 4, dtype=torch.float64)), TypeError, "lora_B has dtype"),
    (dict(lora_A=torch.randn(2, 4, 8, device="meta")), ValueError, "lora_A is on meta"),
    (dict(scalings=[1.0]), ValueError, "scalings must hold one value per adapter"),
    (dict(scalings=torch.ones(3)), ValueError, "scalings must have shape"),
    (dict(scalings=[1.0, "x"]), TypeError, r"scalings\[1\] must be a number"),
    (dict(scalings=1.0), TypeError, "scalings must be a torch.Tensor or a list"),
    (dict(scalings=torch.ones(2, dtype=torch.int64)), TypeError, "scalings must be float"),
    (dict(adapter_ids=torch.tensor([0, 1])), ValueError, "x has batch 3, adapter_ids has 2"),
    (dict(adapter_ids=[0, 1, 1, 0]), ValueError, "x has batch 3, adapter_ids has 4"),
    (dict(adapter_ids=torch.tensor([0.0, 1.0, 1.0])), TypeError, "adapter_ids must be an integer tensor"),
    (dict(adapter_ids=torch.tensor([True, False, True])), TypeError, "adapter_ids must be an integer tensor"),
    (dict(adapter_ids=[0, 1.0, 1]), TypeError, "adapter_ids must hold ints"),
    (dict(adapter_ids=torch.tensor([[0, 1, 1]])), ValueError, "adapter_ids must be 1-D"),
    (dict(adapter_ids="0,1,1"), TypeError, "adapter_ids must be an integer torch.Tensor or a list"),
    (dict(adapter_ids=torch.tensor([0, 2, 1])), ValueError, r"adapter_ids must lie in \[-1, 2\).*got 2"),
    (dict(adapter_ids=torch.tensor([0, -2, 1])), ValueError, r"adapter_ids must lie in \[-1, 2\).*got -2"),
    (dict(adapter_ids=[0, 1, 5]), ValueError, r"adapter_ids must lie in \[-1, 2\).*got 5"),
    (dict(adapter_ids=torch.tensor([0, 1, 1], device="meta")), ValueError, "adapter_ids is on meta"),
    (dict(adapter_ids=torch.tensor([0, 1, 255], dtype=torch.uint8)), ValueError, "got 255"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments(over, exc, match):
    a = _args(**over)
    with pytest.raises(exc, match=match):
        multi_lora_linear(**a)


def test_trainable_weight_refused():
    with pytest.raises(ValueError, match="weight must be frozen"):
        multi_lora_linear(**_args(weight=torch.randn(6, 8, requires_grad=True)))


@pytest.mark.parametrize("backend", backends())
def test_out_of_range_ids_caught_under_compile(backend):
    """The range check runs on the real ids inside the op, so a compiled graph raises it too, before any kernel."""
    torch._dynamo.reset()
    compiled = torch.compile(multi_lora_linear, fullgraph=True)
    a = _args()
    with pk.use_backend(backend):
        compiled(**a)
        with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 2\)"):
            compiled(**_args(adapter_ids=torch.tensor([0, 3, 1])))
    torch._dynamo.reset()


@pytest.mark.triton
def test_explicit_triton_refuses_float64_auto_falls_back(monkeypatch):
    d = _data(2, 3, 4, 2, dtype=torch.float64)
    with pk.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        _run(multi_lora_linear, d, [1, -1])
    # "auto" picks triton where it can run (a GPU); with the kernels unable to serve float64 it falls back to torch
    monkeypatch.setattr(pk.backend, "_AUTO_ORDER", {d["x"].device.type: ("triton", "torch")})
    out = _run(multi_lora_linear, d, [1, -1])
    ref = _run(multi_lora_linear_reference, d, [1, -1])
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
