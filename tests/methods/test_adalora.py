"""AdaLoRA: preparation, budget schedule, scores, masks, orthogonal regulariser, training, parity with PEFT."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
import transformers

from peftkern.methods.adalora import AdaLoRAAllocator, adalora_scaling, prepare_adalora
from peftkern.nn import LoRALinear


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _tiny_bert(dtype=torch.float32):
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                  vocab_size=100, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).to(dtype).eval()


def _fill_random_(alloc: AdaLoRAAllocator, seed=0):
    """Random nonzero parameters and gradients on every adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in alloc.layers.values():
            for p in (layer.lora_A, layer.lora_B, layer.rank_scale):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
                p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


# ----------------------------------------------------------------------------------------------------------------
# prepare_adalora
# ----------------------------------------------------------------------------------------------------------------

def test_prepare_replaces_and_initialises():
    model = _mlp()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 6)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    layers = prepare_adalora(model, ["0", "2"], init_r=5, lora_alpha=16, trainable=["4"])
    assert list(layers) == ["0", "2"]
    for name, layer in layers.items():
        assert isinstance(layer, LoRALinear) and model.get_submodule(name) is layer
        assert layer.weight is linears[name].weight and layer.bias is linears[name].bias  # shared, frozen
        assert not layer.weight.requires_grad and not layer.bias.requires_grad
        assert layer.r == 5 and layer.rank_scale.shape == (5,) and torch.all(layer.rank_scale == 0)
        assert layer.scaling == pytest.approx(16 / (5 + 1e-5), rel=1e-15) == adalora_scaling(16, 5)
        for p in (layer.lora_A, layer.lora_B, layer.rank_scale):
            assert p.requires_grad
    assert isinstance(model[4], nn.Linear) and model[4].weight.requires_grad and model[4].bias.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{k}" for i in ("0", "2") for k in ("lora_A", "lora_B", "rank_scale")} | {"4.weight",
                                                                                                       "4.bias"}
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)  # rank_scale = 0: output unchanged at first


def test_prepare_init_statistics():
    model = nn.Sequential(nn.Linear(400, 300))
    torch.manual_seed(1)
    layer = prepare_adalora(model, ["0"], init_r=64)["0"]
    for p in (layer.lora_A, layer.lora_B):
        assert abs(p.mean().item()) < 2e-3 and p.std().item() == pytest.approx(0.02, rel=0.03)


