"""ntkbook: Neural Tangent Kernels in PyTorch, the helper package of the ntkbook executable book.

Modules: :mod:`ntkbook.models` (networks in the NTK and standard parameterisations),
:mod:`ntkbook.ntk` (empirical NTKs) and :mod:`ntkbook.plotting` (the book's figure style).
"""

from __future__ import annotations

import torch

from ntkbook.models import HadamardNet, NTKLinear, TwoLayerNet, dense, mlp
from ntkbook.ntk import empirical_ntk

__version__ = "0.1.0"

__all__ = [
    "HadamardNet",
    "NTKLinear",
    "TwoLayerNet",
    "default_device",
    "dense",
    "empirical_ntk",
    "mlp",
]


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU: the device every chapter runs on."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
