"""The independent oracle the kernel tests compare against: explicit per-input gradients from
``torch.autograd.grad``, one input run alone and one output at a time, in a plain loop (no vmap, no
hooks, none of ntkbook's code). Run in float64, it agrees with a correct kernel to about 1e-16 of the
kernel's scale per entry, so the tests compare at 1e-10.

Imported as ``autograd_oracle`` by the tests (pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import torch
from torch import nn


def oracle(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
    """Θ ``(n1, n2, k, k)`` from the per-input gradients of every trainable parameter (an unused
    parameter contributes zeros, a sparse gradient is made dense)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def jacobian(x: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(x.shape[0]):
            out = model(x[i : i + 1]).reshape(-1)
            for a in range(out.numel()):
                grads = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
                flat = [(torch.zeros_like(p) if g is None else g.to_dense()).reshape(-1) for g, p in zip(grads, params)]
                rows.append(torch.cat(flat))
        return torch.stack(rows).reshape(x.shape[0], -1, sum(p.numel() for p in params))

    j1 = jacobian(x1)
    j2 = j1 if x2 is None else jacobian(x2)
    return torch.einsum("iap,jbp->ijab", j1, j2)


def in_mode(full: torch.Tensor, mode: str) -> torch.Tensor:
    """The oracle's ``(n1, n2, k, k)`` kernel in ``mode``'s shape, squeezed as ``empirical_ntk`` squeezes
    one output."""
    if full.shape[-1] == 1:
        return full[:, :, 0, 0]
    if mode == "trace":
        return full.diagonal(dim1=2, dim2=3).sum(-1)
    return full.diagonal(dim1=2, dim2=3) if mode == "diagonal" else full
