"""Method ``"loop"``: one backward pass per input and output (chapter 1)."""

from __future__ import annotations

import torch

from ntkbook.ntk.features import Features, PerInputGradients
from ntkbook.ntk.grads import flat_gradient
from ntkbook.ntk.request import Request, apply


def loop_features(request: Request, name: str, x: torch.Tensor) -> Features:
    """Per-input gradients ``(n, k, P)``: one forward pass for the batch, then one backward pass of the
    model's own autograd per input and output, :math:`J_{(i, a)} = \\nabla_\\theta f_a(x_i)`."""
    out = apply(request.model, name, x)
    n, k = out.shape
    rows = [
        flat_gradient(out[i, a], request.params, None, retain_graph=not (i + 1 == n and a + 1 == k))
        for i in range(n)
        for a in range(k)
    ]
    # One feature per parameter tensor, as for "jacobian": each Gram sums over one tensor's entries only.
    parts = torch.stack(rows).split([p.numel() for p in request.params], dim=1)
    return {i: PerInputGradients(part.reshape(n, k, -1)) for i, part in enumerate(parts)}
