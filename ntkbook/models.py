"""Networks used throughout the book, in three parameterisations.

``parameterization="ntk"`` is the NTK parameterisation of Jacot, Gabriel & Hongler (2018), the same
convention as neural-tangents' ``stax.Dense(parameterization="ntk")``: a dense layer with fan-in
:math:`d` computes

.. math::

    z = \\frac{\\sigma_w}{\\sqrt{d}} W a + \\sigma_b b, \\qquad W_{ij}, b_i \\sim \\mathcal N(0, 1),

with :math:`W` and :math:`b` the trainable parameters (no bias parameter when :math:`\\sigma_b = 0`).
``parameterization="standard"`` is PyTorch's ``nn.Linear`` with its own initialisation,
:math:`W_{ij}, b_i \\sim \\mathcal U(-1/\\sqrt{d}, 1/\\sqrt{d})`.
``parameterization="mup"`` is the maximal-update parameterisation of Yang & Hu (2021) for SGD, whose
multipliers and initial variances depend on the layer's place in the network (:class:`~ntkbook.mup.MuPLinear`).

Introduced in chapter 1 (:doc:`/chapters/01_loop_ntk`); μP in the chapter on feature learning
(:doc:`/chapters/05_feature_learning`).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import nn

from ntkbook._checks import generator as check_generator
from ntkbook._checks import positive_int, std
from ntkbook.mup import LayerRole, MuPLinear

#: The parameterisations every network takes, ``"ntk"`` (Jacot et al.), ``"standard"`` (PyTorch) or ``"mup"``.
Parameterization = Literal["ntk", "standard", "mup"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "erf": lambda: _Erf(),
    "identity": nn.Identity,
}


class _Erf(nn.Module):
    """The error function as a module, so ``mlp(..., activation="erf")`` can be built."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(x)


def _check_dims(**dims: object) -> list[int]:
    """Each size as an int, checked by the caller's own argument name (``dense`` would report ``in_features``)."""
    return [positive_int(name, value) for name, value in dims.items()]


