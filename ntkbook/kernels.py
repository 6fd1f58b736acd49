"""Analytic infinite-width kernels of ReLU networks.

The arc-cosine kernels of degree 0 and 1 (Cho & Saul 2009) are the building blocks: for
:math:`w \\sim \\mathcal N(0, I)` and unit vectors with :math:`u = \\langle x, x' \\rangle`,

.. math::

    \\mathbb E[\\mathbf 1(w\\cdot x > 0)\\, \\mathbf 1(w\\cdot x' > 0)] = \\tfrac12 \\kappa_0(u), \\qquad
    \\mathbb E[\\mathrm{relu}(w\\cdot x)\\, \\mathrm{relu}(w\\cdot x')] = \\tfrac12 \\kappa_1(u),

.. math::

    \\kappa_0(u) = \\frac{\\pi - \\arccos u}{\\pi}, \\qquad
    \\kappa_1(u) = \\frac{u(\\pi - \\arccos u) + \\sqrt{1 - u^2}}{\\pi}.

Introduced in chapter 3 (:doc:`/chapters/03_arccos_kernel`).
"""

from __future__ import annotations

import math

import torch

from ntkbook._checks import finite, positive_int, rounding_tolerance, std
from ntkbook._checks import generator as check_generator


def _as_cosine(u: object) -> torch.Tensor:
    """``u`` clipped to [-1, 1], refusing values outside it by more than rounding."""
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u must be a torch.Tensor of cosines, got {type(u).__name__}")
    if not u.is_floating_point():
        raise TypeError(f"u must have a floating dtype, got {u.dtype}")
    finite("u", u)
    excess = float((u.abs() - 1.0).max()) if u.numel() else 0.0
    if excess > rounding_tolerance(u.dtype):
        raise ValueError(
            f"u must hold cosines in [-1, 1], got a value of magnitude {1.0 + excess:g}; only rounding "
            f"errors (up to {rounding_tolerance(u.dtype):.1e} in {u.dtype}) are clipped"
        )
    # arccos would give NaN for a cosine that rounding put just outside [-1, 1].
    return u.clamp(-1.0, 1.0)


def _kappa0(u: torch.Tensor) -> torch.Tensor:
    return (math.pi - torch.arccos(u)) / math.pi


def _kappa1(u: torch.Tensor) -> torch.Tensor:
    return (u * (math.pi - torch.arccos(u)) + torch.sqrt(1.0 - u * u)) / math.pi


def kappa0(u: torch.Tensor) -> torch.Tensor:
    """Arc-cosine kernel of degree 0, :math:`\\kappa_0(u) = (\\pi - \\arccos u)/\\pi`, elementwise.

    ``u`` holds cosines: values outside [-1, 1] by a rounding error are clipped, others refused."""
    return _kappa0(_as_cosine(u))


def kappa1(u: torch.Tensor) -> torch.Tensor:
    """Arc-cosine kernel of degree 1, :math:`\\kappa_1(u) = (u(\\pi - \\arccos u) + \\sqrt{1-u^2})/\\pi`, elementwise.

    ``u`` holds cosines: values outside [-1, 1] by a rounding error are clipped, others refused."""
    return _kappa1(_as_cosine(u))


# --- ReLU multilayer perceptrons: NNGP and NTK by the layer recursion, and a Monte-Carlo check ---
# The exact infinite-width limits of ``ntkbook.mlp(..., parameterization="ntk")``.

_MC_CHUNK_ELEMENTS = 2**22


def _check_batch_shape(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, d), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty batch of shape (n, d) with n, d >= 1, got shape {tuple(x.shape)}")
    return x


