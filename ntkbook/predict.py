"""From kernels to predictions: the NNGP posterior and the trained infinite-width ensemble.

Two Gaussian processes over functions, both from the infinite-width limit of a network (Lee et al. 2019):

- :func:`nngp_predict`: the exact Bayesian posterior when the prior over functions is the NNGP
  :math:`\\mathcal{GP}(0, \\mathcal K)` and the targets are observed without noise (or with noise
  ``diag_reg``).
- :func:`ntk_gp_predict`: the distribution of the outputs of infinitely many infinitely wide networks,
  each initialised at random (so its initial function is a draw from the NNGP) and trained for time ``t``
  by gradient descent on the mean squared error (the NTK :math:`\\Theta` governs the training).

Both take kernel blocks on the training inputs :math:`X` ``(n, n)``, between the test inputs :math:`x_*`
and :math:`X` ``(m, n)`` and on the test inputs ``(m, m)``, and targets ``y_train`` ``(n,)`` or ``(n, k)``.
The ``k`` outputs are independent and share one covariance, as the outputs of a network do at infinite
width. Linear algebra goes through one eigendecomposition of the train kernel, never an inverse.

Introduced in chapter "From kernel to predictions" (:doc:`/chapters/04_predictions`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch

from ntkbook._checks import finite, positive_float, rounding_tolerance, std, symmetric


@dataclass
class GaussianPrediction:
    """A Gaussian over the outputs on the test inputs.

    - ``mean``: ``(m,)`` or ``(m, k)``, shaped like ``y_train`` with ``m`` rows.
    - ``covariance``: ``(m, m)``, the covariance of every output column (the ``k`` outputs are independent
      with this same covariance), or ``None`` when the blocks it needs were not given.

    Introduced in chapter "From kernel to predictions" (:doc:`/chapters/04_predictions`).
    """

    mean: torch.Tensor
    covariance: torch.Tensor | None


def _matrix(
    name: str, value: object, shape: tuple[int | None, int | None], reference: torch.Tensor | None
) -> torch.Tensor:
    """A finite floating matrix of ``shape`` (``None``: any length), with ``reference``'s dtype and device."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    expected = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
    if value.ndim != 2 or any(s is not None and s != v for s, v in zip(shape, value.shape)):
        raise ValueError(f"{name} must be a matrix of shape {expected}, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if reference is not None and (value.dtype != reference.dtype or value.device != reference.device):
        raise TypeError(
            f"{name} must have the train kernel's dtype and device ({reference.dtype}, {reference.device}), "
            f"got ({value.dtype}, {value.device})"
        )
    finite(name, value)
    return value.detach()


def _symmetric(name: str, value: object, n: int | None, reference: torch.Tensor | None) -> torch.Tensor:
    """A symmetric ``(n, n)`` kernel, ``n >= 1``; asymmetry beyond rounding (sqrt(eps) of the largest entry)
    means a cross kernel or a wrong block was passed, which eigh would misread without a word."""
    kernel = _matrix(name, value, (n, n), reference)
    if kernel.shape[0] != kernel.shape[1] or kernel.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square (n, n) kernel, got shape {tuple(kernel.shape)}")
    symmetric(name, kernel, "a symmetric kernel k(X, X)")
    return kernel


def _targets(y_train: object, n: int, reference: torch.Tensor) -> torch.Tensor:
    if not isinstance(y_train, torch.Tensor):
        raise TypeError(f"y_train must be a torch.Tensor, got {type(y_train).__name__}")
    if y_train.ndim not in (1, 2) or y_train.shape[0] != n:
        raise ValueError(
            f"y_train must have shape ({n},) or ({n}, k), one row per training input, got {tuple(y_train.shape)}"
        )
    if y_train.dtype != reference.dtype or y_train.device != reference.device:
        raise TypeError(
            f"y_train must have the train kernel's dtype and device ({reference.dtype}, {reference.device}), "
            f"got ({y_train.dtype}, {y_train.device})"
        )
    finite("y_train", y_train)
    return y_train.detach()


def _eigh(name: str, kernel: torch.Tensor, diag_reg: float, *, invert: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and vectors of ``kernel + diag_reg * mean(diag kernel) * I``.

    Refuses a kernel with an eigenvalue below ``-sqrt(eps) * lambda_max`` (not PSD: rounding leaves a
    computed PSD kernel within that), and, when it is to be inverted, one with no positive smallest
    eigenvalue; warns when the condition number exceeds ``1/sqrt(eps)`` (the solve keeps fewer than half
    the digits of the dtype).
    """
    regularised = kernel + diag_reg * kernel.diagonal().mean() * torch.eye(
        kernel.shape[0], dtype=kernel.dtype, device=kernel.device
    )
    eigenvalues, vectors = torch.linalg.eigh(regularised)
    largest, smallest = float(eigenvalues[-1]), float(eigenvalues[0])
    tolerance = rounding_tolerance(kernel.dtype)
    if largest <= 0 or smallest < -tolerance * largest:
        raise ValueError(
            f"{name} must be positive semi-definite, but its eigenvalues run from {smallest:.3g} to {largest:.3g}"
        )
    if invert:
        if smallest <= 0:
            raise ValueError(
                f"{name} is singular (smallest eigenvalue {smallest:.3g}, largest {largest:.3g}); "
                "pass diag_reg > 0 to regularise it"
            )
        condition = largest / smallest
        if condition > 1 / tolerance:
            warnings.warn(
                f"{name} is ill-conditioned: condition number {condition:.3g} > {1 / tolerance:.3g} in "
                f"{kernel.dtype}, so the solve keeps fewer than half the digits; use float64 or diag_reg > 0",
                RuntimeWarning,
                stacklevel=3,
            )
    return eigenvalues, vectors


def nngp_predict(
    nngp_train: torch.Tensor,
    nngp_test_train: torch.Tensor,
    y_train: torch.Tensor,
    nngp_test: torch.Tensor | None = None,
    *,
    diag_reg: float = 0.0,
) -> GaussianPrediction:
    """Exact posterior of the NNGP prior given the training data (Lee et al. 2018; Rasmussen & Williams 2006, eq. 2.19).

    With :math:`\\mathcal K = \\mathcal K(X, X) + \\epsilon\\,\\overline{\\mathrm{diag}\\,\\mathcal K}\\, I`
    (``diag_reg`` :math:`= \\epsilon` times the mean of its diagonal, the noise variance of the observations),

    .. math::

        \\mu(x_*) = \\mathcal K(x_*, X)\\,\\mathcal K^{-1} Y, \\qquad
        \\Sigma(x_*, x_*) = \\mathcal K(x_*, x_*) - \\mathcal K(x_*, X)\\,\\mathcal K^{-1}\\,\\mathcal K(X, x_*).

    Args:
        nngp_train: :math:`\\mathcal K(X, X)` ``(n, n)``, symmetric positive semi-definite.
        nngp_test_train: :math:`\\mathcal K(x_*, X)` ``(m, n)``.
        y_train: targets ``(n,)`` or ``(n, k)``.
        nngp_test: :math:`\\mathcal K(x_*, x_*)` ``(m, m)``, for the covariance (optional).
        diag_reg: :math:`\\epsilon \\ge 0`.

    Returns:
        A :class:`GaussianPrediction`: mean shaped like ``y_train`` with ``m`` rows, covariance ``(m, m)`` or None.

    Raises:
        ValueError: shapes that do not fit, NaN or infinite entries, a train kernel that is not symmetric,
            not PSD or singular (pass ``diag_reg``). An ill-conditioned one gives a ``RuntimeWarning``
            with its condition number.

    Introduced in chapter "From kernel to predictions" (:doc:`/chapters/04_predictions`).
    """
    nngp_train = _symmetric("nngp_train", nngp_train, None, None)
    n = nngp_train.shape[0]
    nngp_test_train = _matrix("nngp_test_train", nngp_test_train, (None, n), nngp_train)
    y_train = _targets(y_train, n, nngp_train)
    if nngp_test is not None:
        nngp_test = _symmetric("nngp_test", nngp_test, nngp_test_train.shape[0], nngp_train)
    diag_reg = std("diag_reg", diag_reg)

    eigenvalues, vectors = _eigh("nngp_train", nngp_train, diag_reg, invert=True)
    # K(x*, X) K^{-1} = (K(x*, X) V) diag(1/lambda) V^T, one (m, n) matrix for the mean and the covariance.
    projected = nngp_test_train @ vectors
    weights = (projected / eigenvalues) @ vectors.T
    mean = weights @ y_train
    covariance = None
    if nngp_test is not None:
        covariance = nngp_test - (projected / eigenvalues) @ projected.T
        covariance = (covariance + covariance.T) / 2
    return GaussianPrediction(mean, covariance)


def ntk_gp_predict(
    ntk_train: torch.Tensor,
    ntk_test_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    nngp_train: torch.Tensor | None = None,
    nngp_test_train: torch.Tensor | None = None,
    nngp_test: torch.Tensor | None = None,
    t: float | None = None,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
) -> GaussianPrediction:
    """Mean and covariance of the infinite ensemble of infinitely wide networks trained for time ``t``
    (Lee et al. 2019, eq. 16).

    The loss and the learning rate are those of :func:`~ntkbook.training.train` with ``alpha=1``: the
    mean squared error over all ``n k`` entries of ``y_train``, :math:`L = \\frac{1}{nk}\\lVert f(X) - Y\\rVert^2`,
    and steps :math:`\\theta \\leftarrow \\theta - \\eta \\nabla L` with :math:`\\eta` = ``learning_rate``.
    At infinite width the outputs follow the gradient flow
    :math:`\\frac{d}{dt} f_t(X) = -\\gamma\\,\\Theta\\,(f_t(X) - Y)` with :math:`\\gamma = 2\\eta/(nk)` and
    ``t`` counted in steps, so ``train(steps=t, lr=learning_rate)`` approaches this prediction as the width
    grows (up to the difference between :math:`(1 - \\gamma\\lambda)^t` and :math:`e^{-\\gamma\\lambda t}`,
    at most :math:`t(\\gamma\\lambda)^2/(1-\\gamma\\lambda)` per eigenvalue with :math:`\\gamma\\lambda < 1`,
    and zero at ``t = None``).
    The network's initial function is a draw :math:`f_0 \\sim \\mathcal{GP}(0, \\mathcal K)` from the NNGP,
    and with :math:`A = \\Theta(x_*, X)\\,\\Theta^{-1}(I - e^{-\\gamma\\Theta t})` ``(m, n)``,

    .. math::

        f_t(x_*) = f_0(x_*) + A\\,(Y - f_0(X)), \\qquad
        \\mu_t = A\\,Y, \\qquad
        \\Sigma_t = \\mathcal K(x_*, x_*) + A\\,\\mathcal K(X, X)\\,A^\\top
        - A\\,\\mathcal K(X, x_*) - \\mathcal K(x_*, X)\\,A^\\top.

    ``t = None`` is :math:`t \\to \\infty`, where :math:`A = \\Theta(x_*, X)\\Theta^{-1}`. ``diag_reg``
    :math:`= \\epsilon` adds :math:`\\epsilon\\,\\overline{\\mathrm{diag}\\,\\Theta}\\, I` to :math:`\\Theta`
    (in both places it appears in :math:`A`); the NNGP blocks stay as given (the convention of
    neural-tangents' ``predict.gradient_descent_mse_ensemble``).

    Args:
        ntk_train: :math:`\\Theta(X, X)` ``(n, n)``, symmetric positive semi-definite.
        ntk_test_train: :math:`\\Theta(x_*, X)` ``(m, n)``.
        y_train: targets ``(n,)`` or ``(n, k)``; ``k`` enters :math:`\\gamma` as in ``train``'s mean.
        nngp_train, nngp_test_train, nngp_test: :math:`\\mathcal K` on ``(n, n)``, ``(m, n)``, ``(m, m)``:
            all three for the covariance, or none.
        t: training time in steps, ``>= 0``, or ``None`` for the end of training.
        learning_rate: :math:`\\eta > 0`, the ``lr`` of :func:`~ntkbook.training.train`.
        diag_reg: :math:`\\epsilon \\ge 0`.

    Returns:
        A :class:`GaussianPrediction`: mean shaped like ``y_train`` with ``m`` rows, covariance ``(m, m)`` or None.

    Raises:
        ValueError: shapes that do not fit, NaN or infinite entries, kernels that are not symmetric or
            (``ntk_train``) not PSD, a singular ``ntk_train`` at ``t = None`` (pass ``diag_reg``), only some
            NNGP blocks. At ``t = None`` an ill-conditioned ``ntk_train`` gives a ``RuntimeWarning`` with its
            condition number; at finite ``t`` the filter :math:`(1 - e^{-\\gamma\\lambda t})/\\lambda \\le \\gamma t`
            stays bounded, so small eigenvalues do no harm.

    Introduced in chapter "From kernel to predictions" (:doc:`/chapters/04_predictions`).
    """
    ntk_train = _symmetric("ntk_train", ntk_train, None, None)
    n = ntk_train.shape[0]
    ntk_test_train = _matrix("ntk_test_train", ntk_test_train, (None, n), ntk_train)
    m = ntk_test_train.shape[0]
    y_train = _targets(y_train, n, ntk_train)
    blocks = {"nngp_train": nngp_train, "nngp_test_train": nngp_test_train, "nngp_test": nngp_test}
    given = [name for name, block in blocks.items() if block is not None]
    if given and len(given) < 3:
        missing = ", ".join(name for name in blocks if name not in given)
        raise ValueError(f"the covariance needs all three NNGP blocks: {missing} missing (or pass none of them)")
    if given:
        nngp_train = _symmetric("nngp_train", nngp_train, n, ntk_train)
        nngp_test_train = _matrix("nngp_test_train", nngp_test_train, (m, n), ntk_train)
        nngp_test = _symmetric("nngp_test", nngp_test, m, ntk_train)
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise TypeError(f"t must be a real number >= 0 or None, got {type(t).__name__} {t!r}")
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"t must be a finite number >= 0 or None (t -> infinity), got {t}")
    learning_rate = positive_float("learning_rate", learning_rate)
    diag_reg = std("diag_reg", diag_reg)

    eigenvalues, vectors = _eigh("ntk_train", ntk_train, diag_reg, invert=t is None)
    if t is None:
        filtered = 1.0 / eigenvalues
    else:
        # Theta^{-1}(I - exp(-gamma Theta t)) on each eigenvector: -expm1(-g t)/lambda, accurate for tiny
        # gamma lambda t, and its limit gamma t where lambda is 0 (or negative by rounding).
        gamma = 2.0 * learning_rate / y_train.numel()
        safe = torch.where(eigenvalues > 0, eigenvalues, torch.ones_like(eigenvalues))
        filtered = torch.where(
            eigenvalues > 0, -torch.expm1(-gamma * t * safe) / safe, torch.full_like(safe, gamma * t)
        )
    transfer = ((ntk_test_train @ vectors) * filtered) @ vectors.T  # A, (m, n)
    mean = transfer @ y_train
    covariance = None
    if given:
        cross = transfer @ nngp_test_train.T  # A K(X, x*)
        covariance = nngp_test + transfer @ nngp_train @ transfer.T - cross - cross.T
        covariance = (covariance + covariance.T) / 2
    return GaussianPrediction(mean, covariance)
