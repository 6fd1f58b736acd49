"""Convolutional ReLU networks in the NTK parameterisation, whose infinite-width kernels are in
:mod:`ntkbook.cnn_kernels`.

A convolution with :math:`C` input channels and a :math:`k \\times k` filter computes, at every pixel
:math:`p` of an image with 'same' zero padding,

.. math::

    z_{i,p} = \\frac{\\sigma_w}{\\sqrt{C k^2}} \\sum_{c=1}^{C} \\sum_{\\delta} W_{i,c,\\delta}\\, a_{c, p+\\delta}
    + \\sigma_b b_i, \\qquad W_{i,c,\\delta}, b_i \\sim \\mathcal N(0, 1),

the sum over the :math:`k^2` offsets :math:`\\delta` of the filter; pixels outside the image are zero
but still count in the fan-in :math:`C k^2`. This is the convention of neural-tangents'
``stax.Conv(parameterization="ntk", padding="SAME")`` and the convolutional analogue of
:class:`ntkbook.models.NTKLinear`.

Introduced in chapter 9 (:doc:`/chapters/09_convolutional`).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torch.nn import functional as F

from ntkbook._checks import generator as check_generator
from ntkbook._checks import odd_int, one_of, positive_int, std
from ntkbook.models import Parameterization, dense

#: The readouts a :func:`cnn` can end with: global average pooling or flattening.
POOLINGS = ("gap", "flatten")


class NTKConv2d(nn.Module):
    """A 2-d convolution with 'same' zero padding in the NTK parameterisation.

    Maps ``(n, in_channels, h, w)`` to ``(n, out_channels, h, w)`` by
    :math:`z = \\frac{\\sigma_w}{\\sqrt{C k^2}}\\, W \\star a + \\sigma_b b` (the module docstring),
    with ``weight`` of shape ``(out_channels, in_channels, k, k)`` and ``bias`` of shape
    ``(out_channels,)`` drawn from :math:`\\mathcal N(0, 1)`; ``bias`` is ``None`` when ``bias_std == 0``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        weight_std: float = 1.0,
        bias_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.kernel_size = odd_int("kernel_size", kernel_size)
        self.weight_std = std("weight_std", weight_std)
        self.bias_std = std("bias_std", bias_std)
        generator = check_generator(generator)
        shape = (self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)
        self.weight = nn.Parameter(torch.randn(shape, generator=generator))
        if self.bias_std > 0:
            self.bias: nn.Parameter | None = nn.Parameter(torch.randn(self.out_channels, generator=generator))
        else:
            self.register_parameter("bias", None)

    @property
    def weight_scale(self) -> float:
        """The factor :math:`\\sigma_w / \\sqrt{C k^2}` that multiplies the convolution with ``weight``."""
        return self.weight_std / math.sqrt(self.in_channels * self.kernel_size**2)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        z = self.weight_scale * F.conv2d(a, self.weight, padding=self.kernel_size // 2)
        if self.bias is not None:
            z = z + self.bias_std * self.bias[:, None, None]
        return z

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, kernel_size={self.kernel_size}, "
            f"weight_std={self.weight_std}, bias_std={self.bias_std}"
        )


def _standard_conv(
    in_channels: int, out_channels: int, kernel_size: int, generator: torch.Generator | None
) -> nn.Module:
    """``nn.Conv2d`` with 'same' padding and PyTorch's initialisation (uniform on :math:`\\pm 1/\\sqrt{C k^2}`),
    drawn from ``generator``."""
    layer = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    bound = 1.0 / math.sqrt(in_channels * kernel_size**2)
    with torch.no_grad():
        # nn.Conv2d's own reset_parameters draws from the global RNG; redraw from `generator`.
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


class _GlobalAvgPool(nn.Module):
    """``(n, c, h, w) -> (n, c)``: the mean over pixels."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a.mean(dim=(2, 3))


def _image_pixels(image_size: object) -> int:
    """Pixels of an ``image_size`` given as ``int`` (square) or ``(height, width)``."""
    if isinstance(image_size, tuple) and len(image_size) == 2:
        height, width = (positive_int("image_size", side) for side in image_size)
        return height * width
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        return positive_int("image_size", image_size) ** 2
    raise TypeError(f"image_size must be an int or a (height, width) tuple of ints, got {image_size!r}")


def cnn(
    in_channels: int,
    channels: int,
    depth: int,
    outputs: int = 1,
    *,
    kernel_size: int = 3,
    pooling: str = "gap",
    image_size: int | tuple[int, int] | None = None,
    weight_std: float = 1.0,
    bias_std: float = 0.0,
    parameterization: Parameterization = "ntk",
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """A ReLU CNN: ``depth`` convolutions with 'same' zero padding, a pooling, and a dense readout.

    ``(n, in_channels, h, w) -> (n, outputs)``: ``depth`` times [:class:`NTKConv2d` with ``channels``
    output channels, ReLU], then ``pooling="gap"`` (global average pooling, the mean over pixels, to
    ``(n, channels)``) or ``pooling="flatten"`` (to ``(n, channels * h * w)``, which needs
    ``image_size`` to size the readout), then a dense readout (:func:`ntkbook.models.dense`) with fan-in
    ``channels`` or ``channels * h * w``. Every layer uses ``parameterization``, ``weight_std`` and
    ``bias_std``; ``"standard"`` uses ``nn.Conv2d`` and ``nn.Linear`` with PyTorch's initialisation drawn
    from ``generator``. As the channel count grows, the empirical NTK of the ``"ntk"`` network tends to
    :func:`ntkbook.cnn_kernels.cnn_ntk` with the same arguments.

    Introduced in chapter 9 (:doc:`/chapters/09_convolutional`).
    """
    in_channels = positive_int("in_channels", in_channels)
    channels = positive_int("channels", channels)
    depth = positive_int("depth", depth)
    outputs = positive_int("outputs", outputs)
    kernel_size = odd_int("kernel_size", kernel_size)
    pooling = one_of("pooling", pooling, POOLINGS)
    if parameterization not in ("ntk", "standard"):
        raise ValueError(f"parameterization must be 'ntk' or 'standard', got {parameterization!r}")
    if parameterization == "standard" and (weight_std != 1.0 or bias_std != 0.0):
        raise ValueError(
            "weight_std and bias_std set the NTK parameterisation; with parameterization='standard' "
            f"leave them at 1.0 and 0.0 (got weight_std={weight_std}, bias_std={bias_std})"
        )
    if pooling == "flatten":
        if image_size is None:
            raise ValueError("image_size is required with pooling='flatten': it sets the readout's fan-in")
        readout_fan_in = channels * _image_pixels(image_size)
    elif image_size is not None:
        raise ValueError("image_size applies only to pooling='flatten'; global average pooling takes any size")
    else:
        readout_fan_in = channels
    generator = check_generator(generator)
    layers: list[nn.Module] = []
    fan_in = in_channels
    for _ in range(depth):
        if parameterization == "ntk":
            conv = NTKConv2d(
                fan_in, channels, kernel_size, weight_std=weight_std, bias_std=bias_std, generator=generator
            )
        else:
            conv = _standard_conv(fan_in, channels, kernel_size, generator)
        layers += [conv, nn.ReLU()]
        fan_in = channels
    layers.append(_GlobalAvgPool() if pooling == "gap" else nn.Flatten())
    layers.append(
        dense(
            readout_fan_in,
            outputs,
            parameterization=parameterization,
            weight_std=weight_std,
            bias_std=bias_std,
            generator=generator,
        )
    )
    return nn.Sequential(*layers)
