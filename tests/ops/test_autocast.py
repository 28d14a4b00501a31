"""Every op under ``torch.autocast`` behaves as ``F.linear`` does: its matmul inputs are cast to the autocast dtype
(fp32 adapters included, their gradients back in fp32), the output is in the autocast dtype; NF4 scales and DoRA's
norm stay fp32. Eager calls and ``torch.compile`` go through the same torch.library autocast rule."""
import pytest
import torch

import peftkern as pk
from peftkern.ops.lora.reference import dora_linear_reference

from .._helpers import DEVICE, assert_close, backends

DT = torch.bfloat16
DEVICE_TYPE = torch.device(DEVICE).type


def _lora_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(24, 40, device=DEVICE) / 6
    b = torch.randn(24, device=DEVICE)
    A = (torch.randn(4, 40, device=DEVICE) / 6).requires_grad_()
    B = torch.randn(24, 4, device=DEVICE).requires_grad_()
    return x, w, b, A, B


def case_lora():
    x, w, b, A, B = _lora_inputs()
    e = torch.rand(4, device=DEVICE).requires_grad_()
    return (x, w, b, A, B, e), lambda x, w, b, A, B, e: pk.lora_linear(x, w, b, A, B, 0.5, rank_scale=e)


def case_qlora():
    x, w, b, A, B = _lora_inputs()
    q = pk.nf4.quantize(w, 64)
    return (x, b, A, B), lambda x, b, A, B: pk.qlora_linear(x, q, b, A, B, 0.5)


def case_nf4():
    x, w, b, _, _ = _lora_inputs()
    q = pk.nf4.quantize(w, 64)
    return (x, b), lambda x, b: pk.nf4_linear(x, q, b)


def case_multi_lora():
    x, w, b, _, _ = _lora_inputs()
    A = (torch.randn(2, 4, 40, device=DEVICE) / 6).requires_grad_()
    B = torch.randn(2, 24, 4, device=DEVICE).requires_grad_()
    return (x, w, b, A, B), lambda x, w, b, A, B: pk.multi_lora_linear(x, w, b, A, B, [0.5, 2.0], [1, -1])


def case_adapter():
    torch.manual_seed(0)
    h = torch.randn(2, 9, 40, device=DEVICE, requires_grad=True)
    wd = (torch.randn(8, 40, device=DEVICE) / 6).requires_grad_()
    wu = (torch.randn(40, 8, device=DEVICE) / 3).requires_grad_()
    bu = torch.randn(40, device=DEVICE).requires_grad_()
    return (h, wd, wu, bu), lambda h, wd, wu, bu: pk.bottleneck_adapter(h, wd, None, wu, bu, "gelu")


def case_prefix():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 7, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    pk_, pv = (torch.randn(2, 3, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    return (q, k, v, pk_, pv), lambda *t: pk.prefix_attention(*t)


def case_sparse():
    x, w, b, _, _ = _lora_inputs()
    idx = torch.tensor([1, 40, 77, 300, 959], device=DEVICE)
    values = torch.randn(5, device=DEVICE, requires_grad=True)
    return (x, w, b, values), lambda x, w, b, vals: pk.sparse_diff_linear(x, w, b, idx, vals)


CASES = {"lora": case_lora, "qlora": case_qlora, "nf4": case_nf4, "multi_lora": case_multi_lora,
         "adapter": case_adapter, "prefix": case_prefix, "sparse": case_sparse}
KEEP_DTYPE = {"sparse": {3}}  # inputs the rule leaves alone (sparse values over a half-precision weight)


def _grads(fn, inputs, g):
    leaves = [t for t in inputs if t.requires_grad]
    y = fn(*inputs)
    return y, torch.autograd.grad((y.float() * g).sum(), leaves)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", backends())
def test_autocast_is_the_explicit_cast(case, backend):
    """Under autocast: the output in bf16, and output and fp32 gradients bit-equal to the op on inputs cast by hand
    (autocast off), the gradients in fp32."""
    inputs, fn = CASES[case]()
    keep = KEEP_DTYPE.get(case, set())
    with torch.no_grad():
        g = torch.randn(fn(*inputs).shape, device=DEVICE)
    with pk.use_backend(backend):
        with torch.autocast(DEVICE_TYPE, dtype=DT):
            y, grads = _grads(fn, inputs, g)
        cast = [t if i in keep else t.to(DT) for i, t in enumerate(inputs)]
        y_ref, grads_ref = _grads(fn, cast, g)
    assert y.dtype == DT
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    leaves = [t for t in inputs if t.requires_grad]
    for i, (t, got, ref) in enumerate(zip(leaves, grads, grads_ref)):
        assert got.dtype == t.dtype, f"grad {i} in {got.dtype}, its tensor is {t.dtype}"
        torch.testing.assert_close(got, ref.to(got.dtype), rtol=0, atol=0, msg=lambda m: f"grad {i}: {m}")


@pytest.mark.parametrize("backend", backends())
def test_dora_norm_stays_fp32(backend):
    """DoRA under autocast: bf16 output, gradients in fp32; the detached norm is the fp32 one, so the error against
    fp64 is at most that of the reference math run under the same autocast (PEFT's way: a bf16 B A in the norm)."""
    x, w, b, A, B = _lora_inputs()
    m = (w.norm(dim=1) * 1.3).requires_grad_()
    g = torch.randn(2, 9, 24, device=DEVICE)
    leaves = (x, A, B, m)
    with pk.use_backend(backend), torch.autocast(DEVICE_TYPE, dtype=DT):
        y, grads = _grads(lambda *t: pk.dora_linear(t[0], w, b, t[1], t[2], 0.5, t[3]), leaves, g)
        y_eager, grads_eager = _grads(lambda *t: dora_linear_reference(t[0], w, b, t[1], t[2], 0.5, t[3]), leaves, g)
    assert y.dtype == DT
    ref64 = [t.detach().double().requires_grad_() for t in leaves]
    y64, grads64 = _grads(lambda *t: dora_linear_reference(t[0], w.double(), b.double(), t[1], t[2], 0.5, t[3]),
                          ref64, g.double())
    assert_close(y, y64, eager=y_eager, name="y")
    for name, t, got, eager, ref in zip(("x", "A", "B", "magnitude"), leaves, grads, grads_eager, grads64):
        assert got.dtype == t.dtype
        # fp32 gradients of bf16 math: judged against eager autocast's error, as the bf16 output is
        bound = 2.0 * (eager.double() - ref).abs().max().item() + 1e-6 * max(ref.abs().max().item(), 1.0)
        assert (got.double() - ref).abs().max().item() <= bound, name


def test_autocast_under_compile():
    """torch.compile sees the same autocast rule: no graph break, the eager result."""
    inputs, fn = case_lora()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.autocast(DEVICE_TYPE, dtype=DT):
        y = fn(*inputs)
        y_c = compiled(*inputs)
    assert y_c.dtype == DT
    torch.testing.assert_close(y_c, y, rtol=0, atol=0)


def test_inputs_of_mixed_dtypes_are_accepted_only_under_autocast():
    """A layer norm under autocast hands an fp32 x to a bf16 layer: F.linear takes it, so do we."""
    x, w, b, A, B = _lora_inputs()
    with pytest.raises(TypeError, match="weight has dtype torch.bfloat16"):
        pk.lora_linear(x, w.to(DT), b.to(DT), A, B, 0.5)
    with torch.autocast(DEVICE_TYPE, dtype=DT):
        assert pk.lora_linear(x, w.to(DT), b, A, B, 0.5).dtype == DT
