"""The maximal-update parameterisation (μP) of Yang & Hu (2021) for SGD: one dense layer.

:func:`ntkbook.models.mlp` and :func:`ntkbook.models.dense` build networks from it with
``parameterization="mup"``. Introduced in the chapter on feature learning (:doc:`/chapters/05_feature_learning`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ntkbook._checks import generator as check_generator
from ntkbook._checks import positive_int, std

#: Where a μP layer sits, mapping the input to the width, the width to the width, or the width to the output.
LayerRole = Literal["input", "hidden", "output"]


class MuPLinear(nn.Module):
    """A dense layer in the maximal-update parameterisation (μP) for SGD, Yang & Hu (2021), Table 3.

    Maps ``a`` of shape ``(..., in_features)`` to ``(..., out_features)`` by
    :math:`z = s\\, a W^\\top + s_b b` with trainable ``weight`` :math:`W_{ij} \\sim \\mathcal N(0, v)` and
    ``bias`` :math:`b_i \\sim \\mathcal N(0, v_b)` (``None`` when ``bias_std == 0``). In Yang & Hu's
    abc-parameterisation a weight is :math:`n^{-a} w` with :math:`w \\sim \\mathcal N(0, n^{-2b})` and
    every parameter takes the one learning rate :math:`\\eta n^{-c}`; μP is :math:`a = -1/2` for the
    input layer, :math:`0` for hidden layers, :math:`1/2` for the readout, :math:`b = 1/2` throughout,
    and :math:`c = 0`. With :math:`m` the width (``width``: ``out_features`` of an input layer,
    ``in_features`` otherwise) and :math:`d` the input dimension:

    .. list-table::
       :header-rows: 1

       * - ``layer``
         - weight multiplier :math:`s`
         - :math:`v`
         - bias multiplier :math:`s_b`
         - :math:`v_b`
       * - ``"input"``
         - :math:`\\sigma_w\\sqrt{m/d}`
         - :math:`1/m`
         - :math:`\\sigma_b\\sqrt m`
         - :math:`1/m`
       * - ``"hidden"``
         - :math:`\\sigma_w`
         - :math:`1/m`
         - :math:`\\sigma_b\\sqrt m`
         - :math:`1/m`
       * - ``"output"``
         - :math:`\\sigma_w/\\sqrt m`
         - :math:`1/m`
         - :math:`\\sigma_b`
         - :math:`1`

    The constants :math:`\\sigma_w, \\sigma_b` and :math:`1/\\sqrt d` do not depend on the width, which is
    all the abc-parameterisation fixes; with them the effective weights :math:`sW` of the input and
    hidden layers start exactly as in the NTK parameterisation, :math:`\\mathcal N(0, \\sigma_w^2/\\text{fan-in})`,
    and only the readout starts smaller, :math:`\\mathcal N(0, \\sigma_w^2/m^2)`. What differs is the
    step: gradient descent with learning rate :math:`\\eta` moves the effective weights :math:`sW` with
    learning rate :math:`s^2\\eta`, which is :math:`\\eta\\sigma_w^2 m/d`, :math:`\\eta\\sigma_w^2` and
    :math:`\\eta\\sigma_w^2/m` for the three layers (against :math:`\\eta\\sigma_w^2/\\text{fan-in}` in the
    NTK parameterisation), so that every layer's features change by :math:`\\Theta(1)` at any width.
    Biases are weights on a constant input, so those of the input and hidden layers scale like input
    weights, and the readout's bias, which has no width, does not scale.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        layer: LayerRole,
        weight_std: float = 1.0,
        bias_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        if layer not in ("input", "hidden", "output"):
            raise ValueError(f"layer must be 'input', 'hidden' or 'output', got {layer!r}")
        self.layer = layer
        self.weight_std = std("weight_std", weight_std)
        self.bias_std = std("bias_std", bias_std)
        generator = check_generator(generator)
        self.width = self.out_features if layer == "input" else self.in_features
        #: Standard deviations of the stored ``weight`` and ``bias`` at initialisation, sqrt(v) and sqrt(v_b).
        self.weight_init_std = 1.0 / math.sqrt(self.width)
        self.bias_init_std = 1.0 if layer == "output" else 1.0 / math.sqrt(self.width)
        weight = torch.randn(self.out_features, self.in_features, generator=generator) * self.weight_init_std
        self.weight = nn.Parameter(weight)
        if self.bias_std > 0:
            bias = torch.randn(self.out_features, generator=generator) * self.bias_init_std
            self.bias: nn.Parameter | None = nn.Parameter(bias)
        else:
            self.register_parameter("bias", None)

    @property
    def weight_scale(self) -> float:
        """The weight multiplier :math:`s` that multiplies ``a @ weight.T`` (see the table above)."""
        m = self.width
        if self.layer == "input":
            return self.weight_std * math.sqrt(m / self.in_features)
        return self.weight_std if self.layer == "hidden" else self.weight_std / math.sqrt(m)

    @property
    def bias_scale(self) -> float:
        """The bias multiplier :math:`s_b` that multiplies ``bias``."""
        return self.bias_std if self.layer == "output" else self.bias_std * math.sqrt(self.width)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        z = self.weight_scale * (a @ self.weight.T)
        if self.bias is not None:
            z = z + self.bias_scale * self.bias
        return z

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, layer={self.layer!r}, "
            f"weight_std={self.weight_std}, bias_std={self.bias_std}"
        )
