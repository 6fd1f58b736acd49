"""Argument checks shared by ntkbook's modules.

Each check refuses a bad value with a :class:`TypeError` (wrong kind) or :class:`ValueError` (wrong
value) whose message names the argument and says what was expected; the number checks return the
value as the plain ``int`` or ``float`` the caller computes with. This module imports nothing of
ntkbook's own, so that every module can use it.
"""

from __future__ import annotations

import math
import numbers

import torch


def positive_int(name: str, value: object) -> int:
    """``value`` as an ``int >= 1``; any integral number (``numpy.int64`` too) but not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def _real(name: str, value: object, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    return float(value)


def positive_float(name: str, value: object) -> float:
    """``value`` as a finite ``float > 0``; any real number (``numpy.float32`` too) but not a bool."""
    number = _real(name, value, "a positive float")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    return number


def std(name: str, value: object) -> float:
    """A standard deviation: ``value`` as a finite ``float >= 0``."""
    number = _real(name, value, "a non-negative float")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite non-negative float, got {value}")
    return number


def generator(value: object) -> torch.Generator | None:
    """A ``torch.Generator`` or ``None``; an int seed is refused, since torch's samplers take generators."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(value).__name__}")
    return value


def finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse NaN or infinite entries, and meta tensors, which have no entries to check."""
    if tensor.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds shapes but no values")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def rounding_tolerance(dtype: torch.dtype) -> float:
    """How far a computed quantity may miss an exact property (a cosine in [-1, 1], a symmetric kernel)
    relative to its scale and still count as rounding: :math:`\\sqrt{\\varepsilon}` of ``dtype``,
    1.5e-8 in float64 and 3.5e-4 in float32.

    A sum of ``d`` rounded terms is off by about :math:`\\sqrt d\\,\\varepsilon` relative (about
    100 eps for a float64 cosine in 1e5 dimensions, 50 eps for the entries of a float32 NTK of 4e6
    parameters summed in two orders), which stays below :math:`\\sqrt\\varepsilon` until ``d`` nears
    :math:`1/\\varepsilon`; a real defect (a cosine of 1.01, a cross kernel passed as a square one) is
    orders of magnitude above it.
    """
    return torch.finfo(dtype).eps ** 0.5


def symmetric(name: str, kernel: torch.Tensor, what: str, hint: str = "") -> None:
    """Refuse a square ``kernel`` that is not symmetric to within :func:`rounding_tolerance` of its largest
    entry: eigh reads one triangle only, so a cross kernel passed as a square one would be misread without
    a word. The message says the argument must be ``what``, then ``hint``."""
    asymmetry = float((kernel - kernel.T).abs().max())
    scale = float(kernel.abs().max())
    if asymmetry > rounding_tolerance(kernel.dtype) * scale:
        raise ValueError(
            f"{name} must be {what}, but max |K - K^T| = {asymmetry:.3g} against max |K| = {scale:.3g}{hint}"
        )


def odd_int(name: str, value: object) -> int:
    """``value`` as an odd ``int >= 1``, such as a filter size that 'same' padding centres."""
    number = positive_int(name, value)
    if number % 2 == 0:
        raise ValueError(f"{name} must be an odd positive int, got {number}")
    return number


def one_of(name: str, value: object, options: tuple[str, ...]) -> str:
    """``value`` as one of the strings ``options``."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value
