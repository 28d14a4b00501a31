"""Bottleneck adapters in transformers models: where Houlsby / Pfeiffer / parallel adapters act, AdapterDrop's static
and random dropping, AdapterFusion's two stages, MAM, on BERT and Llama."""
from __future__ import annotations

import copy

import pytest
import torch

import peftkern as pk
from peftkern.methods.adapters import AdapterFusion, add_adapters, transformer_sites
from tests._helpers import tiny_bert, tiny_llama


def _bert(seed=0):
    return tiny_bert(seed, layers=4, num_labels=2)


def _llama(seed=0):
    return tiny_llama(seed, layers=4)


BUILDERS = {"bert": _bert, "llama": _llama}
IDS = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def _nonzero_up_(adapters):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for a in adapters:
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g) * 0.5)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_adapters_act_where_the_papers_put_them(arch, placement):
    """A fresh adapter is the identity; with a nonzero up projection each site's output is what the formula says:
    serial h -> h + s f(h) on the sublayer output, parallel FFN(x) + s f(x) on the FFN's input."""
    model = BUILDERS[arch]()
    ref = model(input_ids=IDS).logits
    adapters = add_adapters(model, placement, reduction_factor=4, scale=2.0 if placement == "parallel" else 1.0)
    sites = transformer_sites(model)
    assert len(adapters) == len(sites) * (2 if placement == "houlsby" else 1)
    torch.testing.assert_close(model(input_ids=IDS).logits, ref, rtol=0, atol=0)
    _nonzero_up_(adapters)
    seen = {}
    site = sites[1]
    site["ffn_in"].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    site["ffn_out"].register_forward_pre_hook(lambda m, a: seen.__setitem__("ffn_hidden", a[0]))
    site["ffn_out"].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    assert (model(input_ids=IDS).logits - ref).abs().max() > 1e-3
    lin = site["ffn_out"]
    h = torch.nn.functional.linear(seen["ffn_hidden"], lin.weight, lin.bias)
    a = lin.adapter
    f = lambda t: a.up(getattr(torch.nn.functional, {"relu": "relu"}[a.non_linearity])(a.down(t)))  # noqa: E731
    expected = h + 2.0 * f(seen["x"]) if placement == "parallel" else h + f(h)
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)


def test_adapter_drop_static_and_random():
    model = _bert()
    patched = pk.patch(model, "adapter_drop", reduction_factor=4)  # default: the lower half has none
    sites = transformer_sites(model)
    assert [hasattr(s["ffn_out"], "adapter") for s in sites] == [False, False, True, True]
    assert patched.peftkern_config["options"]["skip_layers"] == 2
    # nothing below the first adapter needs a gradient: backward stops there (AdapterDrop's speed-up)
    out = model(input_ids=IDS, labels=torch.tensor([0, 1]))
    grads = {}
    sites[1]["ffn_out"].register_full_backward_hook(lambda m, gi, go: grads.setdefault("low", True))
    out = model(input_ids=IDS, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert "low" not in grads

    model = _bert()
    adapters = add_adapters(model, "pfeiffer", reduction_factor=4, drop_prob=0.5)
    _nonzero_up_(adapters)
    model.eval()
    ref = model(input_ids=IDS).logits
    torch.testing.assert_close(model(input_ids=IDS).logits, ref)  # no random dropping in eval
    model.train()
    torch.manual_seed(0)
    outs = {tuple(model(input_ids=IDS).logits.flatten()[:3].tolist()) for _ in range(12)}
    assert len(outs) > 1  # different adapters dropped per forward


def _train(model, steps=6, labels=(0, 1), lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=torch.tensor(labels)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_adapter_fusion_two_stages(tmp_path):
    """Stage 1: an adapter per task, saved; stage 2: a fusion layer over both, only it (and the head) trains."""
    for task, labels in (("a", (0, 1)), ("b", (1, 0))):
        model = pk.patch(_bert(), "adapter_pfeiffer", reduction_factor=4)
        _train(model, labels=labels)
        pk.save_adapter(model, tmp_path / task)
    base = _bert()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    fused = pk.patch(base, "adapter_fusion", adapters=[tmp_path / "a", tmp_path / "b"])
    fusions = [m for m in fused.modules() if isinstance(m, AdapterFusion)]
    assert len(fusions) == len(transformer_sites(fused)) and all(len(f.adapters) == 2 for f in fusions)
    stage1 = pk.load_adapter(_bert(), tmp_path / "a")
    torch.testing.assert_close(fusions[0].adapters[0].down.weight,
                               stage1.bert.encoder.layer[0].output.dense.adapter.down.weight)
    frozen = {n: p.detach().clone() for n, p in fused.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in fused.named_parameters() if p.requires_grad}
    assert trainable and all("classifier" in n or any(k in n for k in (".query.", ".key.", ".value."))
                             for n in trainable if "adapter" in n or "classifier" in n)
    assert all(n.startswith("classifier") or ".adapter." in n for n in trainable)
    losses = _train(fused)
    assert losses[-1] < losses[0]
    now = dict(fused.named_parameters())
    assert all(torch.equal(now[n], p) for n, p in frozen.items())  # stage-1 adapters and base untouched
    assert all(torch.equal(now[n], p) for n, p in before.items() if "classifier" not in n)
    fused.eval()
    pk.save_adapter(fused, tmp_path / "fusion")
    again = pk.load_adapter(_bert(), tmp_path / "fusion").eval()  # self-contained: the stage-1 directories unused
    torch.testing.assert_close(again(input_ids=IDS).logits, fused(input_ids=IDS).logits)
    with pytest.raises(ValueError, match="at least 2|needs adapters"):
        pk.patch(_bert(), "adapter_fusion", adapters=[tmp_path / "a"])


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_mam_and_adapters_train_a_llama_and_a_bert(arch):
    for method in ("adapter_houlsby", "adapter_pfeiffer", "mam"):
        model = pk.patch(BUILDERS[arch](), method, **({"num_virtual_tokens": 4} if method == "mam" else {}))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        labels = IDS if arch == "llama" else torch.tensor([0, 1])
        losses = []
        for _ in range(6):
            loss = model(input_ids=IDS, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (method, losses)


def test_bad_options():
    with pytest.raises(ValueError, match="skip_layers must be in"):
        pk.patch(_bert(), "adapter_drop", skip_layers=4)
    with pytest.raises(ValueError, match="activation must be one of"):
        pk.patch(_bert(), "adapter_pfeiffer", non_linearity="nope")
    with pytest.raises(ValueError, match="no transformer layers"):
        add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)), "pfeiffer")
    with pytest.raises(ValueError, match="placement must be"):
        add_adapters(_bert(), "sideways")
    model = copy.deepcopy(_bert())
    with pytest.raises(ValueError, match="drop_prob"):
        add_adapters(model, "pfeiffer", drop_prob=1.0)
