"""Exact infinite-width kernels of convolutional ReLU networks: the CNTK and the CNN's NNGP.

For images :math:`x, x'` of :math:`C` channels and pixels :math:`p, p'` the recursion runs over
covariances between every pair of pixels of the two images (Arora et al. 2019, section 4 and
appendix B; Novak et al. 2019), so each pair of images carries an :math:`(hw) \\times (hw)` matrix
(with ``pooling="gap"``) or, with ``pooling="flatten"``, only its diagonal of :math:`hw` same-pixel
entries. The kernels are the limits of :func:`ntkbook.convolutional.cnn` as its channel count grows.

Introduced in chapter 9 (:doc:`/chapters/09_convolutional`).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ntkbook._checks import finite, odd_int, one_of, positive_int, std
from ntkbook.convolutional import POOLINGS

# Covariance entries per array in one block of image pairs: 2**20 float64 numbers are 8 MiB, and
# about 18 such arrays were measured alive at once (peak memory growth of 290 MiB at 2**21).
_BLOCK_ENTRIES = 2**20


def _check_images(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images of shape (n, c, h, w), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.ndim != 4 or 0 in x.shape:
        raise ValueError(f"{name} must be a non-empty batch of images of shape (n, c, h, w), got {tuple(x.shape)}")
    return x


def _check_image_pair(x1: object, x2: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches ``(n1, c, h, w)`` and ``(n2, c, h, w)`` of one floating dtype, on one device, finite."""
    x1 = _check_images("x1", x1)
    x2 = _check_images("x2", x2)
    if x2.shape[1:] != x1.shape[1:]:
        raise ValueError(f"x2 must have the image shape (c, h, w) of x1, {tuple(x1.shape[1:])}, got {tuple(x2.shape)}")
    if x2.dtype != x1.dtype:
        raise TypeError(f"x2 has dtype {x2.dtype} but x1 has {x1.dtype}; pass both in one dtype")
    if x2.device != x1.device:
        raise ValueError(f"x2 is on {x2.device} but x1 is on {x1.device}")
    finite("x1", x1)
    finite("x2", x2)
    return x1, x2


