"""Parameter gradients by the model's own autograd: what the loop method and the verification use."""

from __future__ import annotations

import torch


def flat_gradient(
    output: torch.Tensor,
    params: list[torch.Tensor],
    cotangent: torch.Tensor | None,
    retain_graph: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:math:`\\nabla_\\theta \\langle c, f \\rangle` for the cotangent ``c`` (the shape of ``output``;
    ``None`` for a scalar output), as one flat vector over ``params`` in order: unused parameters give
    zeros, sparse gradients (``nn.Embedding(sparse=True)``) are made dense; written into ``out`` if given.

    A model with reentrant ``torch.utils.checkpoint`` cannot be differentiated by
    ``torch.autograd.grad``; it gets ``backward()`` instead, with every ``.grad`` restored after."""
    if not output.requires_grad:
        # An output that no trainable parameter reaches (a frozen branch) has a zero gradient.
        grads = [None] * len(params)
    else:
        grads = _autograd_gradients(output, params, cotangent, retain_graph)
    parts = []
    for g, p in zip(grads, params):
        if g is None:
            g = torch.zeros_like(p)
        elif g.layout != torch.strided:
            g = g.to_dense()
        parts.append(g.reshape(-1))
    return torch.cat(parts, out=out) if out is not None else torch.cat(parts)


def _autograd_gradients(
    output: torch.Tensor, params: list[torch.Tensor], cotangent: torch.Tensor | None, retain_graph: bool
) -> list[torch.Tensor | None]:
    """``torch.autograd.grad``, or ``backward()`` for a model with reentrant checkpointing."""
    try:
        # The graph is kept through a failed attempt, so that backward() can still run after it.
        grads = torch.autograd.grad(output, params, cotangent, retain_graph=True, allow_unused=True)
    except RuntimeError as err:
        if "checkpoint" not in str(err):
            raise
        saved = [p.grad for p in params]
        try:
            for p in params:
                p.grad = None
            output.backward(cotangent, retain_graph=retain_graph)
            grads = [p.grad for p in params]
        finally:
            for p, g in zip(params, saved):
                p.grad = g
    return list(grads)
