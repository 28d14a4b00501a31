"""The methods' configs (one :class:`peftkern.methods.base.MethodConfig` per entry of ``pk.patching.METHODS``): PEFT's
defaults where PEFT has the option, a bad value refused with an error naming the option before the model is touched,
the JSON round trip, and ``pk.patch(model, config)`` doing and saving what ``pk.patch(model, name, **options)`` does;
adapter files whose header was written before the configs existed still load."""
from __future__ import annotations

import json
import re

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkern as pk
from peftkern.methods.base import MethodConfig
from tests._helpers import randomize_trainable_, tiny_batch, tiny_bert

METHODS = pk.patching.METHODS

PEFT_CONFIGS = {"lora": peft.LoraConfig, "dora": peft.LoraConfig, "qlora": peft.LoraConfig,
                "adalora": lambda: peft.AdaLoraConfig(total_step=10), "p_tuning": peft.PromptEncoderConfig,
                "prefix_tuning": peft.PrefixTuningConfig}
# ours on purpose: LoRA-like methods adapt every linear unless told (PEFT has no default target), prompt methods
# default to 20 virtual tokens (PEFT has none), prefix_tuning is the method with the MLP (PEFT's flag is off), and
# AdaLoRA runs without its allocator unless given total_step (PEFT requires one)
NOT_PEFT_S = {"target_modules", "num_virtual_tokens", "prefix_projection", "total_step"}


@pytest.mark.parametrize("method", sorted(PEFT_CONFIGS))
def test_defaults_are_peft_s_where_peft_has_the_option(method):
    ours, theirs = METHODS[method].config_class(), PEFT_CONFIGS[method]()
    shared = [k for k in ours.to_dict() if hasattr(theirs, k) and k not in NOT_PEFT_S]
    assert len(shared) >= 2
    assert {k: getattr(ours, k) for k in shared} == {k: getattr(theirs, k) for k in shared}


def test_every_method_has_its_own_config_class():
    classes = [m.config_class for m in METHODS.values()]
    assert len(set(classes)) == len(METHODS) and all(issubclass(c, MethodConfig) for c in classes)
    for name, spec in METHODS.items():
        assert spec.defaults == spec.config_class().to_dict()
        assert getattr(pk, spec.config_class.__name__) is spec.config_class, name


BAD = [("lora", "r", 0, ValueError), ("lora", "r", 2.5, ValueError), ("lora", "lora_alpha", "8", TypeError),
       ("lora", "lora_dropout", 1.0, ValueError), ("lora", "use_rslora", 1, TypeError),
       ("lora", "target_modules", 3, ValueError), ("lora", "target_modules", "(", ValueError),
       ("lora", "adapter_dtype", torch.int8, TypeError), ("lora", "modules_to_save", 3, TypeError),
       ("dora", "modules_to_save", [""], ValueError), ("qlora", "blocksize", 48, ValueError),
       ("qlora", "double_quant", "yes", TypeError), ("adapter_pfeiffer", "reduction_factor", 0, ValueError),
       ("adapter_houlsby", "non_linearity", "sigmoidish", ValueError),
       ("adapter_pfeiffer", "layer_norm", None, TypeError), ("adapter_pfeiffer", "sites", {"nope": "x"}, ValueError),
       ("adapter_drop", "placement", "inside", ValueError), ("adapter_drop", "skip_layers", -1, ValueError),
       ("adapter_drop", "drop_prob", 1.0, ValueError), ("adapter_fusion", "num_adapters", 1, ValueError),
       ("adapter_fusion", "adapters", "one_dir", TypeError),
       ("adapter_fusion", "adapter_options", {"r": 4}, ValueError),
       ("adalora", "init_r", 0, ValueError), ("adalora", "total_step", 0, ValueError),
       ("adalora", "deltaT", 0, ValueError), ("adalora", "lora_alpha", 0, ValueError),
       ("bitfit", "modules_to_save", 7, TypeError), ("diff_pruning", "density", 0.0, ValueError),
       ("diff_pruning", "steps", 0, ValueError), ("diff_pruning", "lr", -1.0, ValueError),
       ("fish_mask", "density", 1.5, ValueError), ("far", "fraction", 0, ValueError),
       ("far", "priming_lr", 0.0, ValueError), ("prompt_tuning", "num_virtual_tokens", 0, ValueError),
       ("prompt_tuning", "init", "zeros", ValueError), ("p_tuning", "encoder", "gru", ValueError),
       ("p_tuning", "encoder_dropout", 2.0, ValueError), ("prefix_tuning", "prefix_projection", "no", TypeError),
       ("p_tuning_v2", "sites", {"q": "("}, ValueError), ("mam", "scale", "4", TypeError),
       ("unipelt", "r", 0, ValueError)]


