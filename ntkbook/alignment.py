"""Kernel–target alignment: how well a kernel's geometry matches the targets it is asked to fit.

Introduced in the chapter on feature learning (:doc:`/chapters/05_feature_learning`).
"""

from __future__ import annotations

import torch

from ntkbook._checks import finite, rounding_tolerance


def kernel_alignment(kernel: torch.Tensor, y: torch.Tensor) -> float:
    """The centred kernel–target alignment of Cortes, Mohri & Rostamizadeh (2012).

    For a Gram matrix :math:`K` ``(n, n)`` on ``n`` inputs and targets :math:`Y` ``(n,)`` or ``(n, k)``
    (one-hot labels for classes), with the centring matrix :math:`H = I - \\tfrac1n \\mathbf 1\\mathbf 1^\\top`,

    .. math::

        A(K, Y) = \\frac{\\langle HKH,\\; HYY^\\top H\\rangle_F}{\\lVert HKH\\rVert_F\\,\\lVert HYY^\\top H\\rVert_F},

    the cosine between the centred kernel and the centred target kernel :math:`YY^\\top`. It lies in
    :math:`[-1, 1]` by Cauchy–Schwarz, and in :math:`[0, 1]` for a positive semi-definite :math:`K`
    (both centred matrices are then PSD, and so is their inner product); it is 1 when :math:`HKH` is a
    positive multiple of :math:`HYY^\\top H`, the kernel that sees only the targets. Centring removes
    the constant part that every NTK of an unnormalised input carries and that would otherwise
    dominate the cosine. Computed as :math:`\\mathrm{tr}(Y_c^\\top K_c Y_c) / (\\lVert K_c\\rVert_F \\lVert
    Y_c^\\top Y_c\\rVert_F)` with :math:`K_c = HKH`, :math:`Y_c = HY`, in ``O(n^2 k)``.

    Args:
        kernel: a symmetric ``(n, n)`` floating-point matrix, ``n >= 2``, e.g. an empirical NTK.
        y: targets ``(n,)`` or ``(n, k)``, the kernel's dtype and device.

    Returns:
        The alignment as a float.

    Raises:
        ValueError: a non-square, non-symmetric or non-finite kernel, one that is constant after
            centring, or targets of another length, non-finite or all equal (alignment undefined).
        TypeError: arguments that are not floating-point tensors of the kernel's dtype and device.
    """
    if not isinstance(kernel, torch.Tensor):
        raise TypeError(f"kernel must be a torch.Tensor, got {type(kernel).__name__}")
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] < 2:
        raise ValueError(f"kernel must be a square (n, n) matrix with n >= 2, got shape {tuple(kernel.shape)}")
    if not kernel.is_floating_point():
        raise TypeError(f"kernel must have a floating dtype, got {kernel.dtype}")
    finite("kernel", kernel)
    scale = float(kernel.abs().max())
    if float((kernel - kernel.T).abs().max()) > rounding_tolerance(kernel.dtype) * scale:
        raise ValueError("kernel must be symmetric (a Gram matrix K(X, X)), but K differs from K^T")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    n = kernel.shape[0]
    if y.ndim not in (1, 2) or y.shape[0] != n or y.numel() == 0:
        raise ValueError(f"y must have shape ({n},) or ({n}, k) to match the kernel, got {tuple(y.shape)}")
    if y.dtype != kernel.dtype or y.device != kernel.device:
        raise TypeError(
            f"y must have the kernel's dtype and device ({kernel.dtype}, {kernel.device}), got ({y.dtype}, {y.device})"
        )
    finite("y", y)
    targets = y.reshape(n, -1)
    k_centred = kernel - kernel.mean(dim=0, keepdim=True) - kernel.mean(dim=1, keepdim=True) + kernel.mean()
    y_centred = targets - targets.mean(dim=0, keepdim=True)
    kernel_norm = torch.linalg.matrix_norm(k_centred)
    target_norm = torch.linalg.matrix_norm(y_centred.T @ y_centred)
    if float(kernel_norm) <= torch.finfo(kernel.dtype).eps * scale * n:
        raise ValueError("kernel is constant after centring (H K H = 0): its alignment is undefined")
    if float(target_norm) == 0.0:
        raise ValueError("y is the same for every input: centred targets are zero and the alignment is undefined")
    inner = (y_centred * (k_centred @ y_centred)).sum()
    return float(inner / (kernel_norm * target_norm))
