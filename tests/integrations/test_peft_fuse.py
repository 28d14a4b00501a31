"""pk.integrations.peft.fuse: PEFT LoRA / rsLoRA / DoRA / NF4-base layers run on peftkern's kernels in place, with
PEFT's logits and gradients, parameter names and save/load unchanged; mixed-adapter batches; unfuse."""
from __future__ import annotations

import copy

import pytest
import torch
import peft
import transformers

import peftkern as pk
from peftkern.peers import bnb_linear4bit, peft_on_layer
from tests._helpers import max_err, next_token_logits, tiny_batch, tiny_model, token_kernel_calls


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _peft(config, model=None):
    pm = peft.get_peft_model(model or _llama(), config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return pm


def _logits_and_grads(pm, ids):
    pm.zero_grad()
    logits = pm(input_ids=ids).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_same_logits_grads_and_names(variant):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             use_rslora=variant == "rslora", use_dora=variant == "dora")
    pm = _peft(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    ref_logits, ref_grads = _logits_and_grads(pm, ids)
    names = [n for n, _ in pm.named_parameters()]
    assert pk.integrations.peft.fuse(pm) == 6
    assert [n for n, _ in pm.named_parameters()] == names
    logits, grads = _logits_and_grads(pm, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert pk.integrations.peft.unfuse(pm) == 6
    torch.testing.assert_close(_logits_and_grads(pm, ids)[0], ref_logits)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_gpt2_conv1d_layers_fused(variant):
    """GPT-2's transformers ``Conv1D`` projections (PEFT's ``fan_in_fan_out``) run on our kernels, every one of them,
    with PEFT's logits and gradients."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                             use_dora=variant == "dora")
    pm = _peft(config, tiny_model("gpt2")).eval()
    ids = torch.randint(0, 100, (2, 7))
    ref_logits, ref_grads = _logits_and_grads(pm, ids)
    assert pk.integrations.peft.fuse(pm) == sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in pm.modules()) > 0
    logits, grads = _logits_and_grads(pm, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_kernels_actually_run(monkeypatch):
    pm = _peft(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).eval()
    calls = []
    real = pk.integrations.peft.lora_linear
    monkeypatch.setattr(pk.integrations.peft, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    pk.integrations.peft.fuse(pm)
    pm(input_ids=torch.randint(0, 100, (1, 5)))
    assert len(calls) == 2  # one per layer's q_proj


def _bf16_base(pm):
    """A copy of ``pm`` as a model loaded in bf16 under PEFT: the base in bf16, the adapters kept in fp32 (PEFT's
    ``autocast_adapter_dtype``)."""
    half = copy.deepcopy(pm)
    for name, p in half.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    return half


@pytest.mark.parametrize("family", ["gpt2", "opt", "qwen2"])
def test_batch_one_generate_runs_the_token_kernel(family, monkeypatch):
    """A user's decode on the CPU: PEFT LoRA on every linear layer of a transformers model (GPT-2's Conv1D included),
    fused; greedy generate of one prompt with the KV cache gives PEFT's tokens, its steps through csrc/cpu's one-token
    kernel; with the base in bf16 (fp32 adapters) a step's tokens take the kernel in bf16, the logits within twice
    PEFT's error there against the fp32 model."""
    from peftkern.ops.lora import torch_impl

    model = tiny_model(family)
    model.generation_config.eos_token_id = None
    pm = _peft(peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), model).eval()
    half = _bf16_base(pm)
    ids = tiny_batch(model, batch=1, seq=5)["input_ids"]
    greedy = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        theirs = pm.generate(input_ids=ids, **greedy)
        ref, peer = next_token_logits(pm, ids), next_token_logits(half, ids)
    assert pk.integrations.peft.fuse(pm) > 0 and pk.integrations.peft.fuse(half) > 0
    taken = token_kernel_calls(monkeypatch, torch_impl, "lora_token")
    with torch.no_grad():
        assert torch.equal(pm.generate(input_ids=ids, **greedy), theirs)
        assert taken and set(taken) == {torch.float32}
        taken.clear()
        ours = next_token_logits(half, ids)
    assert taken and set(taken) == {torch.bfloat16}
    assert max_err(ours, ref) <= 2 * max_err(peer, ref) + 1e-6 * ref.abs().max().item()


def test_save_pretrained_round_trip(tmp_path):
    pm = _peft(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    pk.integrations.peft.fuse(pm)
    ids = torch.randint(0, 100, (2, 6))
    logits = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(_llama(), tmp_path).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_mixed_adapter_batch_goes_through_multi_lora(monkeypatch):
    pm = _peft(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B.other" in n:
                p.normal_(0, 0.1)
    pm.eval()
    ids = torch.randint(0, 100, (3, 6))
    names = ["default", "other", "__base__"]
    ref = pm(input_ids=ids, adapter_names=names).logits
    calls = []
    real = pk.integrations.peft.multi_lora_linear
    monkeypatch.setattr(pk.integrations.peft, "multi_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    pk.integrations.peft.fuse(pm)
    torch.testing.assert_close(pm(input_ids=ids, adapter_names=names).logits, ref, rtol=1e-5, atol=1e-5)
    assert len(calls) == 4


def test_nf4_base_runs_qlora(monkeypatch):
    torch.manual_seed(0)
    pm = peft_on_layer(bnb_linear4bit(torch.nn.Linear(64, 128, bias=True)), r=4, lora_alpha=8).eval()
    with torch.no_grad():
        pm.base_model.model.proj.lora_B["default"].weight.normal_(0, 0.1)
    x = torch.randn(3, 64)
    ref = pm(x)
    calls = []
    real = pk.integrations.peft.qlora_linear
    monkeypatch.setattr(pk.integrations.peft, "qlora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert pk.integrations.peft.fuse(pm) == 1
    out = pm(x)
    assert calls == [1]
    w = pk.nf4.NF4Tensor.from_bnb(pm.base_model.model.proj.base_layer.weight.data,
                                  pm.base_model.model.proj.base_layer.weight.quant_state).dequantize()
    layer = pm.base_model.model.proj
    exact = x.double() @ w.double().t() + layer.base_layer.bias.double() + layer.scaling["default"] * (
        x.double() @ layer.lora_A["default"].weight.double().t()) @ layer.lora_B["default"].weight.double().t()
    # within 2x PEFT + bitsandbytes' own error against the exact math on the same codes
    assert (out.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-6
