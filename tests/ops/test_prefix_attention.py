"""Prefix attention: values and all five gradients against fp64 math on concatenated keys (GQA, shared and per-row
prefixes, padding, causal and not, P = 0, S = 1, P > S), against SDPA on concatenated keys, what autograd keeps,
torch.compile, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftkern as pk
from peftkern.backend import registered
from peftkern.measure import SavedBytes
from peftkern.ops.prefix_attention import function as prefix_fn, torch_impl
from peftkern.ops.prefix_attention.reference import prefix_attention_reference
from tests._helpers import (DEVICE, assert_close, assert_within_eager, backends, op_backends, shape_id,
                            torch_variant_or_backend)

# the torch backend runs PyTorch's CPU flash kernel on a CPU (at test sizes over the prefix concatenated before the
# keys); "torch-chunked" switches it off; "torch-blocked" takes the prefix apart and splits causal queries into
# blocks (torch_impl.query_blocks) at test sizes: blocks of 2 rows or more, at most 3
BACKENDS = [b for b in backends() if getattr(b, "values", (b,))[0] in registered("prefix_attention_forward")]
BACKENDS += ["torch-chunked", "torch-blocked"]


@pytest.fixture
def use(request, monkeypatch):
    """Enter the backend (or torch path) named by the test's ``backend`` parameter."""
    name = request.node.callspec.params["backend"]
    if name == "torch-blocked":
        monkeypatch.setattr(torch_impl, "CONCAT_MAX_WORK", 0)
        monkeypatch.setattr(torch_impl, "BLOCK_ROWS", 2)
        monkeypatch.setattr(torch_impl, "MAX_BLOCKS", 3)
        name = "torch"
    with torch_variant_or_backend(name, "torch-chunked", monkeypatch, torch_impl, "USE_CPU_FLASH") as name:
        yield name
# (B, Hq, Hkv, S, P, D)
SHAPES = [(2, 4, 2, 7, 3, 16), (1, 2, 2, 1, 5, 8), (2, 2, 1, 5, 9, 32), (2, 3, 3, 6, 0, 16), (1, 2, 1, 37, 4, 64)]
NAMES = ("o", "dq", "dk", "dv", "dprefix_k", "dprefix_v")


