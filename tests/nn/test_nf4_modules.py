"""NF4Linear and QLoRALinear: bitsandbytes' checkpoint format both ways, QLoRA against PEFT + bitsandbytes on the
same weights, training touches only the adapter, merge, torch.compile."""
from __future__ import annotations

import pytest
import torch
from torch import nn
import bitsandbytes as bnb

import peftkern as pk
from peftkern.peers import bnb_linear4bit, peft_on_layer
from peftkern.ops.lora.reference import lora_linear_reference
from tests._helpers import DEVICE, max_err


def _linear(in_f, out_f, dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f).to(DEVICE, dtype)


@pytest.mark.parametrize("double_quant", [True, False], ids=["double", "single"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_state_dict_is_bitsandbytes_format(dtype, double_quant):
    lin = _linear(130, 48, dtype)
    ours = pk.nn.NF4Linear.from_linear(lin, blocksize=64, double_quant=double_quant).state_dict()
    theirs = bnb_linear4bit(lin, double_quant).state_dict()
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert theirs[k].dtype == ours[k].dtype and torch.equal(theirs[k], ours[k]), k


def test_loads_bitsandbytes_and_bitsandbytes_loads_ours():
    lin = _linear(128, 64, torch.bfloat16)
    q4 = bnb_linear4bit(lin)
    ours = pk.nn.NF4Linear(128, 64, device=DEVICE, dtype=torch.bfloat16)
    ours.load_state_dict(q4.state_dict())
    assert torch.equal(ours.dequantized_weight(), pk.nn.NF4Linear.from_bnb(q4).dequantized_weight())
    sd = pk.nn.NF4Linear.from_linear(lin).state_dict()
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    p4 = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device=DEVICE)
    assert torch.equal(bnb.functional.dequantize_4bit(p4.data, p4.quant_state), ours.dequantized_weight())
    with pytest.raises(RuntimeError, match="size mismatch"):
        pk.nn.NF4Linear(64, 128, device=DEVICE, dtype=torch.bfloat16).load_state_dict(q4.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_qlora_matches_peft_bitsandbytes(dtype):
    """Forward and gradients within 2x the error of PEFT + bitsandbytes against fp64 math on the same weights."""
    lin = _linear(96, 80, dtype)
    q4 = bnb_linear4bit(lin)
    layer = peft_on_layer(q4, r=8, lora_alpha=16).base_model.model.proj
    ours = pk.nn.QLoRALinear.from_bnb(q4, r=8, lora_alpha=16)
    with torch.no_grad():
        nn.init.normal_(ours.lora_B, std=0.05)
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    torch.manual_seed(1)
    x = torch.randn(3, 7, 96, dtype=dtype, device=DEVICE)
    g = torch.randn(3, 7, 80, dtype=dtype, device=DEVICE)

    def grads(module, A, B):
        xx = x.clone().requires_grad_()
        y = module(xx)
        y.backward(g)
        return y.detach(), xx.grad, A.grad, B.grad

    peft_out = grads(layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    ours_out = grads(ours, ours.lora_A, ours.lora_B)
    w = ours.dequantized_weight().double()
    A, B = ours.lora_A.detach().double().requires_grad_(), ours.lora_B.detach().double().requires_grad_()
    x64 = x.double().requires_grad_()
    y64 = lora_linear_reference(x64.view(-1, 96), w, ours.bias.double(), A, B, ours.scaling).view(3, 7, 80)
    y64.backward(g.double())
    ref = (y64.detach(), x64.grad, A.grad, B.grad)
    for name, o, p, r in zip(("y", "dx", "dA", "dB"), ours_out, peft_out, ref):
        scale = r.abs().max().item()
        assert max_err(o, r) <= 2 * max_err(p, r) + 2e-6 * scale, name


@pytest.mark.parametrize("autocast", [False, True], ids=["eager", "autocast"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x32", "xbf16"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["c32", "cbf16"])
def test_dtypes_as_bitsandbytes(compute_dtype, x_dtype, autocast):
    """A drop-in for ``bnb.nn.Linear4bit``: an fp32 bias and any input dtype work; the output has bitsandbytes'
    dtype and is within 2x its error against exact NF4 math; also loaded from a bitsandbytes state dict."""
    lin = _linear(96, 80, torch.float32)
    q4 = bnb_linear4bit(lin)
    q4.compute_dtype, q4.compute_type_is_set = compute_dtype, True  # the configured compute dtype, as loaded
    ours = pk.nn.NF4Linear.from_bnb(q4)
    assert ours.compute_dtype == compute_dtype
    loaded = pk.nn.NF4Linear(96, 80, compute_dtype=compute_dtype, device=DEVICE)
    loaded.load_state_dict(q4.state_dict())
    torch.manual_seed(1)
    x = torch.randn(3, 5, 96).to(DEVICE, x_dtype)
    ref = x.double() @ ours.dequantized_weight().double().t() + lin.bias.double()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=autocast):
        y_bnb = q4(x)
        outs = ours(x), loaded(x)
    for y in outs:
        assert y.dtype == y_bnb.dtype == x_dtype
        assert max_err(y, ref) <= 2 * max_err(y_bnb, ref) + 1e-6 * ref.abs().max().item()
    assert loaded.bias.dtype == torch.float32  # cast for the call, not in place (bitsandbytes casts its own)


def test_qlora_training_touches_only_the_adapter_and_merges():
    lin = _linear(64, 32, torch.bfloat16)
    layer = pk.nn.QLoRALinear.from_linear(lin, r=4, lora_alpha=8, lora_dropout=0.1)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    packed = layer.nf4.packed.clone()
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    x = torch.randn(8, 64, dtype=torch.bfloat16, device=DEVICE)
    for _ in range(3):
        loss = layer(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(layer.nf4.packed, packed) and layer.lora_B.abs().max() > 0
    layer.eval()
    merged = layer.merge()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == torch.bfloat16
    ref = layer(x).float()
    assert (merged(x).float() - ref).abs().max() <= 0.02 * ref.abs().max()  # one bf16 rounding of the merge


def test_torch_compile_fullgraph_same_numbers():
    lin = _linear(64, 48, torch.float32)
    layer = pk.nn.QLoRALinear.from_linear(lin, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(5, 64, device=DEVICE)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def test_to_moves_state_and_ignores_dtype_casts():
    layer = pk.nn.NF4Linear(64, 32, device=DEVICE, dtype=torch.bfloat16)
    before = layer.nf4.packed.clone()
    layer.to(torch.float32)
    assert layer.nf4.packed.dtype == torch.uint8 and torch.equal(layer.nf4.packed, before)
    assert layer.nf4.dtype == torch.bfloat16 and layer.quant_storage == torch.uint8
    unbiased = pk.nn.NF4Linear(64, 32, bias=False, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16, device=DEVICE)
    ref = unbiased(x)
    unbiased.half()  # would cast the fp32 scales and tables too: undone
    assert unbiased.quant_absmax2.dtype == torch.float32 and torch.equal(unbiased(x), ref)
    layer.to("meta")
    assert layer.weight.device.type == "meta"


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float32], ids=str)
def test_storage_is_a_frozen_parameter_in_quant_storage(quant_storage):
    """The codes are a parameter (what FSDP2 shards) in bitsandbytes' quant_storage layout; the state dict reads back
    into bitsandbytes' Linear4bit of the same quant_storage and into ours."""
    lin = _linear(64, 40, torch.bfloat16)
    layer = pk.nn.NF4Linear.from_linear(lin, quant_storage=quant_storage)
    params = dict(layer.named_parameters())
    assert params["weight"].dtype == quant_storage and not params["weight"].requires_grad
    assert params["weight"].shape[1] == 1 and params["weight"].numel() * params["weight"].element_size() >= 64 * 40 // 2
    assert {n for n, _ in layer.named_buffers()} >= {"quant_qabsmax", "quant_absmax2", "quant_code"}
    ref = pk.nn.NF4Linear.from_linear(lin)
    x = torch.randn(3, 64, dtype=torch.bfloat16, device=DEVICE)
    assert torch.equal(layer(x), ref(x))
    sd = layer.state_dict()
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    p4 = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device=DEVICE, quant_storage=quant_storage)
    assert p4.data.dtype == quant_storage
    assert torch.equal(bnb.functional.dequantize_4bit(p4.data, p4.quant_state), ref.dequantized_weight())
    back = pk.nn.NF4Linear(64, 40, device=DEVICE, dtype=torch.bfloat16, quant_storage=quant_storage)
    back.load_state_dict(sd)
    assert torch.equal(back(x), ref(x))


def test_bad_input():
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        pk.nn.NF4Linear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="Linear4bit"):
        pk.nn.NF4Linear.from_bnb(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="r must be a positive int"):
        pk.nn.QLoRALinear.from_linear(nn.Linear(64, 4), r=0)
    with pytest.raises(ValueError, match="blocksize"):
        pk.nn.NF4Linear(64, 4, blocksize=100)


@pytest.mark.parametrize("bits", [32, 8])
def test_paged_adamw_trains_the_adapter(bits):
    torch.manual_seed(0)
    layer = pk.nn.QLoRALinear.from_linear(_linear(256, 64, torch.float32), r=8, lora_alpha=16)
    opt = pk.optim.paged_adamw([layer.lora_A, layer.lora_B], lr=1e-2, bits=bits)
    assert type(opt).__name__ == f"{'Paged' if DEVICE == 'cuda' else ''}AdamW{bits}bit"  # unpaged on a CPU
    x, target = torch.randn(64, 256, device=DEVICE), torch.randn(64, 64, device=DEVICE)
    losses = []
    for _ in range(20):
        loss = (layer(x) - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    with pytest.raises(ValueError, match="bits must be 8 or 32"):
        pk.optim.paged_adamw([layer.lora_A], bits=4)
