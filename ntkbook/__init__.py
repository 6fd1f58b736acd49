"""ntkbook: Neural Tangent Kernels in PyTorch, the helper package of the ntkbook executable book.

Modules: :mod:`ntkbook.models` (networks in the NTK, standard and μP parameterisations; :mod:`ntkbook.mup`
holds the μP layer), :mod:`ntkbook.alignment` (kernel–target alignment),
:mod:`ntkbook.ntk` (empirical NTKs), :mod:`ntkbook.kernels` (analytic
infinite-width kernels), :mod:`ntkbook.convolutional` and :mod:`ntkbook.cnn_kernels` (convolutional networks and
their infinite-width kernels), :mod:`ntkbook.training` (gradient descent), :mod:`ntkbook.linearized`
(linearised, centred and scaled models, and NTK predictions), :mod:`ntkbook.predict` (the NNGP
posterior and the trained infinite ensemble), :mod:`ntkbook.blocked` (kernels larger than memory, to
disk, resumable, across processes) and :mod:`ntkbook.plotting` (the book's figure style).
"""

from __future__ import annotations

import torch

from ntkbook.alignment import kernel_alignment
from ntkbook.blocked import blocked_kernel
from ntkbook.cnn_kernels import cnn_nngp, cnn_ntk
from ntkbook.convolutional import NTKConv2d, cnn
from ntkbook.kernels import hadamard_nngp, hadamard_ntk, kappa0, kappa1, mc_relu_ntk, relu_nngp, relu_ntk
from ntkbook.linearized import centered, critical_lr, linearize, ntk_predict, scaled
from ntkbook.models import HadamardNet, NTKLinear, TwoLayerNet, dense, mlp
from ntkbook.mup import MuPLinear
from ntkbook.ntk import empirical_ntk
from ntkbook.predict import GaussianPrediction, nngp_predict, ntk_gp_predict
from ntkbook.training import DivergenceError, train

__version__ = "0.1.0"

__all__ = [
    "DivergenceError",
    "GaussianPrediction",
    "HadamardNet",
    "MuPLinear",
    "NTKConv2d",
    "NTKLinear",
    "TwoLayerNet",
    "blocked_kernel",
    "centered",
    "cnn",
    "cnn_nngp",
    "cnn_ntk",
    "critical_lr",
    "default_device",
    "dense",
    "empirical_ntk",
    "hadamard_nngp",
    "hadamard_ntk",
    "kappa0",
    "kappa1",
    "kernel_alignment",
    "linearize",
    "mc_relu_ntk",
    "mlp",
    "nngp_predict",
    "ntk_gp_predict",
    "ntk_predict",
    "relu_nngp",
    "relu_ntk",
    "scaled",
    "train",
]


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU: the device every chapter runs on."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
