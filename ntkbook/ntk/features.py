"""Per-input features of a batch, and their Gram matrices in each mode.

A method turns a batch of ``n`` inputs into features from which any block of the kernel is a sum of
Grams. Two kinds exist:

- :class:`PerInputGradients`: ``J`` of shape ``(n, k, p)``, the gradients of the ``k`` outputs of each
  input with respect to ``p`` parameters; its share of the kernel is :math:`J J'^\\top`.
- :class:`DenseFactors`: for a dense layer :math:`z = s W a + s_b b`, the layer inputs ``A`` (n, d) and
  the output gradients ``G`` (n, k, m); since :math:`\\partial f/\\partial W = s\\, g a^\\top`, its share
  is :math:`(G G'^\\top) \\odot (s^2 A A'^\\top + s_b^2)` without ever forming ``g a^T``.

A rule for another layer type may define its own kind: a subclass of :class:`Feature` that knows its
rows, its explicit per-input gradients (to pair with a batch on which the layer needed the default
rule), and overrides :meth:`Feature.pair` for a cheaper Gram with its own kind.

Features are kept in a dict keyed by what they belong to (a layer's qualified name, or one tensor of
all parameters), so that two batches are paired by layer, not by position: ``x1`` and ``x2`` may take
different branches of a model, and a layer only one of them reaches contributes nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


class Feature(ABC):
    """One layer's (or one method's) per-input feature of a batch of ``n`` inputs with ``k`` outputs."""

    @property
    @abstractmethod
    def n(self) -> int: ...

    @property
    @abstractmethod
    def k(self) -> int: ...

    @abstractmethod
    def rows(self, start: int, stop: int) -> Feature:
        """The feature of inputs ``start:stop``."""

    @abstractmethod
    def as_gradients(self) -> PerInputGradients:
        """The same share of the kernel as explicit per-input gradients ``(n, k, p)``."""

    def pair(self, other: Feature, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This share of the kernel block against ``other`` (the same layer on another batch): a Gram in
        ``mode``'s shape and an optional factor it is multiplied by elementwise. The default forms
        both sides' per-input gradients; a kind overrides it for a cheaper route with its own kind."""
        return gram(self.as_gradients().J, other.as_gradients().J, mode), None


class OutputGradientFeature(Feature):
    """A kind built on the output gradients ``G`` (n, k, ...) of its layer: its rows are those of ``G``."""

    G: torch.Tensor

    @property
    def n(self) -> int:
        return self.G.shape[0]

    @property
    def k(self) -> int:
        return self.G.shape[1]


@dataclass
class PerInputGradients(Feature):
    """``J`` (n, k, p): per-input gradients of the outputs with respect to ``p`` parameters."""

    J: torch.Tensor

    @property
    def n(self) -> int:
        return self.J.shape[0]

    @property
    def k(self) -> int:
        return self.J.shape[1]

    def rows(self, start: int, stop: int) -> PerInputGradients:
        return PerInputGradients(self.J[start:stop])

    def as_gradients(self) -> PerInputGradients:
        return self