def _box(maps: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Mean over each pixel's zero-padded ``k x k`` window of maps ``(..., h, w)``: the sum divided by
    :math:`k^2` whether or not the window leaves the image, as the fan-in :math:`C k^2` counts padding."""
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    pooled = F.avg_pool2d(flat, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
    return pooled.reshape(maps.shape)


def _diagonal_box(cov: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """:math:`\\frac{1}{k^2}\\sum_\\delta Q_{p+\\delta, p'+\\delta}` for covariances ``(..., h, w, h, w)``.

    A convolution of the pixel-pair covariance with a filter that moves both pixels by the same offset
    (zero outside the images). The offsets' rows and columns range independently, so it is taken as
    shifted in-place sums along the two row axes, then along the two column axes: :math:`2(k-1)`
    additions of (at most) the whole array instead of :math:`k^2`."""
    h, w = cov.shape[-4], cov.shape[-3]
    rows = cov.clone()
    for a in range(1, min(kernel_size // 2, h - 1) + 1):
        rows[..., : h - a, :, : h - a, :] += cov[..., a:, :, a:, :]
        rows[..., a:, :, a:, :] += cov[..., : h - a, :, : h - a, :]
    both = rows.clone()
    for b in range(1, min(kernel_size // 2, w - 1) + 1):
        both[..., : w - b, :, : w - b] += rows[..., b:, :, b:]
        both[..., b:, :, b:] += rows[..., : w - b, :, : w - b]
    return both.div_(kernel_size**2)


def _relu_moments(cov: torch.Tensor, root1: torch.Tensor, root2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:math:`K = \\tfrac12 \\sqrt{v v'}\\,\\kappa_1(\\rho)` and :math:`\\dot K = \\tfrac12 \\kappa_0(\\rho)` of a
    pre-activation covariance ``cov``, from the roots of the pixel variances (broadcasting against it).

    The same expectations as :func:`ntkbook.kernels.relu_ntk`'s, with one ``arccos`` per entry
    (:math:`\\pi\\kappa_0 = \\pi - \\theta`, :math:`\\pi\\kappa_1 = \\sin\\theta + (\\pi - \\theta)\\cos\\theta`) and
    in-place steps, since these arrays dominate time and memory. A zero variance has ``cov = 0`` and
    gets cosine 0, as there."""
    scale = root1 * root2
    # |cov| <= scale by Cauchy-Schwarz, so clamping only removes rounding.
    cosine = (cov / scale.clamp_min(torch.finfo(cov.dtype).tiny)).clamp_(-1.0, 1.0)
    rest = torch.arccos(cosine).neg_().add_(math.pi)
    sine = (cosine * cosine).neg_().add_(1.0).sqrt_()
    relu_cov = sine.addcmul_(rest, cosine).mul_(scale).mul_(0.5 / math.pi)
    return relu_cov, rest.mul_(0.5 / math.pi)


def _pair_block(
    x1: torch.Tensor,
    x2: torch.Tensor,
    roots1: list[torch.Tensor],
    roots2: list[torch.Tensor],
    kernel_size: int,
    pooling: str,
    var_w: float,
    var_b: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nngp, ntk)`` of shape ``(b1, b2)`` for a block of images, given the roots of each layer's
    pixel variances."""
    channels = x1.shape[1]
    if pooling == "gap":
        cov = torch.einsum("icp,jcq->ijpq", x1.flatten(2), x2.flatten(2)) / channels
        cov = cov.reshape(x1.shape[0], x2.shape[0], *x1.shape[2:], *x1.shape[2:])
        spread = lambda q: _diagonal_box(q, kernel_size)
        left, right = (slice(None), None, ..., None, None), (None, slice(None), None, None, ...)
        readout_dims = (2, 3, 4, 5)
    else:
        # Flattening compares only the same pixel of the two images, and the same-pixel entries need
        # only same-pixel entries below them: the diagonal of the covariance is enough.
        cov = torch.einsum("icp,jcp->ijp", x1.flatten(2), x2.flatten(2)) / channels
        cov = cov.reshape(x1.shape[0], x2.shape[0], *x1.shape[2:])
        spread = lambda q: _box(q, kernel_size)
        left, right = (slice(None), None, ...), (None, slice(None), ...)
        readout_dims = (2, 3)
    cov = spread(cov).mul_(var_w).add_(var_b)
    ntk = cov
    for layer, (r1, r2) in enumerate(zip(roots1, roots2)):
        relu_cov, derivative_cov = _relu_moments(cov, r1[left], r2[right])
        below = derivative_cov.mul_(ntk)
        if layer == len(roots1) - 1:
            nngp = var_w * relu_cov.mean(dim=readout_dims) + var_b
            return nngp, nngp + var_w * below.mean(dim=readout_dims)
        cov = spread(relu_cov).mul_(var_w).add_(var_b)
        ntk = spread(below).mul_(var_w).add_(cov)
    raise AssertionError("depth >= 1 always returns inside the loop")


def _pixel_roots(x: torch.Tensor, depth: int, kernel_size: int, var_w: float, var_b: float) -> list[torch.Tensor]:
    """The root of the pre-activation variance at every pixel, for each of the ``depth`` layers:
    ``depth`` maps ``(n, h, w)``. The variances are

    :math:`v^{(1)} = \\sigma_w^2\\,\\mathrm{box}(\\|x_p\\|^2 / C) + \\sigma_b^2` and
    :math:`v^{(l+1)} = \\sigma_w^2\\,\\mathrm{box}(v^{(l)}/2) + \\sigma_b^2`, since :math:`\\kappa_1(1) = 1`."""
    variances = [var_w * _box((x * x).mean(dim=1), kernel_size) + var_b]
    for _ in range(depth - 1):
        variances.append(var_w * _box(0.5 * variances[-1], kernel_size) + var_b)
    return [torch.sqrt(v) for v in variances]


def _cnn_recursion(
    x1: object,
    x2: object,
    depth: object,
    kernel_size: object,
    pooling: object,
    weight_std: object,
    bias_std: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the arguments, run the recursion block by block and return ``(nngp, ntk)`` ``(n1, n2)``."""
    symmetric = x1 is x2
    x1, x2 = _check_image_pair(x1, x2)
    depth = positive_int("depth", depth)
    kernel_size = odd_int("kernel_size", kernel_size)
    pooling = one_of("pooling", pooling, POOLINGS)
    var_w = std("weight_std", weight_std) ** 2
    var_b = std("bias_std", bias_std) ** 2
    roots1 = _pixel_roots(x1, depth, kernel_size, var_w, var_b)
    roots2 = roots1 if symmetric else _pixel_roots(x2, depth, kernel_size, var_w, var_b)
    pixels = x1.shape[2] * x1.shape[3]
    entries_per_pair = pixels**2 if pooling == "gap" else pixels
    side = max(1, math.isqrt(max(1, _BLOCK_ENTRIES // entries_per_pair)))
    n1, n2 = x1.shape[0], x2.shape[0]
    nngp = x1.new_empty(n1, n2)
    ntk = x1.new_empty(n1, n2)
    for i in range(0, n1, side):
        # For x2 = x1, blocks below the diagonal are the transposes of those above it.
        for j in range(i if symmetric else 0, n2, side):
            rows, cols = slice(i, i + side), slice(j, j + side)
            block = _pair_block(
                x1[rows],
                x2[cols],
                [r[rows] for r in roots1],
                [r[cols] for r in roots2],
                kernel_size,
                pooling,
                var_w,
                var_b,
            )
            for out, values in zip((nngp, ntk), block):
                if symmetric and i == j:
                    # The two halves of a diagonal block differ by rounding (sums taken in another order).
                    values = 0.5 * (values + values.T)
                out[rows, cols] = values
                if symmetric:
                    out[cols, rows] = values.T
    return nngp, ntk


def cnn_nngp(
    x1: torch.Tensor,
    x2: torch.Tensor,
    depth: int = 1,
    *,
    kernel_size: int = 3,
    pooling: str = "gap",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
) -> torch.Tensor:
    """Infinite-width NNGP covariance :math:`\\mathbb E[f(x) f(x')]` of :func:`ntkbook.convolutional.cnn`.

    The network has the same ``depth``, ``kernel_size``, ``pooling``, ``weight_std`` and ``bias_std``,
    ``parameterization="ntk"``, and its channel count goes to infinity. Write :math:`\\mathcal A` for the
    convolution of a pixel-pair covariance with the filter that moves both pixels by one offset,
    :math:`\\mathcal A(Q)_{p,p'} = \\frac1{k^2}\\sum_\\delta Q_{p+\\delta,\\,p'+\\delta}` (zero outside the
    images, :math:`k^2` terms whatever the padding, as in the fan-in :math:`Ck^2`). With
    :math:`\\Sigma^{(1)} = \\sigma_w^2 \\mathcal A(\\langle x_p, x'_{p'}\\rangle / C) + \\sigma_b^2` and, for
    :math:`l = 1, \\dots,` ``depth``, the ReLU expectations of :func:`ntkbook.kernels.relu_nngp` taken
    pixel pair by pixel pair,

    .. math::

        K^{(l)}_{pp'} = \\tfrac12 \\sqrt{\\Sigma^{(l)}_{pp}(x,x)\\Sigma^{(l)}_{p'p'}(x',x')}\\,
        \\kappa_1(\\rho^{(l)}_{pp'}), \\qquad
        \\Sigma^{(l+1)} = \\sigma_w^2 \\mathcal A(K^{(l)}) + \\sigma_b^2,

    the readout gives :math:`\\sigma_w^2 \\frac{1}{(hw)^2}\\sum_{p,p'} K^{(\\text{depth})}_{pp'} + \\sigma_b^2`
    after global average pooling, which compares every pixel of one image with every pixel of the
    other, and :math:`\\sigma_w^2 \\frac{1}{hw}\\sum_p K^{(\\text{depth})}_{pp} + \\sigma_b^2` after
    flattening, which compares each pixel only with the same pixel. For :math:`1 \\times 1` images and
    ``kernel_size=1`` this is :func:`ntkbook.kernels.relu_nngp` of the ``c``-dimensional inputs.

    Memory and time: with ``pooling="gap"`` each pair of images carries up to about 18 arrays of
    :math:`(hw)^2` numbers alive at once (:math:`32` KiB each in float64 for :math:`8 \\times 8`
    images), with ``"flatten"`` as many of :math:`hw` numbers. Pairs are processed in blocks of at most
    :math:`2^{20}` entries per array (8 MiB in float64), so the memory, about 150 MiB at most in
    float64, does not grow with the number of images (a :math:`500 \\times 500` kernel of
    :math:`8 \\times 8` images needs no more than a :math:`20 \\times 20` one); time grows like
    :math:`n_1 n_2 (hw)^2 \\cdot \\text{depth}` (gap) and runs on whatever device the images are on.
    Accuracy as in :func:`ntkbook.kernels.relu_ntk`: use float64 to compare kernels closely.

    Args:
        x1: images of shape ``(n1, c, h, w)``, any scale.
        x2: images of shape ``(n2, c, h, w)``, same dtype and device as ``x1``; pass ``x1`` itself for a
            square kernel, which is then computed once per pair and exactly symmetric.
        depth: number of convolutional ReLU layers, at least 1.
        kernel_size: odd filter size :math:`k`.
        pooling: ``"gap"`` (global average pooling) or ``"flatten"``.
        weight_std: :math:`\\sigma_w \\ge 0`.
        bias_std: :math:`\\sigma_b \\ge 0`.

    Returns:
        Tensor of shape ``(n1, n2)`` in the dtype and on the device of ``x1``.

    Introduced in chapter 9 (:doc:`/chapters/09_convolutional`).
    """
    return _cnn_recursion(x1, x2, depth, kernel_size, pooling, weight_std, bias_std)[0]


def cnn_ntk(
    x1: torch.Tensor,
    x2: torch.Tensor,
    depth: int = 1,
    *,
    kernel_size: int = 3,
    pooling: str = "gap",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
) -> torch.Tensor:
    """Infinite-width NTK of :func:`ntkbook.convolutional.cnn` (the CNTK): the limit of its ``empirical_ntk``.

    Same network, arguments, memory and notation as :func:`cnn_nngp`. With the derivative covariance
    :math:`\\dot K^{(l)}_{pp'} = \\tfrac12 \\kappa_0(\\rho^{(l)}_{pp'})`, the pixel-pair NTK follows
    (Arora et al. 2019, section 4 and appendix B)

    .. math::

        \\Theta^{(1)} = \\Sigma^{(1)}, \\qquad
        \\Theta^{(l+1)} = \\Sigma^{(l+1)} + \\sigma_w^2 \\mathcal A\\big(\\dot K^{(l)} \\odot \\Theta^{(l)}\\big),

    and the readout averages :math:`\\sigma_w^2 (K^{(\\text{depth})} + \\dot K^{(\\text{depth})} \\odot
    \\Theta^{(\\text{depth})})` over all pixel pairs (``"gap"``) or over same-pixel pairs
    (``"flatten"``), plus :math:`\\sigma_b^2`. The first term is the readout's gradient, the second
    everything below it, as in :func:`ntkbook.kernels.relu_ntk`, which this equals for :math:`1 \\times 1`
    images and ``kernel_size=1``.

    Returns:
        Tensor of shape ``(n1, n2)`` in the dtype and on the device of ``x1``.

    Introduced in chapter 9 (:doc:`/chapters/09_convolutional`).
    """
    return _cnn_recursion(x1, x2, depth, kernel_size, pooling, weight_std, bias_std)[1]
