"""pk.nn.BottleneckAdapter: identity at init, its options (layer norm, gate, no residual, scale) against the
reference math, fp32 adapters over a bf16 model, torch.compile, bad arguments."""
from __future__ import annotations

import pytest
import torch

import peftkern as pk
from peftkern.ops.adapter.reference import bottleneck_adapter_reference
from tests._helpers import DEVICE, assert_close, backends


def _randomized(adapter):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return adapter.to(DEVICE)


def test_fresh_adapter_is_the_identity_and_residual_free_adds_nothing():
    h = torch.randn(3, 5, 32, device=DEVICE)
    assert torch.equal(pk.nn.BottleneckAdapter(32, 4, device=DEVICE)(h), h)
    assert torch.equal(pk.nn.BottleneckAdapter(32, 4, residual=False, device=DEVICE)(h), torch.zeros_like(h))
    assert pk.nn.BottleneckAdapter(32, 4).bottleneck_size == 8


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layer_norm,gated,residual", [(False, False, True), (True, False, True), (False, True, True),
                                                       (True, True, False)],
                         ids=["plain", "layer-norm", "gated", "ln-gated-no-residual"])
def test_options_match_the_math(backend, layer_norm, gated, residual):
    a = _randomized(pk.nn.BottleneckAdapter(24, 3, "silu", layer_norm=layer_norm, gated=gated, residual=residual,
                                            scale=0.5))
    h = torch.randn(2, 7, 24, device=DEVICE, requires_grad=True)
    with pk.use_backend(backend):
        y = a(h)
    d = a.double()
    h64 = h.detach().double()
    x = d.layer_norm(h64) if layer_norm else h64
    ref = bottleneck_adapter_reference(x, d.down.weight, d.down.bias, d.up.weight, d.up.bias, "silu", False, 0.5)
    if gated:
        ref = torch.sigmoid(d.gate(h64)) * ref
    ref = h64 + ref if residual else ref
    assert_close(y, ref.detach())


def test_fp32_adapter_over_bf16_activations():
    a = _randomized(pk.nn.BottleneckAdapter(16, 2, "gelu"))
    h = torch.randn(4, 16, dtype=torch.bfloat16, device=DEVICE)
    y = a(h)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, a(h.float()).to(torch.bfloat16), rtol=0, atol=0)


def test_parametrized_weight_is_read_through_the_module():
    """A weight under torch.nn.utils.parametrize lives outside the parameter dict: the adapter reads it through the
    module, so the output and the gradient of the original follow the parametrization."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    a = _randomized(pk.nn.BottleneckAdapter(16, 4, "gelu"))
    parametrize.register_parametrization(a.up, "weight", Doubled())
    h = torch.randn(3, 16, device=DEVICE)
    y = a(h)
    d = a.double()
    ref = bottleneck_adapter_reference(h.double(), d.down.weight, d.down.bias, d.up.weight, d.up.bias, "gelu")
    assert_close(y, ref.detach())
    a.float()(h).sum().backward()
    original = a.up.parametrizations.weight.original
    assert original.grad is not None and torch.count_nonzero(original.grad) > 0


def test_torch_compile_fullgraph():
    a = _randomized(pk.nn.BottleneckAdapter(16, 4, "relu", gated=True))
    h = torch.randn(3, 16, device=DEVICE)
    torch.testing.assert_close(torch.compile(a, fullgraph=True, backend="aot_eager")(h), a(h), rtol=0, atol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        pk.nn.BottleneckAdapter(16, 4, "softplusish")
    with pytest.raises(ValueError, match="reduction_factor"):
        pk.nn.BottleneckAdapter(16, 0)
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        pk.nn.BottleneckAdapter(16.5, 4)
    assert "16 -> 4 -> 16, relu" in repr(pk.nn.BottleneckAdapter(16, 4))
