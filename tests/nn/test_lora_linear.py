"""LoRALinear against PEFT's LoRA layer (plain, rsLoRA, DoRA), merge/unmerge, eval, torch.compile
(DDP: tests/test_distributed.py)."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import peft

import peftkern as pk
from peftkern.ops.lora.reference import dora_linear_reference, dora_weight_norm_reference, lora_linear_reference
from tests._helpers import DEVICE, assert_close, assert_within_eager, backends, shape_id


class _Holder(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.lin = linear

    def forward(self, x):
        return self.lin(x)


def _pair(in_f, out_f, r, alpha, *, dtype=torch.float32, use_rslora=False, use_dora=False, bias=True, seed=0):
    """A PEFT LoRA layer and our LoRALinear holding the same (random, nonzero-B) weights."""
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias).to(DEVICE, dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], use_rslora=use_rslora, use_dora=use_dora)
    pm = peft.get_peft_model(_Holder(copy.deepcopy(base)), cfg)
    layer = pm.base_model.model.lin
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.mul_(1.0 + 0.1 * torch.rand(out_f, device=DEVICE))
    ours = pk.nn.LoRALinear.from_linear(copy.deepcopy(base), r=r, lora_alpha=alpha, use_rslora=use_rslora,
                                        use_dora=use_dora)
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
        if use_dora:
            ours.lora_magnitude.copy_(layer.lora_magnitude_vector["default"].weight)
    return pm, layer, ours


def _grads(module, x, g, params):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    grads = torch.autograd.grad(y, [x, *params], g)
    return y.detach(), grads


def _peft_params(layer, dora):
    ps = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return ps + ([layer.lora_magnitude_vector["default"].weight] if dora else [])


def _our_params(ours, dora):
    return [ours.lora_A, ours.lora_B] + ([ours.lora_magnitude] if dora else [])


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
@pytest.mark.parametrize("dims", [(2, 7, 37, 29, 4), (1, 1, 64, 96, 8), (3, 5, 130, 33, 1)],
                         ids=lambda d: shape_id(B=d[0], S=d[1], I=d[2], O=d[3], R=d[4]))
def test_matches_peft_fp32(backend, variant, dims):
    b, s, in_f, out_f, r = dims
    dora = variant == "dora"
    pm, layer, ours = _pair(in_f, out_f, r, 2 * r + 1, use_rslora=variant == "rslora", use_dora=dora)
    assert ours.scaling == pytest.approx(layer.scaling["default"])
    x = torch.randn(b, s, in_f, device=DEVICE)
    g = torch.randn(b, s, out_f, device=DEVICE)
    y_p, g_p = _grads(layer, x, g, _peft_params(layer, dora))
    with pk.use_backend(backend):
        y_o, g_o = _grads(ours, x, g, _our_params(ours, dora))
    # fp64 reference of the same math
    W, bias = ours.weight.double(), ours.bias.double()
    x64 = x.double().requires_grad_(True)
    p64 = [p.detach().double().requires_grad_(True) for p in _our_params(ours, dora)]
    if dora:
        y_r = dora_linear_reference(x64, W, bias, p64[0], p64[1], ours.scaling, p64[2])
    else:
        y_r = lora_linear_reference(x64, W, bias, p64[0], p64[1], ours.scaling)
    g_r = torch.autograd.grad(y_r, [x64, *p64], g.double())
    names = ["dx", "dA", "dB", "dmagnitude"]
    assert_close(y_o, y_r, name="y")
    assert_close(y_p, y_r, name="peft y")
    for name, go, gp, gr in zip(names, g_o, g_p, g_r):
        assert_close(go, gr, name=name)
        assert_close(go, gp.double(), name=f"{name} vs peft")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_half_base_fp32_adapters_like_peft(dtype, dora):
    """PEFT keeps adapters in fp32 over a half base; ours too, with at most 2x PEFT's error vs fp64."""
    pm, layer, ours = _pair(64, 48, 8, 16, dtype=dtype, use_dora=dora)
    assert ours.lora_A.dtype == torch.float32 and layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 11, 64).to(DEVICE, dtype)
    g = torch.randn(3, 11, 48).to(DEVICE, dtype)
    y_p, g_p = _grads(layer, x, g, _peft_params(layer, dora))
    y_o, g_o = _grads(ours, x, g, _our_params(ours, dora))
    assert y_o.dtype == dtype and g_o[0].dtype == dtype and g_o[1].dtype == torch.float32
    W, bias = ours.weight.double(), ours.bias.double()
    x64 = x.double().requires_grad_(True)
    p64 = [p.detach().double().requires_grad_(True) for p in _our_params(ours, dora)]
    y_r = (dora_linear_reference(x64, W, bias, *p64[:2], ours.scaling, p64[2]) if dora
           else lora_linear_reference(x64, W, bias, *p64, ours.scaling))
    g_r = torch.autograd.grad(y_r, [x64, *p64], g.double())
    assert_close(y_o, y_r, eager=y_p, name="y")
    for name, go, gp, gr in zip(["dx", "dA", "dB", "dmag"], g_o, g_p, g_r):
        if go.dtype == torch.float32:
            # fp32 adapter grads come from half-precision activations: compare as low precision vs PEFT
            bound = 2.0 * (gp.double() - gr).abs().max().item() + 1e-6 * max(gr.abs().max().item(), 1.0)
            assert (go.double() - gr).abs().max().item() <= bound, name
        else:
            assert_close(go, gr, eager=gp, name=name)


