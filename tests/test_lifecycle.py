"""``pk.merge`` / ``pk.unpatch`` / ``pk.disable`` on ``pk.patch`` models of every method: the merged model is a plain
transformers model with the same outputs (and PEFT's ``merge_and_unload`` weights), unpatch gives the original model
back bit for bit, disable gives the base's outputs and the method back afterwards."""
from __future__ import annotations

import copy

import pytest
import torch

import peftkern as pk
from peftkern.patching import METHODS
from tests._helpers import assert_close
from tests.test_patching import _batch, _bert, _llama, _patch, _peft_from, _randomize_

FOLDABLE = ["lora", "dora", "qlora", "adalora", "bitfit", "diff_pruning", "fish_mask", "far"]
NOT_FOLDABLE = sorted(set(METHODS) - set(FOLDABLE))
LABELS = torch.tensor([0, 1, 2])


def _patch_any(model, method):
    """test_patching's ``_patch`` for every method (AdapterFusion over two fresh adapters), plus two variants:
    rsLoRA and Diff Pruning taken to sparse diffs by its calibration stage."""
    if method == "adapter_fusion":
        return pk.patch(model, method, num_adapters=2, adapter_options=dict(reduction_factor=4))
    if method == "rslora":
        return pk.patch(model, "lora", r=4, lora_alpha=8, use_rslora=True)
    if method == "diff_pruning_sparse":
        batches = [{**_batch(seed), "labels": LABELS} for seed in (11, 12)]
        return pk.patch(model, "diff_pruning", calibration_data=batches, density=0.05)
    return _patch(model, method)


def _trained(model, method):
    """``model`` patched and its trainable tensors moved (as training would: the head and BitFit's biases in place)."""
    patched = _patch_any(model, method)
    _randomize_(patched)
    return patched.eval()


def _logits(model):
    return model(**_batch()).logits


def _is_plain(model, allowed=()):
    return (all(not type(m).__module__.startswith("peftkern") or isinstance(m, allowed) for m in model.modules())
            and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
            and not hasattr(model, "peftkern_config"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_disable_then_unpatch(method):
    """Within ``disable`` the base's outputs, after it (also after an exception) the method's; ``merge`` refuses
    what is not a weight update and leaves the model as it was; ``unpatch`` gives the original model back: the same
    object, state_dict and requires_grad flags bit for bit, no peftkern module, hook or record, sdpa again."""
    model = _bert()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ref = _logits(model)
    patched = _trained(model, method)
    out = _logits(patched)
    assert not torch.allclose(out, ref)
    with pk.disable(patched) as m:
        assert m is patched
        base = _logits(patched)
    assert torch.equal(_logits(patched), out)
    with pytest.raises(RuntimeError, match="inside"):
        with pk.disable(patched):
            raise RuntimeError("inside")
    assert torch.equal(_logits(patched), out)
    if method in NOT_FOLDABLE:
        with pytest.raises(ValueError, match=f"method '{method}' cannot be merged"):
            pk.merge(patched)
        assert torch.equal(_logits(patched), out)

    back = pk.unpatch(patched)
    assert back is model and model.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(back), base)
    now = back.state_dict()
    if method == "qlora":  # the 4-bit base with the codes patch made (frozen: integers); the rest bit-identical
        nf4 = {f"{n}.weight" for n, m in back.named_modules() if isinstance(m, pk.nn.NF4Linear)}
        assert nf4 and _is_plain(back, pk.nn.NF4Linear)
        assert all(torch.equal(now[k], v) for k, v in state.items() if k not in nf4)
        assert {n: p.requires_grad for n, p in back.named_parameters() if n not in nf4} == {
            n: f for n, f in flags.items() if n not in nf4}
        return
    assert _is_plain(back)
    assert {n: p.requires_grad for n, p in back.named_parameters()} == flags
    assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert torch.equal(base, ref)


def test_unpatch_keeps_the_users_hooks_and_the_model_patches_again():
    model = _bert()
    site = model.bert.encoder.layer[0].output.dense
    calls = []
    site.register_forward_hook(lambda *a: calls.append("before"))
    patched = _trained(model, "adapter_houlsby")
    site.register_forward_hook(lambda *a: calls.append("after"))
    back = pk.unpatch(patched)
    assert len(site._forward_hooks) == 2 and not hasattr(site, "adapter")
    _logits(back)
    assert calls == ["before", "after"]
    again = _trained(back, "lora")
    assert isinstance(again.bert.encoder.layer[0].output.dense, pk.nn.LoRALinear)


def test_unpatch_qlora_gives_back_the_bitsandbytes_layer_it_took():
    model = _bert(hidden=64)  # bitsandbytes' CPU 4-bit matmul needs in_features >= its blocksize
    attn = model.bert.encoder.layer[0].attention.self
    attn.query = q4 = pk.nn.NF4Linear.from_linear(attn.query).to_bnb()
    ref = _logits(model)
    patched = pk.patch(model, "qlora", r=4, target_modules=["layer.0.attention.self.query"])
    _randomize_(patched)
    assert isinstance(attn.query, pk.nn.QLoRALinear) and not torch.equal(_logits(patched), ref)
    back = pk.unpatch(patched)
    assert attn.query is q4 and torch.equal(_logits(back), ref)


@pytest.mark.parametrize("method", ["lora", "qlora", "prompt_tuning", "prefix_tuning", "p_tuning_v2",
                                    "adapter_houlsby", "mam", "unipelt"])
def test_llama_disable_and_unpatch(method):
    """A causal LM with grouped-query attention: the prefix methods' attention registration is undone too."""
    model = _llama()
    ref = _logits(model)
    patched = _trained(model, method)
    out = _logits(patched)
    with pk.disable(patched):
        base = _logits(patched)
    assert torch.equal(_logits(patched), out)
    back = pk.unpatch(patched)
    assert back.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(back), base)
    if method != "qlora":
        assert torch.equal(base, ref)