def _case(B, Hq, Hkv, S, P, D, *, shared=True, padding=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE, dtype)  # noqa: E731
    lead = () if shared else (B,)
    kpm = None
    if padding:
        kpm = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
        kpm[-1, : max(1, S // 3)] = True  # left padding on the last row (with P = 0 its first query sees nothing)
    return dict(q=rnd(B, Hq, S, D), k=rnd(B, Hkv, S, D), v=rnd(B, Hkv, S, D), pk=rnd(*lead, Hkv, P, D),
                pv=rnd(*lead, Hkv, P, D), kpm=kpm, g=rnd(B, Hq, S, D))


def _run(fn, c, *, to=None, causal=True):
    cast = (lambda t: t) if to is None else (lambda t: t.to(to))
    leaves = [cast(c[n]).detach().requires_grad_() for n in ("q", "k", "v", "pk", "pv")]
    o = fn(*leaves, causal=causal, key_padding_mask=c["kpm"])
    grads = torch.autograd.grad(o, leaves, cast(c["g"]))
    return (o.detach(), *grads)


def _sdpa_concat(q, k, v, pk_, pv, *, causal, key_padding_mask):
    """The peer: SDPA over [prefix; sequence] keys with the same visibility mask (what users do today)."""
    B, Hq, S, D = q.shape
    P = pk_.shape[-2]
    expand = lambda t: t.expand(B, *t.shape[-3:]) if t.dim() == 3 else t  # noqa: E731
    keys = torch.cat([expand(pk_), k], 2).repeat_interleave(Hq // k.shape[1], 1)
    values = torch.cat([expand(pv), v], 2).repeat_interleave(Hq // k.shape[1], 1)
    visible = torch.ones(B, 1, S, P + S, dtype=torch.bool, device=q.device)
    if causal:
        visible[..., P:] = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        visible[..., P:] &= ~key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-row"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dims", SHAPES, ids=lambda d: shape_id(B=d[0], H=d[1], KV=d[2], S=d[3], P=d[4], D=d[5]))
def test_fp32_values_and_grads(dims, causal, shared, padding, backend, use):
    c = _case(*dims, shared=shared, padding=padding)
    out = _run(pk.prefix_attention, c, causal=causal)
    ref = _run(prefix_attention_reference, c, to=torch.float64, causal=causal)
    for name, o, r in zip(NAMES, out, ref):
        assert_close(o, r, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dims", SHAPES[:3], ids=lambda d: shape_id(B=d[0], H=d[1], KV=d[2], S=d[3], P=d[4], D=d[5]))
def test_low_precision_within_twice_eager_error(dims, dtype, backend, use):
    c = _case(*dims, shared=False, padding=True, dtype=dtype)
    out = _run(pk.prefix_attention, c)
    ref = _run(prefix_attention_reference, c, to=torch.float64)
    eager = _run(prefix_attention_reference, c)  # the same math in the inputs' dtype
    for name, o, r, e in zip(NAMES, out, ref, eager):
        assert_close(o, r, eager=e, name=name)


def test_matches_sdpa_on_concatenated_keys():
    """Values and gradients within 2x the error of SDPA on concatenated keys against fp64."""
    c = _case(2, 4, 2, 9, 5, 32, shared=True, padding=False)
    ours = _run(pk.prefix_attention, c)
    peer = _run(_sdpa_concat, c)
    ref = _run(prefix_attention_reference, c, to=torch.float64)
    for name, o, p, r in zip(NAMES, ours, peer, ref):
        assert_within_eager(o, r, p, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, use):
    """q/k/v as transformers lays them out ([B, S, H, D] transposed) and a sliced prefix."""
    B, H, S, P, D = 2, 2, 6, 3, 16
    c = _case(B, H, H, S, P, D, shared=True)
    base = {n: c[n].transpose(1, 2).contiguous().transpose(1, 2) for n in ("q", "k", "v")}
    assert not base["q"].is_contiguous()
    wide = torch.randn(H, P, 2 * D, device=DEVICE)
    c2 = {**c, **base, "pk": wide[..., ::2], "pv": wide[..., 1::2]}
    out = _run(pk.prefix_attention, c2)
    ref = _run(prefix_attention_reference, {**c2}, to=torch.float64)
    for name, o, r in zip(NAMES, out, ref):
        assert_close(o, r, name=name)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cpu_path_at_its_own_block_sizes(causal, monkeypatch):
    """S = 150 with the torch path's own query blocks (2 of 75 rows), left padding past the first block on one row
    and GQA: values and every gradient against fp64."""
    monkeypatch.setattr(torch_impl, "CONCAT_MAX_WORK", 0)
    c = _case(2, 4, 2, 150, 5, 16, shared=False, padding=False)
    c["kpm"] = torch.zeros(2, 150, dtype=torch.bool, device=DEVICE)
    c["kpm"][1, :90] = True
    with pk.use_backend("torch"):
        out = _run(pk.prefix_attention, c, causal=causal)
    ref = _run(prefix_attention_reference, c, to=torch.float64, causal=causal)
    for name, o, r in zip(NAMES, out, ref):
        assert_close(o, r, name=name)


@pytest.mark.parametrize("cached", [True, False], ids=["cached-mask", "built-mask"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
def test_cpu_concatenated_path_causal_mask(cached, padding, monkeypatch):
    """The small problems' path (prefix concatenated before the keys) with its causal mask cached and built per call
    (both sides of MASK_CACHE_MAX); the cached one first made under inference mode, then used to train: values and
    every gradient against fp64."""
    monkeypatch.setattr(torch_impl, "MASK_CACHE_MAX", 1 << 14 if cached else 0)
    torch_impl._cached_causal_mask.cache_clear()
    c = _case(2, 4, 2, 11, 6, 16, shared=False, padding=padding)
    args = [c[n] for n in ("q", "k", "v", "pk", "pv")]
    with pk.use_backend("torch"):
        assert torch_impl._concatenates(c["q"], 6)
        with torch.inference_mode():
            pk.prefix_attention(*args, key_padding_mask=c["kpm"])
        out = _run(pk.prefix_attention, c)
    assert torch_impl._cached_causal_mask.cache_info().currsize == (1 if cached else 0)
    ref = _run(prefix_attention_reference, c, to=torch.float64)
    for name, o, r in zip(NAMES, out, ref):
        assert_close(o, r, name=name)


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "bshd"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-row"])
def test_registered_backward_outputs_own_their_storage(shared, transposed):
    """B 1, one KV head: the slices of the concatenated keys' gradient are contiguous views of one tensor there; the
    registered op (which refuses outputs that alias one another) gets copies, equal to the eager call's, each in the
    layout the op's fake tensors give (``empty_like`` of its input; q, k, v also as transformers lays them out)."""
    c = _case(1, 2, 1, 6, 3, 16, shared=shared)
    if transposed:
        c.update({n: c[n].transpose(1, 2).contiguous().transpose(1, 2) for n in ("q", "k", "v")})
    args = [c[n] for n in ("q", "k", "v", "pk", "pv")]
    o, lse = torch.ops.peftkern.prefix_attention_forward(*args, None, True, 0.25, "torch")
    grads = torch.ops.peftkern.prefix_attention_backward(c["g"], *args, None, o, lse, True, 0.25, "torch")
    eager = prefix_fn.prefix_attention_backward(c["g"], *args, None, o, lse, True, 0.25, "torch")
    assert len({g.untyped_storage().data_ptr() for g in grads}) == 5
    for name, g, e, a in zip(NAMES[1:], grads, eager, args):
        assert g.stride() == torch.empty_like(a).stride(), name
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
def test_cpu_inference_runs_the_torch_implementation(padding, monkeypatch):
    """A call with neither autograd nor autocast, eager, under "auto", on the CPU runs torch's implementation itself
    (no op, no autograd node): the registered op's o bit for bit. With a backend named, under autocast, on CUDA: the
    op."""
    c = _case(2, 4, 2, 7, 3, 16, padding=padding)
    args = [c[n] for n in ("q", "k", "v", "pk", "pv")]
    entered = op_backends(monkeypatch, prefix_fn, "prefix_attention_forward")
    with torch.inference_mode():
        o = pk.prefix_attention(*args, key_padding_mask=c["kpm"])
        assert entered == ([] if DEVICE == "cpu" else ["auto"])
        with pk.use_backend("torch"):
            o_op = pk.prefix_attention(*args, key_padding_mask=c["kpm"])
    assert entered[-1] == "torch"
    torch.testing.assert_close(o, o_op, rtol=0, atol=0)
    with torch.inference_mode(), torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        pk.prefix_attention(*args, key_padding_mask=c["kpm"])
    assert entered[-1] == "auto"


COMPOSITE = [(2, 4, 2, 7, 3, 16), (1, 4, 2, 16, 8, 16), (2, 2, 1, 5, 9, 32)]  # B, Hq, Hkv, S, P, D


@pytest.mark.parametrize("layout", ["contiguous", "bshd"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-row"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dims", COMPOSITE, ids=lambda d: shape_id(B=d[0], H=d[1], KV=d[2], S=d[3], P=d[4], D=d[5]))
def test_cpu_composite_is_the_op_under_torch_autograd(dims, causal, shared, padding, layout, monkeypatch):
    """An eager fp32 call with grad on the CPU under "auto", at the sizes that concatenate, runs the op's small-problem
    path as PyTorch ops under PyTorch's own autograd (torch_impl.composite; q, k, v and o's gradient also as
    transformers lays them out): o and every gradient the registered op's bit for bit and fp64's within tolerance,
    the op never entered; autograd keeps the concatenated keys and values and the cached mask beside o. Above the size
    switch (CONCAT_MAX_WORK) and with a backend named: the op."""
    c = _case(*dims, shared=shared, padding=padding)
    if layout == "bshd":
        c.update({n: c[n].transpose(1, 2).contiguous().transpose(1, 2) for n in ("q", "k", "v", "g")})
    entered = op_backends(monkeypatch, prefix_fn, "prefix_attention_forward")
    leaves = [c[n].detach().requires_grad_() for n in ("q", "k", "v", "pk", "pv")]
    if DEVICE != "cpu":  # off the CPU the call is the op's
        pk.prefix_attention(*leaves, causal=causal, key_padding_mask=c["kpm"])
        assert entered == ["auto"]
        return
    with SavedBytes(exclude=leaves) as saved:
        o = pk.prefix_attention(*leaves, causal=causal, key_padding_mask=c["kpm"])
    out = (o.detach(), *torch.autograd.grad(o, leaves, c["g"]))
    assert entered == []
    B, Hq, Hkv, S, P, D = dims
    keys = B * Hkv * (P + S) * D * 4
    mask = [(B if padding else 1) * (S if causal else 1) * (P + S) * 4] if causal or padding else []
    assert sorted(saved.sizes) == sorted([B * Hq * S * D * 4, B * Hq * S * 4, keys, keys, *mask])  # o, lse
    with pk.use_backend("torch"):
        out_op = _run(pk.prefix_attention, c, causal=causal)
    ref = _run(prefix_attention_reference, c, to=torch.float64, causal=causal)
    for name, a, b, r in zip(NAMES, out, out_op, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        assert_close(a, r, name=name)
    monkeypatch.setattr(torch_impl, "CONCAT_MAX_WORK", 0)
    _run(pk.prefix_attention, c, causal=causal)
    assert entered == ["torch", "auto"]


@pytest.mark.triton
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-row"])
def test_triton_prefix_grad_split_equals_unsplit(shared, monkeypatch):
    """The prefix's dk/dv reduction split over (batch row, query block) units into parts (3 here; for the shared
    prefix one part spans two batch rows), each part's sum in a workspace and then one sum, against the unsplit
    kernel's (one part): both against fp64, the split within 2x the unsplit's error. S spans 3 query blocks at the
    kernel's own BLOCK_M."""
    from peftkern.ops.prefix_attention import triton_impl

    block_m = triton_impl._cfg(16, "dkdv")["BLOCK_M"]
    B, Hkv, S = 2, 2, 2 * block_m + 5
    groups = 1 if shared else B
    c = _case(B, 4, Hkv, S, 5, 16, shared=shared, padding=True)
    ref = _run(prefix_attention_reference, c, to=torch.float64)
    parts, grads = [], []
    for programs in (1, 10):
        monkeypatch.setattr(triton_impl, "programs_wanted", lambda device, n=programs: n)
        parts.append(triton_impl.prefix_splits(3 * B // groups, Hkv * groups, torch.device(DEVICE)))
        with pk.use_backend("triton"):
            grads.append(_run(pk.prefix_attention, c))
    assert parts == [(1, 3 * B // groups), (3, 2) if shared else (3, 1)]
    for name, o, e, r in zip(NAMES, grads[1], grads[0], ref):
        assert_close(e, r, name=name)
        assert_within_eager(o, r, e, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_without_visible_key_outputs_zero(backend, use):
    c = _case(1, 2, 2, 4, 0, 8, padding=True)  # P = 0, key 0 padding: query 0 sees nothing (causal)
    out = _run(pk.prefix_attention, c)
    assert (out[0][:, :, 0] == 0).all() and (out[1][:, :, 0] == 0).all()
    assert all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_for_backward_is_linear_in_s(backend, use):
    """S = 1024, P = 64: autograd keeps O(B H S D), never the B H S (P + S) matrix. Triton on a CPU (the
    interpreter) at S = 256, D = 16: the matrix still 20x o's size, 7 s instead of 70 s."""
    B, H, S, P, D = (1, 2, 256, 64, 16) if use == "triton" and DEVICE == "cpu" else (1, 2, 1024, 64, 32)
    c = _case(B, H, H, S, P, D)
    leaves = [c[n].requires_grad_() for n in ("q", "k", "v", "pk", "pv")]
    with SavedBytes(exclude=leaves) as saved:
        o = pk.prefix_attention(*leaves)
    assert max(saved.sizes) < B * H * S * (P + S) * 4 // 8
    assert saved.total <= 2 * B * H * S * D * 4  # o and lse
    o.sum().backward()


def test_torch_compile_fullgraph_same_numbers():
    c = _case(2, 4, 2, 7, 3, 16)
    fn = torch.compile(pk.prefix_attention, fullgraph=True, backend="aot_eager")
    args = [c[n] for n in ("q", "k", "v", "pk", "pv")]
    torch.testing.assert_close(fn(*args), pk.prefix_attention(*args), rtol=0, atol=0)


def test_bad_input():
    c = _case(2, 4, 2, 7, 3, 16)
    q, k, v, pk_, pv = (c[n] for n in ("q", "k", "v", "pk", "pv"))
    with pytest.raises(ValueError, match="q must be 4-D"):
        pk.prefix_attention(q[0], k, v, pk_, pv)
    with pytest.raises(ValueError, match="multiple of k's 3 heads"):
        kv3, prefix3 = torch.randn(2, 3, 7, 16, device=DEVICE), torch.randn(3, 3, 16, device=DEVICE)
        pk.prefix_attention(q, kv3, kv3, prefix3, prefix3)
    with pytest.raises(ValueError, match="k must be"):
        pk.prefix_attention(q, torch.randn(2, 2, 6, 16, device=DEVICE), v, pk_, pv)
    with pytest.raises(ValueError, match="prefix_k must have shape"):
        pk.prefix_attention(q, k, v, torch.randn(2, 3, 8, device=DEVICE), pv)
    with pytest.raises(ValueError, match="prefix_v must have shape"):
        pk.prefix_attention(q, k, v, pk_, torch.randn(2, 4, 16, device=DEVICE))
    with pytest.raises(TypeError, match="prefix_k has dtype"):
        pk.prefix_attention(q, k, v, pk_.double(), pv)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        pk.prefix_attention(q, k, v, pk_, pv, key_padding_mask=torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        pk.prefix_attention(q, k, v, pk_, pv, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="softmax_scale"):
        pk.prefix_attention(q, k, v, pk_, pv, softmax_scale=0.0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        pk.prefix_attention(q, k, v, pk_, pv, causal=1)


def test_wide_heads_beyond_the_triton_kernels():
    """D = 256: "auto" serves it through torch (values right), an explicit "triton" refuses it by name."""
    from peftkern.ops.prefix_attention import triton_impl

    c = _case(1, 2, 2, 5, 3, 256)
    args = [c[n] for n in ("q", "k", "v", "pk", "pv")]
    with pk.use_backend("triton"), pytest.raises(ValueError, match="head dim 256 > 128"):
        pk.prefix_attention(*args)
    impl = triton_impl.forward  # what auto would reach on a GPU
    o, _ = impl(*args, None, True, 256 ** -0.5)
    assert_close(o, prefix_attention_reference(*[a.double() for a in args]), name="o")
