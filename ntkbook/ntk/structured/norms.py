"""Rules for the affine parameters of ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.BatchNorm1d/2d/3d``
(the last in eval mode, with running statistics).

Each normalises its input to :math:`\\hat x` and applies a per-feature scale and shift,
:math:`z = \\hat x \\odot w + b`, with :math:`w, b` indexed by the normalised features (LayerNorm) or by
the channel (GroupNorm, BatchNorm) and broadcast over the other positions. With
:math:`g_{ic} = \\partial f_c(x_i)/\\partial z_i`, the per-input gradients are sums over positions,

.. math::

    \\frac{\\partial f_c(x_i)}{\\partial w} = \\sum_{\\text{positions}} g_{ic} \\odot \\hat x_i, \\qquad
    \\frac{\\partial f_c(x_i)}{\\partial b} = \\sum_{\\text{positions}} g_{ic},

formed directly from :math:`\\hat x` (recomputed from the recorded input by torch's own normalisation
without the affine part) and :math:`g`, no ``vmap``: :math:`n k \\cdot` (the input's size per example)
multiply-adds, memory :math:`n k p` for the ``p`` affine parameters plus one normalised input.
BatchNorm in training mode (or without running statistics) normalises with the batch's statistics,
which mixes the inputs: the rule declines, and the checks of ``empirical_ntk`` refuse such a model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ntkbook.ntk.features import PerInputGradients
from ntkbook.ntk.structured.dense import plain_forward
from ntkbook.ntk.structured.rules import register


def affine_gradients(
    module: nn.Module, xhat: torch.Tensor, g: torch.Tensor, channels: int, channel_first: bool
) -> PerInputGradients:
    """Per-input gradients of ``module.weight`` then ``module.bias`` (those that require grad), each of
    ``channels`` entries: the normalised features last (``channel_first=False``) or in dimension 1."""
    n, k = g.shape[:2]
    if channel_first:
        xhat, g = xhat.reshape(n, channels, -1), g.reshape(n, k, channels, -1)
        weight_sum, bias_sum = "nkcp,ncp->nkc", 3
    else:
        xhat, g = xhat.reshape(n, -1, channels), g.reshape(n, k, -1, channels)
        weight_sum, bias_sum = "nkpc,npc->nkc", 2
    parts = []
    if module.weight is not None and module.weight.requires_grad:
        parts.append(torch.einsum(weight_sum, g, xhat))
    if module.bias is not None and module.bias.requires_grad:
        parts.append(g.sum(bias_sum))
    return PerInputGradients(torch.cat(parts, dim=2))


def _plain(module: nn.Module, args: tuple, channels: int | None = None) -> bool:
    """Whether the rule knows the layer's forward; with ``channels``, whether that count, read from the
    layer (``num_channels``), matches its affine parameters and its input's dimension 1 (they differ
    only where an attribute or a parameter was replaced after the layer was built)."""
    if not (plain_forward(module) and len(args) == 1 and args[0].is_floating_point()):
        return False
    if channels is None:
        return True
    affine = (p for p in (module.weight, module.bias) if p is not None)
    return args[0].ndim >= 2 and args[0].shape[1] == channels and all(p.shape == (channels,) for p in affine)


@register(nn.LayerNorm)
def layer_norm_rule(module: nn.LayerNorm, name: str, args: tuple, g: torch.Tensor) -> PerInputGradients | None:
    """:math:`\\hat x` = ``layer_norm`` over the last ``len(normalized_shape)`` dimensions."""
    if not _plain(module, args) or args[0].ndim <= len(module.normalized_shape):
        return None
    xhat = F.layer_norm(args[0], module.normalized_shape, None, None, module.eps)
    return affine_gradients(module, xhat, g, math.prod(module.normalized_shape), False)


@register(nn.GroupNorm)
def group_norm_rule(module: nn.GroupNorm, name: str, args: tuple, g: torch.Tensor) -> PerInputGradients | None:
    """:math:`\\hat x` = ``group_norm`` of ``(n, C, ...)`` in ``num_groups`` groups of channels."""
    if not _plain(module, args, module.num_channels):
        return None
    xhat = F.group_norm(args[0], module.num_groups, None, None, module.eps)
    return affine_gradients(module, xhat, g, module.num_channels, True)


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm_rule(
    module: nn.modules.batchnorm._BatchNorm, name: str, args: tuple, g: torch.Tensor
) -> PerInputGradients | None:
    """:math:`\\hat x = (x - \\mu_{\\text{running}}) / \\sqrt{\\sigma^2_{\\text{running}} + \\epsilon}` per channel
    (dimension 1), in eval mode only."""
    if not _plain(module, args, module.num_features) or module.training or module.running_mean is None:
        return None
    xhat = F.batch_norm(args[0], module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
    return affine_gradients(module, xhat, g, module.num_features, True)
