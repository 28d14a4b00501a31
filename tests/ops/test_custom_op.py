"""Eager calls skip the dispatcher and compute what the registered op computes (peftkern.ops.custom_op); argument
checks are remembered per metadata signature and nothing else (peftkern._validate.checked)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import peftkern as pk
from peftkern import _validate as V
from peftkern.measure import SavedBytes
from peftkern.ops import custom_op
from peftkern.ops.adapter import function as adapter_fn
from peftkern.ops.lora import function as lora_fn
from peftkern.ops.multi_lora import function as multi_lora_fn
from peftkern.ops.nf4 import function as nf4_fn
from peftkern.ops.prefix_attention import function as prefix_fn
from peftkern.ops.sparse import function as sparse_fn

from .._helpers import DEVICE, op_backends
from .test_backward_backend import CASES

DEVICE_TYPE = torch.device(DEVICE).type
OPS = [op for module in (lora_fn, nf4_fn, multi_lora_fn, adapter_fn, prefix_fn, sparse_fn)
       for op in vars(module).values() if isinstance(op, custom_op.Op)]


def _run(case: str, autocast: bool):
    """(output, gradients of the case's leaves, bytes saved for backward) of one forward and backward, the dropout
    seed drawn from torch.manual_seed(1)."""
    torch.manual_seed(0)
    leaves, forward = CASES[case]()
    torch.manual_seed(1)
    with torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16, enabled=autocast), SavedBytes(leaves) as saved:
        y = forward()
    grads = torch.autograd.grad(y.float().square().sum(), leaves)
    return y, grads, saved.total


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
@pytest.mark.parametrize("case", list(CASES))
def test_eager_path_is_the_registered_op(case, autocast, monkeypatch):
    """Eager calls never enter the registered op; forcing every call through it gives bit-equal outputs and
    gradients in the same dtypes, and autograd saves the same bytes (also under autocast, whose rule the eager path
    applies itself); the adapter's and prefix attention's small fp32 eager paths run under PyTorch's own autograd,
    which keeps what the op recomputes (a = act(z); the concatenated keys: their family tests check what)."""
    entered = []
    for op in OPS:
        monkeypatch.setattr(op, "op", lambda *args, _op=op.op: entered.append(_op) or _op(*args))
    y, grads, saved = _run(case, autocast)
    assert not entered
    monkeypatch.setattr(custom_op, "eager", lambda first: False)
    y_op, grads_op, saved_op = _run(case, autocast)
    assert entered and (saved == saved_op or (case, autocast) in (("adapter", False), ("prefix", False)))
    assert y.dtype == y_op.dtype and y.shape == y_op.shape
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)
    for i, (g, g_op) in enumerate(zip(grads, grads_op)):
        assert g.dtype == g_op.dtype
        torch.testing.assert_close(g, g_op, rtol=0, atol=0, msg=lambda m: f"grad {i}: {m}")


def test_tracers_see_the_registered_ops():
    """Under a dispatch mode (what make_fx, fake tensors and FLOP counters use) the forward and the backward are one
    op each; a fake-tensor call runs the registered fake."""
    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    seen = []
    leaves, forward = CASES["lora"]()
    with Recorder():
        forward().sum().backward()
    assert "peftkern.lora_forward.default" in seen and "peftkern.lora_backward.default" in seen
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w, A, B = torch.empty(3, 5, 24), torch.empty(20, 24), torch.empty(4, 24), torch.empty(20, 4)
        assert pk.lora_linear(x, w, None, A, B, 0.5).shape == (3, 5, 20)


@pytest.mark.parametrize("dims", [(24,), (7, 24), (2, 7, 24)])
def test_any_leading_dims(dims, monkeypatch):
    """x of 1, 2 or 3 dims: y with x's leading dims, and the same y and dx as through the registered op."""
    torch.manual_seed(0)
    x = torch.randn(*dims, device=DEVICE, requires_grad=True)
    w, b = torch.randn(20, 24, device=DEVICE), torch.randn(20, device=DEVICE)
    A, B = torch.randn(4, 24, device=DEVICE), torch.randn(20, 4, device=DEVICE)
    results = []
    for eager in (True, False):
        monkeypatch.setattr(custom_op, "eager", lambda first, eager=eager: eager)
        y = pk.lora_linear(x, w, b, A, B, 0.5)
        results.append((y, torch.autograd.grad(y.sum(), x)[0]))
    (y, dx), (y_op, dx_op) = results
    assert y.shape == (*dims[:-1], 20) and dx.shape == x.shape
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)
    torch.testing.assert_close(dx, dx_op, rtol=0, atol=0)