def test_init_like_peft():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, device=DEVICE)
    m = pk.nn.LoRALinear.from_linear(lin, r=16, lora_alpha=32)
    assert m.weight is lin.weight and not m.weight.requires_grad and not m.bias.requires_grad
    assert m.lora_A.shape == (16, 128) and m.lora_B.shape == (64, 16)
    assert torch.count_nonzero(m.lora_B) == 0
    bound = 1.0 / math.sqrt(128)  # kaiming_uniform(a=sqrt(5)) on fan_in=128
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.9 * bound
    assert m.scaling == 2.0
    assert pk.nn.LoRALinear.from_linear(lin, r=16, lora_alpha=32, use_rslora=True).scaling == 8.0
    x = torch.randn(4, 128, device=DEVICE)
    assert torch.equal(m(x), lin(x))  # B = 0: the adapter starts as the identity
    d = pk.nn.LoRALinear(128, 64, r=4, use_dora=True)
    assert torch.allclose(d.lora_magnitude, d.weight.norm(dim=1))


@pytest.mark.parametrize("variant", ["lora", "dora", "rank_scale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_unmerge(variant, dtype):
    torch.manual_seed(1)
    m = pk.nn.LoRALinear(37, 29, r=4, lora_alpha=8, use_dora=variant == "dora", device=DEVICE, dtype=dtype)
    if variant == "rank_scale":
        m.enable_rank_scale()
        torch.nn.init.normal_(m.rank_scale)
    torch.nn.init.normal_(m.lora_B, std=0.2)
    w0 = m.weight.detach().clone()
    x = torch.randn(5, 37, dtype=dtype, device=DEVICE)
    y = m(x)
    m.merge()
    assert m.merged
    y_merged = m(x)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y_merged, y, rtol=tol, atol=tol)
    m.merge()  # idempotent
    m.unmerge()
    assert torch.equal(m.weight, w0)  # exact restore
    assert torch.equal(m(x), y)


def test_eval_disables_dropout_and_seed_reproduces():
    torch.manual_seed(0)
    m = pk.nn.LoRALinear(32, 16, r=4, lora_dropout=0.5, device=DEVICE)
    torch.nn.init.normal_(m.lora_B)
    x = torch.randn(6, 32, device=DEVICE)
    m.eval()
    y_eval = m(x)
    ref = lora_linear_reference(x.double(), m.weight.double(), m.bias.double(), m.lora_A.double(),
                                m.lora_B.double(), m.scaling)
    assert_close(y_eval, ref, name="eval y")
    m.train()
    torch.manual_seed(3)
    y1 = m(x)
    torch.manual_seed(3)
    y2 = m(x)
    y3 = m(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    assert not torch.allclose(y1, y_eval)


@pytest.mark.parametrize("variant", ["lora", "dora", "rank_scale"])
def test_torch_compile_fullgraph(variant):
    """Compiled and eager: outputs and eval-mode gradients both within 2x eager's error against the module in fp64
    (inductor may round the norms and sums around our op differently); training-mode gradients reach every adapter
    parameter."""
    torch.manual_seed(0)
    m = pk.nn.LoRALinear(48, 40, r=8, lora_alpha=16, use_dora=variant == "dora", lora_dropout=0.1, device=DEVICE)
    if variant == "rank_scale":
        m.enable_rank_scale(1.0)
    torch.nn.init.normal_(m.lora_B, std=0.1)
    x = torch.randn(2, 9, 48, device=DEVICE)
    m.eval()
    m64 = copy.deepcopy(m).double()
    compiled = torch.compile(m, fullgraph=True)
    y_eager = m(x)
    y_comp = compiled(x)
    y64 = m64(x.double())
    assert_within_eager(y_comp, y64.detach(), y_eager, name="y")
    # gradients through the compiled graph (training mode, dropout on) are finite and reach every adapter param
    m.train()
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    xg = x.clone().requires_grad_(True)
    compiled(xg).square().sum().backward()
    params = [p for p in m.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    # eval-mode gradients, compiled and eager
    m.eval()
    for p in params:
        p.grad = None
    m(xg).square().sum().backward()
    eager_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    torch._dynamo.reset()
    torch.compile(m, fullgraph=True)(xg).square().sum().backward()
    y64.square().sum().backward()
    params64 = [p for p in m64.parameters() if p.requires_grad]
    for i, (p, p64, ge) in enumerate(zip(params, params64, eager_grads)):
        assert_within_eager(p.grad, p64.grad, ge, name=f"grad {i}")


def test_dora_norm_without_materializing():
    torch.manual_seed(0)
    W, A, B = (torch.randn(*shape, dtype=torch.float64, device=DEVICE) for shape in ((29, 37), (5, 37), (29, 5)))
    torch.testing.assert_close(pk.ops.lora.dora_weight_norm(W, A, B, 0.7), dora_weight_norm_reference(W, A, B, 0.7))


def test_checks_once_per_state(monkeypatch):
    """A layer's call checks its arguments once per signature of x and the weight for the layer's state: replacing a
    parameter, a scaling, train()/eval() or .to() make the next call check again; a bad x raises every time."""
    from peftkern.nn import lora as lora_module

    calls = []
    check = lora_module._check_lora_args
    monkeypatch.setattr(lora_module, "_check_lora_args", lambda *args: calls.append(1) or check(*args))
    torch.manual_seed(0)
    m = pk.nn.LoRALinear(24, 20, r=4).to(DEVICE)
    x = torch.randn(3, 24, device=DEVICE)
    for _ in range(3):
        m(x)
    assert len(calls) == 1
    m(torch.randn(2, 5, 24, device=DEVICE))
    with torch.no_grad():
        m(x)
    assert len(calls) == 3
    for _ in range(2):
        with pytest.raises(ValueError, match="x has 23 features"):
            m(x[:, :23])
    m.eval()
    m(x)
    assert len(calls) == 6
    m.scaling = True
    with pytest.raises(TypeError, match="scaling must be a number"):
        m(x)
    m.scaling = 1.0
    m.lora_A = nn.Parameter(torch.randn(5, 24, device=DEVICE))
    with pytest.raises(ValueError, match="lora_B must have shape"):
        m(x)
    m.lora_A = nn.Parameter(torch.randn(4, 24, device=DEVICE))
    m(x)
    m.to(torch.float64)
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        m(x)
    assert m(x.double()).dtype == torch.float64
    m.weight.data = m.weight.data.float()  # not seen by the layer's state, but the weight is in the key
    with pytest.raises(TypeError, match="weight has dtype torch.float32"):
        m(x.double())


def test_named_adapter_is_checked_by_signature():
    """A named adapter's tensors live in its own module: the layer checks them by their signature on every call."""
    torch.manual_seed(0)
    m = pk.nn.LoRALinear(24, 20, r=4).to(DEVICE)
    m.add_adapter("other", r=2, lora_alpha=2)
    m.active_adapter = "other"
    x = torch.randn(3, 24, device=DEVICE)
    m(x)
    m.lora_adapters["other"].lora_A = nn.Parameter(torch.randn(3, 24, device=DEVICE))
    with pytest.raises(ValueError, match="lora_B must have shape"):
        m(x)