def _check_pair(x1: object, x2: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches ``(n1, d)`` and ``(n2, d)`` of one floating dtype, on one device, finite."""
    x1 = _check_batch_shape("x1", x1)
    x2 = _check_batch_shape("x2", x2)
    if x2.shape[1] != x1.shape[1]:
        raise ValueError(f"x2 must have the input dimension of x1 ({x1.shape[1]}), got shape {tuple(x2.shape)}")
    if x2.dtype != x1.dtype:
        raise TypeError(f"x2 has dtype {x2.dtype} but x1 has {x1.dtype}; pass both in one dtype")
    if x2.device != x1.device:
        raise ValueError(f"x2 is on {x2.device} but x1 is on {x1.device}")
    finite("x1", x1)
    finite("x2", x2)
    return x1, x2


def _input_covariance(
    x1: torch.Tensor, x2: torch.Tensor, var_w: float, var_b: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First-layer pre-activation covariances :math:`\\sigma_w^2 \\langle x, x'\\rangle / d + \\sigma_b^2`:
    ``(cross (n1, n2), diag1 (n1,), diag2 (n2,))``."""
    fan_in = x1.shape[1]
    cross = var_w * (x1 @ x2.T) / fan_in + var_b
    diag1 = var_w * (x1 * x1).sum(dim=1) / fan_in + var_b
    diag2 = var_w * (x2 * x2).sum(dim=1) / fan_in + var_b
    return cross, diag1, diag2


def _scale_and_cosine(
    cross: torch.Tensor, diag1: torch.Tensor, diag2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:math:`\\sqrt{\\Sigma(x,x)\\Sigma(x',x')}` and the cosine :math:`\\rho` of a covariance.

    A pre-activation of variance 0 is identically 0, so relu and relu' vanish there: any cosine
    gives the right (zero) terms, and 0 is the continuous extension that keeps them finite."""
    product = diag1[:, None] * diag2[None, :]
    # The root of the product is exact for x with itself (cosine 1, where kappa0 has infinite slope), but
    # the product can underflow where the scale itself does not: inputs of norms 1e-17 and 1e-6 in
    # float32 have a scale of 1e-23 and a product below 1e-45. There the product of the roots is used.
    underflow = product < torch.finfo(product.dtype).tiny
    scale = torch.where(underflow, torch.sqrt(diag1)[:, None] * torch.sqrt(diag2)[None, :], torch.sqrt(product))
    positive = scale > 0
    cosine = torch.where(positive, cross / torch.where(positive, scale, 1.0), 0.0)
    # |cross| <= scale by Cauchy-Schwarz, so a cosine outside [-1, 1] is rounding, however many inputs
    # summed into it.
    return scale, cosine.clamp(-1.0, 1.0)


def _relu_recursion(
    x1: object, x2: object, depth: object, weight_std: object, bias_std: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recursion of :func:`relu_ntk` and return ``(nngp, ntk)`` of the readout."""
    x1, x2 = _check_pair(x1, x2)
    depth = positive_int("depth", depth)
    var_w = std("weight_std", weight_std) ** 2
    var_b = std("bias_std", bias_std) ** 2
    cross, diag1, diag2 = _input_covariance(x1, x2, var_w, var_b)
    ntk = cross
    for _ in range(depth):
        scale, cosine = _scale_and_cosine(cross, diag1, diag2)
        cross = 0.5 * var_w * scale * _kappa1(cosine) + var_b
        derivative = 0.5 * var_w * _kappa0(cosine)
        ntk = cross + ntk * derivative
        # kappa1(1) = 1, so the variances follow the same map without a cosine.
        diag1 = 0.5 * var_w * diag1 + var_b
        diag2 = 0.5 * var_w * diag2 + var_b
    return cross, ntk


def relu_nngp(
    x1: torch.Tensor,
    x2: torch.Tensor,
    depth: int = 1,
    *,
    weight_std: float = 1.0,
    bias_std: float = 0.0,
) -> torch.Tensor:
    """Infinite-width NNGP covariance :math:`\\Sigma(x, x') = \\mathbb E[f(x) f(x')]` of a ReLU MLP.

    The network is ``mlp(d, width, depth, parameterization="ntk", weight_std=sigma_w,
    bias_std=sigma_b)`` as width goes to infinity: every layer, readout included, computes
    :math:`z = (\\sigma_w/\\sqrt{\\text{fan-in}}) W a + \\sigma_b b` with standard normal ``W``, ``b``.
    With :math:`\\Sigma^{(1)}(x, x') = \\sigma_w^2 \\langle x, x'\\rangle / d + \\sigma_b^2` and, for
    each of the ``depth`` ReLU layers (Jacot, Gabriel & Hongler 2018; Cho & Saul 2009),

    .. math::

        \\Sigma^{(l+1)}(x, x') = \\tfrac{\\sigma_w^2}{2} \\sqrt{\\Sigma^{(l)}(x,x)\\Sigma^{(l)}(x',x')}\\,
        \\kappa_1(\\rho^{(l)}) + \\sigma_b^2, \\qquad
        \\rho^{(l)} = \\frac{\\Sigma^{(l)}(x, x')}{\\sqrt{\\Sigma^{(l)}(x,x)\\Sigma^{(l)}(x',x')}},

    the result is :math:`\\Sigma^{(\\text{depth}+1)}`. An input whose pre-activation variance is zero
    (zero norm and ``bias_std = 0``) makes the network output identically zero, and gets covariance
    0 with every input: the continuous extension of the formula.

    Accuracy: :math:`\\kappa_0` has infinite slope at :math:`\\rho = \\pm 1`, so a rounding error
    :math:`\\varepsilon` in a cosine becomes an error of order :math:`\\sqrt{\\varepsilon}` in
    :func:`relu_ntk`, even for identical inputs: about :math:`10^{-8}` relative in float64 and
    :math:`10^{-4}` in float32. Use float64 to compare NTKs closely. The NNGP needs only
    :math:`\\kappa_1`, whose slope :math:`\\kappa_0` is bounded, and keeps full accuracy.

    Args:
        x1: inputs of shape ``(n1, d)``, any norm.
        x2: inputs of shape ``(n2, d)``, same dtype and device as ``x1`` (may be ``x1`` itself).
        depth: number of hidden ReLU layers, at least 1.
        weight_std: :math:`\\sigma_w \\ge 0`.
        bias_std: :math:`\\sigma_b \\ge 0`.

    Returns:
        Tensor of shape ``(n1, n2)`` in the dtype and on the device of ``x1``.

    Introduced in chapter 3 (:doc:`/chapters/03_arccos_kernel`).
    """
    return _relu_recursion(x1, x2, depth, weight_std, bias_std)[0]


def relu_ntk(
    x1: torch.Tensor,
    x2: torch.Tensor,
    depth: int = 1,
    *,
    weight_std: float = 1.0,
    bias_std: float = 0.0,
) -> torch.Tensor:
    """Infinite-width NTK of a ReLU MLP: the limit of ``empirical_ntk(mlp(...))`` as width grows.

    Same network and arguments as :func:`relu_nngp`. With
    :math:`\\dot\\Sigma^{(l+1)}(x, x') = \\tfrac{\\sigma_w^2}{2}\\kappa_0(\\rho^{(l)})`, the derivative
    kernel, the recursion of Jacot, Gabriel & Hongler (2018) is

    .. math::

        \\Theta^{(1)} = \\Sigma^{(1)}, \\qquad
        \\Theta^{(l+1)} = \\Sigma^{(l+1)} + \\Theta^{(l)} \\dot\\Sigma^{(l+1)},

    and the result is :math:`\\Theta^{(\\text{depth}+1)}`. The first term is the readout layer's
    gradient, the second everything below it. For ``depth=1``, ``weight_std=1``, ``bias_std=0`` and
    unit inputs with :math:`u = \\langle x, x' \\rangle` this is
    :math:`(u\\,\\kappa_0(u) + \\kappa_1(u)) / (2d)`. Zero-variance inputs get 0, as in
    :func:`relu_nngp`.

    Returns:
        Tensor of shape ``(n1, n2)`` in the dtype and on the device of ``x1``.

    Introduced in chapter 3 (:doc:`/chapters/03_arccos_kernel`).
    """
    return _relu_recursion(x1, x2, depth, weight_std, bias_std)[1]


def mc_relu_ntk(
    x1: torch.Tensor,
    x2: torch.Tensor,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo estimate of ``relu_ntk(x1, x2, depth=1)`` and its standard error.

    Draws ``num_samples`` weight vectors :math:`w_s \\sim \\mathcal N(0, I_d)` (shared by all
    pairs) and averages

    .. math::

        t_s(x, x') = \\frac{1}{d}\\Big[\\mathrm{relu}(w_s\\cdot x)\\,\\mathrm{relu}(w_s\\cdot x')
        + \\langle x, x'\\rangle\\, \\mathbf 1(w_s\\cdot x > 0)\\,\\mathbf 1(w_s\\cdot x' > 0)\\Big],

    whose expectation is exactly :func:`relu_ntk` with ``depth=1``, ``weight_std=1``,
    ``bias_std=0``; the :math:`1/d` is the NTK parameterisation's fan-in factor. It is the empirical
    NTK of a width-``num_samples`` network with its readout weights' squares replaced by their mean 1.
    The standard error is the sample standard deviation of :math:`t_s` over :math:`\\sqrt{S}`.
    Vectorised: every sum over samples is a matrix product, taken in chunks of samples to bound
    memory. A zero input gets estimate and standard error 0, matching :func:`relu_ntk`.

    Args:
        x1: inputs of shape ``(n1, d)``.
        x2: inputs of shape ``(n2, d)``, same dtype and device as ``x1``.
        num_samples: number :math:`S \\ge 2` of weight vectors.
        generator: source of the weights; must live on the device of ``x1``.

    Returns:
        ``(estimate, standard_error)``, each of shape ``(n1, n2)`` in the dtype of ``x1``.

    Introduced in chapter 3 (:doc:`/chapters/03_arccos_kernel`).
    """
    x1, x2 = _check_pair(x1, x2)
    num_samples = positive_int("num_samples", num_samples)
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to estimate a standard error, got {num_samples}")
    generator = check_generator(generator)
    if generator is not None and generator.device.type != x1.device.type:
        raise ValueError(f"generator is on {generator.device} but x1 is on {x1.device}; they must match")
    fan_in = x1.shape[1]
    gram = x1 @ x2.T
    total = torch.zeros_like(gram)
    total_sq = torch.zeros_like(gram)
    chunk = max(1, _MC_CHUNK_ELEMENTS // (x1.shape[0] + x2.shape[0]))
    for start in range(0, num_samples, chunk):
        w = torch.randn(min(chunk, num_samples - start), fan_in, generator=generator, dtype=x1.dtype, device=x1.device)
        pre1, pre2 = x1 @ w.T, x2 @ w.T
        act1, act2 = torch.relu(pre1), torch.relu(pre2)
        on1, on2 = (pre1 > 0).to(x1.dtype), (pre2 > 0).to(x1.dtype)
        act_prod = act1 @ act2.T
        on_prod = on1 @ on2.T
        total += act_prod + gram * on_prod
        # t_s^2 expanded; relu(a) * 1(a > 0) = relu(a) turns the cross term into act_prod.
        total_sq += (act1 * act1) @ (act2 * act2).T + 2 * gram * act_prod + gram * gram * on_prod
    mean = total / num_samples
    variance = (total_sq - num_samples * mean * mean).clamp_min(0.0) / (num_samples - 1)
    return mean / fan_in, torch.sqrt(variance / num_samples) / fan_in


# --- Hadamard-product networks: NNGP and NTK of one hidden layer relu(W1 x) * relu(W2 x) ---
# The exact infinite-width limits of ``ntkbook.HadamardNet(..., parameterization="ntk")``.


def _hadamard_terms(
    x1: object, x2: object, weight_std: object, bias_std: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """Branch covariance ``K``, ``E[relu relu]``, ``E[relu' relu']`` and the two variances ``sigma_w^2, sigma_b^2``."""
    x1, x2 = _check_pair(x1, x2)
    var_w = std("weight_std", weight_std) ** 2
    var_b = std("bias_std", bias_std) ** 2
    cross, diag1, diag2 = _input_covariance(x1, x2, var_w, var_b)
    scale, cosine = _scale_and_cosine(cross, diag1, diag2)
    return cross, 0.5 * scale * _kappa1(cosine), 0.5 * _kappa0(cosine), var_w, var_b


def hadamard_nngp(
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    weight_std: float = 1.0,
    bias_std: float = 0.0,
) -> torch.Tensor:
    """Infinite-width NNGP covariance :math:`\\mathbb E[f(x) f(x')]` of a Hadamard-product network.

    The network is ``HadamardNet(d, width, 1, parameterization="ntk", weight_std=sigma_w,
    bias_std=sigma_b)`` as width goes to infinity,
    :math:`f(x) = \\frac{\\sigma_w}{\\sqrt m} v^\\top [\\mathrm{relu}(h_1(x)) \\odot \\mathrm{relu}(h_2(x))]
    + \\sigma_b b` with branches :math:`h_i(x) = \\frac{\\sigma_w}{\\sqrt d} W_i x + \\sigma_b b_i`
    and every parameter standard normal. A unit of each branch is a Gaussian process with covariance
    :math:`K(x, x') = \\sigma_w^2 \\langle x, x'\\rangle / d + \\sigma_b^2`; the two branches are
    independent, so with :math:`\\rho = K(x,x')/\\sqrt{K(x,x)K(x',x')}` and

    .. math::

        \\Sigma(x, x') = \\mathbb E[\\mathrm{relu}(h(x))\\,\\mathrm{relu}(h(x'))]
        = \\tfrac12 \\sqrt{K(x,x)K(x',x')}\\,\\kappa_1(\\rho),

    the covariance is :math:`\\sigma_w^2 \\Sigma(x, x')^2 + \\sigma_b^2`: the square of the plain
    network's hidden covariance. An input with :math:`K(x, x) = 0` (zero norm and no bias) makes the
    network output identically zero and gets covariance 0 with every input.

    Args:
        x1: inputs of shape ``(n1, d)``, any norm.
        x2: inputs of shape ``(n2, d)``, same dtype and device as ``x1`` (may be ``x1`` itself).
        weight_std: :math:`\\sigma_w \\ge 0`, shared by both branches and the readout.
        bias_std: :math:`\\sigma_b \\ge 0`, likewise shared.

    Returns:
        Tensor of shape ``(n1, n2)`` in the dtype and on the device of ``x1``.

    Introduced in chapter 4 (:doc:`/chapters/04_hadamard`).
    """
    _, relu_cov, _, var_w, var_b = _hadamard_terms(x1, x2, weight_std, bias_std)
    return var_w * relu_cov**2 + var_b


def hadamard_ntk(
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    weight_std: float = 1.0,
    bias_std: float = 0.0,
) -> torch.Tensor:
    """Infinite-width NTK of a Hadamard-product network: the limit of ``empirical_ntk(HadamardNet(...))``.

    Same network and arguments as :func:`hadamard_nngp`. With the derivative kernel
    :math:`\\dot\\Sigma(x, x') = \\mathbb E[\\mathrm{relu}'(h(x))\\,\\mathrm{relu}'(h(x'))] =
    \\tfrac12 \\kappa_0(\\rho)`, the gradient with respect to the readout gives the NNGP and the
    gradient with respect to each branch gives the other branch's :math:`\\Sigma` times
    :math:`\\dot\\Sigma K`, so

    .. math::

        \\Theta(x, x') = \\sigma_w^2 \\Sigma^2 + \\sigma_b^2 + 2 \\sigma_w^2\\, \\Sigma\\, \\dot\\Sigma\\, K,

    against :math:`\\sigma_w^2 \\Sigma + \\sigma_b^2 + \\sigma_w^2 \\dot\\Sigma K` for the plain
    network (:func:`relu_ntk` with ``depth=1``). For ``weight_std=1``, ``bias_std=0`` and inputs
    of norms :math:`r, r'` at cosine :math:`u` this is
    :math:`\\frac{(r r')^2}{4 d^2}\\,[\\kappa_1(u)^2 + 2u\\,\\kappa_0(u)\\kappa_1(u)]`, homogeneous of
    degree 2 in each input (degree 1 for the plain network). Zero-variance inputs get 0, as in
    :func:`hadamard_nngp`.

    Returns:
        Tensor of shape ``(n1, n2)`` in the dtype and on the device of ``x1``.

    Introduced in chapter 4 (:doc:`/chapters/04_hadamard`).
    """
    cross, relu_cov, derivative_cov, var_w, var_b = _hadamard_terms(x1, x2, weight_std, bias_std)
    return var_w * relu_cov**2 + var_b + 2 * var_w * relu_cov * derivative_cov * cross
