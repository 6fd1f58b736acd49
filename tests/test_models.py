"""ntkbook.models: parameterisations, shapes, seeding and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ntkbook import HadamardNet, NTKLinear, TwoLayerNet, dense, mlp


def test_ntk_linear_computes_scaled_affine_map() -> None:
    gen = torch.Generator().manual_seed(0)
    layer = NTKLinear(5, 3, weight_std=1.5, bias_std=0.2, generator=gen)
    a = torch.randn(4, 5, generator=gen)
    expected = 1.5 / math.sqrt(5) * a @ layer.weight.T + 0.2 * layer.bias
    torch.testing.assert_close(layer(a), expected)


def test_ntk_linear_without_bias_has_no_bias_parameter() -> None:
    layer = NTKLinear(5, 3)
    assert layer.bias is None
    assert [name for name, _ in layer.named_parameters()] == ["weight"]


def test_ntk_parameters_are_standard_normal() -> None:
    layer = NTKLinear(400, 500, bias_std=1.0, generator=torch.Generator().manual_seed(1))
    # 200,000 draws: the sample mean and variance are within 5 standard errors of 0 and 1.
    assert abs(float(layer.weight.detach().mean())) < 5 / math.sqrt(200_000)
    assert abs(float(layer.weight.detach().var()) - 1) < 5 * math.sqrt(2 / 200_000)


def test_standard_parameterization_matches_pytorch_bounds() -> None:
    layer = dense(100, 50, parameterization="standard", generator=torch.Generator().manual_seed(0))
    assert isinstance(layer, nn.Linear)
    bound = 1 / math.sqrt(100)
    assert float(layer.weight.detach().abs().max()) <= bound
    assert float(layer.bias.detach().abs().max()) <= bound
    # Uniform on [-b, b] has standard deviation b / sqrt(3); 5000 draws give about 1% precision.
    assert abs(float(layer.weight.detach().std()) - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_same_generator_seed_gives_same_model(parameterization: str) -> None:
    def build() -> nn.Module:
        return mlp(3, 8, 2, parameterization=parameterization, generator=torch.Generator().manual_seed(7))

    for p, q in zip(build().parameters(), build().parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [TwoLayerNet, HadamardNet])
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_two_layer_models_map_batches(cls: type, parameterization: str) -> None:
    model = cls(4, 6, 3, parameterization=parameterization, generator=torch.Generator().manual_seed(0))
    assert model(torch.randn(7, 4, generator=torch.Generator().manual_seed(1))).shape == (7, 3)


def test_hadamard_net_multiplies_the_branches() -> None:
    model = HadamardNet(4, 6, 1, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    hidden = torch.relu(model.branch1(x)) * torch.relu(model.branch2(x))
    torch.testing.assert_close(model(x), model.readout(hidden))


def test_mlp_has_depth_hidden_layers() -> None:
    model = mlp(3, 8, 3, 2, bias_std=0.1, activation="tanh")
    linear = [m for m in model if isinstance(m, NTKLinear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(3, 8), (8, 8), (8, 8), (8, 2)]
    assert sum(isinstance(m, nn.Tanh) for m in model) == 3
    assert all(m.bias is not None for m in linear)


def test_mlp_forward_preactivation_variance_is_weight_std_squared() -> None:
    # In the NTK parameterisation a first-layer pre-activation has variance sigma_w^2 |x|^2 / d.
    model = mlp(10, 20000, 1, weight_std=2.0, generator=torch.Generator().manual_seed(0))
    x = torch.ones(1, 10)  # |x|^2 = d, so the variance is sigma_w^2 = 4
    z = model[0](x)
    # 20,000 units: the sample variance has relative standard error sqrt(2 / 20000); allow 5 of them.
    assert abs(float(z.detach().var()) - 4.0) < 5 * 4.0 * math.sqrt(2 / 20000)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"width": 0}, ValueError, "width"),
        ({"width": 2.5}, TypeError, "width"),
        ({"depth": 0}, ValueError, "depth"),
        ({"weight_std": -1.0}, ValueError, "weight_std"),
        ({"bias_std": float("nan")}, ValueError, "bias_std"),
        ({"weight_std": "1"}, TypeError, "weight_std"),
        ({"activation": "gelu"}, ValueError, "activation"),
        ({"parameterization": "mean-field"}, ValueError, "parameterization"),
        ({"parameterization": "standard", "weight_std": 2.0}, ValueError, "weight_std"),
        ({"generator": 0}, TypeError, "generator"),
    ],
)
def test_mlp_rejects_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    arguments = {"input_dim": 3, "width": 4, "depth": 1} | kwargs
    with pytest.raises(error, match=match):
        mlp(**arguments)
