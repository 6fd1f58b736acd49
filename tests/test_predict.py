"""ntkbook.predict: the NNGP posterior and the trained infinite ensemble against dense solves, their
limits in time, ntk_predict where the two overlap, and the warnings for ill-conditioned kernels."""

from __future__ import annotations

import warnings

import pytest
import torch

import ntkbook
from ntkbook.predict import nngp_predict, ntk_gp_predict

N, M, K, D = 12, 7, 3, 5


def _blocks(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Analytic ReLU NTK and NNGP blocks on random inputs, and targets with K columns."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    xs = torch.randn(M, D, generator=gen, dtype=torch.float64)
    y = torch.randn(N, K, generator=gen, dtype=torch.float64)
    kw = dict(depth=2, bias_std=0.5)
    blocks = {
        "ntk_train": ntkbook.relu_ntk(x, x, **kw),
        "ntk_test_train": ntkbook.relu_ntk(xs, x, **kw),
        "nngp_train": ntkbook.relu_nngp(x, x, **kw),
        "nngp_test_train": ntkbook.relu_nngp(xs, x, **kw),
        "nngp_test": ntkbook.relu_nngp(xs, xs, **kw),
        "y": y,
    }
    return {name: block.to(dtype) for name, block in blocks.items()}


def _transfer(b: dict[str, torch.Tensor], t: float | None, lr: float, reg: float = 0.0) -> torch.Tensor:
    """A = Θ(x*, X) Θ^{-1} (I - expm(-γ Θ t)) by a dense solve and matrix_exp."""
    theta = b["ntk_train"] + reg * b["ntk_train"].diagonal().mean() * torch.eye(N, dtype=torch.float64)
    if t is None:
        return torch.linalg.solve(theta, b["ntk_test_train"].T).T
    gamma = 2 * lr / b["y"].numel()
    decay = torch.eye(N, dtype=torch.float64) - torch.linalg.matrix_exp(-gamma * t * theta)
    return b["ntk_test_train"] @ torch.linalg.solve(theta, decay)


def _ensemble(b: dict[str, torch.Tensor], **kwargs: object) -> ntkbook.GaussianPrediction:
    return ntk_gp_predict(
        b["ntk_train"],
        b["ntk_test_train"],
        b["y"],
        nngp_train=b["nngp_train"],
        nngp_test_train=b["nngp_test_train"],
        nngp_test=b["nngp_test"],
        **kwargs,
    )


@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_nngp_posterior_equals_a_dense_solve(reg: float) -> None:
    b = _blocks()
    kernel = b["nngp_train"] + reg * b["nngp_train"].diagonal().mean() * torch.eye(N, dtype=torch.float64)
    weights = torch.linalg.solve(kernel, b["nngp_test_train"].T).T
    out = nngp_predict(b["nngp_train"], b["nngp_test_train"], b["y"], b["nngp_test"], diag_reg=reg)
    torch.testing.assert_close(out.mean, weights @ b["y"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.covariance, b["nngp_test"] - weights @ b["nngp_test_train"].T, rtol=1e-9, atol=1e-12)
    # Noise-free posterior: the mean interpolates the targets and the variance vanishes on the training inputs.
    on_train = nngp_predict(b["nngp_train"], b["nngp_train"], b["y"], b["nngp_train"])
    torch.testing.assert_close(on_train.mean, b["y"], rtol=0, atol=1e-9)
    assert float(on_train.covariance.diagonal().abs().max()) < 1e-9
    assert nngp_predict(b["nngp_train"], b["nngp_test_train"], b["y"]).covariance is None


@pytest.mark.parametrize(("t", "lr", "reg"), [(None, 1.0, 0.0), (None, 1.0, 0.05), (3.0, 0.5, 0.0), (40.0, 2.0, 0.1)])
def test_ntk_ensemble_equals_a_dense_solve(t: float | None, lr: float, reg: float) -> None:
    b = _blocks()
    a = _transfer(b, t, lr, reg)
    expected_cov = b["nngp_test"] + a @ b["nngp_train"] @ a.T - a @ b["nngp_test_train"].T - b["nngp_test_train"] @ a.T
    out = _ensemble(b, t=t, learning_rate=lr, diag_reg=reg)
    torch.testing.assert_close(out.mean, a @ b["y"], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out.covariance, expected_cov, rtol=1e-8, atol=1e-10)
    assert out.mean.dtype == torch.float64 and out.mean.shape == (M, K) and out.covariance.shape == (M, M)


def test_covariance_is_that_of_the_trained_random_function() -> None:
    """Σ_t is the covariance of f0(x*) + A (Y - f0(X)) for f0 drawn from the NNGP: checked by 20,000 draws,
    each entry within 5 standard errors (sampled covariance of a Gaussian: SE^2 = (Σ_ii Σ_jj + Σ_ij^2) / S)."""
    b = _blocks()
    t, lr = 5.0, 1.0
    a = _transfer(b, t, lr)
    joint = torch.cat(
        [torch.cat([b["nngp_train"], b["nngp_test_train"].T], 1), torch.cat([b["nngp_test_train"], b["nngp_test"]], 1)]
    )
    samples = 20_000
    draws = torch.distributions.MultivariateNormal(
        torch.zeros(N + M, dtype=torch.float64), joint + 1e-12 * torch.eye(N + M, dtype=torch.float64)
    )
    torch.manual_seed(0)  # torch.distributions samples from the global generator only
    f0 = draws.sample((samples,))
    trained = f0[:, N:] - f0[:, :N] @ a.T  # the ensemble's random part; the mean A Y is deterministic
    sampled = trained.T @ trained / samples
    cov = _ensemble(b, t=t, learning_rate=lr).covariance
    se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / samples).sqrt()
    assert float(((sampled - cov).abs() / se).max()) < 5


def test_time_limits() -> None:
    b = _blocks()
    start = _ensemble(b, t=0.0)
    assert float(start.mean.abs().max()) == 0.0  # untrained networks average to zero
    torch.testing.assert_close(start.covariance, b["nngp_test"], rtol=0, atol=1e-14)  # ... and follow the NNGP
    # First order in t: A ≈ γ t Θ(x*, X), with a relative error of order γ t λ_max.
    t, gamma = 1e-6, 2.0 / b["y"].numel()
    early = _ensemble(b, t=t).mean
    first_order = gamma * t * b["ntk_test_train"] @ b["y"]
    lam_max = float(torch.linalg.eigvalsh(b["ntk_train"])[-1])
    assert float((early - first_order).norm() / first_order.norm()) < gamma * t * lam_max
    # Late: the slowest mode decays as exp(-γ λ_min t), so t = 50 / (γ λ_min) matches t = None to e^-50.
    lam_min = float(torch.linalg.eigvalsh(b["ntk_train"])[0])
    late, end = _ensemble(b, t=50 / (gamma * lam_min)), _ensemble(b)
    torch.testing.assert_close(late.mean, end.mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(late.covariance, end.covariance, rtol=1e-8, atol=1e-10)


def test_ntk_with_the_nngp_as_its_kernel_is_the_nngp_posterior() -> None:
    """With Θ = K, A = K(x*, X) K^{-1}: the trained ensemble at t -> ∞ is exactly the Bayesian posterior."""
    b = _blocks()
    ens = ntk_gp_predict(
        b["nngp_train"],
        b["nngp_test_train"],
        b["y"],
        nngp_train=b["nngp_train"],
        nngp_test_train=b["nngp_test_train"],
        nngp_test=b["nngp_test"],
    )
    post = nngp_predict(b["nngp_train"], b["nngp_test_train"], b["y"], b["nngp_test"])
    torch.testing.assert_close(ens.mean, post.mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ens.covariance, post.covariance, rtol=1e-7, atol=1e-9)


def test_matches_ntk_predict_and_trains_like_train() -> None:
    """ntk_predict is gradient descent with lr; ntk_gp_predict its gradient flow with γ = 2 lr / (n k).

    Their filters differ by |(1 - x)^t - e^{-xt}| <= t x^2 / (1 - x) per eigenvalue, x = γλ, which bounds
    the difference of the means; at t = ∞ both are Θ(x*, X) Θ^{-1} Y. k outputs are k scalar problems
    each with the learning rate divided by k (train's mean runs over all n k entries)."""
    b = _blocks()
    theta, y = b["ntk_train"], b["y"]
    eigenvalues = torch.linalg.eigvalsh(theta)
    zeros = torch.zeros(N, dtype=torch.float64)
    for lr, steps in [(0.05, 200), (0.02, 5000)]:
        flow = ntk_gp_predict(theta, b["ntk_test_train"], y, t=float(steps), learning_rate=lr).mean
        x = 2 * (lr / K) / N * eigenvalues
        bound = float((steps * x**2 / (1 - x) / eigenvalues).max()) * float(
            torch.linalg.matrix_norm(b["ntk_test_train"], 2)
        )
        for c in range(K):
            single = ntk_gp_predict(theta, b["ntk_test_train"], y[:, c], t=float(steps), learning_rate=lr / K).mean
            torch.testing.assert_close(flow[:, c], single, rtol=1e-10, atol=1e-12)
            steps_out = ntkbook.ntk_predict(
                theta, zeros, y[:, c], lr=lr / K, steps=steps, kernel_test=b["ntk_test_train"], f0_test=zeros[:M]
            ).test
            gap = float((steps_out - single).norm())
            assert gap <= bound * float(y[:, c].norm()), (gap, bound)
            assert gap > 0  # the two are different dynamics; the bound is what makes them agree
    end = ntk_gp_predict(theta, b["ntk_test_train"], y[:, 0]).mean
    lr = 0.9 * ntkbook.critical_lr(theta)
    long_run = ntkbook.ntk_predict(
        theta, zeros, y[:, 0], lr=lr, steps=10**7, kernel_test=b["ntk_test_train"], f0_test=zeros[:M]
    ).test
    torch.testing.assert_close(long_run, end, rtol=1e-7, atol=1e-9)


def test_dtypes_and_shapes_follow_the_inputs() -> None:
    b = _blocks(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the float32 NTK is ill-conditioned at sqrt(eps)
        out = _ensemble(b, t=10.0)
        flat = nngp_predict(b["nngp_train"], b["nngp_test_train"], b["y"][:, 0], b["nngp_test"])
    assert out.mean.dtype == torch.float32 and out.covariance.dtype == torch.float32
    assert flat.mean.shape == (M,) and flat.covariance.shape == (M, M)


def test_ill_conditioning_warns_and_singularity_is_refused() -> None:
    b = _blocks()
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    low_rank = x @ x.T  # rank 2: singular
    nearly = low_rank + 1e-9 * torch.eye(N, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="condition number"):
        nngp_predict(nearly, b["nngp_test_train"], b["y"])
    with pytest.warns(RuntimeWarning, match="condition number"):
        ntk_gp_predict(nearly, b["ntk_test_train"], b["y"])
    with pytest.raises(ValueError, match="diag_reg"):
        ntk_gp_predict(low_rank, b["ntk_test_train"], b["y"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finite t filters small eigenvalues: no warning, finite output
        out = ntk_gp_predict(low_rank, b["ntk_test_train"], b["y"], t=100.0)
        assert torch.isfinite(out.mean).all()
        nngp_predict(low_rank, b["nngp_test_train"], b["y"], diag_reg=0.01)
