"""Sparse diff ops: output, dx and d values against dense fp64 math on odd shapes and densities (one entry to 50%),
every backend; the SDDMM alone; merge/unmerge exact; nothing [out, in] kept for backward; bad input."""
from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
import torch.utils.checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

import peftkern as pk
from peftkern import _native
from peftkern.backend import registered, run
from peftkern.measure import SavedBytes
from peftkern.ops.sparse.reference import masked_weight_grad_reference, sparse_diff_linear_reference
from tests._helpers import (DEVICE, assert_close, backends, no_host_syncs, on_device, poison_, shape_id,
                            token_kernel_declines)

BACKENDS = [b for b in backends() if getattr(b, "values", (b,))[0] in registered("sparse_diff_forward")]
SHAPES = [(1, 37, 29), (37, 130, 29), (2 * 33, 64, 96)]  # (N, in, out)
DENSITIES = [0.0, 0.001, 0.05, 0.5]  # 0.0: exactly one entry


def _case(N, I, O, density, *, dtype=torch.float32, values_dtype=None, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    nnz = max(1, int(density * O * I))
    idx = torch.randperm(O * I, generator=g)[:nnz].sort().values
    x_shape = (*lead, I) if lead else (N, I)
    return on_device(dict(x=rnd(*x_shape).to(dtype), weight=(rnd(O, I) * I ** -0.5).to(dtype), bias=rnd(O).to(dtype),
                          indices=idx, values=rnd(nnz).to(values_dtype or dtype), g=rnd(*x_shape[:-1], O).to(dtype)))


def _run(fn, c, to=None):
    cast = (lambda t: t) if to is None else (lambda t: t.to(to))
    x = cast(c["x"]).detach().requires_grad_()
    b = cast(c["bias"]).detach().requires_grad_()
    v = cast(c["values"]).detach().requires_grad_()
    y = fn(x, cast(c["weight"]), b, c["indices"], v)
    dx, db, dv = torch.autograd.grad(y, (x, b, v), cast(c["g"]).to(y.dtype))
    return y.detach(), dx, db, dv


NAMES = ("y", "dx", "db", "dvalues")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dims", SHAPES, ids=lambda d: shape_id(N=d[0], I=d[1], O=d[2]))
def test_fp32_against_dense_math(dims, density, backend):
    c = _case(*dims, density, lead=(2, dims[0] // 2) if dims[0] % 2 == 0 else None)
    with pk.use_backend(backend):
        out = _run(pk.sparse_diff_linear, c)
    ref = _run(sparse_diff_linear_reference, c, to=torch.float64)
    for name, o, r in zip(NAMES, out, ref):
        assert_close(o, r, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("values_dtype", [None, torch.float32], ids=["same", "fp32-values"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("density", [0.005, 0.05], ids=["nnz-le-out", "nnz-gt-out"])  # the torch path's two forms
def test_low_precision_within_twice_eager_error(dtype, values_dtype, backend, density):
    c = _case(37, 130, 29, density, dtype=dtype, values_dtype=values_dtype)
    with pk.use_backend(backend):
        out = _run(pk.sparse_diff_linear, c)
    ref = _run(sparse_diff_linear_reference, c, to=torch.float64)
    eager = _run(sparse_diff_linear_reference, c)  # the dense masked approach in the inputs' dtypes
    for name, o, r, e in zip(NAMES, out, ref, eager):
        assert o.dtype == e.dtype, name
        assert_close(o, r, eager=e.to(o.dtype) if e.dtype != o.dtype else e, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_weight_grad_is_the_sampled_dense_grad(backend):
    c = _case(37, 64, 29, 0.1)
    with pk.use_backend(backend):
        got = pk.sparse.masked_weight_grad(c["g"], c["x"], c["indices"])
    ref = masked_weight_grad_reference(c["g"].double(), c["x"].double(), c["indices"])
    assert_close(got, ref, name="masked_weight_grad")


# ------------------------------------------------------------------------------ torch forms, eager CPU paths
FORMS = [("merged", "dense"), ("merged", "csr"), ("gather", "gather"), ("csr", "csr"), ("gather", "dense")]


def _noncontiguous(x):
    """``x`` as a strided view (every other element of a wider tensor), differentiable back to ``x``."""
    return torch.stack([x, x], -1)[..., 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("forms", FORMS, ids=lambda f: "-".join(f))
def test_torch_forms_against_dense_math(forms, dtype, monkeypatch):
    """Each form of the torch path forced (y and dx: merged, gather, csr; d values: dense, gather, csr), the merged
    copies in several row and column blocks with a partial last one, on one token (the 1-D gathers) and on 3-D and
    non-contiguous inputs, through the op (torch) and in inference mode through the eager CPU path (auto)."""
    from peftkern.ops.sparse import torch_impl

    monkeypatch.setattr(torch_impl, "correction_form", lambda *args: forms[0])
    monkeypatch.setattr(torch_impl, "sddmm_form", lambda *args: forms[1])
    monkeypatch.setattr(torch_impl, "BLOCK_BYTES", 1000)  # fp32 29 x 37: 5 blocks of rows, 5 of columns
    values_dtype = torch.float32 if dtype == torch.bfloat16 else None
    for N, lead in ((1, None), (6, (2, 3))):
        c = _case(N, 37, 29, 0.1, dtype=dtype, values_dtype=values_dtype, seed=N, lead=lead)
        ref = _run(sparse_diff_linear_reference, c, to=torch.float64)
        eager = _run(sparse_diff_linear_reference, c)
        fn = lambda x, *args: pk.sparse_diff_linear(_noncontiguous(x), *args)  # noqa: E731
        with pk.use_backend("torch"):
            out = _run(fn, c)
        with torch.inference_mode():  # one token: the inline 1-D gather where the form is gather
            y_auto = fn(c["x"], c["weight"], c["bias"], c["indices"], c["values"])
        for name, o, r, e in zip(("y auto",) + NAMES, (y_auto,) + out, ref[:1] + ref, eager[:1] + eager):
            assert_close(o, r, eager=e.to(o.dtype), name=f"{name} N={N}")


TOKEN_CASES = [(13, 7, 0.0), (37, 29, 0.05), (64, 96, 0.5)]  # (in, out, density): in below / past 16-wide chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16+fp32-values"])
@pytest.mark.parametrize("layout", ["rows", "conv1d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", TOKEN_CASES, ids=[shape_id(I=i, O=o, d=d) for i, o, d in TOKEN_CASES])
def test_cpu_token_kernel(case, bias, layout, dtype):
    """One token through csrc/cpu's kernel (a CPU decode step; bf16 under fp32 values, as a layer keeps them) against
    fp64 (bf16: within twice the dense approach's error in the inputs' dtypes): every element written (NaN-poisoned),
    rows without entries and with many, the weight as a layer passes a Conv1D's; an inference call under auto and
    the op run the same kernel (the same bits)."""
    from peftkern.ops.sparse import torch_impl

    I, O, density = case
    c = _case(1, I, O, density, dtype=dtype, values_dtype=torch.float32)
    w = c["weight"] if layout == "rows" else c["weight"].t().contiguous().t()
    b = c["bias"] if bias else None
    y = poison_(torch.empty(1, O, dtype=dtype))
    assert torch_impl.token_forward(c["x"], w, b, torch_impl.plan(c["indices"], (O, I)), c["values"], out=y) is y
    ref = sparse_diff_linear_reference(c["x"].double(), w.double(), None if b is None else b.double(), c["indices"],
                                       c["values"].double())
    eager = sparse_diff_linear_reference(c["x"], w, b, c["indices"], c["values"])
    assert_close(y, ref, eager=eager, name="y")
    with torch.inference_mode():
        torch.testing.assert_close(pk.sparse_diff_linear(c["x"], w, b, c["indices"], c["values"]), y, rtol=0, atol=0)
        with pk.use_backend("torch"):
            torch.testing.assert_close(pk.sparse_diff_linear(c["x"], w, b, c["indices"], c["values"]), y, rtol=0,
                                       atol=0)


@pytest.mark.parametrize("why", ["no-library", "large-weight", "strided-x", "fp64", "bf16-values"])
def test_cpu_token_kernel_declines(why, monkeypatch):
    """Where the kernel does not apply, the torch gather computes the token (as right)."""
    from peftkern.ops.sparse import torch_impl

    dtype = {"fp64": torch.float64, "bf16-values": torch.bfloat16}.get(why, torch.float32)
    c = _case(1, 37, 29, 0.05, dtype=dtype)
    token_kernel_declines(why, monkeypatch, 37 * 29)
    x = _noncontiguous(c["x"]) if why == "strided-x" else c["x"]
    y = poison_(torch.empty(1, 29, dtype=x.dtype))
    plan = torch_impl.plan(c["indices"], (29, 37))
    got = torch_impl.token_forward(x, c["weight"], c["bias"], plan, c["values"], out=y)
    assert got is not y
    ref = sparse_diff_linear_reference(*(c[k].double() for k in ("x", "weight", "bias")), c["indices"],
                                       c["values"].double())
    eager = sparse_diff_linear_reference(c["x"], c["weight"], c["bias"], c["indices"], c["values"])
    assert_close(got, ref, eager=eager, name=why)


@pytest.mark.parametrize("library", [True, False], ids=["nodes", "no-nodes"])
@pytest.mark.parametrize("case", [(16, 64, 64, 0.01, torch.float32, True), (2 * 5, 37, 29, 0.05, torch.float64, True),
                                  (16, 512, 384, 0.001, torch.float32, False),
                                  (16, 64, 64, 0.01, torch.bfloat16, False)],
                         ids=["small", "small-fp64", "larger", "bf16"])
def test_eager_cpu_path_both_sides_of_the_small_switch(case, library, monkeypatch):
    """Under auto on the CPU a small layer in one precision runs as csrc/torch's C++ autograd node (without that
    extension: addmm on the merged weight under PyTorch's autograd), bit-equal to the op through the torch backend,
    whose torch forms then compute the same; a larger one, or bf16, is the op. Both right against fp64, 3-D and
    non-contiguous inputs."""
    N, I, O, density, dtype, small = case
    if not library:
        monkeypatch.setattr(_native, "USE_CPU_LIBRARY", False)
    values_dtype = torch.float32 if dtype == torch.bfloat16 else None
    c = _case(N, I, O, density, dtype=dtype, values_dtype=values_dtype, lead=(2, N // 2))
    c = {k: v.cpu() for k, v in c.items()}
    fn = lambda x, *args: pk.sparse_diff_linear(_noncontiguous(x), *args)  # noqa: E731
    x = c["x"].detach().requires_grad_()
    y = fn(x, c["weight"], c["bias"], c["indices"], c["values"].requires_grad_())
    ours = getattr(getattr(y.grad_fn, "_forward_cls", None), "__name__", None) == "sparse_diff_forward_eager"
    assert ours != small
    if small:
        assert _ran_node(y) == library
    with pk.use_backend("torch"):
        out_op = _run(fn, c)
    out = _run(fn, c)
    ref = _run(sparse_diff_linear_reference, c, to=torch.float64)
    eager = _run(sparse_diff_linear_reference, c)
    for name, o, o_op, r, e in zip(NAMES, out, out_op, ref, eager):
        assert_close(o, r, eager=e.to(o.dtype), name=name)
        if small:
            torch.testing.assert_close(o, o_op, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def _ran_node(y) -> bool:
    """Whether y (or its grad_fn), or the tensor it is a view of, came out of csrc/torch's SparseSmall node."""
    fn = y if not isinstance(y, torch.Tensor) else y.grad_fn
    return fn is not None and any("SparseSmall" in f.name() for f in (fn, *(f for f, _ in fn.next_functions if f is not None)))


SMALL_CASES = [(16, 64, 64, 0.01), (2 * 5, 37, 29, 0.05), (2 * 3, 5, 7, 0.3)]  # (N, in, out, density)


def _small_layer_run(c, dtype, bias, layout):
    """y, dx, (db), dvalues of a SparseDiffLinear's second call (over an nn.Linear or its transposed, Conv1D-like
    weight) on c's x in ``dtype`` as a 3-D non-contiguous input, and y's grad_fn."""
    w = c["weight"].to(dtype)
    weight = torch.nn.Parameter(w.t().contiguous() if layout == "conv1d" else w, requires_grad=False)
    layer = pk.nn.SparseDiffLinear(weight, None if bias == "no-bias" else c["bias"].to(dtype), c["indices"],
                                   c["values"].to(dtype), fan_in_fan_out=layout == "conv1d")
    if bias == "bias":
        layer.bias.requires_grad_(True)
    x = c["x"].to(dtype).detach().requires_grad_()
    first = layer(_noncontiguous(x))  # the Python path; from the second call on the layer's SmallLayer (csrc/torch)
    if pk.get_backend() == "auto":
        assert layer.__dict__["_small_call"](_noncontiguous(x)) is not None  # its gate takes this call
    else:
        assert "_small_call" not in layer.__dict__  # made only where it would run
    y = layer(_noncontiguous(x))
    torch.testing.assert_close(y, first, rtol=0, atol=0)
    wrt = (x, layer.bias, layer.values) if bias == "bias" else (x, layer.values)
    return (y.detach(), *torch.autograd.grad(y, wrt, c["g"].to(dtype))), y.grad_fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("layout", ["rows", "conv1d"])
@pytest.mark.parametrize("bias", ["bias", "frozen-bias", "no-bias"])
@pytest.mark.parametrize("case", SMALL_CASES, ids=[shape_id(N=n, I=i, O=o, d=d) for n, i, o, d in SMALL_CASES])
def test_cpu_small_layer_node(case, bias, layout, dtype):
    """A small layer's training call on the CPU is csrc/torch's one C++ autograd node: y, dx, the bias' and the
    values' gradients against fp64 (3-D, non-contiguous x; its weight as stored by nn.Linear or Conv1D), and the
    same bits as the registered op through the torch backend (whose torch forms call the node's functions)."""
    N, I, O, density = case
    c = {k: v.cpu() for k, v in _case(N, I, O, density, dtype=torch.float64, lead=(2, N // 2)).items()}
    out, grad_fn = _small_layer_run(c, dtype, bias, layout)
    assert _ran_node(grad_fn)
    with pk.use_backend("torch"):
        out_op, grad_fn_op = _small_layer_run(c, dtype, bias, layout)
    assert not _ran_node(grad_fn_op)
    x, b, v = (c["x"].requires_grad_(), c["bias"].requires_grad_(), c["values"].requires_grad_())
    y = sparse_diff_linear_reference(x, c["weight"], None if bias == "no-bias" else b, c["indices"], v)
    ref = (y, *torch.autograd.grad(y, (x, b, v) if bias == "bias" else (x, v), c["g"]))
    names = ("y", "dx", "db", "dvalues") if bias == "bias" else ("y", "dx", "dvalues")
    for name, o, o_op, r in zip(names, out, out_op, ref):
        assert_close(o, r.detach(), name=name)
        torch.testing.assert_close(o, o_op, rtol=0, atol=0, msg=lambda m: f"{name} vs the op: {m}")


@pytest.mark.parametrize("library", [True, False], ids=["nodes", "no-nodes"])
def test_small_layer_same_bits_with_and_without_grad(library, monkeypatch):
    """A small layer gives the same y trained (the node), without grad, in inference mode and through the op; so a
    reentrant checkpoint (no-grad forward, recomputed with grad) gives the plain call's gradients bit for bit."""
    if not library:
        monkeypatch.setattr(_native, "USE_CPU_LIBRARY", False)
    c = {k: v.cpu() for k, v in _case(16, 64, 64, 0.02).items()}
    layer = pk.nn.SparseDiffLinear(torch.nn.Parameter(c["weight"], requires_grad=False), c["bias"], c["indices"],
                                   c["values"])
    x = c["x"].detach().requires_grad_()
    y = layer(x)
    assert _ran_node(y) == library
    y.square().sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y.detach(), rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(layer(c["x"]), y.detach(), rtol=0, atol=0)
    with pk.use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(layer(x), y.detach(), rtol=0, atol=0)
    grads = x.grad, layer.values.grad
    x.grad, layer.values.grad = None, None
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=True).square().sum().backward()
    for got, want in zip((x.grad, layer.values.grad), grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cpu_small_layer_node_double_backward_and_other_threads():
    """The node's gradients are differentiable (create_graph: the same terms as ATen ops) and its backward runs on
    any thread (everything it needs is in its context)."""
    c = {k: v.cpu() for k, v in _case(6, 9, 7, 0.2, dtype=torch.float64).items()}
    x, b, v = c["x"].requires_grad_(), c["bias"].requires_grad_(), c["values"].requires_grad_()
    fn = lambda x, b, v: pk.sparse_diff_linear(x, c["weight"], b, c["indices"], v)  # noqa: E731
    assert _ran_node(fn(x, b, v))
    assert torch.autograd.gradcheck(fn, (x, b, v))
    assert torch.autograd.gradgradcheck(fn, (x, b, v))
    y = fn(x, b, v)
    here = torch.autograd.grad(y, (x, b, v), c["g"], retain_graph=True)
    there = []
    worker = threading.Thread(target=lambda: there.extend(torch.autograd.grad(y, (x, b, v), c["g"])))
    worker.start()
    worker.join()
    for a, t in zip(here, there, strict=True):
        assert torch.equal(a, t)


def test_cpu_small_layer_node_saves_nothing_weight_sized():
    """What the node keeps for backward: x (contiguous), W, the values and the entries' rows and columns, the last two
    its only storages of its own (as many bytes as the op's int64 indices); the composite it replaced kept a merged
    copy of W."""
    O, I, N = 64, 64, 16
    c = {k: v.cpu() for k, v in _case(N, I, O, 0.01).items()}
    x, v = c["x"].requires_grad_(), c["values"].requires_grad_()
    with SavedBytes(exclude=[c["weight"], v, x]) as saved:
        y = pk.sparse_diff_linear(x, c["weight"], None, c["indices"], v)
    assert _ran_node(y)
    assert saved.total == 2 * 4 * v.numel()  # the entries' rows and columns, int32


def test_small_tokens_is_where_the_forms_make_a_layer_small():
    from peftkern.ops.sparse import torch_impl as T

    for shape in [(64, 64), (37, 29), (5, 7), (1, 1), (512, 384), (128, 1024)]:
        for nnz in (1, shape[0] * shape[1] // 100 + 1, shape[0] * shape[1] // 3 + 1):
            for weight_bytes in (2, 4, 8):
                got = T.small_tokens(nnz, shape, weight_bytes)
                for tokens in range(0, 300):
                    expect = (T.correction_form(tokens, nnz, shape, weight_bytes) == "merged"
                              and T.sddmm_form(tokens, nnz, shape) == "dense"
                              and shape[0] * shape[1] * weight_bytes <= T.BLOCK_BYTES)
                    assert (tokens in got) == expect, (shape, nnz, weight_bytes, tokens)


def test_layer_calls_take_the_node_straight_while_their_state_holds(monkeypatch):
    """After a small layer's first training call (its Python check and path), its calls go straight to the node
    (csrc/torch's SmallLayer: no check, same bits as the functional call); whatever that check read sends the next
    call back through Python: grad mode off, autocast, another backend, a token count outside the small range, the
    weight unfrozen, indices changed in place, a merge, .to(); a bad x raises every time. The layer deep-copies and
    pickles (without its C++ object)."""
    from peftkern.nn import sparse as sparse_module

    calls = []
    check = sparse_module._check
    monkeypatch.setattr(sparse_module, "_check", lambda *args: calls.append(1) or check(*args))
    c = {k: v.cpu() for k, v in _case(16, 64, 64, 0.02).items()}
    layer = pk.nn.SparseDiffLinear(torch.nn.Parameter(c["weight"], requires_grad=False), c["bias"],
                                   c["indices"].clone(), c["values"])

    def same_as_functional(x, indices=None):
        x = x.detach().requires_grad_()
        y = layer(x)
        dx, dv = torch.autograd.grad(y, (x, layer.values), torch.ones_like(y))
        x_f, v_f = x.detach().requires_grad_(), layer.values.detach().requires_grad_()
        y_f = pk.sparse_diff_linear(x_f, layer.weight, layer.bias, layer.indices if indices is None else indices, v_f)
        for got, want in zip((y, dx, dv), (y_f, *torch.autograd.grad(y_f, (x_f, v_f), torch.ones_like(y_f)))):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        return y

    for x in (c["x"], c["x"].view(2, 8, 64), c["x"].t().contiguous().t()):
        assert _ran_node(same_as_functional(x))
    assert len(calls) == 1 and layer.__dict__.get("_small_call") is not None
    with pytest.raises(ValueError, match="x has 63 features"):
        layer(c["x"][:, :63])
    with torch.no_grad():
        y = layer(c["x"])
    assert y.grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(c["x"]).dtype == torch.bfloat16
    with pk.use_backend("torch"):
        assert not _ran_node(layer(c["x"]))
    assert not _ran_node(layer(torch.randn(512, 64)))  # past the dense SDDMM's tokens
    calls.clear()
    assert _ran_node(layer(c["x"])) and not calls
    layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="weight must be frozen"):
        layer(c["x"])
    layer.weight.requires_grad_(False)
    moved = torch.randperm(64 * 64)[: layer.indices.numel()].sort().values
    layer.indices.copy_(moved)
    assert _ran_node(same_as_functional(c["x"], moved))
    unmerged = layer(c["x"]).detach()
    layer.merge()
    merged = layer(c["x"])
    assert not _ran_node(merged)
    torch.testing.assert_close(merged.detach(), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert _ran_node(same_as_functional(c["x"]))
    twin = copy.deepcopy(layer)
    torch.save(layer, io.BytesIO())
    torch.testing.assert_close(twin(c["x"]), layer(c["x"]), rtol=0, atol=0)
    layer.to(torch.float64)
    assert _ran_node(same_as_functional(c["x"].double()))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(c["x"].double()), layer(c["x"].double()), rtol=0, atol=0)


@pytest.mark.triton
def test_triton_kernels_write_every_output():
    from peftkern.ops.sparse import triton_impl

    c = _case(19, 37, 29, 0.2)
    out = poison_(c["x"].new_empty(c["indices"].numel()))
    triton_impl.masked_grad(c["g"], c["x"], c["indices"], 37, out=out)
    assert_close(out, masked_weight_grad_reference(c["g"].double(), c["x"].double(), c["indices"]), name="sddmm")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tiled", [True, False], ids=["tiles", "gather"])
def test_triton_sddmm_both_regimes_across_tile_edges(tiled, dtype, monkeypatch):
    """The values' gradient by dense tiles (their entries gathered from the accumulator) and by the per-entry
    gather, forced either way: a 3 x 3 grid of tiles with a partial last row and column, tokens not a multiple of
    the token block, the rows and columns on each side of every tile edge, tiles with more entries than an
    epilogue chunk, and an empty tile."""
    from peftkern.ops.sparse import triton_impl
    from peftkern.ops.sparse.torch_impl import TILE

    N, O, I = 37, 2 * TILE + 9, 2 * TILE + 13
    c = _case(N, I, O, 0.03, dtype=dtype, seed=3)
    edges = torch.tensor([0, TILE - 1, TILE, 2 * TILE - 1, 2 * TILE])
    edge_rows, edge_cols = torch.cat([edges, torch.tensor([O - 1])]), torch.cat([edges, torch.tensor([I - 1])])
    idx = torch.cat([c["indices"].cpu(), (edge_rows[:, None] * I + edge_cols[None, :]).reshape(-1)]).unique()
    r, col = idx // I, idx % I
    idx = idx[~((r // TILE == 1) & (col // TILE == 1))].to(DEVICE)  # tile (1, 1) empty
    monkeypatch.setattr(triton_impl, "TILED_SDDMM_ENTRIES", 0 if tiled else 10 ** 9)
    out = poison_(c["x"].new_empty(idx.numel(), dtype=torch.float32))
    triton_impl.masked_grad(c["g"], c["x"], idx, I, out=out)
    ref = masked_weight_grad_reference(c["g"].double(), c["x"].double(), idx)
    assert_close(out, ref, name="sddmm")  # fp32 sums of products exact in fp32 (bf16 operands too)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_unmerge_exact(dtype, backend):
    c = _case(3, 37, 29, 0.1, dtype=dtype, values_dtype=torch.float32)
    w = c["weight"].clone()
    with pk.use_backend(backend):
        previous = pk.sparse.merge(w, c["indices"], c["values"], alpha=0.5)
        expected = c["weight"].double().view(-1).index_add(0, c["indices"], 0.5 * c["values"].double())
        assert torch.equal(w.view(-1), expected.to(dtype))  # the sum rounded once
        pk.sparse.unmerge(w, c["indices"], c["values"], alpha=0.5, previous=previous)
    assert torch.equal(w, c["weight"])


@pytest.mark.parametrize("backend,N", [pytest.param(*getattr(b, "values", (b,)), 16, marks=getattr(b, "marks", ()))
                                       for b in BACKENDS] + [pytest.param("torch", 256, id="torch-256-merged")])
def test_keeps_nothing_weight_sized_for_backward(backend, N):
    O, I = 512, 384
    c = _case(N, I, O, 0.001)
    x, v = c["x"].requires_grad_(), c["values"].requires_grad_()
    with pk.use_backend(backend), SavedBytes(exclude=[c["weight"], v, x]) as saved:
        y = pk.sparse_diff_linear(x, c["weight"], None, c["indices"], v)
    assert max(saved.sizes) < O * I * 4 // 4  # the indices only (and x)
    y.sum().backward()


class Largest(TorchDispatchMode):
    """``largest``: the most elements of a tensor any op (but a view) made while it was on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and func is not torch.ops.aten.view.default:
                self.largest = max(self.largest, t.numel())
        return out


def test_merged_form_copies_at_most_a_block(monkeypatch):
    """At 256 tokens the torch path merges (a copy of W, one GEMM): in blocks of rows (y) and columns (dx) of at most
    BLOCK_BYTES, so no tensor of a training step is W-sized (here W is larger than every activation)."""
    from peftkern.ops.sparse import torch_impl

    O, I, N = 512, 384, 256
    assert torch_impl.correction_form(N, O * I // 100, (O, I), 4) == "merged"
    monkeypatch.setattr(torch_impl, "BLOCK_BYTES", 64 << 10)
    c = _case(N, I, O, 0.01)
    x, v = c["x"].requires_grad_(), c["values"].requires_grad_()
    with pk.use_backend("torch"), Largest() as seen:
        y = pk.sparse_diff_linear(x, c["weight"], None, c["indices"], v)
        y.backward(c["g"])
    assert 0 < seen.largest <= max(N * O, N * I) < O * I
    ref = _run(sparse_diff_linear_reference, {**c, "bias": torch.zeros(O, dtype=torch.float64)}, to=torch.float64)
    assert_close(y, ref[0], name="y")
    assert_close(x.grad, ref[1], name="dx")
    assert_close(v.grad, ref[3], name="dvalues")


def test_torch_compile_fullgraph_same_numbers():
    c = _case(37, 64, 29, 0.05)
    fn = torch.compile(pk.sparse_diff_linear, fullgraph=True, backend="aot_eager")
    args = (c["x"], c["weight"], c["bias"], c["indices"], c["values"])
    torch.testing.assert_close(fn(*args), pk.sparse_diff_linear(*args), rtol=0, atol=0)


def test_bad_input():
    c = _case(3, 8, 6, 0.2)
    x, w, b, idx, v = (c[n] for n in ("x", "weight", "bias", "indices", "values"))
    call = lambda **kw: pk.sparse_diff_linear(**on_device({"x": x, "weight": w, "bias": b,  # noqa: E731
                                                           "indices": idx, "values": v, **kw}))
    with pytest.raises(ValueError, match="must lie in"):
        call(indices=torch.tensor([0, 48]), values=torch.randn(2))
    with pytest.raises(ValueError, match="must lie in"):
        call(indices=torch.tensor([-1, 3]), values=torch.randn(2))
    with pytest.raises(ValueError, match="sorted and unique"):
        call(indices=torch.tensor([5, 3]), values=torch.randn(2))
    with pytest.raises(ValueError, match="sorted and unique"):
        call(indices=torch.tensor([3, 3]), values=torch.randn(2))
    with pytest.raises(TypeError, match="int64 or int32"):
        call(indices=torch.tensor([1.0, 2.0]), values=torch.randn(2))
    with pytest.raises(ValueError, match="values has 3 entries but indices has 2"):
        call(indices=torch.tensor([1, 2]), values=torch.randn(3))
    with pytest.raises(ValueError, match="x has 7 features"):
        call(x=torch.randn(3, 7))
    with pytest.raises(ValueError, match="weight must be frozen"):
        call(weight=w.clone().requires_grad_())
    with pytest.raises(TypeError, match="values must be float32"):
        call(values=v.to(torch.float16))
    with pytest.raises(ValueError, match="share their leading dims"):
        pk.sparse.masked_weight_grad(torch.randn(4, 6, device=DEVICE), x, idx)


def test_sparse_diff_linear_module_trains_only_values_and_merges_exactly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).to(DEVICE, torch.bfloat16)
    w0 = lin.weight.detach().clone()
    idx = torch.randperm(64 * 48)[:30].sort().values
    layer = pk.nn.SparseDiffLinear.from_linear(lin, idx)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["values"]
    assert layer.values.dtype == torch.float32 and layer.values.numel() == 30
    opt = torch.optim.AdamW([layer.values], lr=1e-2)
    x = torch.randn(8, 64, dtype=torch.bfloat16, device=DEVICE)
    for _ in range(3):
        layer(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state[layer.values]
    assert all(t.numel() in (1, 30) for t in state.values())  # optimizer state is nnz-sized
    assert torch.equal(layer.weight, w0) and layer.values.abs().max() > 0
    layer.eval()
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=2e-2, atol=2e-2)  # one bf16 rounding of the merged weight
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    sd = layer.diff_state_dict()
    assert torch.equal(sd["indices"].cpu(), idx) and sd["shape"].tolist() == [48, 64]


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dense_weight_sized_tensor_in_a_training_step(backend):
    """Every tensor an op creates during forward + backward + optimizer step is far smaller than [out, in]."""
    O, I, N = 512, 384, 16
    idx = torch.randperm(O * I)[: O * I // 1000].sort().values
    layer = pk.nn.SparseDiffLinear.from_linear(torch.nn.Linear(I, O, device=DEVICE), idx)
    opt = torch.optim.AdamW([layer.values], lr=1e-3)
    x = torch.randn(N, I, device=DEVICE, requires_grad=True)
    with pk.use_backend(backend), Largest() as seen:
        layer(x).square().mean().backward()
        opt.step()
    assert 0 < seen.largest <= max(N * O, N * I)  # activations at most, never O * I


def test_indices_checked_once_per_version():
    """A layer's fixed indices are validated once, yet an in-place change to them is caught."""
    c = _case(3, 8, 6, 0.2)
    idx = c["indices"].clone()
    args = lambda: (c["x"], c["weight"], c["bias"], idx, c["values"])  # noqa: E731
    pk.sparse_diff_linear(*args())
    pk.sparse_diff_linear(*args())
    idx[0] = idx[1]  # bumps the version: checked again
    with pytest.raises(ValueError, match="sorted and unique"):
        pk.sparse_diff_linear(*args())


# ------------------------------------------------------------------------------------------------- host syncs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.005, 0.1], ids=["nnz-le-out", "nnz-gt-out"])
def test_forward_and_backward_never_sync_the_host(backend, density):
    """What runs every call (the indices are checked once per tensor, before): none of the ops that would wait for a
    GPU (checked here as the ops called; on CUDA in test_backward_backend.py), and the right numbers."""
    c = _case(9, 40, 29, density)
    x, w, b, idx, v, g = (c[n] for n in ("x", "weight", "bias", "indices", "values", "g"))
    with no_host_syncs():
        out = (run("sparse_diff_forward", backend, x.device, x, w, b, idx, v),
               run("sparse_diff_dgrad", backend, x.device, g, w, idx, v),
               run("sparse_masked_grad", backend, x.device, g, x, idx, w.shape[1]))
    ref = _run(sparse_diff_linear_reference, c, to=torch.float64)
    for name, o, r in zip(("y", "dx", "dvalues"), out, (ref[0], ref[1], ref[3])):
        assert_close(o, r, name=name)



# ------------------------------------------------------------------------------------------ cached structure


def test_structure_groups_entries_both_ways():
    """Rows, columns, the column order and both groupings' bounds, as dense math derives them."""
    from peftkern.ops.sparse.torch_impl import structure

    O, I = 29, 37
    idx = _case(1, I, O, 0.2)["indices"]
    s = structure(idx, (O, I))
    rows, cols = idx // I, idx % I
    assert all(t.dtype == torch.int32 for t in s)
    assert torch.equal(s.rows, rows) and torch.equal(s.cols, cols)
    assert torch.equal(s.row_bounds, torch.cat([rows.new_zeros(1), torch.bincount(rows, minlength=O).cumsum(0)]))
    assert torch.equal(s.col_bounds, torch.cat([cols.new_zeros(1), torch.bincount(cols, minlength=I).cumsum(0)]))
    assert torch.equal(cols[s.by_col], cols.sort(stable=True).values) and torch.equal(s.col_rows, rows[s.by_col])
    assert all(torch.equal(s.col_rows[s.col_bounds[c]:s.col_bounds[c + 1]], rows[cols == c]) for c in range(I))


def test_structure_tile_order():
    """The TILE x TILE tile order of the tiled SDDMM: tiles row-major, entries in index order inside a tile, each
    entry's place in its tile, and every tile's bounds (empty tiles included)."""
    from peftkern.ops.sparse.torch_impl import TILE, structure

    O, I = 2 * TILE + 3, TILE + 5
    idx = _case(1, I, O, 0.01, seed=1)["indices"]
    idx = idx[(idx // I) // TILE != 1]  # the middle row of tiles empty
    s = structure(idx, (O, I))
    rows, cols = idx // I, idx % I
    tile = (rows // TILE) * 2 + cols // TILE
    order = sorted(range(idx.numel()), key=lambda e: (int(tile[e]), int(idx[e])))
    assert s.by_tile.tolist() == order
    assert torch.equal(s.tile_pos, ((rows % TILE) * TILE + cols % TILE)[s.by_tile])
    assert torch.equal(s.tile_bounds, torch.cat([tile.new_zeros(1), torch.bincount(tile, minlength=6).cumsum(0)]))


def test_structure_built_once_per_indices_and_rebuilt_when_they_change():
    from peftkern.ops.sparse.torch_impl import structure

    idx = torch.tensor([1, 5, 9, 20], device=DEVICE)
    first = structure(idx, (4, 6))
    assert structure(idx, (4, 6)) is first
    assert structure(idx, (6, 4)) is not first  # another weight shape: other rows and columns
    idx[1] = 6  # in place: a new version
    assert torch.equal(structure(idx, (6, 4)).cols, torch.tensor([1, 2, 1, 0], device=DEVICE))
    assert structure(idx.clone(), (6, 4)) is not structure(idx, (6, 4))


def test_layer_built_in_inference_mode():
    """Indices made under torch.inference_mode keep no version counter: checked and grouped every call, right."""
    c = _case(9, 40, 29, 0.1)
    with torch.inference_mode():
        layer = pk.nn.SparseDiffLinear(torch.nn.Parameter(c["weight"], requires_grad=False), c["bias"],
                                       c["indices"].clone(), c["values"])
        y = layer(c["x"])
    ref = sparse_diff_linear_reference(*(c[n].double() for n in ("x", "weight", "bias")), c["indices"],
                                       c["values"].double())
    assert_close(y, ref, name="y")


def test_layer_checks_once_per_state(monkeypatch):
    """The layer checks its call once per signature of x and the weight for its state (V.ChecksPerState): a bad x
    raises every time; values or indices replaced, or .to(), are checked again."""
    from peftkern.nn import sparse as sparse_module

    calls = []
    check = sparse_module._check
    monkeypatch.setattr(sparse_module, "_check", lambda *args: calls.append(1) or check(*args))
    c = _case(9, 40, 29, 0.1)
    layer = pk.nn.SparseDiffLinear(torch.nn.Parameter(c["weight"], requires_grad=False), c["bias"],
                                   c["indices"], c["values"])
    for _ in range(3):
        layer(c["x"])
    assert len(calls) == 1
    for _ in range(2):
        with pytest.raises(ValueError, match="x has 28 features"):
            layer(c["x"][..., :28])
    layer.values = torch.nn.Parameter(c["values"][:-1].clone())
    with pytest.raises(ValueError, match="values has"):
        layer(c["x"])
    layer.values = torch.nn.Parameter(c["values"].clone())
    layer.indices = c["indices"].to(torch.float32)
    with pytest.raises(TypeError, match="indices"):
        layer(c["x"])
    layer.indices = c["indices"]
    layer.to(torch.float64)
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        layer(c["x"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.005, 0.1], ids=["nnz-le-out", "nnz-gt-out"])
def test_training_steps_never_rebuild_the_structure(backend, density):
    """After the first step no sort, search or index division runs (the structure is the layer's, cached); an
    in-place change of the indices is followed, with the right numbers."""
    from torch.profiler import profile

    c = _case(9, 40, 29, density)
    layer = pk.nn.SparseDiffLinear(torch.nn.Parameter(c["weight"], requires_grad=False), None, c["indices"],
                                   c["values"])
    x = c["x"].requires_grad_()
    with pk.use_backend(backend):
        layer(x).backward(c["g"])
        with profile() as prof:
            layer(x).backward(c["g"])
        ran = {e.name for e in prof.events()}
        assert not ran & {"aten::sort", "aten::argsort", "aten::searchsorted", "aten::floor_divide",
                          "aten::remainder", "aten::div"}, ran
        with torch.no_grad():
            layer.indices.copy_(torch.randperm(40 * 29)[:layer.indices.numel()].sort().values.to(DEVICE))
        out = _run(pk.sparse_diff_linear, {**c, "indices": layer.indices})
    ref = _run(sparse_diff_linear_reference, {**c, "indices": layer.indices}, to=torch.float64)
    for name, o, r in zip(NAMES, out, ref):
        assert_close(o, r, name=name)
