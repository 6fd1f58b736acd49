"""The convolution rule for ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` and :class:`~ntkbook.convolutional.NTKConv2d`.

A convolution with :math:`G` groups maps ``a`` (n, C, *spatial) to
:math:`z = s\\, (W \\star a) + s_b b` of shape (n, O, *out), with ``W`` (O, C/G, *kernel); ``s = s_b = 1``
for PyTorch's layers, :math:`s = \\sigma_w/\\sqrt{C k^2}` and :math:`s_b = \\sigma_b` for ``NTKConv2d``.
Unfolding each input (im2col, after the layer's own padding) gives its patches :math:`P_i` of shape
(G, D, L): :math:`D = (C/G) \\prod \\text{kernel}` taps per group, :math:`L = \\prod \\text{out}` output
positions, the patch at position :math:`l` holding what the filter meets there (stride and dilation
included). With :math:`g_{ia}` (G, O/G, L) the gradient of output :math:`a` with respect to :math:`z_i`,

.. math::

    \\frac{\\partial f_a(x_i)}{\\partial W_\\gamma} = s\\, g_{ia\\gamma} P_{i\\gamma}^\\top \\;\\; (O/G, D),
    \\qquad \\frac{\\partial f_a(x_i)}{\\partial b} = s_b \\sum_l g_{ia\\cdot l},

and the layer's share of the kernel :math:`\\Theta_{ab}(x_i, x_j)` follows by one of two exact routes
(Novak, Sohl-Dickstein & Schoenholz 2022, who choose between such routes by their cost):

1. **per-input gradients**: ``J`` (n, k, O D) by one batched product per input,
   :math:`(k O/G \\times L)(L \\times D)` per group, :math:`2 n k O D L` flops and :math:`n k O D` numbers
   held, then their Gram, :math:`2 n_1 n_2 \\kappa O D` flops (:math:`\\kappa = k` in trace and diagonal
   modes, :math:`k^2` in full mode);
2. **patch Grams**: :math:`\\Theta_{ab}(i, j) = s^2 \\sum_\\gamma \\sum_{l, l'} \\langle g_{ia\\gamma l},
   g_{jb\\gamma l'} \\rangle \\langle P_{i\\gamma l}, P_{j\\gamma l'} \\rangle`, never forming ``O D``
   gradients: :math:`2 n_1 n_2 G L_1 L_2 (D + \\kappa O/G + \\rho)` flops and :math:`n_1 n_2 G L_1 L_2 (1 +
   \\rho)` numbers, :math:`\\rho = 1, k, k^2` kernel entries per pair of inputs in trace, diagonal and full mode.

:meth:`ConvFeature.pair` takes the route with fewer flops (a side's ``J`` already formed costs nothing
more) among those whose memory is at most route 1's; route 2 wins for small outputs (:math:`L^2 n \\lesssim
k O D / G`), route 1 everywhere else. The bias share is :math:`s_b^2 \\langle \\sum_l g_{ia l}, \\sum_{l'}
g_{jb l'} \\rangle` either way. A frozen weight or bias drops its share. Padding modes other than zeros
are applied with ``F.pad`` exactly as the layer applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ntkbook.convolutional import NTKConv2d
from ntkbook.ntk.features import Feature, PerInputGradients, gram
from ntkbook.ntk.structured.dense import plain_forward
from ntkbook.ntk.structured.rules import register

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, NTKConv2d)


@dataclass(frozen=True)
class Geometry:
    """What the layer does to its input: ``pads`` (F.pad order: last dimension first, left then right),
    ``pad_mode`` (for F.pad), per spatial dimension ``kernel``, ``stride``, ``dilation``; ``groups``; the
    multipliers ``s``, ``s_b``; which parameters are trained."""

    pads: tuple[int, ...]
    pad_mode: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    s: float
    s_b: float
    weight: bool
    bias: bool


def geometry(module: nn.Module) -> Geometry | None:
    """The layer's geometry, or ``None`` where the rule does not know its forward."""
    if not plain_forward(module) or not _consistent(module):
        return None
    trained = (module.weight.requires_grad, module.bias is not None and module.bias.requires_grad)
    if type(module) is NTKConv2d:
        half = module.kernel_size // 2
        kernel = (module.kernel_size,) * 2
        return Geometry(
            (half,) * 4, "constant", kernel, (1, 1), (1, 1), 1, module.weight_scale, module.bias_std, *trained
        )
    # PyTorch's forward pads zeros by the live ``padding`` and other modes by the amounts cached when the
    # layer was built ('same' puts an odd total's extra element on the right).
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pads = tuple(module._reversed_padding_repeated_twice) if mode != "constant" else _zero_pads(module)
    return Geometry(pads, mode, module.kernel_size, module.stride, module.dilation, module.groups, 1.0, 1.0, *trained)