@pytest.mark.parametrize("method, option, value, error", BAD, ids=[f"{m}-{o}-{v!r}" for m, o, v, _ in BAD])
def test_a_bad_option_is_refused_naming_it_before_the_model_changes(method, option, value, error):
    named = rf"^{re.escape(option)}[ :\[]"
    with pytest.raises(error, match=named):
        METHODS[method].config_class(**{option: value})
    model = tiny_bert()
    before = [(n, type(m), [p.requires_grad for p in m.parameters(recurse=False)]) for n, m in model.named_modules()]
    with pytest.raises(error, match=named):
        pk.patch(model, method, **{option: value})
    assert getattr(model, "peftkern_config", None) is None
    assert [(n, type(m), [p.requires_grad for p in m.parameters(recurse=False)])
            for n, m in model.named_modules()] == before


# options other than the defaults, all of which JSON holds
NON_DEFAULT = {
    "lora": dict(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"], use_rslora=True,
                 adapter_dtype=torch.bfloat16, modules_to_save=["classifier"]),
    "dora": dict(r=2, target_modules=".*query", modules_to_save="classifier"),
    "qlora": dict(r=4, blocksize=128, double_quant=False, adapter_dtype=torch.float16),
    "prompt_tuning": dict(num_virtual_tokens=5, init="text", init_text="hello"),
    "p_tuning": dict(num_virtual_tokens=5, encoder="lstm", encoder_hidden_size=16, encoder_num_layers=1,
                     encoder_dropout=0.1),
    "prefix_tuning": dict(num_virtual_tokens=5, prefix_projection=False, encoder_hidden_size=16,
                          sites={"q": r"attention\.self\.query"}),
    "p_tuning_v2": dict(num_virtual_tokens=5, sites={"attn_out": r"attention\.output\.dense"}),
    "adapter_houlsby": dict(reduction_factor=4, non_linearity="relu", layer_norm=True),
    "adapter_pfeiffer": dict(reduction_factor=8.0, non_linearity="gelu"),
    "adapter_drop": dict(placement="parallel", skip_layers=1, drop_prob=0.5),
    "adapter_fusion": dict(num_adapters=3, adapter_options={"reduction_factor": 4}),
    "adalora": dict(init_r=6, target_r=2, total_step=100, tinit=10, tfinal=20, deltaT=5),
    "bitfit": dict(modules_to_save=["classifier"]),
    "diff_pruning": dict(density=0.1, l0_weight=0.0, lr=0.5, steps=3),
    "fish_mask": dict(density=0.02, target_modules=["dense"]),
    "far": dict(fraction=0.5, target_modules=["intermediate.dense"], priming_lr=1e-3),
    "unipelt": dict(r=4, lora_alpha=8, target_modules=["query"], num_virtual_tokens=3, reduction_factor=4,
                    non_linearity="tanh"),
    "mam": dict(num_virtual_tokens=3, prefix_projection=True, reduction_factor=2, scale=1.0),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_json_round_trip(method):
    cls = METHODS[method].config_class
    config = cls(**NON_DEFAULT[method])
    assert config != cls()
    text = config.to_json()
    assert json.loads(text)["modules_to_save"] == config.modules_to_save
    again = cls.from_json(text)
    assert type(again) is cls and again == config
    assert cls.from_dict(config.to_dict()) == config


def test_json_leaves_out_what_it_cannot_hold_and_refuses_unknown_options():
    """A callable target or a tokenizer is not JSON: it comes back as the default (``pk.save_adapter`` saves the
    same options); an unknown name in the JSON raises, naming it."""
    config = pk.LoraConfig(r=4, target_modules=lambda name, module: name.endswith("query"))
    assert pk.LoraConfig.from_json(config.to_json()) == pk.LoraConfig(r=4)
    prompt = pk.PromptTuningConfig(init="text", init_text="hi", tokenizer=object())
    assert pk.PromptTuningConfig.from_json(prompt.to_json()).tokenizer is None
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\]"):
        pk.LoraConfig.from_json('{"rank": 4}')


