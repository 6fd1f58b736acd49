"""The rule for ``nn.Embedding`` on integer token ids ``(n,)`` or ``(n, ...)``.

Row :math:`v` of the table :math:`E` (vocabulary :math:`V` by dimension :math:`m`) is read at every
position where the token id is :math:`v`, so with :math:`g_{isc} = \\partial f_c(x_i)/\\partial z_{is}`
the gradient is sparse, :math:`\\partial f_c(x_i)/\\partial E_v = \\sum_s [\\mathrm{id}_{is} = v]\\, g_{isc}`,
and the layer's share of the kernel is

.. math::

    \\Theta^{(l)}_{cc'}(x_i, x_j) = \\sum_{s,t} [\\mathrm{id}_{is} = \\mathrm{id}_{jt}]\\,
    \\langle g_{isc}, g_{jtc'} \\rangle .

Positions holding ``padding_idx`` get no gradient (torch's rule), so their :math:`g` is set to zero.
Two exact routes, never a dense ``V x m`` gradient per input:

- **per-input gradients on the ids that occur**: the :math:`u` distinct ids of both batches
  (:math:`u \\le \\min(V, n_1 S_1 + n_2 S_2)`), each input's gradient scattered onto those rows
  (memory :math:`(n_1 + n_2) k u m`), then a Gram of :math:`n_1 n_2 c\\, u m` multiply-adds
  (:math:`c = k^2` in full mode, :math:`k` otherwise);
- **token pairs**: the Gram of the output gradients over all position pairs masked by id equality,
  :math:`n_1 n_2 S_1 S_2 c\\, m` multiply-adds, memory :math:`n_1 n_2 S_1 S_2 c`.

:meth:`TokenGradients.pair` takes the cheaper. ``max_norm`` (which rewrites the table during the
forward) and ``scale_grad_by_freq`` (a gradient that depends on the whole batch's counts) are left to
the default rule; ``sparse=True`` changes only how torch stores the gradient, not its value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ntkbook.ntk.features import Feature, OutputGradientFeature, PerInputGradients, gram
from ntkbook.ntk.structured.dense import plain_forward
from ntkbook.ntk.structured.rules import register


@dataclass
class TokenGradients(OutputGradientFeature):
    """Token ids ``ids`` (n, S), output gradients ``G`` (n, k, S, m) (zero at padding positions), and
    the vocabulary size ``vocab`` (only :meth:`as_gradients` needs it)."""

    ids: torch.Tensor
    G: torch.Tensor
    vocab: int

    def rows(self, start: int, stop: int) -> TokenGradients:
        return TokenGradients(self.ids[start:stop], self.G[start:stop], self.vocab)

    def scattered(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-input gradients ``(n, k, len(rows) * m)`` on the table rows ``rows`` (sorted, holding
        every id of this batch)."""
        n, k, s, m = self.G.shape
        slot = torch.searchsorted(rows, self.ids.reshape(-1)) + torch.arange(n, device=rows.device).repeat_interleave(
            s
        ) * len(rows)
        out = self.G.new_zeros(n * len(rows), k, m)
        out.index_add_(0, slot, self.G.transpose(1, 2).reshape(n * s, k, m))
        return out.reshape(n, len(rows), k, m).transpose(1, 2).reshape(n, k, -1)

    def as_gradients(self) -> PerInputGradients:
        """The dense ``(n, k, V * m)`` per-input gradients: only to pair with a batch on which the layer
        needed the default rule."""
        return PerInputGradients(self.scattered(torch.arange(self.vocab, device=self.ids.device)))

    def pair(self, other: Feature, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(other, TokenGradients):
            return super().pair(other, mode)
        (n1, k, s1, m), (n2, _, s2, _) = self.G.shape, other.G.shape
        c = k * k if mode == "full" else k
        rows = torch.unique(torch.cat([self.ids.reshape(-1), other.ids.reshape(-1)]))
        if n1 * n2 * c * len(rows) * m + (n1 * s1 + n2 * s2) * k * m <= n1 * n2 * s1 * s2 * c * (m + 1):
            first = self.scattered(rows)
            return gram(first, first if other is self else other.scattered(rows), mode), None
        same = (self.ids.reshape(n1, s1, 1, 1) == other.ids.reshape(1, 1, n2, s2)).to(self.G.dtype)
        if mode == "trace":
            g1 = self.G.transpose(1, 2).reshape(n1 * s1, k * m)
            g2 = other.G.transpose(1, 2).reshape(n2 * s2, k * m)
            return torch.einsum("isjt,isjt->ij", (g1 @ g2.T).reshape(n1, s1, n2, s2), same), None
        if mode == "diagonal":
            grads = torch.bmm(
                self.G.transpose(0, 1).reshape(k, n1 * s1, m), other.G.permute(1, 3, 0, 2).reshape(k, m, n2 * s2)
            )
            return torch.einsum("cisjt,isjt->ijc", grads.reshape(k, n1, s1, n2, s2), same), None
        grads = (self.G.reshape(n1 * k * s1, m) @ other.G.reshape(n2 * k * s2, m).T).reshape(n1, k, s1, n2, k, s2)
        return torch.einsum("iasjbt,isjt->ijab", grads, same), None


@register(nn.Embedding)
def embedding_rule(module: nn.Module, name: str, args: tuple, g: torch.Tensor) -> TokenGradients | None:
    """Ids ``(n, ...)`` with gradients ``(n, k, ..., m)`` flattened to ``(n, S)`` and ``(n, k, S, m)``;
    ``None`` (the default rule) for ``max_norm``, ``scale_grad_by_freq`` or anything but integer ids."""
    if not plain_forward(module, ("weight",)) or module.max_norm is not None or module.scale_grad_by_freq:
        return None
    if len(args) != 1 or args[0].is_floating_point() or args[0].is_complex() or args[0].dtype == torch.bool:
        return None
    n, k, m = g.shape[0], g.shape[1], g.shape[-1]
    ids = args[0].reshape(n, -1)
    grads = g.reshape(n, k, ids.shape[1], m)
    if module.padding_idx is not None:
        padding = module.padding_idx % module.weight.shape[0]  # F.embedding counts a negative one from the end
        grads = grads.masked_fill((ids == padding)[:, None, :, None], 0.0)
    return TokenGradients(ids, grads, module.num_embeddings)
