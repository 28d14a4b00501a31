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


# --------------------------------------------------------------------------------------------------- named adapters
def _four_rows():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (4, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _saved(base, tmp_path, name, method="lora", **options):
    """A trained adapter of ``method`` over a copy of ``base``, saved by pk.save_adapter to tmp_path / name."""
    patched = pk.patch(copy.deepcopy(base), method, **options)
    g = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for p in patched.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    pk.save_adapter(patched, tmp_path / name)
    return tmp_path / name


ADAPTERS = {"x": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"]),
            "d": dict(method="dora", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])}


def test_named_adapters_match_peft_per_row_and_set_adapter(tmp_path):
    """Three adapters (LoRA "default", rsLoRA "x" over fewer modules with another rank, DoRA "d") against PEFT's
    model holding the same three (PeftModel.from_pretrained + load_adapter(adapter_name=)): a batch whose rows use
    different adapters (adapter_names; DoRA refused there, as PEFT refuses it) and each adapter set active."""
    base = _llama()
    dirs = {"default": _saved(base, tmp_path, "default", r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj", "down_proj"])}
    dirs |= {name: _saved(base, tmp_path, name, **opts) for name, opts in ADAPTERS.items()}
    ours = pk.load_adapter(copy.deepcopy(base), dirs["default"]).eval()
    peer = _peft_from(copy.deepcopy(base), dirs["default"])
    for name in ADAPTERS:
        pk.load_adapter(ours, dirs[name], adapter_name=name)
        peer.load_adapter(str(dirs[name]), adapter_name=name)
    assert pk.lifecycle.adapters(ours) == ["default", "x", "d"]
    batch = _four_rows()
    names = ["x", "__base__", "default", "x"]
    mixed = ours(**batch, adapter_names=names).logits
    torch.testing.assert_close(mixed, peer(**batch, adapter_names=names).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"DoRA adapters \(\['d'\]\)"):
        ours(**batch, adapter_names=["d", "x", "x", "x"])
    with pk.disable(ours):
        torch.testing.assert_close(ours(**batch).logits[1], mixed[1], rtol=0, atol=0)
    for name in ["x", "d", "default"]:
        pk.set_adapter(ours, name)
        peer.set_adapter(name)
        out = ours(**batch).logits
        torch.testing.assert_close(out, peer(**batch).logits, rtol=1e-5, atol=1e-5)
        if name in names:
            torch.testing.assert_close(out[names.index(name)], mixed[names.index(name)], rtol=1e-5, atol=1e-5)
    keys = set(base.state_dict())
    for name in ADAPTERS:
        pk.delete_adapter(ours, name)
    assert pk.lifecycle.adapters(ours) == ["default"] and not any(".lora_adapters." in k for k in ours.state_dict())
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['x'\]"):
        ours(**batch, adapter_names=names)
    back = pk.unpatch(ours)
    assert _is_plain(back) and set(back.state_dict()) == keys


def test_set_adapter_trains_only_the_active_one_and_delete_removes_it(tmp_path):
    base = _llama()
    ours = pk.patch(copy.deepcopy(base), "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    keys = list(ours.state_dict())
    pk.load_adapter(ours, _saved(base, tmp_path, "x", **ADAPTERS["x"]), adapter_name="x")
    extra = {n for n in ours.state_dict() if ".lora_adapters.x." in n}
    assert extra and set(ours.state_dict()) == set(keys) | extra  # the default adapter's names as they were
    pk.set_adapter(ours, "x")
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n in extra}
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    ours.train()
    ids = _four_rows()["input_ids"]
    ours(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1).step()
    moved = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n in extra if n.endswith("lora_B")} | {n for n in extra if n.endswith("lora_A")}

    pk.save_adapter(ours, tmp_path / "x_again", adapter_name="x")
    again = pk.load_adapter(pk.patch(copy.deepcopy(base), "lora", r=4, target_modules=["q_proj", "v_proj"]),
                            tmp_path / "x_again", adapter_name="x")
    assert all(torch.equal(p, dict(ours.named_parameters())[n]) for n, p in again.named_parameters() if ".x." in n)
    with pytest.raises(ValueError, match="'x' is the active adapter"):
        pk.delete_adapter(ours, "x")
    with pytest.raises(ValueError, match="'nope' is not one of"):
        pk.delete_adapter(ours, "nope")
    out = ours.eval()(input_ids=ids).logits
    pk.delete_adapter(ours, "default")  # as PEFT allows: the layers' own tensors go
    assert set(ours.state_dict()) == {k for k in keys if ".lora_" not in k} | extra
    assert pk.lifecycle.adapters(ours) == ["x"] and torch.equal(ours(input_ids=ids).logits, out)
    with pytest.raises(ValueError, match=r"'default' is not one of the model's adapters \['x'\]"):
        pk.save_adapter(ours, tmp_path / "default_again")


def test_named_adapters_on_qlora_and_merge_folds_the_active_one(tmp_path):
    """QLoRA: a mixed batch (over the dequantized base) gives each row what a QLoRA model holding that adapter
    alone gives; merge folds the active adapter, as PEFT's merge_and_unload."""
    base = _llama()
    dirs = {n: _saved(base, tmp_path, n, r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"]) for n, r in
            (("default", 4), ("x", 2))}
    ours = pk.load_adapter(copy.deepcopy(base), dirs["default"], method="qlora").eval()
    pk.load_adapter(ours, dirs["x"], adapter_name="x")
    alone = {n: pk.load_adapter(copy.deepcopy(base), d, method="qlora").eval() for n, d in dirs.items()}
    batch = _four_rows()
    names = ["x", "default", "__base__", "x"]
    mixed = ours(**batch, adapter_names=names).logits
    with pk.disable(alone["x"]):
        base_row = alone["x"](**batch).logits[2]
    for i, name in enumerate(names):
        ref = base_row if name == "__base__" else alone[name](**batch).logits[i]
        torch.testing.assert_close(mixed[i], ref, rtol=1e-5, atol=1e-5)
    pk.set_adapter(ours, "x")
    out = ours(**batch).logits
    torch.testing.assert_close(pk.merge(ours)(**batch).logits, out, rtol=1e-5, atol=1e-5)


def test_named_adapter_bad_calls(tmp_path):
    base = _llama()
    lora_dir = _saved(base, tmp_path, "x", **ADAPTERS["x"])
    ours = pk.patch(copy.deepcopy(base), "lora", r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"adapts \['model.layers.0.self_attn.v_proj'"):
        pk.load_adapter(ours, lora_dir, adapter_name="x")
    ours = pk.patch(copy.deepcopy(base), "lora", r=4, target_modules=["q_proj", "v_proj"]).eval()
    with pytest.raises(ValueError, match="adapter_name must be a new name"):
        pk.load_adapter(ours, lora_dir, adapter_name="__base__")
    with pytest.raises(ValueError, match="takes its method and options from its file"):
        pk.load_adapter(ours, lora_dir, adapter_name="x", r=2)
    with pytest.raises(ValueError, match="load the first one without adapter_name"):
        pk.load_adapter(copy.deepcopy(base), lora_dir, adapter_name="x")
    with pytest.raises(ValueError, match="several adapters need a LoRA-family model"):
        pk.load_adapter(pk.patch(copy.deepcopy(base), "prompt_tuning", num_virtual_tokens=3), lora_dir,
                        adapter_name="x")
    with pytest.raises(ValueError, match="'y' is not one of the model's adapters"):
        pk.set_adapter(ours, "y")
    ids = _four_rows()["input_ids"]
    with pytest.raises(ValueError, match="one name per row: 2 names for a batch of 4"):
        ours(input_ids=ids, adapter_names=["default", "__base__"])
    with pytest.raises(TypeError, match="adapter_names must be a list"):
        ours(input_ids=ids, adapter_names="default")
    with pytest.raises(ValueError, match="adapter_names is for inference"):
        ours.train()(input_ids=ids, adapter_names=["default"] * 4)
