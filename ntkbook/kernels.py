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


def _as_cosine(u: torch.Tensor) -> torch.Tensor:
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u must be a torch.Tensor of cosines, got {type(u).__name__}")
    if not u.is_floating_point():
        raise TypeError(f"u must have a floating dtype, got {u.dtype}")
    if torch.isnan(u).any():
        raise ValueError("u contains NaN")
    # Cosines computed in floating point can leave [-1, 1] by a rounding error; arccos would give NaN.
    return u.clamp(-1.0, 1.0)


def kappa0(u: torch.Tensor) -> torch.Tensor:
    """Arc-cosine kernel of degree 0, :math:`\\kappa_0(u) = (\\pi - \\arccos u)/\\pi`, elementwise; ``u`` is clipped to [-1, 1]."""
    u = _as_cosine(u)
    return (math.pi - torch.arccos(u)) / math.pi


def kappa1(u: torch.Tensor) -> torch.Tensor:
    """Arc-cosine kernel of degree 1, :math:`\\kappa_1(u) = (u(\\pi - \\arccos u) + \\sqrt{1-u^2})/\\pi`, elementwise; ``u`` is clipped to [-1, 1]."""
    u = _as_cosine(u)
    return (u * (math.pi - torch.arccos(u)) + torch.sqrt(1.0 - u * u)) / math.pi