def test_prepare_regex_callable_and_bert():
    bert = _tiny_bert()
    layers = prepare_adalora(bert, r".*attention\.self\.(query|value)", init_r=3)
    assert len(layers) == 4 and all(n.endswith(("query", "value")) for n in layers)
    bert2 = _tiny_bert()
    layers2 = prepare_adalora(bert2, lambda n, m: isinstance(m, nn.Linear) and "intermediate" in n, init_r=3)
    assert list(layers2) == [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    assert not any(p.requires_grad for n, p in bert2.named_parameters() if "lora" not in n and "rank_scale" not in n)


def test_forward_is_svd_form():
    """y = x W^T + b + scaling * (x A^T * e) B^T with PEFT's scaling alpha / (r + 1e-5)."""
    model = _mlp(torch.float64)
    layer = prepare_adalora(model, ["2"], init_r=4, lora_alpha=8)["2"]
    with torch.no_grad():
        layer.rank_scale.normal_()
    x = torch.randn(7, 10, dtype=torch.float64)
    A, B, e, W, b = layer.lora_A, layer.lora_B, layer.rank_scale, layer.weight, layer.bias
    ref = x @ W.T + b + (x @ (A * e[:, None]).T @ B.T) * 8 / (4 + 1e-5)
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(target_modules=["nope"]), "target_modules"),
    (dict(target_modules=["1"]), "target_modules"),  # a Tanh
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules=5), "target_modules"),
    (dict(target_modules="(("), "target_modules"),
    (dict(target_modules=["0"], init_r=0), "init_r"),
    (dict(target_modules=["0"], init_r=2.0), "init_r"),
    (dict(target_modules=["0"], lora_alpha=0), "lora_alpha"),
    (dict(target_modules=["0"], lora_dropout=1.0), "lora_dropout"),
    (dict(target_modules=["0"], trainable=["missing"]), "trainable"),
    (dict(target_modules=["0"], trainable=[""]), "trainable"),
])
def test_prepare_bad_args(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        prepare_adalora(_mlp(), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# allocator arguments and schedule
# ----------------------------------------------------------------------------------------------------------------

def _prepared_mlp(init_r=4, dtype=torch.float32):
    model = _mlp(dtype)
    prepare_adalora(model, ["0", "2", "4"], init_r=init_r)
    return model


@pytest.mark.parametrize("kwargs, arg", [
    (dict(target_r=0), "target_r"),
    (dict(target_r=5), "target_r"),  # more than init_r=4
    (dict(target_r=1.5), "target_r"),
    (dict(total_step=0), "total_step"),
    (dict(tinit=-1), "tinit"),
    (dict(tfinal=-1), "tfinal"),
    (dict(tinit=6, tfinal=4), "tinit"),  # 6 >= 10 - 4: no budgeting phase
    (dict(deltaT=0), "deltaT"),
    (dict(beta1=0.0), "beta1"),
    (dict(beta1=1.0), "beta1"),
    (dict(beta2=1.5), "beta2"),
    (dict(orth_reg_weight=-0.1), "orth_reg_weight"),
    (dict(init_r=3), "init_r"),  # layers have r=4
])
def test_allocator_bad_args(kwargs, arg):
    kw = dict(target_r=2, total_step=10) | kwargs
    with pytest.raises(ValueError, match=arg):
        AdaLoRAAllocator(_prepared_mlp(), **kw)


def test_allocator_bad_model_and_step():
    with pytest.raises(ValueError, match="model"):
        AdaLoRAAllocator(_mlp(), target_r=2, total_step=10)  # no prepared layer
    with pytest.raises(ValueError, match="model"):
        AdaLoRAAllocator([nn.Linear(2, 2)], target_r=1, total_step=10)
    with pytest.raises(ValueError, match="model"):
        AdaLoRAAllocator([LoRALinear(3, 3, r=2)], target_r=1, total_step=10)  # no rank_scale
    alloc = AdaLoRAAllocator(_prepared_mlp(), target_r=2, total_step=10)
    for step in (-1, 1.0, True):
        with pytest.raises(ValueError, match="global_step"):
            alloc.update_and_allocate(step)


def test_allocator_accepts_dict_and_list():
    model = _prepared_mlp()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    a1 = AdaLoRAAllocator(model, target_r=2, total_step=10, init_r=4)
    a2 = AdaLoRAAllocator(layers, target_r=2, total_step=10)
    a3 = AdaLoRAAllocator(list(layers.values()), target_r=2, total_step=10)
    assert list(a1.layers) == list(a2.layers) == ["0", "2", "4"] and list(a3.layers) == ["0", "1", "2"]
    assert a1.init_budget == 12 and a1.target_budget == 6 and a1.rank_pattern == {"0": 4, "2": 4, "4": 4}


SCHEDULES = [
    dict(target_r=2, init_r=4, total_step=20, tinit=2, tfinal=5, deltaT=2),
    dict(target_r=3, init_r=12, total_step=1000, tinit=100, tfinal=300, deltaT=10),
    dict(target_r=1, init_r=8, total_step=50, tinit=0, tfinal=0, deltaT=1),
    dict(target_r=4, init_r=6, total_step=37, tinit=5, tfinal=11, deltaT=3),
]


@pytest.mark.parametrize("cfg", SCHEDULES, ids=lambda c: f"T{c['total_step']}")
def test_budget_schedule_formula_and_peft(cfg):
    from peft import AdaLoraConfig, get_peft_model
    from peft.tuners.adalora.layer import RankAllocator

    model = _prepared_mlp(init_r=cfg["init_r"])
    alloc = AdaLoRAAllocator(model, **cfg)
    n = 3
    b0, b1 = cfg["init_r"] * n, cfg["target_r"] * n
    assert (alloc.init_budget, alloc.target_budget) == (b0, b1)
    T, ti, tf, dT = cfg["total_step"], cfg["tinit"], cfg["tfinal"], cfg["deltaT"]
    # key steps, by the formula
    assert alloc.budget_schedule(0) == (b0, False) and alloc.budget_schedule(ti) == (b0, False)
    assert alloc.budget_schedule(T - tf)[0] == b1  # cubic reaches the target at the final step
    assert alloc.budget_schedule(T - tf + 1) == (b1, True) and alloc.budget_schedule(T + 5) == (b1, True)
    mid = ti + (T - tf - ti) // 2
    c = 1 - (mid - ti) / (T - tf - ti)
    assert alloc.budget_schedule(mid) == (int((b0 - b1) * c ** 3 + b1), mid % dT == 0)
    budgets = [alloc.budget_schedule(s)[0] for s in range(T + 2)]
    assert all(x >= y for x, y in zip(budgets, budgets[1:]))  # non-increasing
    assert budgets[ti + 1] < b0 or b0 == b1
    # PEFT's RankAllocator on the same configuration
    pcfg = AdaLoraConfig(target_modules=["0", "2", "4"], **cfg)
    pmodel = get_peft_model(_mlp(), pcfg)
    ra = RankAllocator(pmodel, pcfg, "default")
    assert (ra.init_bgt, ra.target_bgt) == (b0, b1)
    assert [alloc.budget_schedule(s) for s in range(T + 3)] == [ra.budget_schedule(s) for s in range(T + 3)]


# ----------------------------------------------------------------------------------------------------------------
# scores and masks
# ----------------------------------------------------------------------------------------------------------------

def test_importance_by_hand():
    """One layer, r=2, in=3, out=2; two updates with known p and grad; beta1=0.5, beta2=0.25."""
    layer = LoRALinear(3, 2, r=2).double()
    layer.enable_rank_scale()
    alloc = AdaLoRAAllocator([layer], target_r=1, total_step=100, tinit=50, beta1=0.5, beta2=0.25)
    b1, b2 = 0.5, 0.25
    steps = [
        dict(A=[[1., -2., 3.], [0.5, 0., -1.]], gA=[[2., 1., 1.], [-4., 3., 2.]],
             B=[[1., 2.], [-1., 0.5]], gB=[[0.5, 0.5], [2., -2.]], e=[2., -3.], ge=[0.25, 1.]),
        dict(A=[[0., 1., 1.], [2., -1., 1.]], gA=[[1., 1., -3.], [1., 1., 1.]],
             B=[[2., 2.], [1., -1.]], gB=[[1., 0.], [0.5, 3.]], e=[1., 1.], ge=[-2., 0.5]),
    ]
    avg = {k: torch.zeros(1) for k in "ABe"}
    unc = {k: torch.zeros(1) for k in "ABe"}
    for st in steps:
        with torch.no_grad():
            for k, p in (("A", layer.lora_A), ("B", layer.lora_B), ("e", layer.rank_scale)):
                p.copy_(torch.tensor(st[k], dtype=torch.float64))
                p.grad = torch.tensor(st["g" + k], dtype=torch.float64)
        alloc.update_and_allocate(0)  # step <= tinit: scores only, no masking
        for k in "ABe":
            ipt = (torch.tensor(st[k]) * torch.tensor(st["g" + k])).abs()
            avg[k] = b1 * avg[k] + (1 - b1) * ipt
            unc[k] = b2 * unc[k] + (1 - b2) * (ipt - avg[k]).abs()
    s = {k: avg[k] * unc[k] for k in "ABe"}
    expect = [s["e"][i] + s["A"][i].mean() + s["B"][:, i].mean() for i in range(2)]
    got = alloc.importance()["0"]
    torch.testing.assert_close(got, torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=0)
    # literal numbers for triplet 0 after one update: S = (1-b1) ipt * (1-b2) |ipt - (1-b1) ipt| = 0.1875 ipt^2,
    # ipt_e = |2 * 0.25|, ipt_A[0] = |(1, -2, 3) * (2, 1, 1)|, ipt_B[:, 0] = |(1, -1) * (0.5, 2)|
    alloc2 = AdaLoRAAllocator([layer], target_r=1, total_step=100, tinit=50, beta1=0.5, beta2=0.25)
    st = steps[0]
    with torch.no_grad():
        for k, p in (("A", layer.lora_A), ("B", layer.lora_B), ("e", layer.rank_scale)):
            p.copy_(torch.tensor(st[k], dtype=torch.float64))
            p.grad = torch.tensor(st["g" + k], dtype=torch.float64)
    alloc2.update_and_allocate(0)
    k = 0.5 * 0.75 * 0.5
    ipt_e0, ipt_A0, ipt_B0 = 0.5, [2., 2., 3.], [0.5, 2.]
    expect0 = k * ipt_e0 ** 2 + k * sum(v * v for v in ipt_A0) / 3 + k * sum(v * v for v in ipt_B0) / 2
    assert alloc2.importance()["0"][0].item() == pytest.approx(expect0, rel=1e-12)
    assert expect0 == pytest.approx(0.1875 * (0.25 + 17 / 3 + 4.25 / 2))


def test_mask_to_budget_keeps_exactly_budget_most_important():
    model = _prepared_mlp(init_r=6)
    alloc = AdaLoRAAllocator(model, target_r=2, total_step=40, tinit=2, tfinal=5, deltaT=1)
    _fill_random_(alloc)
    for step in range(3):
        alloc.update_and_allocate(step)  # warm-up: no masking
    assert alloc.total_rank == 18 and all(torch.all(l.rank_scale != 0) for l in alloc.layers.values())
    scores = torch.cat(list(alloc.importance().values()))
    for budget in (17, 11, 6, 1, 0):
        alloc.mask_to_budget(budget)
        e = torch.cat([l.rank_scale.detach() for l in alloc.layers.values()])
        assert int((e != 0).sum()) == budget == alloc.total_rank == alloc.budget
        kept = e != 0
        if 0 < budget < 18:
            assert scores[kept].min() > scores[~kept].max()
    # in the loop: after a masking step the nonzero count equals the scheduled budget
    alloc2 = AdaLoRAAllocator(model, target_r=2, total_step=40, tinit=2, tfinal=5, deltaT=1)
    for step in range(3, 20):
        _fill_random_(alloc2, seed=step)
        budget = alloc2.update_and_allocate(step)
        e = torch.cat([l.rank_scale.detach() for l in alloc2.layers.values()])
        assert int((e != 0).sum()) == budget == alloc2.total_rank == sum(alloc2.rank_pattern.values())
        assert alloc2.rank_mask == {n: (l.rank_scale != 0).tolist() for n, l in alloc2.layers.items()}


def test_ties_keep_exactly_budget():
    model = _prepared_mlp(init_r=4)
    alloc = AdaLoRAAllocator(model, target_r=2, total_step=10)
    with torch.no_grad():
        for l in alloc.layers.values():
            l.rank_scale.fill_(1.0)
    alloc.mask_to_budget(7)  # all scores are zero (no update yet): ties broken by layer then rank order
    assert alloc.rank_pattern == {"0": 4, "2": 3, "4": 0}
    alloc.mask_to_budget(12)
    assert alloc.total_rank == 12


def test_masked_ranks_contribute_nothing():
    torch.manual_seed(3)
    layer = LoRALinear(10, 7, r=6).double()
    layer.enable_rank_scale()
    alloc = AdaLoRAAllocator([layer], target_r=2, total_step=10)
    _fill_random_(alloc)
    alloc.update_scores()
    alloc.mask_to_budget(2)
    keep = torch.tensor(alloc.rank_mask["0"])
    assert int(keep.sum()) == 2
    x = torch.randn(9, 10, dtype=torch.float64)
    A, B, e = layer.lora_A[keep], layer.lora_B[:, keep], layer.rank_scale[keep]
    ref = x @ layer.weight.T + layer.bias + layer.scaling * (x @ A.T * e) @ B.T
    y = layer(x)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # whatever the masked rows/columns of A and B hold, the output is the same
        layer.lora_A[~keep] = torch.randn(4, 10, dtype=torch.float64) * 100
        layer.lora_B[:, ~keep] = torch.randn(7, 4, dtype=torch.float64) * 100
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    # and they get no gradient through A and B
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert torch.all(layer.lora_A.grad[~keep] == 0) and torch.all(layer.lora_B.grad[:, ~keep] == 0)


def test_final_phase_reapplies_masks_and_skipped_final_step():
    model = _prepared_mlp(init_r=4)
    alloc = AdaLoRAAllocator(model, target_r=2, total_step=12, tinit=1, tfinal=4, deltaT=2)
    for step in range(8):
        _fill_random_(alloc, seed=step)
        alloc.update_and_allocate(step)
    assert not alloc.final_done
    _fill_random_(alloc, seed=99)
    assert alloc.update_and_allocate(8) == 6 and alloc.final_done and alloc.total_rank == 6
    mask = alloc.rank_mask
    for step in range(9, 12):
        with torch.no_grad():  # the optimizer revives the masked entries...
            for l in alloc.layers.values():
                l.rank_scale.add_(1.0)
        alloc.update_and_allocate(step)  # ...and the final masks are re-applied
        assert alloc.rank_mask == mask
        assert {n: (l.rank_scale != 0).tolist() for n, l in alloc.layers.items()} == mask
    # skipping the call at total_step - tfinal still performs the final allocation
    alloc2 = AdaLoRAAllocator(model, target_r=1, total_step=12, tinit=1, tfinal=4, deltaT=2)
    _fill_random_(alloc2)
    alloc2.update_and_allocate(3)
    alloc2.update_and_allocate(10)
    assert alloc2.final_done and alloc2.total_rank == 3


def test_merged_layers_rejected():
    model = _prepared_mlp()
    alloc = AdaLoRAAllocator(model, target_r=2, total_step=10)
    model[0].merge()
    with pytest.raises(RuntimeError, match="merged"):
        alloc.update_and_allocate(0)


def test_state_dict_roundtrip():
    model = _prepared_mlp()
    alloc = AdaLoRAAllocator(model, target_r=2, total_step=20, tinit=1, tfinal=5)
    for step in range(6):
        _fill_random_(alloc, seed=step)
        alloc.update_and_allocate(step)
    state = alloc.state_dict()
    other = AdaLoRAAllocator(model, target_r=2, total_step=20, tinit=1, tfinal=5)
    other.load_state_dict(state)
    assert other.rank_mask == alloc.rank_mask and other.budget == alloc.budget
    for a, b in zip(other.importance().values(), alloc.importance().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    bad = dict(state, masks={"0": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="state"):
        other.load_state_dict(bad)


# ----------------------------------------------------------------------------------------------------------------
# orthogonal regularisation
# ----------------------------------------------------------------------------------------------------------------

def test_orthogonal_regularization_literal_and_grad():
    model = _prepared_mlp(init_r=4, dtype=torch.float64)
    alloc = AdaLoRAAllocator(model, target_r=2, total_step=10, orth_reg_weight=0.3)
    _fill_random_(alloc)
    terms, terms_sq = [], []
    for l in alloc.layers.values():
        A, B = l.lora_A.detach(), l.lora_B.detach()
        for M in (A @ A.T - torch.eye(4, dtype=A.dtype), B.T @ B - torch.eye(4, dtype=A.dtype)):
            v = sum(M[i, j].item() ** 2 for i in range(4) for j in range(4))
            terms.append(v ** 0.5)
            terms_sq.append(v)
    reg = alloc.orthogonal_regularization()
    assert reg.item() == pytest.approx(0.3 * sum(terms) / 6, rel=1e-12)
    assert alloc.orthogonal_regularization(squared=True).item() == pytest.approx(0.3 * sum(terms_sq) / 6, rel=1e-12)
    # PEFT's own loop over named parameters gives the same value
    peft_reg, num = 0, 0
    for n, p in model.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            peft_reg += torch.norm(cov - torch.eye(*cov.size(), dtype=cov.dtype), p="fro")
            num += 1
    assert reg.item() == pytest.approx(0.3 * (peft_reg / num).item(), rel=1e-12)
    # differentiable in A and B (not in rank_scale), gradient matches autograd on the literal form
    for l in alloc.layers.values():
        l.lora_A.grad = l.lora_B.grad = l.rank_scale.grad = None
    reg.backward()
    A = model[0].lora_A
    assert all(l.lora_A.grad is not None and l.lora_B.grad is not None for l in alloc.layers.values())
    assert all(l.rank_scale.grad is None for l in alloc.layers.values())
    A2 = A.detach().clone().requires_grad_(True)
    lit = 0.3 / 6 * torch.sqrt(((A2 @ A2.T - torch.eye(4, dtype=A2.dtype)) ** 2).sum())
    lit.backward()
    torch.testing.assert_close(A.grad, A2.grad, rtol=1e-10, atol=1e-12)
    # orthonormal factors: zero regulariser
    layer = LoRALinear(10, 8, r=4).double()
    layer.enable_rank_scale()
    with torch.no_grad():
        layer.lora_A.copy_(torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))[0].T)
        layer.lora_B.copy_(torch.linalg.qr(torch.randn(8, 4, dtype=torch.float64))[0])
    assert AdaLoRAAllocator([layer], target_r=2, total_step=5).orthogonal_regularization(squared=True).item() < 1e-20


# ----------------------------------------------------------------------------------------------------------------
# training: end to end, and lock step with PEFT
# ----------------------------------------------------------------------------------------------------------------

def _bert_batch(n=32, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 100, (n, seq), generator=g)
    return x, (x[:, 1] < 50).long()  # the label is a property of the first real token


def test_end_to_end_bert_training():
    bert = _tiny_bert()
    torch.manual_seed(0)
    layers = prepare_adalora(bert, ["query", "value", "intermediate.dense"], init_r=6, lora_alpha=32,
                             trainable=["classifier"])
    n_layers = len(layers)
    assert n_layers == 2 * 3
    T = 40
    alloc = AdaLoRAAllocator(bert, target_r=2, init_r=6, total_step=T, tinit=4, tfinal=10, deltaT=3)
    opt = torch.optim.AdamW([p for p in bert.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.0)
    x, y = _bert_batch()
    bert.train()
    losses, ranks = [], []
    for step in range(T):
        out = bert(input_ids=x, labels=y)
        (out.loss + alloc.orthogonal_regularization()).backward()
        opt.step()
        alloc.update_and_allocate(step)
        opt.zero_grad()
        losses.append(out.loss.item())
        ranks.append(alloc.total_rank)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5 and losses[-1] < 0.3, losses
    assert ranks[0] == 6 * n_layers and ranks[-1] == alloc.target_budget == 2 * n_layers
    assert all(a >= b for a, b in zip(ranks, ranks[1:]))
    e = torch.cat([l.rank_scale.detach() for l in layers.values()])
    assert int((e != 0).sum()) == 2 * n_layers
    assert sum(alloc.rank_pattern.values()) == 2 * n_layers and set(alloc.rank_pattern) == set(layers)
    # the allocation is adaptive, not uniform, and masked ranks hold no orthogonality bonus in the output
    assert len(set(alloc.rank_pattern.values())) > 1


def test_lockstep_with_peft_adalora():
    """Identical weights, data and optimizer: PEFT's AdaLoRA and peftkern's give the same losses and masks."""
    from peft import AdaLoraConfig, get_peft_model

    base = _tiny_bert(torch.float64)
    mine = copy.deepcopy(base)
    T, kw = 16, dict(init_r=4, target_r=2, tinit=2, tfinal=5, deltaT=2)
    pcfg = AdaLoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], total_step=T, lora_alpha=8,
                         orth_reg_weight=0.4, **kw)
    pm = get_peft_model(base, pcfg)
    layers = prepare_adalora(mine, ["query", "value"], init_r=4, lora_alpha=8, trainable=["classifier"])
    alloc = AdaLoRAAllocator(mine, total_step=T, orth_reg_weight=0.4, **kw)
    pp = dict(pm.named_parameters())
    with torch.no_grad():  # same adapter init
        for n, l in layers.items():
            pre = f"base_model.model.{n}."
            l.lora_A.copy_(pp[pre + "lora_A.default"])
            l.lora_B.copy_(pp[pre + "lora_B.default"])
            l.rank_scale.copy_(pp[pre + "lora_E.default"].view(-1))
    # PEFT leaves ranknum.requires_grad=True after set_adapter; it is meant to be a constant, keep it out
    peft_params = [p for n, p in pm.named_parameters() if p.requires_grad and "ranknum" not in n]
    n_mine = sum(p.numel() for p in mine.parameters() if p.requires_grad)
    assert sum(p.numel() for p in peft_params) == n_mine  # adapters + classifier (PEFT's modules_to_save)
    opt1 = torch.optim.SGD(peft_params, lr=0.5)
    opt2 = torch.optim.SGD([p for p in mine.parameters() if p.requires_grad], lr=0.5)
    x, y = _bert_batch(16)
    masks_seen = 0
    for step in range(T):
        l1 = pm(input_ids=x, labels=y).loss  # PEFT adds orth_reg_weight * regulariser itself
        l2 = mine(input_ids=x, labels=y).loss + alloc.orthogonal_regularization()
        assert l2.item() == pytest.approx(l1.item(), rel=1e-9, abs=1e-12), step
        l1.backward()
        l2.backward()
        opt1.step()
        opt2.step()
        pm.base_model.update_and_allocate(step)
        alloc.update_and_allocate(step)
        opt1.zero_grad()
        opt2.zero_grad()
        if pcfg.rank_pattern:
            peft_masks = {k.replace("base_model.model.", "").replace(".lora_E.default", "").replace(".lora_E", ""): v
                          for k, v in pcfg.rank_pattern.items()}
            assert peft_masks == alloc.rank_mask, step
            masks_seen += 1
        for n, l in layers.items():
            torch.testing.assert_close(l.rank_scale.detach(), pp[f"base_model.model.{n}.lora_E.default"].view(-1),
                                       rtol=1e-7, atol=1e-9)
    assert masks_seen >= T - kw["tinit"] - 2 and alloc.total_rank == 2 * len(layers)
    assert sum(sum(v) for v in pcfg.rank_pattern.values()) == alloc.total_rank


def test_gpt2_conv1d_projections():
    """GPT-2's transformers Conv1D projections (weight [in, out]) take AdaLoRA's SVD form, checked against the literal
    ``x W + b + s ((x A^T) * e) B^T`` in fp64; the allocator trains them like nn.Linear ones."""
    import peftkern as pk
    from tests._helpers import tiny_batch, tiny_model

    model = pk.patch(tiny_model("gpt2").double(), "adalora", init_r=4, target_r=2, total_step=4)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert layers and all(m.fan_in_fan_out for m in layers.values())
    layer = layers["transformer.h.0.attn.c_attn"]
    with torch.no_grad():
        layer.rank_scale.normal_()
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float64)
    expected = x @ layer.weight + layer.bias + layer.scaling * ((x @ layer.lora_A.T) * layer.rank_scale) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    batch = tiny_batch(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(4):
        model(**batch).loss.backward()
        opt.step()
        model.peftkern_allocator.update_and_allocate(step)
        opt.zero_grad()
    assert model.peftkern_allocator.total_rank == 2 * len(layers)  # the target budget, reached at the last step