class NTKLinear(nn.Module):
    """A dense layer in the NTK parameterisation.

    Maps ``a`` of shape ``(..., in_features)`` to ``(..., out_features)`` by
    :math:`z = (\\sigma_w/\\sqrt{d_{in}})\\, a W^\\top + \\sigma_b b` with ``weight`` of shape
    ``(out_features, in_features)`` and ``bias`` of shape ``(out_features,)`` drawn from
    :math:`\\mathcal N(0, 1)`. ``bias`` is ``None`` when ``bias_std == 0``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        weight_std: float = 1.0,
        bias_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        self.weight_std = std("weight_std", weight_std)
        self.bias_std = std("bias_std", bias_std)
        generator = check_generator(generator)
        self.weight = nn.Parameter(torch.randn(self.out_features, self.in_features, generator=generator))
        if self.bias_std > 0:
            self.bias: nn.Parameter | None = nn.Parameter(torch.randn(self.out_features, generator=generator))
        else:
            self.register_parameter("bias", None)

    @property
    def weight_scale(self) -> float:
        """The factor :math:`\\sigma_w / \\sqrt{d_{in}}` that multiplies ``a @ weight.T``."""
        return self.weight_std / math.sqrt(self.in_features)

    @property
    def bias_scale(self) -> float:
        """The factor :math:`\\sigma_b` that multiplies ``bias``."""
        return self.bias_std

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        z = self.weight_scale * (a @ self.weight.T)
        if self.bias is not None:
            z = z + self.bias_scale * self.bias
        return z

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_std={self.weight_std}, bias_std={self.bias_std}"
        )


def dense(
    in_features: int,
    out_features: int,
    *,
    parameterization: Parameterization = "ntk",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
    layer: LayerRole | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """One dense layer in the requested parameterisation.

    ``"ntk"`` returns an :class:`NTKLinear`. ``"mup"`` returns a :class:`~ntkbook.mup.MuPLinear`, which needs
    ``layer`` (``"input"``, ``"hidden"`` or ``"output"``): in μP the scaling depends on where the layer
    sits. ``"standard"`` returns ``nn.Linear(in_features, out_features)`` initialised as PyTorch does
    (uniform on :math:`\\pm 1/\\sqrt{d_{in}}` for the weight and the bias) but from ``generator``;
    ``weight_std`` and ``bias_std`` do not apply to it and must keep their defaults.
    """
    if parameterization not in ("ntk", "standard", "mup"):
        raise ValueError(f"parameterization must be 'ntk', 'standard' or 'mup', got {parameterization!r}")
    if parameterization == "mup":
        if layer is None:
            raise ValueError("parameterization='mup' needs layer='input', 'hidden' or 'output'")
        return MuPLinear(
            in_features, out_features, layer=layer, weight_std=weight_std, bias_std=bias_std, generator=generator
        )
    if layer is not None:
        raise ValueError(f"layer applies to parameterization='mup' only; leave it None for {parameterization!r}")
    if parameterization == "ntk":
        return NTKLinear(in_features, out_features, weight_std=weight_std, bias_std=bias_std, generator=generator)
    if weight_std != 1.0 or bias_std != 0.0:
        raise ValueError(
            "weight_std and bias_std set the NTK and μP parameterisations; with parameterization='standard' "
            f"leave them at 1.0 and 0.0 (got weight_std={weight_std}, bias_std={bias_std})"
        )
    in_features, out_features = _check_dims(in_features=in_features, out_features=out_features)
    generator = check_generator(generator)
    layer = nn.Linear(in_features, out_features)
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        # nn.Linear's own reset_parameters draws from the global RNG; redraw from `generator`.
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


class TwoLayerNet(nn.Module):
    """One hidden ReLU layer of width :math:`m`, mapping ``(n, d)`` to ``(n, k)``.

    In the NTK parameterisation with ``bias_std = 0``,
    :math:`f(x) = \\frac{\\sigma_w}{\\sqrt m} V\\,\\mathrm{relu}\\big(\\frac{\\sigma_w}{\\sqrt d} W x\\big)`
    with :math:`W, V` entrywise :math:`\\mathcal N(0, 1)`; in the standard one,
    :math:`f(x) = V\\,\\mathrm{relu}(W x + b) + c` with PyTorch's initialisation.

    The network of chapter 1 (:doc:`/chapters/01_loop_ntk`). Layers are ``hidden`` and ``readout``;
    see :func:`dense` for the parameterisations (with ``"mup"``, ``hidden`` is μP's input layer).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int = 1,
        *,
        parameterization: Parameterization = "ntk",
        weight_std: float = 1.0,
        bias_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_dims(input_dim=input_dim, hidden_dim=hidden_dim, output_dim=output_dim)
        kwargs = {
            "parameterization": parameterization,
            "weight_std": weight_std,
            "bias_std": bias_std,
            "generator": generator,
        }
        mup = parameterization == "mup"
        self.hidden = dense(input_dim, hidden_dim, layer="input" if mup else None, **kwargs)
        self.readout = dense(hidden_dim, output_dim, layer="output" if mup else None, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.relu(self.hidden(x)))


class HadamardNet(nn.Module):
    """A hidden layer that is the Hadamard product of two ReLU branches.

    :math:`f(x) = V\\,[\\mathrm{relu}(W_1 x) \\odot \\mathrm{relu}(W_2 x)]`, shape ``(n, d) -> (n, k)``,
    the building block of polynomial nets, where each product :math:`W a` carries the factor
    :math:`\\sigma_w/\\sqrt{\\text{fan-in}}` in the NTK parameterisation (see :func:`dense`). Layers are ``branch1``, ``branch2`` and ``readout``;
    see :func:`dense` for the ``"ntk"`` and ``"standard"`` parameterisations.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int = 1,
        *,
        parameterization: Parameterization = "ntk",
        weight_std: float = 1.0,
        bias_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_dims(input_dim=input_dim, hidden_dim=hidden_dim, output_dim=output_dim)
        if parameterization == "mup":
            # μP's scalings are derived for layers that feed one another, not for products of branches.
            raise ValueError("HadamardNet takes parameterization 'ntk' or 'standard', got 'mup'")
        kwargs = {
            "parameterization": parameterization,
            "weight_std": weight_std,
            "bias_std": bias_std,
            "generator": generator,
        }
        self.branch1 = dense(input_dim, hidden_dim, **kwargs)
        self.branch2 = dense(input_dim, hidden_dim, **kwargs)
        self.readout = dense(hidden_dim, output_dim, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.relu(self.branch1(x)) * torch.relu(self.branch2(x)))


def mlp(
    input_dim: int,
    width: int,
    depth: int,
    output_dim: int = 1,
    *,
    parameterization: Parameterization = "ntk",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
    activation: str = "relu",
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """A fully connected network with ``depth`` hidden layers of ``width`` units.

    ``input_dim -> width -> ... -> width -> output_dim`` with ``activation`` after every hidden layer
    and a linear readout; maps ``(n, input_dim)`` to ``(n, output_dim)``. Every layer, readout
    included, uses the same ``parameterization``, ``weight_std`` and ``bias_std`` (see :func:`dense`).

    With ``parameterization="mup"`` the layers are :class:`~ntkbook.mup.MuPLinear`: the first is μP's input layer,
    the ``depth - 1`` in between are hidden layers and the last is the readout, with the multipliers
    and initial variances of Yang & Hu (2021), Table 3, for SGD with one global learning rate
    (:math:`m` = ``width``, :math:`d` = ``input_dim``):

    - input layer: multiplier :math:`\\sigma_w\\sqrt{m/d}`, weights :math:`\\mathcal N(0, 1/m)`
      (effective learning rate :math:`\\propto m`);
    - hidden layers: multiplier :math:`\\sigma_w`, weights :math:`\\mathcal N(0, 1/m)` (:math:`\\propto 1`);
    - readout: multiplier :math:`\\sigma_w/\\sqrt m`, weights :math:`\\mathcal N(0, 1/m)`
      (:math:`\\propto 1/m`; the output starts at :math:`O(m^{-1/2})`);
    - biases of the input and hidden layers: multiplier :math:`\\sigma_b\\sqrt m`, :math:`\\mathcal N(0, 1/m)`;
      the readout's bias: multiplier :math:`\\sigma_b`, :math:`\\mathcal N(0, 1)`.

    :func:`~ntkbook.training.train` trains it unchanged; the chapter on feature learning
    (:doc:`/chapters/05_feature_learning`) shows its features move at every width.
    """
    input_dim, width, depth, output_dim = _check_dims(
        input_dim=input_dim, width=width, depth=depth, output_dim=output_dim
    )
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    kwargs = {
        "parameterization": parameterization,
        "weight_std": weight_std,
        "bias_std": bias_std,
        "generator": generator,
    }
    mup = parameterization == "mup"
    layers: list[nn.Module] = []
    fan_in = input_dim
    for index in range(depth):
        role = ("input" if index == 0 else "hidden") if mup else None
        layers += [dense(fan_in, width, layer=role, **kwargs), _ACTIVATIONS[activation]()]
        fan_in = width
    layers.append(dense(fan_in, output_dim, layer="output" if mup else None, **kwargs))
    return nn.Sequential(*layers)
