"""ntkbook.kernels, ReLU section: kappa0/kappa1, relu_nngp, relu_ntk and mc_relu_ntk.

Statistical tests use fixed seeds, so they are deterministic; each tolerance says how often it
would fail for a fresh seed.
"""

from __future__ import annotations

import math

import pytest
import torch

import ntkbook.kernels
from ntkbook import empirical_ntk, mlp
from ntkbook.kernels import kappa0, kappa1, mc_relu_ntk, relu_nngp, relu_ntk

# A 3-SE band holds 99.73% of a normal; 4 SE holds all but 6e-5, the bound for single-entry checks.
Z_ENTRY = 4.0


def circle(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    angles = 2 * math.pi * torch.arange(n, dtype=dtype) / n
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- kappa0, kappa1 -------------------------------------------------------------------------------


def test_kappas_at_special_points() -> None:
    u = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(kappa0(u), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(kappa1(u), torch.tensor([0.0, 1 / math.pi, 1.0], dtype=torch.float64))


def test_kappas_are_gaussian_expectations() -> None:
    # 2 E[1(w.x>0) 1(w.x'>0)] = kappa0 and 2 E[relu relu] = kappa1, by quadrature over the angle of w.
    phi = (torch.arange(200_000, dtype=torch.float64) + 0.5) * 2 * math.pi / 200_000
    w = torch.stack([torch.cos(phi), torch.sin(phi)], dim=1)
    for theta in [0.3, 1.7, 2.9]:
        x, xp = (
            torch.tensor([1.0, 0.0], dtype=torch.float64),
            torch.tensor([math.cos(theta), math.sin(theta)], dtype=torch.float64),
        )
        both_on = ((w @ x > 0) & (w @ xp > 0)).double().mean()
        # E[r^2] = 2 for the radius of a 2-d standard normal.
        relu_prod = 2 * (torch.relu(w @ x) * torch.relu(w @ xp)).mean()
        u = torch.tensor(math.cos(theta), dtype=torch.float64)
        torch.testing.assert_close(2 * both_on, kappa0(u), atol=1e-5, rtol=0)
        torch.testing.assert_close(2 * relu_prod, kappa1(u), atol=1e-8, rtol=0)


def test_kappas_clip_rounding_outside_the_unit_interval() -> None:
    u = torch.tensor([1 + 1e-7, -1 - 1e-7], dtype=torch.float32)
    assert torch.isfinite(kappa0(u)).all() and torch.isfinite(kappa1(u)).all()
    torch.testing.assert_close(kappa1(u), torch.tensor([1.0, 0.0]))


def test_kappas_take_cosines_rounded_in_many_dimensions_but_refuse_others() -> None:
    # Cosines of unit vectors in 1e5 dimensions miss [-1, 1] by up to ~100 eps in float64 (sum rounding).
    x = torch.randn(20, 100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    unit = x / x.norm(dim=1, keepdim=True)
    u = torch.cat([unit, -unit]) @ unit.T
    assert torch.isfinite(kappa0(u)).all() and torch.isfinite(kappa1(u)).all()
    with pytest.raises(ValueError, match=r"u must hold cosines in \[-1, 1\], got a value of magnitude 1.01"):
        kappa0(torch.tensor([0.5, 1.01], dtype=torch.float64))


@pytest.mark.parametrize(
    ("u", "error", "match"),
    [
        ([0.5], TypeError, "u must be a torch.Tensor"),
        (torch.tensor([1, 0]), TypeError, "u must have a floating dtype"),
        (torch.tensor([float("nan")]), ValueError, "u contains NaN"),
    ],
)
def test_kappas_reject_bad_input(u: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        kappa1(u)


# --- relu_nngp and relu_ntk: closed forms --------------------------------------------------------


def test_depth_one_is_the_arc_cosine_formula() -> None:
    # Unit inputs in d dimensions: NTK = (u kappa0 + kappa1) / (2d), NNGP = kappa1 / (2d).
    d = 5
    x = gaussian(12, d, 0)
    x = x / x.norm(dim=1, keepdim=True)
    u = x @ x.T
    # sqrt(eps) sensitivity of kappa at u = 1 (see the docstring): 1e-7 covers float64 rounding.
    torch.testing.assert_close(relu_ntk(x, x), (u * kappa0(u) + kappa1(u)) / (2 * d), atol=1e-7, rtol=0)
    torch.testing.assert_close(relu_nngp(x, x), kappa1(u) / (2 * d), atol=1e-7, rtol=0)


def test_he_initialisation_keeps_the_diagonal_and_adds_one_per_layer() -> None:
    # weight_std^2 = 2 makes E[relu(z)^2] = Var z, so Sigma(x, x) = 2|x|^2/d at every layer and
    # Theta(x, x) = Sigma + Theta_prev * 1 grows by 2|x|^2/d per layer.
    x = gaussian(6, 7, 1)
    base = 2 * (x * x).sum(dim=1) / 7
    for depth in [1, 2, 4]:
        torch.testing.assert_close(relu_nngp(x, x, depth, weight_std=math.sqrt(2)).diagonal(), base)
        torch.testing.assert_close(relu_ntk(x, x, depth, weight_std=math.sqrt(2)).diagonal(), (depth + 1) * base)


def test_bias_free_kernels_are_homogeneous_of_degree_two() -> None:
    x1, x2 = gaussian(4, 3, 2), gaussian(5, 3, 3)
    for depth in [1, 3]:
        torch.testing.assert_close(relu_ntk(3 * x1, 0.5 * x2, depth), 1.5 * relu_ntk(x1, x2, depth))


def test_symmetric_and_positive_semidefinite() -> None:
    x = gaussian(40, 4, 4)
    for depth, bias_std in [(1, 0.0), (2, 0.3), (3, 1.0)]:
        for kernel in (relu_nngp(x, x, depth, bias_std=bias_std), relu_ntk(x, x, depth, bias_std=bias_std)):
            torch.testing.assert_close(kernel, kernel.T, atol=1e-12, rtol=0)
            eigenvalues = torch.linalg.eigvalsh(kernel)
            # sqrt(eps) ~ 1e-8 rounding of the diagonal (docstring); a real defect is O(1).
            assert eigenvalues.min() >= -1e-7 * eigenvalues.max()


def test_cross_kernel_is_a_block_of_the_joint_kernel() -> None:
    x1, x2 = gaussian(4, 3, 5), gaussian(6, 3, 6)
    joint = relu_ntk(torch.cat([x1, x2]), torch.cat([x1, x2]), 2, bias_std=0.4)
    torch.testing.assert_close(relu_ntk(x1, x2, 2, bias_std=0.4), joint[:4, 4:])


def test_zero_input_gets_zero_like_the_network() -> None:
    x = torch.cat([torch.zeros(1, 3, dtype=torch.float64), gaussian(3, 3, 7)])
    for depth in [1, 2]:
        kernel = relu_ntk(x, x, depth)
        assert torch.isfinite(kernel).all()
        assert torch.equal(kernel[0], torch.zeros(4, dtype=torch.float64))
        net = mlp(3, 16, depth, generator=torch.Generator().manual_seed(0)).double()
        assert torch.equal(empirical_ntk(net, x)[0], torch.zeros(4, dtype=torch.float64))
    # With a bias the zero input has positive variance and an ordinary, non-zero kernel.
    assert relu_ntk(x, x, 1, bias_std=0.5)[0, 0] > 0


def test_float32_in_float32_out() -> None:
    x = gaussian(5, 3, 8).float()
    assert relu_ntk(x, x).dtype == torch.float32 and relu_nngp(x, x).dtype == torch.float32
    estimate, se = mc_relu_ntk(x, x, 10, generator=torch.Generator().manual_seed(0))
    assert estimate.dtype == se.dtype == torch.float32


# --- relu_nngp and relu_ntk: the limits of ntkbook.mlp ------------------------------------------


@pytest.mark.parametrize(("weight_std", "bias_std"), [(1.0, 0.0), (1.4, 0.5)])
def test_depth_one_is_the_exact_mean_over_networks(weight_std: float, bias_std: float) -> None:
    # One hidden layer: the empirical NTK is an average over i.i.d. hidden units, so its mean over
    # networks equals relu_ntk at ANY width; likewise E[f(x) f(x')] = relu_nngp.
    x = gaussian(5, 3, 9)
    gen = torch.Generator().manual_seed(10)
    kernels, outer = [], []
    for _ in range(300):
        net = mlp(3, 32, 1, weight_std=weight_std, bias_std=bias_std, generator=gen).double()
        kernels.append(empirical_ntk(net, x))
        out = net(x).detach().reshape(-1)
        outer.append(out[:, None] * out[None, :])
    for samples, exact in [(torch.stack(kernels), relu_ntk), (torch.stack(outer), relu_nngp)]:
        se = samples.std(dim=0) / math.sqrt(samples.shape[0])
        z = (samples.mean(dim=0) - exact(x, x, 1, weight_std=weight_std, bias_std=bias_std)) / se
        assert z.abs().max() < Z_ENTRY


@pytest.mark.parametrize(("depth", "bias_std"), [(2, 0.0), (3, 0.5)])
def test_deep_networks_converge_at_rate_one_over_sqrt_width(depth: int, bias_std: float) -> None:
    x = circle(16)
    exact = relu_ntk(x, x, depth, bias_std=bias_std)

    def rms_error(width: int) -> float:
        errors = []
        for seed in range(6):
            net = mlp(2, width, depth, bias_std=bias_std, generator=torch.Generator().manual_seed(seed)).double()
            errors.append(float(torch.linalg.norm(empirical_ntk(net, x) - exact) / torch.linalg.norm(exact)))
        return math.sqrt(sum(e * e for e in errors) / len(errors))

    narrow, wide = rms_error(32), rms_error(1024)
    # 1/sqrt(width) predicts a ratio sqrt(32) = 5.7; a wrong constant in the recursion would leave
    # an error that stops shrinking. An RMS over six seeds is reliable to about 30%, hence 3.5.
    assert narrow / wide > 3.5
    # rms * sqrt(width) measured 2.7-3.6 over 48 seeds for depths 2-3; 6 allows the 30% scatter.
    assert wide * math.sqrt(1024) < 6


# --- mc_relu_ntk -----------------------------------------------------------------------------------


def test_mc_matches_the_per_sample_formula() -> None:
    # The same weight vectors, summed over samples explicitly: checks mean and standard error.
    x1, x2 = gaussian(3, 4, 11), gaussian(5, 4, 12)
    estimate, se = mc_relu_ntk(x1, x2, 50, generator=torch.Generator().manual_seed(13))
    w = torch.randn(50, 4, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    pre1, pre2 = x1 @ w.T, x2 @ w.T
    terms = (
        torch.relu(pre1)[:, None, :] * torch.relu(pre2)[None, :, :]
        + (x1 @ x2.T)[:, :, None] * ((pre1 > 0)[:, None, :] & (pre2 > 0)[None, :, :])
    ) / 4
    torch.testing.assert_close(estimate, terms.mean(dim=2))
    torch.testing.assert_close(se, terms.std(dim=2) / math.sqrt(50))


def test_mc_does_not_depend_on_the_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # A budget of 8 elements for 4 + 4 inputs makes chunks of one sample: 40 draws of randn(1, d),
    # whose sums across chunks must equal the per-sample formula on those same weights.
    x = gaussian(4, 3, 14)
    monkeypatch.setattr(ntkbook.kernels, "_MC_CHUNK_ELEMENTS", 8)
    chunked = mc_relu_ntk(x, x, 40, generator=torch.Generator().manual_seed(15))
    gen = torch.Generator().manual_seed(15)
    w = torch.cat([torch.randn(1, 3, generator=gen, dtype=torch.float64) for _ in range(40)])
    pre = x @ w.T
    terms = (
        torch.relu(pre)[:, None, :] * torch.relu(pre)[None, :, :]
        + (x @ x.T)[:, :, None] * ((pre > 0)[:, None, :] & (pre > 0)[None, :, :])
    ) / 3
    torch.testing.assert_close(chunked[0], terms.mean(dim=2))
    torch.testing.assert_close(chunked[1], terms.std(dim=2) / math.sqrt(40))


def test_mc_agrees_with_relu_ntk_within_standard_errors() -> None:
    x = circle(30)
    exact = relu_ntk(x, x)
    estimate, se = mc_relu_ntk(x, x, 20_000, generator=torch.Generator().manual_seed(16))
    inside = se > 0
    # Only antipodal pairs have no sample with both units on; the exact kernel is 0 there too.
    assert int((~inside).sum()) == 30
    assert exact[~inside].abs().max() < 1e-7 and estimate[~inside].abs().max() == 0
    z = ((estimate - exact) / se)[inside]
    # Entries share samples, so their z-scores are correlated; the largest of 870 correlated
    # normals stays below 4.5 except in about 1 run in 200 (union bound 870 * 6.8e-6 = 0.006).
    assert z.abs().max() < 4.5
    # The standard error has the right size, not just an upper bound: mean z^2 near 1.
    assert 0.5 < float((z * z).mean()) < 2.0


def test_mc_standard_error_falls_like_one_over_sqrt_samples() -> None:
    x = circle(8)
    _, se_small = mc_relu_ntk(x, x, 1_000, generator=torch.Generator().manual_seed(17))
    _, se_large = mc_relu_ntk(x, x, 100_000, generator=torch.Generator().manual_seed(18))
    ok = se_large > 0
    # sqrt(100) = 10; the sample standard deviation at 1000 samples is good to a few percent.
    torch.testing.assert_close(se_small[ok] / se_large[ok], torch.full_like(se_small[ok], 10.0), rtol=0.15, atol=0)


def test_mc_of_zero_input_is_zero() -> None:
    x = torch.cat([torch.zeros(1, 2, dtype=torch.float64), circle(3)])
    estimate, se = mc_relu_ntk(x, x, 100, generator=torch.Generator().manual_seed(19))
    assert torch.equal(estimate[0], torch.zeros(4, dtype=torch.float64)) and torch.equal(se[0], estimate[0])


def test_mc_is_reproducible_from_the_generator() -> None:
    x = circle(5)
    first = mc_relu_ntk(x, x, 300, generator=torch.Generator().manual_seed(20))
    second = mc_relu_ntk(x, x, 300, generator=torch.Generator().manual_seed(20))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# --- argument checks -------------------------------------------------------------------------------

GOOD = gaussian(4, 3, 21)


@pytest.mark.parametrize(
    ("x1", "x2", "error", "match"),
    [
        (GOOD.numpy(), GOOD, TypeError, "x1 must be a torch.Tensor"),
        (GOOD, [[1.0, 2.0, 3.0]], TypeError, "x2 must be a torch.Tensor"),
        (GOOD.long(), GOOD, TypeError, "x1 must have a floating dtype"),
        (GOOD[0], GOOD, ValueError, r"x1 must be a non-empty batch of shape \(n, d\)"),
        (GOOD, GOOD[:0], ValueError, "x2 must be a non-empty batch"),
        (GOOD, GOOD[:, :2], ValueError, "x2 must have the input dimension of x1"),
        (GOOD, GOOD.float(), TypeError, "x2 has dtype torch.float32 but x1 has torch.float64"),
        (GOOD, GOOD.to("meta"), ValueError, "x2 is on meta"),
        (torch.full((2, 3), float("nan"), dtype=torch.float64), GOOD, ValueError, "x1 contains NaN"),
        (GOOD, torch.full((2, 3), float("inf"), dtype=torch.float64), ValueError, "x2 contains NaN or infinite"),
    ],
)
def test_bad_inputs_get_clear_errors(x1: object, x2: object, error: type, match: str) -> None:
    for function in (relu_nngp, relu_ntk):
        with pytest.raises(error, match=match):
            function(x1, x2)
    with pytest.raises(error, match=match):
        mc_relu_ntk(x1, x2, 10)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(depth=0), ValueError, "depth must be a positive int"),
        (dict(depth=1.5), TypeError, "depth must be a positive int"),
        (dict(weight_std=-1.0), ValueError, "weight_std must be a finite non-negative"),
        (dict(bias_std=float("nan")), ValueError, "bias_std must be a finite non-negative"),
        (dict(bias_std="0.1"), TypeError, "bias_std must be a non-negative float"),
    ],
)
def test_bad_hyperparameters_get_clear_errors(kwargs: dict, error: type, match: str) -> None:
    for function in (relu_nngp, relu_ntk):
        with pytest.raises(error, match=match):
            function(GOOD, GOOD, **kwargs)


@pytest.mark.parametrize(
    ("num_samples", "kwargs", "error", "match"),
    [
        (1, {}, ValueError, "num_samples must be >= 2"),
        (10.0, {}, TypeError, "num_samples must be a positive int"),
        (True, {}, TypeError, "num_samples must be a positive int"),
        (10, dict(generator=0), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_mc_bad_arguments_get_clear_errors(num_samples: object, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        mc_relu_ntk(GOOD, GOOD, num_samples, **kwargs)


def test_inputs_of_very_different_norms_do_not_underflow_in_float32() -> None:
    # The variances multiply to 2.5e-47, below float32's range, though their square roots' product does not.
    direction = torch.tensor([[0.6, 0.8]])
    small, large = 1e-17 * direction, 1e-6 * direction
    for kernel in (relu_nngp, relu_ntk):
        exact = kernel(small.double(), large.double())
        assert float(kernel(small, large)) == pytest.approx(float(exact), rel=1e-5) and float(exact) > 0