CONFIG_CASES = {"lora": dict(r=4, target_modules=["query", "value"]), "qlora": dict(r=4),
                "adapter_drop": dict(reduction_factor=4), "fish_mask": dict(density=0.05),
                "p_tuning": dict(num_virtual_tokens=4, encoder="lstm"),
                "adapter_fusion": dict(num_adapters=2, adapter_options={"reduction_factor": 4})}


def _files(directory) -> tuple:
    from safetensors import safe_open

    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
        header = f.metadata()
    return load_file(directory / "adapter_model.safetensors"), header, (directory / "adapter_config.json").read_text()


@pytest.mark.parametrize("method", sorted(CONFIG_CASES))
def test_patch_with_a_config_object_is_patch_with_keywords(method, tmp_path):
    batch = tiny_batch(tiny_bert())
    calibration = [batch] if METHODS[method].calibrated is True else None
    config = METHODS[method].config_class(**CONFIG_CASES[method])
    patched = {}
    for how in ("keywords", "config"):
        torch.manual_seed(1)
        if how == "keywords":
            model = pk.patch(tiny_bert(), method, calibration_data=calibration, **CONFIG_CASES[method])
        else:
            model = pk.patch(tiny_bert(), config, calibration_data=calibration)
        randomize_trainable_(model)
        pk.save_adapter(model, tmp_path / how)
        patched[how] = model
    kw, cf = patched["keywords"], patched["config"]
    assert cf.peftkern_config == kw.peftkern_config
    torch.testing.assert_close(cf(**batch).logits, kw(**batch).logits, rtol=0, atol=0)
    (kw_tensors, kw_header, kw_json), (cf_tensors, cf_header, cf_json) = _files(tmp_path / "keywords"), \
        _files(tmp_path / "config")
    assert cf_header == kw_header and cf_json == kw_json
    assert kw_tensors.keys() == cf_tensors.keys() and all(torch.equal(kw_tensors[k], cf_tensors[k]) for k in kw_tensors)
    assert config == METHODS[method].config_class(**CONFIG_CASES[method])  # what the method resolved stays off it


def test_a_config_object_takes_no_keyword_options_and_must_be_a_method_s():
    with pytest.raises(ValueError, match=r"options \['r'\] given beside a config object"):
        pk.patch(tiny_bert(), pk.LoraConfig(), r=4)
    with pytest.raises(TypeError, match="method: MethodConfig is the config of no method"):
        pk.patch(tiny_bert(), MethodConfig())


# headers as pk.save_adapter wrote them before the configs existed (options in their old order, dtypes by name)
OLD_HEADERS = {
    "lora": '{"method": "lora", "options": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": '
            '["query", "value"], "use_rslora": false, "modules_to_save": null, "adapter_dtype": "float32"}}',
    "adapter_drop": '{"method": "adapter_drop", "options": {"reduction_factor": 4, "non_linearity": "relu", '
                    '"layer_norm": false, "modules_to_save": null, "sites": null, "placement": "pfeiffer", '
                    '"skip_layers": 1, "drop_prob": 0.0}}',
}


@pytest.mark.parametrize("method", sorted(OLD_HEADERS))
def test_a_header_written_before_the_configs_loads(method, tmp_path):
    options = json.loads(OLD_HEADERS[method])["options"]
    model = pk.patch(tiny_bert(), method, **options)
    randomize_trainable_(model)
    pk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file(load_file(path), str(path), metadata={"format": "pt", "peftkern": OLD_HEADERS[method]})
    again = pk.load_adapter(tiny_bert(), tmp_path)
    assert again.peftkern_config["options"] == model.peftkern_config["options"]
    batch = tiny_batch(model)
    torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)
