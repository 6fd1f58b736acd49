"""The dense-factor rule for ``nn.Linear`` (and attention's ``out_proj`` class),
:class:`~ntkbook.models.NTKLinear` and :class:`~ntkbook.mup.MuPLinear`.

For :math:`z = s W a + s_b b` the gradient of output :math:`f_c` is
:math:`\\partial f_c/\\partial W = s\\, g_c a^\\top` and :math:`\\partial f_c/\\partial b = s_b g_c`, with
:math:`g_c = \\partial f_c/\\partial z`. So on ``(n, d)`` inputs the layer's share of the kernel is

.. math::

    \\Theta^{(l)}_{ab}(x, x') = \\langle g_a, g'_b \\rangle \\big(s^2 \\langle a, a' \\rangle + s_b^2\\big),

a Gram of output gradients times a Gram of inputs: ``n x n`` products of length ``width``, never a
``(n, k, width x width)`` Jacobian; memory :math:`n k m + n d` plus the kernel. This is the code
chapter 6 shows. On ``(n, ..., d)`` inputs the same layer acts at every position: :mod:`.sequence`.
"""

from __future__ import annotations

import torch
from torch import nn

from ntkbook.models import NTKLinear
from ntkbook.mup import MuPLinear
from ntkbook.ntk.features import DenseFactors, Feature
from ntkbook.ntk.structured.rules import register
from ntkbook.ntk.structured.sequence import sequence_factors

# Attention's out_proj: an nn.Linear subclass that only changes how quantization treats it.
PLAIN_LINEAR = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def plain_forward(module: nn.Module, names: tuple[str, ...] = ("weight", "bias")) -> bool:
    """Whether ``module``'s forward is its class's, on its own parameters ``names`` used as they are:
    no pruning mask or other hook in between, no ``forward`` replaced on the instance. The
    verification would catch the others; this guard spares a wasted attempt."""
    own = module._parameters
    if any(own.get(key) is not getattr(module, key) for key in names):
        return False
    if module._forward_pre_hooks or module._forward_hooks or "forward" in vars(module):
        return False
    global_hooks = (getattr(nn.modules.module, h, None) for h in ("_global_forward_pre_hooks", "_global_forward_hooks"))
    return not any(global_hooks)


def dense_multipliers(module: nn.Module) -> tuple[float, float] | None:
    """``(s, s_b)`` of a dense layer whose forward is known exactly (see :func:`plain_forward`)."""
    if not plain_forward(module):
        return None
    return (1.0, 1.0) if type(module) in PLAIN_LINEAR else (module.weight_scale, module.bias_scale)


@register(*PLAIN_LINEAR, NTKLinear, MuPLinear)
def dense_rule(module: nn.Module, name: str, args: tuple, g: torch.Tensor) -> Feature | None:
    """The factors ``(A, G, s^2, s_b^2)``: :class:`DenseFactors` on ``(n, d)`` inputs,
    :class:`~ntkbook.ntk.structured.sequence.SequenceFactors` on ``(n, ..., d)``; ``None`` (the default
    rule) for other inputs."""
    factors = dense_multipliers(module)
    if factors is None or len(args) != 1 or args[0].ndim < 2:
        return None
    s, s_b = factors
    a = args[0] if module.weight.requires_grad else None
    sb2 = s_b**2 if module.bias is not None and module.bias.requires_grad else 0.0
    if args[0].ndim == 2:
        return DenseFactors(a, g, s**2, sb2)
    return sequence_factors(a, g, s**2, sb2)
