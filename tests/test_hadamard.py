"""ntkbook.kernels.hadamard_ntk / hadamard_nngp against HadamardNet: constants, limits and argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ntkbook import HadamardNet, default_device, empirical_ntk
from ntkbook.kernels import hadamard_nngp, hadamard_ntk, kappa0, kappa1, relu_nngp, relu_ntk
from ntkbook.plotting import loglog_slope

DEVICE = default_device()


def gaussian_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)


def hadamard_net(d: int, width: int, seed: int, **kwargs: float) -> HadamardNet:
    net = HadamardNet(d, width, 1, generator=torch.Generator().manual_seed(seed), **kwargs)
    return net.double().to(DEVICE)


@pytest.mark.parametrize("stds", [{}, {"weight_std": 1.3, "bias_std": 0.4}])
def test_ntk_is_the_mean_of_finite_width_ntks(stds: dict[str, float]) -> None:
    # For one hidden layer the expected empirical NTK equals the limit at every width (each term is
    # an average of i.i.d. hidden units, and E[v_i^2] = 1), so the mean over networks must agree
    # within its own standard error. 5 standard errors: each entry averages 200 i.i.d. kernels, so
    # a correct formula fails with probability below 1e-5 per entry; a wrong constant is off by 25-100%.
    x = gaussian_inputs(6, 3, seed=0)
    kernels = torch.stack([empirical_ntk(hadamard_net(3, 32, seed, **stds), x) for seed in range(200)])
    mean = kernels.mean(dim=0)
    standard_error = kernels.std(dim=0) / math.sqrt(kernels.shape[0])
    analytic = hadamard_ntk(x, x, **stds)
    assert ((mean - analytic).abs() <= 5 * standard_error).all(), (mean - analytic) / standard_error


@pytest.mark.parametrize("stds", [{}, {"weight_std": 0.8, "bias_std": 0.6}])
def test_nngp_is_the_output_covariance_over_initialisations(stds: dict[str, float]) -> None:
    # E[f(x) f(x')] over initialisations equals the NNGP at every width, for the same reason; 4000
    # networks, 5 standard errors (see above).
    x = gaussian_inputs(5, 4, seed=1)
    with torch.no_grad():
        outputs = torch.stack([hadamard_net(4, 16, 1000 + seed, **stds)(x)[:, 0] for seed in range(4000)])
    products = outputs[:, :, None] * outputs[:, None, :]
    mean = products.mean(dim=0)
    standard_error = products.std(dim=0) / math.sqrt(products.shape[0])
    analytic = hadamard_nngp(x, x, **stds)
    assert ((mean - analytic).abs() <= 5 * standard_error).all(), (mean - analytic) / standard_error


def test_a_single_wide_network_converges_like_inverse_sqrt_width() -> None:
    x = gaussian_inputs(16, 3, seed=2)
    analytic = hadamard_ntk(x, x, bias_std=0.5)
    widths = [64, 256, 1024, 4096]
    errors = []
    for width in widths:
        per_seed = [
            float(torch.linalg.norm(empirical_ntk(hadamard_net(3, width, seed, bias_std=0.5), x) - analytic))
            / float(torch.linalg.norm(analytic))
            for seed in range(6)
        ]
        errors.append(float(np.mean(per_seed)))
    slope = loglog_slope(widths, errors)
    # Central-limit fluctuations give exactly -1/2; 6 seeds per width leave about 10% noise on each
    # mean error, which over a factor-64 range of widths moves the fitted slope by well under 0.15.
    assert abs(slope + 0.5) < 0.15, (slope, errors)
    assert errors[-1] < 0.1, errors


def test_unit_sphere_closed_form_and_norms() -> None:
    d = 3
    x1, x2 = gaussian_inputs(7, d, seed=3), gaussian_inputs(5, d, seed=4)
    r1, r2 = x1.norm(dim=1), x2.norm(dim=1)
    u = (x1 / r1[:, None]) @ (x2 / r2[:, None]).T
    radial = (r1[:, None] * r2[None, :]) ** 2 / (4 * d**2)
    expected = radial * (kappa1(u) ** 2 + 2 * u * kappa0(u) * kappa1(u))
    torch.testing.assert_close(hadamard_ntk(x1, x2), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hadamard_nngp(x1, x2), radial * kappa1(u) ** 2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("stds", [(1.0, 0.0), (1.7, 0.3)])
def test_relation_to_the_plain_relu_network(stds: tuple[float, float]) -> None:
    # Both networks share the branch statistics: the plain hidden covariance Sigma and the derivative
    # kernel Sigma_dot * K can be read off relu_nngp and relu_ntk, and the Hadamard kernels are
    # polynomials in them (see the hadamard_ntk docstring).
    weight_std, bias_std = stds
    x1, x2 = gaussian_inputs(6, 4, seed=5), gaussian_inputs(3, 4, seed=6)
    var_w, var_b = weight_std**2, bias_std**2
    plain_nngp = relu_nngp(x1, x2, weight_std=weight_std, bias_std=bias_std)
    plain_ntk = relu_ntk(x1, x2, weight_std=weight_std, bias_std=bias_std)
    relu_cov = (plain_nngp - var_b) / var_w
    derivative_term = (plain_ntk - plain_nngp) / var_w
    torch.testing.assert_close(
        hadamard_nngp(x1, x2, weight_std=weight_std, bias_std=bias_std), var_w * relu_cov**2 + var_b
    )
    torch.testing.assert_close(
        hadamard_ntk(x1, x2, weight_std=weight_std, bias_std=bias_std),
        var_w * relu_cov**2 + var_b + 2 * var_w * relu_cov * derivative_term,
    )


@pytest.mark.parametrize("c", [0.3, 2.5])
def test_homogeneous_of_degree_four_without_bias(c: float) -> None:
    x1, x2 = gaussian_inputs(6, 3, seed=7), gaussian_inputs(4, 3, seed=8)

    def assert_scaled(scaled: torch.Tensor, reference: torch.Tensor, power: int) -> None:
        # Relative to the largest entry: near-antipodal entries are tiny and carry absolute rounding.
        error = float((scaled - c**power * reference).abs().max() / (c**power * reference).abs().max())
        assert error < 1e-12, error

    assert_scaled(hadamard_ntk(c * x1, c * x2), hadamard_ntk(x1, x2), 4)
    assert_scaled(hadamard_ntk(c * x1, x2), hadamard_ntk(x1, x2), 2)
    assert_scaled(hadamard_nngp(c * x1, c * x2), hadamard_nngp(x1, x2), 4)


def test_symmetric_and_positive_semidefinite() -> None:
    x1, x2 = gaussian_inputs(40, 5, seed=9), gaussian_inputs(30, 5, seed=10)
    for kernel in (hadamard_ntk, hadamard_nngp):
        torch.testing.assert_close(kernel(x1, x2, bias_std=0.2), kernel(x2, x1, bias_std=0.2).T)
        eigenvalues = torch.linalg.eigvalsh(kernel(x1, x1, bias_std=0.2))
        # float64 rounding of a 40x40 Gram matrix is ~1e-14 relative; a non-PSD formula is off by O(1).
        assert float(eigenvalues.min()) >= -1e-12 * float(eigenvalues.max())


def test_zero_input_matches_the_network() -> None:
    x = gaussian_inputs(4, 3, seed=11)
    x[2] = 0.0
    net = hadamard_net(3, 64, seed=0)
    for kernel in (hadamard_ntk(x, x), empirical_ntk(net, x)):
        assert torch.isfinite(kernel).all()
        assert (kernel[2] == 0).all() and (kernel[:, 2] == 0).all()
    with_bias = hadamard_ntk(x, x, bias_std=0.5)
    assert torch.isfinite(with_bias).all() and float(with_bias[2, 2]) > 0


def test_dtype_and_device_follow_the_inputs() -> None:
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    for kernel in (hadamard_ntk(x, x), hadamard_nngp(x, x[:2])):
        assert kernel.dtype == torch.float32 and kernel.device == x.device
    assert hadamard_nngp(x, x[:2]).shape == (3, 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x1": [[1.0, 2.0]]}, TypeError, "x1 must be a torch.Tensor"),
        ({"x1": torch.ones(3, dtype=torch.int64).reshape(3, 1)}, TypeError, "x1 must have a floating dtype"),
        ({"x1": torch.ones(3)}, ValueError, r"x1 must be a non-empty batch of shape \(n, d\)"),
        ({"x2": torch.ones(2, 3)}, ValueError, "x2 must have the input dimension of x1"),
        ({"x2": torch.ones(2, 2, dtype=torch.float64)}, TypeError, "x2 has dtype"),
        ({"x1": torch.tensor([[float("nan"), 1.0]])}, ValueError, "x1 contains NaN"),
        ({"weight_std": -1.0}, ValueError, "weight_std must be a finite non-negative float"),
        ({"bias_std": True}, TypeError, "bias_std must be a non-negative float"),
    ],
)
@pytest.mark.parametrize("kernel", [hadamard_ntk, hadamard_nngp])
def test_bad_arguments_raise_clear_errors(kernel, kwargs: dict, error: type, match: str) -> None:
    arguments = {"x1": torch.ones(2, 2), "x2": torch.ones(1, 2)} | kwargs
    with pytest.raises(error, match=match):
        kernel(**arguments)
