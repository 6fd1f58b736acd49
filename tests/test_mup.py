"""ntkbook.mup and parameterization="mup": the multipliers and variances of Yang & Hu (2021), Table 3,
and the width scaling they exist for."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ntkbook import MuPLinear, TwoLayerNet, dense, empirical_ntk, mlp, train


def mup_layers(model: nn.Module) -> list[MuPLinear]:
    return [m for m in model.modules() if isinstance(m, MuPLinear)]


def test_mup_layers_have_the_multipliers_and_variances_of_table_3() -> None:
    d, m, sw, sb = 4, 1000, 1.5, 0.5
    model = mlp(
        d, m, 3, 2, parameterization="mup", weight_std=sw, bias_std=sb, generator=torch.Generator().manual_seed(0)
    )
    layers = mup_layers(model)
    assert [layer.layer for layer in layers] == ["input", "hidden", "hidden", "output"]
    assert all(layer.width == m for layer in layers)
    expected_scales = [sw * math.sqrt(m / d), sw, sw, sw / math.sqrt(m)]
    expected_bias_scales = [sb * math.sqrt(m), sb * math.sqrt(m), sb * math.sqrt(m), sb]
    assert [layer.weight_scale for layer in layers] == pytest.approx(expected_scales, rel=1e-15)
    assert [layer.bias_scale for layer in layers] == pytest.approx(expected_bias_scales, rel=1e-15)
    # Stored weights N(0, 1/m) everywhere; biases N(0, 1/m) except the readout's N(0, 1). The sample
    # variance of N draws has relative standard error sqrt(2/N); allow 5 of them (N >= 4000 here).
    for layer in layers:
        variance = float(layer.weight.detach().var())
        assert abs(variance * m - 1) < 5 * math.sqrt(2 / layer.weight.numel())
    for layer in layers[:-1]:
        assert abs(float(layer.bias.detach().var()) * m - 1) < 5 * math.sqrt(2 / m)
    assert layers[-1].bias.shape == (2,)


def test_mup_effective_weights_start_as_in_the_ntk_parameterisation_except_the_readout() -> None:
    d, m = 5, 2000
    model = mlp(d, m, 2, parameterization="mup", generator=torch.Generator().manual_seed(1))
    first, hidden, readout = mup_layers(model)
    # Effective weights s W: N(0, 1/fan-in) for the input and hidden layers, N(0, 1/m^2) for the readout.
    for layer, fan_in in [(first, d), (hidden, m)]:
        effective = layer.weight_scale * layer.weight.detach()
        assert abs(float(effective.var()) * fan_in - 1) < 5 * math.sqrt(2 / effective.numel())
    effective = readout.weight_scale * readout.weight.detach()
    assert 0.8 < float(effective.pow(2).mean()) * m**2 < 1.2  # 2000 draws: standard error 3 %


def relative_feature_change(parameterization: str, width: int, seed: int) -> float:
    """|X_1 - X_0|_F / |X_0|_F for the last hidden layer of a depth-2 ReLU net after one step.

    The targets are shifted by the initial outputs, so the first residual is -y at every width (as for
    a centred network): the NTK parameterisation's random initial function would otherwise change the
    step's size from width to width."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 1, generator=gen, dtype=torch.float64)
    model = mlp(3, width, 2, parameterization=parameterization, generator=gen).double()
    features = model[:-1]
    before = features(x).detach()
    train(model, x, y + model(x).detach(), steps=1, lr=0.1, progress=False)
    return float(torch.linalg.norm(features(x).detach() - before) / torch.linalg.norm(before))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_feature_change_is_width_independent_in_mup_and_falls_as_inverse_sqrt_width_in_ntk(seed: int) -> None:
    # Width x16: the NTK parameterisation's relative feature change should fall 4-fold (m^-1/2),
    # muP's should stay put. At width 128 with 8 inputs the ratios scatter: seeds 0-9 gave 3.43-4.63
    # (NTK) and 0.86-1.16 (muP), within 16 % of 4 and 1; 25 % keeps a margin and still separates them.
    ratio = {p: relative_feature_change(p, 128, seed) / relative_feature_change(p, 2048, seed) for p in ("ntk", "mup")}
    assert abs(ratio["ntk"] / 4 - 1) < 0.25, ratio
    assert abs(ratio["mup"] - 1) < 0.25, ratio


def test_structured_ntk_of_a_mup_network_equals_the_jacobian_one() -> None:
    model = mlp(3, 16, 2, 2, parameterization="mup", bias_std=0.7, generator=torch.Generator().manual_seed(3))
    model = model.double()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    structured = empirical_ntk(model, x, method="structured", mode="full")
    jacobian = empirical_ntk(model, x, method="jacobian", mode="full")
    torch.testing.assert_close(structured, jacobian, rtol=1e-10, atol=1e-12)


def test_dense_and_two_layer_net_build_mup_layers_by_role() -> None:
    net = TwoLayerNet(3, 10, 2, parameterization="mup", generator=torch.Generator().manual_seed(0))
    assert (net.hidden.layer, net.readout.layer) == ("input", "output")
    layer = dense(10, 10, parameterization="mup", layer="hidden", bias_std=1.0)
    assert isinstance(layer, MuPLinear) and layer.bias_scale == pytest.approx(math.sqrt(10))
    a = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(a), layer.weight_scale * a @ layer.weight.T + layer.bias_scale * layer.bias)