@pytest.mark.parametrize("method", FOLDABLE + ["rslora", "diff_pruning_sparse"])
def test_merge_folds_the_method_into_plain_linears(method):
    """The merged model's logits and the patched model's against the method's math in fp64 (the fp32 rule of every
    op test: the randomized adapters are ~10x the weights, so the network amplifies fp32 rounding to ~1e-5 either
    way). QLoRA's fp64 math: its NF4 values plus the update, formed in fp64 by merge(dtype=float64)."""
    model = _bert()
    keys = list(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    patched = _trained(model, method)
    exact = copy.deepcopy(patched)
    ref64 = _logits(pk.merge(exact, dtype=torch.float64).double() if method == "qlora" else exact.double())
    assert_close(_logits(patched), ref64, name="patched")
    merged = pk.merge(patched)
    assert merged is model and _is_plain(merged)
    assert list(merged.state_dict()) == keys
    assert {n: p.requires_grad for n, p in merged.named_parameters()} == flags
    assert_close(_logits(merged), ref64, name="merged")


@pytest.mark.parametrize("method", ["lora", "rslora", "dora"])
def test_merge_matches_peft_merge_and_unload(method, tmp_path):
    base = _bert()
    patched = _trained(copy.deepcopy(base), method)
    pk.save_adapter(patched, tmp_path)
    peer = _peft_from(copy.deepcopy(base), tmp_path).merge_and_unload()
    ours = pk.merge(patched).state_dict()
    for k, v in peer.state_dict().items():
        torch.testing.assert_close(ours[k], v, rtol=1e-6, atol=1e-6, msg=k)


def test_merge_qlora_dequantizes_to_the_dtype_asked():
    patched = _trained(_bert(), "qlora")
    targets = patched.peftkern_config["targets"]
    fp32 = pk.merge(copy.deepcopy(patched))
    bf16 = pk.merge(patched, dtype=torch.bfloat16)
    for name in targets:
        w = bf16.get_submodule(name).weight
        assert w.dtype == torch.bfloat16 and torch.equal(w, fp32.get_submodule(name).weight.to(torch.bfloat16))


def test_bad_calls_name_the_problem():
    with pytest.raises(ValueError, match="not patched"):
        pk.merge(_bert())
    with pytest.raises(ValueError, match="not patched"):
        pk.unpatch(_bert())
    with pytest.raises(ValueError, match="not patched"):
        with pk.disable(_bert()):
            pass
    with pytest.raises(ValueError, match="dtype chooses the dtype of QLoRA"):
        pk.merge(_trained(_bert(), "lora"), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dtype must be"):
        pk.merge(_trained(_bert(), "qlora"), dtype="bf16")
