"""The dense-factor rule for ``nn.Linear``, :class:`~ntkbook.models.NTKLinear` and :class:`~ntkbook.models.MuPLinear` on ``(n, d)`` inputs.

For :math:`z = s W a + s_b b` the gradient of output :math:`f_c` is
:math:`\\partial f_c/\\partial W = s\\, g_c a^\\top` and :math:`\\partial f_c/\\partial b = s_b g_c`, with
:math:`g_c = \\partial f_c/\\partial z`. So the layer's share of the kernel is

.. math::

    \\Theta^{(l)}_{ab}(x, x') = \\langle g_a, g'_b \\rangle \\big(s^2 \\langle a, a' \\rangle + s_b^2\\big),

a Gram of output gradients times a Gram of inputs: ``n x n`` products of length ``width``, never a
``(n, k, width x width)`` Jacobian. This is the code chapter 6 shows.
"""

from __future__ import annotations

import torch
from torch import nn

from ntkbook.models import NTKLinear
from ntkbook.mup import MuPLinear
from ntkbook.ntk.features import DenseFactors
from ntkbook.ntk.structured.rules import register


def dense_multipliers(module: nn.Module) -> tuple[float, float] | None:
    """``(s, s_b)`` of a layer whose forward is known exactly: its ``weight`` and ``bias`` are its own
    parameters, used as they are (no pruning mask or other hook in between, no ``forward`` replaced on
    the instance). The verification would catch the others; this guard spares a wasted attempt."""
    factors = (1.0, 1.0) if type(module) is nn.Linear else (module.weight_scale, module.bias_scale)
    own = module._parameters
    if own.get("weight") is not module.weight or own.get("bias") is not module.bias:
        return None
    if module._forward_pre_hooks or module._forward_hooks or "forward" in vars(module):
        return None
    global_hooks = (getattr(nn.modules.module, h, None) for h in ("_global_forward_pre_hooks", "_global_forward_hooks"))
    if any(global_hooks):
        return None
    return factors


@register(nn.Linear, NTKLinear, MuPLinear)
def dense_rule(module: nn.Module, name: str, args: tuple, g: torch.Tensor) -> DenseFactors | None:
    """The factors ``(A, G, s^2, s_b^2)``; ``None`` (the default rule) for other input shapes."""
    factors = dense_multipliers(module)
    if factors is None or len(args) != 1 or args[0].ndim != 2:
        return None
    s, s_b = factors
    a = args[0] if module.weight.requires_grad else None
    sb2 = s_b**2 if module.bias is not None and module.bias.requires_grad else 0.0
    return DenseFactors(a, g, s**2, sb2)
