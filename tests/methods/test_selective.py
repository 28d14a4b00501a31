"""BitFit, FISH Mask, Diff Pruning and FAR: what each selects, that only it trains, and the sparse layers it leaves."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkern as pk
from peftkern.methods import selective


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 12, generator=g), torch.randint(0, 3, (1,), generator=g)) for _ in range(n)]


def _loss(model, sample):
    x, y = sample
    return nn.functional.cross_entropy(model(x), y)


def test_bitfit_trains_only_biases_and_head():
    torch.manual_seed(0)
    net = Net()
    names = pk.methods.bitfit(net)
    assert set(names) == {"fc1.bias", "fc2.bias", "classifier.weight", "classifier.bias"}
    w = net.fc1.weight.detach().clone()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    _loss(net, _data()[0]).backward()
    opt.step()
    assert torch.equal(net.fc1.weight, w)


def test_fish_mask_global_top_k_of_the_empirical_fisher():
    torch.manual_seed(0)
    net = Net()
    ref = Net()
    ref.load_state_dict(net.state_dict())
    data = _data()
    # the empirical Fisher by hand: mean over samples of squared per-sample gradients
    fisher = {n: torch.zeros_like(getattr(ref, n).weight) for n in ("fc1", "fc2")}
    for s in data:
        ref.zero_grad()
        _loss(ref, s).backward()
        for n in fisher:
            fisher[n] += getattr(ref, n).weight.grad.square() / len(data)
    layers = pk.methods.fish_mask(net, data, _loss, density=0.05, target=r"fc\d")
    scores = torch.cat([fisher["fc1"].view(-1), fisher["fc2"].view(-1)])
    k = round(0.05 * scores.numel())
    chosen = torch.cat([layers[n].indices + offset for n, offset in (("fc1", 0), ("fc2", 16 * 12)) if n in layers])
    assert chosen.numel() == k
    assert set(chosen.tolist()) == set(torch.topk(scores, k).indices.tolist())
    assert isinstance(net.fc1, pk.nn.SparseDiffLinear)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.values" for n in layers} | {"classifier.weight", "classifier.bias"}


def test_diff_pruning_gates_penalty_and_projection():
    torch.manual_seed(0)
    net = Net()
    wrapped = pk.methods.diff_pruning(net, target=r"fc\d")
    layer = wrapped["fc1"]
    with torch.no_grad():
        layer.diff.normal_()
        layer.log_alpha.normal_(0, 3)
    layer.train()
    z = layer.gates()
    assert ((z >= 0) & (z <= 1)).all() and (z == 0).any() and (z == 1).any()  # stretched and clamped
    penalty = pk.methods.diff_pruning_l0(net)
    penalty.backward()
    assert layer.log_alpha.grad.abs().sum() > 0
    expected = torch.sigmoid(layer.log_alpha - layer.beta * torch.log(torch.tensor(1.5 / 1.5))).sum()
    torch.testing.assert_close(layer.l0(), expected)
    layer.eval()
    dense_delta = (layer.gates() * layer.diff).detach()
    x = torch.randn(4, 12)
    sparse = pk.methods.diff_pruning_to_sparse(net, density=0.1)["fc1"]
    k = round(0.1 * dense_delta.numel())
    assert sparse.indices.numel() == k
    assert set(sparse.indices.tolist()) == set(torch.topk(dense_delta.abs().view(-1), k).indices.tolist())
    kept = torch.zeros_like(dense_delta).view(-1)
    kept[sparse.indices] = dense_delta.view(-1)[sparse.indices]
    torch.testing.assert_close(sparse(x), nn.functional.linear(x, sparse.weight + kept.view(16, 12), sparse.bias))


def test_far_selects_the_most_changed_nodes():
    torch.manual_seed(0)
    net = Net()
    before = {"fc1": net.fc1.weight.detach().clone()}
    with torch.no_grad():  # "priming": rows 3 and 9 change most
        net.fc1.weight[3] += 1.0
        net.fc1.weight[9] -= 0.8
        net.fc1.weight[5] += 0.01
    layers = pk.methods.far_select(net, before, fraction=2 / 16)
    layer = layers["fc1"]
    assert layer.rows.tolist() == [3, 9] and tuple(layer.delta.shape) == (2, 12)
    assert torch.equal(layer.linear.weight, before["fc1"])  # the priming only chose the nodes
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"fc1.delta", "classifier.weight",
                                                                         "classifier.bias"}
    # the dense-block math: y, dx and d delta equal dense math with the delta scattered into those rows
    with torch.no_grad():
        layer.delta.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    layer.double()
    xr = x.clone().requires_grad_()
    y = layer(xr)
    g = torch.randn_like(y)
    dx, dd = torch.autograd.grad(y, (xr, layer.delta), g)
    delta = layer.delta.detach().clone().requires_grad_()
    xd = x.clone().requires_grad_()
    w = layer.linear.weight.index_add(0, layer.rows, delta)
    y2 = nn.functional.linear(xd, w, layer.linear.bias)
    dx2, dd2 = torch.autograd.grad(y2, (xd, delta), g)
    for a, b in ((y, y2), (dx, dx2), (dd, dd2)):
        torch.testing.assert_close(a, b)
    w0 = layer.linear.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y2.detach())
    layer.unmerge()
    assert torch.equal(layer.linear.weight, w0)


def test_bad_input():
    net = Net()
    with pytest.raises(ValueError, match="density"):
        pk.methods.fish_mask(net, _data(), _loss, density=0.0)
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        pk.methods.fish_mask(net, _data(), _loss, density=0.1, target="nothing")
    with pytest.raises(ValueError, match="yielded no sample"):
        pk.methods.fish_mask(Net(), [], _loss, density=0.1)
    with pytest.raises(TypeError, match="linear must be"):
        selective.DiffPruningLinear(nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="fraction"):
        pk.methods.far_select(Net(), {}, fraction=1.5)