def _consistent(module: nn.Module) -> bool:
    """Whether the attributes the geometry is read from agree with the weight, as they do unless changed
    after the layer was built (``conv.kernel_size = ...``, a weight of another shape): forward reads the
    weight, the rule the attributes."""
    spatial = tuple(module.weight.shape[2:])
    if type(module) is NTKConv2d:
        return spatial == (module.kernel_size,) * 2
    sizes = (module.kernel_size, module.stride, module.dilation)
    padding_fits = module.padding in ("valid", "same") or (
        isinstance(module.padding, tuple) and len(module.padding) == len(spatial)
    )
    return spatial == tuple(module.kernel_size) and padding_fits and all(len(t) == len(spatial) for t in sizes)


def _zero_pads(module: nn.Module) -> tuple[int, ...]:
    """``F.pad``'s amounts (last dimension first) for the padding ``F.conv`` applies from ``module.padding``."""
    padding = module.padding
    if padding == "valid":
        return (0, 0) * len(module.kernel_size)
    pads: list[int] = []
    for i in reversed(range(len(module.kernel_size))):
        if padding == "same":
            total = module.dilation[i] * (module.kernel_size[i] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [padding[i], padding[i]]
    return tuple(pads)


def patches(a: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """``(n, G, D, L)``: each input's patches per group, taps ordered as in ``weight`` (channel, then
    kernel offsets), positions in row-major order of the output."""
    n, c = a.shape[:2]
    dims = len(geo.kernel)
    if any(geo.pads):
        a = F.pad(a, geo.pads, mode=geo.pad_mode)
    for d, (k, stride, dil) in enumerate(zip(geo.kernel, geo.stride, geo.dilation)):
        # Windows of span dil*(k-1)+1 every `stride` positions, then every dil-th tap of each window.
        a = a.unfold(2 + d, dil * (k - 1) + 1, stride)
        if dil > 1:
            a = a[..., ::dil]
    out = a.shape[2 : 2 + dims]
    # (n, C, *out, *kernel) -> (n, C, *kernel, *out)
    a = a.permute(0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))
    return a.reshape(n, geo.groups, c // geo.groups * math.prod(geo.kernel), math.prod(out))


class _Batch:
    """One batch's patches ``P`` (n, G, D, L), output gradients ``g`` (n, k, G, O/G, L), and the
    per-input weight gradients ``J`` (n, k, O D) without the factor ``s``, formed once when first asked."""

    def __init__(self, P: torch.Tensor | None, g: torch.Tensor) -> None:
        self.P, self.g = P, g
        self.bias = g.sum(-1).flatten(2)  # (n, k, O)
        self._J: torch.Tensor | None = None

    def J(self) -> torch.Tensor:
        if self._J is None:
            n, k, G, Og, L = self.g.shape
            gk = self.g.transpose(1, 2).reshape(n, G, k * Og, L)
            out = torch.matmul(gk, self.P.transpose(-1, -2))  # (n, G, k O/G, D)
            self._J = out.reshape(n, G, k, -1).transpose(1, 2).reshape(n, k, -1)
        return self._J


@dataclass
class ConvFeature(Feature):
    """Inputs ``start:stop`` of one batch of a convolution: see the module docstring for its routes."""

    batch: _Batch
    geo: Geometry
    start: int
    stop: int

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def k(self) -> int:
        return self.batch.g.shape[1]

    def rows(self, start: int, stop: int) -> ConvFeature:
        return ConvFeature(self.batch, self.geo, self.start + start, self.start + min(stop, self.n))

    def _J(self) -> torch.Tensor:
        return self.batch.J()[self.start : self.stop]

    def _bias(self) -> torch.Tensor:
        return self.batch.bias[self.start : self.stop]

    def as_gradients(self) -> PerInputGradients:
        """Weight then bias, as the default rule orders them."""
        parts = [self.geo.s * self._J()] if self.geo.weight else []
        if self.geo.bias:
            parts.append(self.geo.s_b * self._bias())
        return PerInputGradients(torch.cat(parts, dim=2))

    def pair(self, other: Feature, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(other, ConvFeature):
            return super().pair(other, mode)
        total = None
        if self.geo.weight:
            route = patch_gram if choose_patch_gram(self, other, mode) else weight_gram
            total = route(self, other, mode).mul_(self.geo.s**2)
        if self.geo.bias:
            bias = gram(self._bias(), other._bias(), mode).mul_(self.geo.s_b**2)
            total = bias if total is None else total.add_(bias)
        return total, None


def weight_gram(f1: ConvFeature, f2: ConvFeature, mode: str) -> torch.Tensor:
    """Route 1: the Gram of the per-input weight gradients."""
    return gram(f1._J(), f2._J(), mode)


def patch_gram(f1: ConvFeature, f2: ConvFeature, mode: str) -> torch.Tensor:
    """Route 2: products of patch Grams and output-gradient Grams, summed over groups and position pairs."""
    P1, P2 = (f.batch.P[f.start : f.stop] for f in (f1, f2))
    g1, g2 = (f.batch.g[f.start : f.stop] for f in (f1, f2))
    (n1, k, G, Og, L1), (n2, L2) = g1.shape, (g2.shape[0], g2.shape[-1])
    # Patch Gram per group: (G, n1 L1, n2 L2).
    patch = torch.matmul(P1.permute(1, 0, 3, 2).reshape(G, n1 * L1, -1), P2.permute(1, 2, 0, 3).reshape(G, -1, n2 * L2))
    patch = patch.reshape(G, n1, L1, n2, L2)
    if mode == "trace":
        left = g1.permute(2, 0, 4, 1, 3).reshape(G, n1 * L1, k * Og)
        right = g2.permute(2, 1, 3, 0, 4).reshape(G, k * Og, n2 * L2)
        grads = torch.matmul(left, right).reshape(G, n1, L1, n2, L2)
        return (grads * patch).sum(dim=(0, 2, 4))
    if mode == "diagonal":
        left = g1.permute(2, 1, 0, 4, 3).reshape(G, k, n1 * L1, Og)
        right = g2.permute(2, 1, 3, 0, 4).reshape(G, k, Og, n2 * L2)
        grads = torch.matmul(left, right).reshape(G, k, n1, L1, n2, L2)
        return (grads * patch[:, None]).sum(dim=(0, 3, 5)).permute(1, 2, 0)
    left = g1.permute(2, 0, 1, 4, 3).reshape(G, n1 * k * L1, Og)
    right = g2.permute(2, 3, 0, 1, 4).reshape(G, Og, n2 * k * L2)
    grads = torch.matmul(left, right).reshape(G, n1, k, L1, n2, k, L2)
    return (grads * patch[:, :, None, :, :, None]).sum(dim=(0, 3, 6)).permute(0, 2, 1, 3)


def route_costs(f1: ConvFeature, f2: ConvFeature, mode: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """``((flops, numbers held) of route 1, the same of route 2)`` for this pair; see the module docstring."""
    n1, n2, k = f1.n, f2.n, f1.k
    G, D, L1 = f1.batch.P.shape[1:]
    O, L2 = G * f1.batch.g.shape[3], f2.batch.P.shape[3]
    kappa, rho = (k * k, k * k) if mode == "full" else (k, k if mode == "diagonal" else 1)
    unformed = [(f.n, f.batch.P.shape[3]) for f in {id(f1.batch): f1, id(f2.batch): f2}.values() if f.batch._J is None]
    route1 = (
        2.0 * sum(n * k * O * D * L for n, L in unformed) + 2.0 * n1 * n2 * kappa * O * D,
        float((n1 + n2) * k * O * D),
    )
    route2 = (2.0 * n1 * n2 * G * L1 * L2 * (D + kappa * O / G + rho), float(n1 * n2 * G * L1 * L2 * (1 + rho)))
    return route1, route2


def choose_patch_gram(f1: ConvFeature, f2: ConvFeature, mode: str) -> bool:
    """Route 2 when it takes fewer flops and no more memory than route 1."""
    (flops1, memory1), (flops2, memory2) = route_costs(f1, f2, mode)
    return flops2 < flops1 and memory2 <= memory1


@register(*CONVOLUTIONS)
def conv_rule(module: nn.Module, name: str, args: tuple, g: torch.Tensor) -> ConvFeature | None:
    """The layer's :class:`ConvFeature`; ``None`` (the default rule) for an unbatched input or a layer
    whose forward the rule does not know."""
    geo = geometry(module)
    dims = len(geo.kernel) if geo is not None else 0
    if geo is None or len(args) != 1 or args[0].ndim != dims + 2 or g.ndim != dims + 3:
        return None
    n, k, O = g.shape[:3]
    P = patches(args[0], geo) if geo.weight else None
    if P is not None and P.shape[3] != math.prod(g.shape[3:]):
        return None
    return ConvFeature(_Batch(P, g.reshape(n, k, geo.groups, O // geo.groups, -1)), geo, 0, n)