@dataclass
class DenseFactors(OutputGradientFeature):
    """A dense layer's factors: inputs ``A`` (n, d), or ``None`` when the weight is frozen; output
    gradients ``G`` (n, k, m); the squared weight and bias multipliers ``s2``, ``sb2`` (0 without a
    trainable bias)."""

    A: torch.Tensor | None
    G: torch.Tensor
    s2: float
    sb2: float

    def rows(self, start: int, stop: int) -> DenseFactors:
        a = None if self.A is None else self.A[start:stop]
        return DenseFactors(a, self.G[start:stop], self.s2, self.sb2)

    def as_gradients(self) -> PerInputGradients:
        """The same share as explicit per-input gradients, weight then bias: to pair with a batch on
        which the layer needed the default rule."""
        n, k, _ = self.G.shape
        parts = []
        if self.A is not None:
            parts.append((self.s2**0.5 * self.G[:, :, :, None] * self.A[:, None, None, :]).reshape(n, k, -1))
        if self.sb2:
            parts.append(self.sb2**0.5 * self.G)
        return PerInputGradients(torch.cat(parts, dim=2))

    def pair(self, other: Feature, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(other, DenseFactors):
            return super().pair(other, mode)
        g = gram(self.G, other.G, mode)
        if self.A is None:
            return g.mul_(self.sb2), None
        # s^2 A A'^T + s_b^2 in one BLAS call; beta=0 skips the bias term of a layer without one.
        inputs = torch.addmm(
            self.A.new_tensor(self.sb2), self.A, other.A.T, beta=1.0 if self.sb2 else 0.0, alpha=self.s2
        )
        factor = inputs if mode == "trace" else inputs[:, :, None] if mode == "diagonal" else inputs[:, :, None, None]
        return g, factor


Features = dict[object, Feature]


# Contractions longer than this are summed as partial Grams over chunks of this length, added up by
# torch's sum (a cascade of partial sums): a BLAS adds the partial sums of a long dot product one after
# another, which in float32 loses about 1e-3 over 4 million products.
GRAM_CHUNK = 4096
# At most this many entries of partial Grams are held at once (64 MiB in float32).
PARTIALS = 2**24


def _gram_once(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    n1, k, p = a.shape
    n2 = b.shape[0]
    if mode == "full":
        return (a.reshape(n1 * k, p) @ b.reshape(n2 * k, p).T).reshape(n1, k, n2, k).permute(0, 2, 1, 3)
    if mode == "trace":
        return a.reshape(n1, k * p) @ b.reshape(n2, k * p).T
    return torch.bmm(a.transpose(0, 1), b.permute(1, 2, 0)).permute(1, 2, 0)


def _chunked_gram(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """:func:`_gram_once` of ``a`` (n1, k, q C) and ``b`` (n2, k, q C), ``C = GRAM_CHUNK``, as ``q``
    partial Grams by batched products (one BLAS call per group of chunks: leaves this small run slowly
    one by one), summed over the chunks. Each group is copied into place: memory ``PARTIALS`` plus
    one group of each side."""
    (n1, k, p), n2 = a.shape, b.shape[0]
    q = p // GRAM_CHUNK
    rows, cols = (n1 * k, n2 * k) if mode == "full" else (n1, n2)
    batch = k if mode == "diagonal" else 1
    group = max(1, min(q, PARTIALS // (batch * rows * cols)))

    def chunks(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Chunks ``start:stop`` of ``t`` (m, k, p) as (batch, chunk, m-rows, C)."""
        split = t[:, :, start * GRAM_CHUNK : stop * GRAM_CHUNK].reshape(t.shape[0], k, stop - start, GRAM_CHUNK)
        if mode == "diagonal":  # per output: (output, chunk, m, C)
            return split.permute(1, 2, 0, 3)
        # trace contracts (output, entry) together; full keeps each output's rows apart
        inner = (t.shape[0], -1) if mode == "trace" else (t.shape[0] * k, GRAM_CHUNK)
        return split.permute(2, 0, 1, 3).reshape(1, stop - start, *inner)

    total = None
    for start in range(0, q, group):
        stop = min(q, start + group)
        part = torch.matmul(chunks(a, start, stop), chunks(b, start, stop).transpose(2, 3)).sum(1)
        total = part if total is None else total.add_(part)
    if mode == "diagonal":
        return total.permute(1, 2, 0)
    if mode == "trace":
        return total[0]
    return total[0].reshape(n1, k, n2, k).permute(0, 2, 1, 3)


def gram(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """Contract ``a`` (n1, k, p) with ``b`` (n2, k, p) over ``p``: (n1, n2, k, k) in full mode,
    (n1, n2) summed over outputs in trace mode, (n1, n2, k) per output in diagonal mode. Over more
    than ``GRAM_CHUNK`` entries, as partial Grams over chunks added by a cascade: the rounding then
    grows with the logarithm of ``p``, not with ``p``."""
    p = a.shape[2]
    whole = p // GRAM_CHUNK * GRAM_CHUNK
    if whole <= GRAM_CHUNK:
        return _gram_once(a, b, mode)
    head = _chunked_gram(a[:, :, :whole], b[:, :, :whole], mode)
    return head if whole == p else head.add_(_gram_once(a[:, :, whole:], b[:, :, whole:], mode))


def contract(f1: Features, f2: Features, mode: str) -> torch.Tensor:
    """The kernel block of two feature sets: the sum over their common keys of each share. With one
    output every mode is the ``(n1, n2)`` matrix, computed as such."""
    first = next(iter(f1.values()))
    n1, k = first.n, first.k
    n2 = next(iter(f2.values())).n
    mode = "trace" if k == 1 else mode
    shape = {"full": (n1, n2, k, k), "trace": (n1, n2), "diagonal": (n1, n2, k)}[mode]
    total = None
    for key, e1 in f1.items():
        if key not in f2:
            continue
        g, factor = e1.pair(f2[key], mode)
        if total is None:
            total = g.mul_(factor) if factor is not None else g
        elif factor is None:
            total.add_(g)
        else:
            total.addcmul_(g, factor)
    if total is None:
        return first.rows(0, 0).as_gradients().J.new_zeros(shape)  # an empty slice: only its dtype and device
    return total


def rows(features: Features, start: int, stop: int) -> Features:
    return {key: e.rows(start, stop) for key, e in features.items()}


def batch_size(features: Features) -> int:
    return next(iter(features.values())).n
