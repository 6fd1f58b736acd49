"""ntkbook.ntk.empirical_ntk, loop method: values, cost, dtype/device, and argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ntkbook import HadamardNet, TwoLayerNet, empirical_ntk, mlp


def jacobian_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Reference kernel from torch.func.jacrev, independent of ntkbook's code path."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def f(params: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (xi[None],)).reshape(())

    def flat(x: torch.Tensor) -> torch.Tensor:
        jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
        return torch.cat([j.reshape(x.shape[0], -1) for j in jac.values()], dim=1)

    return flat(x1) @ flat(x2).T


MODELS = {
    "two-layer": lambda g: TwoLayerNet(3, 7, 1, bias_std=0.5, generator=g),
    "hadamard": lambda g: HadamardNet(3, 7, 1, generator=g),
    "mlp-depth-3": lambda g: mlp(3, 5, 3, bias_std=0.1, generator=g),
    "standard": lambda g: mlp(3, 5, 2, parameterization="standard", generator=g),
}


@pytest.mark.parametrize("name", MODELS)
def test_loop_matches_jacrev_in_float64(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    model = MODELS[name](gen).double()
    x1 = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    x2 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    kernel = empirical_ntk(model, x1, x2)
    torch.testing.assert_close(kernel, jacobian_ntk(model, x1, x2), rtol=1e-12, atol=1e-12)
    assert kernel.dtype == torch.float64 and kernel.shape == (6, 4)


def test_x2_none_is_x1_and_kernel_is_symmetric_psd() -> None:
    gen = torch.Generator().manual_seed(1)
    model = TwoLayerNet(5, 50, 1, generator=gen).double()
    x = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    kernel = empirical_ntk(model, x)
    assert torch.equal(kernel, kernel.T)
    torch.testing.assert_close(kernel, empirical_ntk(model, x, x))
    eigenvalues = torch.linalg.eigvalsh(kernel)
    assert eigenvalues.min() >= -1e-12 * eigenvalues.max()


def test_output_of_shape_n_is_accepted() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert empirical_ntk(model, x).shape == (5, 5)


def test_loop_makes_one_backward_pass_per_input() -> None:
    model = TwoLayerNet(3, 4, 1, generator=torch.Generator().manual_seed(0))
    calls = []
    model.readout.weight.register_hook(lambda grad: calls.append(1))
    x1 = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    x2 = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    empirical_ntk(model, x1, x2, method="loop", verify=False)
    assert len(calls) == 7 + 5
    calls.clear()
    # The verification adds one backward pass per probe (three) on each side.
    empirical_ntk(model, x1, x2, method="loop")
    assert len(calls) == 7 + 5 + 3 + 3
    calls.clear()
    # For the symmetric kernel five probes serve both sides.
    empirical_ntk(model, x1, method="loop")
    assert len(calls) == 7 + 5


def test_frozen_parameters_are_excluded() -> None:
    model = TwoLayerNet(3, 4, 1, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    model.hidden.weight.requires_grad_(False)
    # With W frozen only the readout gradient relu(Wx/sqrt(d))/sqrt(m) remains.
    features = torch.relu(model.hidden(x)) / 2.0
    torch.testing.assert_close(empirical_ntk(model, x), features @ features.T)


def test_parameters_unused_by_the_output_contribute_zero() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 1)
            self.spare = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Unused()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    xx = torch.cat([x, torch.ones(4, 1)], dim=1)
    torch.testing.assert_close(empirical_ntk(model, x), xx @ xx.T)


def test_model_is_left_without_grads() -> None:
    model = TwoLayerNet(3, 4, 1, generator=torch.Generator().manual_seed(0))
    empirical_ntk(model, torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    assert all(p.grad is None for p in model.parameters())


GOOD_X = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("x1", "x2", "error", "match"),
    [
        (GOOD_X[:, :2], None, ValueError, "x1.*shape"),
        (GOOD_X, GOOD_X[:, :2], ValueError, "x2.*shape"),
        (GOOD_X[:0], None, ValueError, "x1.*non-empty"),
        # Integer inputs are accepted (token ids); a model that cannot take them says so, naming x1.
        (torch.ones(4, 3, dtype=torch.int64), None, ValueError, "model cannot be applied to x1"),
        (GOOD_X.double(), None, TypeError, "x1.*float64"),
        (GOOD_X, GOOD_X.to("meta"), ValueError, "x2.*meta"),
        (torch.full((2, 3), float("nan")), None, ValueError, "x1.*NaN"),
        (GOOD_X, torch.full((2, 3), float("inf")), ValueError, "x2.*infinite"),
        (GOOD_X.numpy(), None, TypeError, "x1.*torch.Tensor"),
        (torch.tensor(1.0), None, ValueError, "x1.*non-empty batch"),
    ],
)
def test_bad_inputs_get_clear_errors(x1: object, x2: object, error: type, match: str) -> None:
    model = TwoLayerNet(3, 4, 1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(error, match=match):
        empirical_ntk(model, x1, x2)


def test_model_and_inputs_on_the_meta_device_are_refused() -> None:
    model = TwoLayerNet(3, 4, 2, generator=torch.Generator().manual_seed(0)).to("meta")
    with pytest.raises(ValueError, match="x1 and the model are on the meta device"):
        empirical_ntk(model, GOOD_X.to("meta"))


def test_model_without_trainable_parameters_is_refused() -> None:
    model = TwoLayerNet(3, 4, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        empirical_ntk(model, GOOD_X)


def test_not_a_module_is_refused() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        empirical_ntk(lambda x: x, GOOD_X)


def test_outputs_that_are_not_one_row_per_input_are_refused() -> None:
    class Grid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x).reshape(-1, 2, 3)

    for method in ("loop", "jacobian", "implicit", "structured"):
        with pytest.raises(ValueError, match=r"one output row per input, of shape \(n,\) or \(n, k\)"):
            empirical_ntk(Grid(), GOOD_X, method=method)


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        empirical_ntk(TwoLayerNet(3, 4, 1), GOOD_X, method="magic")