@pytest.mark.parametrize("dims", [(24,), (2, 7, 24)])
def test_cpu_inference_runs_the_torch_implementation(dims, monkeypatch):
    """A LoRA call with neither autograd nor autocast, eager, under "auto", on the CPU runs torch's implementation
    itself (no op, no autograd node; through the function and the layer): the registered op's y bit for bit. With
    grad, with a backend named, on CUDA: the op."""
    torch.manual_seed(0)
    layer = pk.nn.LoRALinear(24, 20, r=4).to(DEVICE)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(*dims, device=DEVICE)
    args = (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, 0.5)
    entered = op_backends(monkeypatch, lora_fn, "lora_forward")
    with torch.no_grad():
        y, y_layer = pk.lora_linear(*args), layer(x)
        assert entered == ([] if DEVICE_TYPE == "cpu" else ["auto", "auto"])
        with pk.use_backend("torch"):
            y_op, y_layer_op = pk.lora_linear(*args), layer(x)
    assert entered[-2:] == ["torch", "torch"]
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)
    torch.testing.assert_close(y_layer, y_layer_op, rtol=0, atol=0)
    assert y.shape == (*dims[:-1], 20)
    pk.lora_linear(*args)
    assert entered[-1] == "auto"


def _lora_args():
    torch.manual_seed(0)
    return (torch.randn(3, 24), torch.randn(20, 24), None, torch.randn(4, 24, requires_grad=True),
            torch.randn(20, 4, requires_grad=True))


def test_checks_run_once_per_signature(monkeypatch):
    """The checks run on the first call of a signature only; a new shape, dtype or requires_grad is a new one."""
    calls = []
    check = lora_fn._check_lora_args
    monkeypatch.setattr(lora_fn, "_check_lora_args", lambda *args: calls.append(1) or check(*args))
    x, w, b, A, B = _lora_args()
    for _ in range(3):
        pk.lora_linear(x, w, b, A, B, 0.5)
    assert len(calls) == 1
    pk.lora_linear(torch.randn(5, 24), w, b, A, B, 0.5)
    pk.lora_linear(x.requires_grad_(), w, b, A, B, 0.5)
    pk.lora_linear(x, w, b, A, B, 2)
    assert len(calls) == 4


def test_a_remembered_signature_does_not_hide_a_change():
    """What a check reads changing under the same tensor objects (a parameter's .data replaced, grad mode, autocast)
    or a value of another type (True is not 1) is checked anew."""
    x, w, b, A, B = _lora_args()
    pk.lora_linear(x, w, b, A, B, 1)
    with pytest.raises(TypeError, match="scaling must be a number"):
        pk.lora_linear(x, w, b, A, B, True)
    A.data = torch.randn(5, 24)
    with pytest.raises(ValueError, match="lora_B must have shape"):
        pk.lora_linear(x, w, b, A, B, 1)
    A.data = torch.randn(4, 24)
    w.requires_grad_(True)
    with torch.no_grad():
        pk.lora_linear(x, w, b, A, B, 1)
    with pytest.raises(ValueError, match="weight must be frozen"):
        pk.lora_linear(x, w, b, A, B, 1)
    w.requires_grad_(False)
    w16 = w.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pk.lora_linear(x, w16, b, A, B, 1)
    with pytest.raises(TypeError, match="weight has dtype torch.bfloat16"):
        pk.lora_linear(x, w16, b, A, B, 1)


def test_a_failed_check_is_not_remembered_and_lists_are_checked_every_call():
    x, w, b, A, B = _lora_args()
    for _ in range(2):
        with pytest.raises(ValueError, match="lora_A must have shape"):
            pk.lora_linear(x, w, b, A[:, :20], B, 1)
    x3, A3, B3 = x[None], A.detach()[None], B.detach()[None]
    pk.multi_lora_linear(x3, w, b, A3, B3, [0.5], [0])
    for _ in range(2):
        with pytest.raises(TypeError, match="scalings\\[0\\] must be a number"):
            pk.multi_lora_linear(x3, w, b, A3, B3, ["0.5"], [0])


def test_checked_without_a_signature_checks_every_call():
    """An argument that is neither a tensor, a plain value nor shaped (a list) cannot key the memory: the check runs
    every time."""
    calls = []
    for _ in range(3):
        V.checked(lambda values: calls.append(values), [1, 2])
    assert len(calls) == 3
