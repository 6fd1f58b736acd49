"""A dense layer applied at every position of a sequence: ``nn.Linear`` on ``(n, ..., d)`` inputs.

For :math:`z_{is} = s W a_{is} + s_b b` at positions :math:`s = 1..S` of input :math:`i` (all leading
dimensions after the batch flattened into one), the gradient of output :math:`f_c(x_i)` is a sum over
positions, :math:`\\partial f_c/\\partial W = s \\sum_s g_{isc} a_{is}^\\top = s\\, G_{ic}^\\top A_i` and
:math:`\\partial f_c/\\partial b = s_b \\sum_s g_{isc}`, with :math:`g_{isc} = \\partial f_c(x_i)/\\partial z_{is}`.
The layer's share of the kernel is therefore

.. math::

    \\Theta^{(l)}_{cc'}(x_i, x_j) = \\sum_{s,t} \\langle g_{isc}, g_{jtc'} \\rangle
    \\big(s^2 \\langle a_{is}, a_{jt} \\rangle + s_b^2\\big),

which two routes compute exactly:

- **per-input gradients** :math:`J_{ic} = s\\, G_{ic}^\\top A_i` (``m x d`` each) and their Gram:
  :math:`(n_1 + n_2) k S m d` multiply-adds to form them, :math:`n_1 n_2 c\\, m d` for the Gram
  (:math:`c = k^2` in full mode, :math:`k` in trace and diagonal modes); memory :math:`n k m d`, or
  above ``SLICE_ENTRIES`` (:math:`2^{20}`) entries a slice along the longer of the gradients' two sides
  (output rows or input columns) at a time, :math:`2^{20}` entries
  per side plus the :math:`n_1 n_2 c` block (for the symmetric kernel, one Gram of the whole batch is
  kept and its halves read from it);
- **token-pair Grams**, the Gram of the output gradients over all position pairs times the Gram of the
  inputs: :math:`n_1 n_2 S_1 S_2 (d + c\\, m)` multiply-adds, memory :math:`n_1 n_2 S_1 S_2 c`.

:meth:`SequenceFactors.pair` takes the cheaper (Novak et al., 2022, make the same choice between
"structured derivatives" and the Jacobian contraction). With :math:`S = 1` the token-pair route is the
dense rule of :mod:`.dense`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ntkbook.ntk.features import Feature, OutputGradientFeature, PerInputGradients, gram

# Per-input gradients larger than this (entries per side) are formed and contracted in slices.
SLICE_ENTRIES = 2**20


@dataclass
class SequenceFactors(OutputGradientFeature):
    """Inputs ``A`` (n, S, d), or ``None`` when the weight is frozen; output gradients ``G`` (n, k, S, m);
    the squared multipliers ``s2`` and ``sb2`` (0 without a trainable bias). The per-input gradients
    are formed once, when first needed, and kept; the rows of a feature (``source``) take theirs from
    the whole feature's, since the symmetric kernel pairs slices of one batch with the whole."""

    A: torch.Tensor | None
    G: torch.Tensor
    s2: float
    sb2: float
    source: tuple[SequenceFactors, int, int] | None = field(default=None, repr=False, compare=False)
    _stacked: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _columns: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _self_grams: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def rows(self, start: int, stop: int) -> SequenceFactors:
        a = None if self.A is None else self.A[start:stop]
        return SequenceFactors(a, self.G[start:stop], self.s2, self.sb2, (self, start, stop))

    def _inputs(self) -> torch.Tensor:
        """:math:`[s A_i, s_b 1]`, ``(n, S, d + 1)`` (without the column of a frozen weight or bias)."""
        if self._columns is not None:
            return self._columns
        n, _, s, _ = self.G.shape
        columns = [] if self.A is None else [self.A if self.s2 == 1.0 else self.s2**0.5 * self.A]
        if self.sb2:
            columns.append(self.G.new_full((n, s, 1), self.sb2**0.5))
        self._columns = columns[0] if len(columns) == 1 else torch.cat(columns, dim=2)
        return self._columns

    def _inputs_first(self) -> bool:
        """Whether the gradients are laid out ``(d + 1, m)`` per input rather than ``(m, d + 1)``: the
        batched product runs faster with the longer side last (measured on one CPU core: 16 against
        25 ms for ``m = 2048, d = 64``, 74 against 23 ms the other way round)."""
        return self.G.shape[3] >= self._inputs().shape[2]

    def _gradient_rows(self, start: int, stop: int, inputs: torch.Tensor) -> torch.Tensor:
        """Output rows ``start:stop`` of the weight-and-bias gradients, ``(n, k, (stop - start)(d + 1))``:
        one batched product :math:`G_{ic}^\\top [s A_i, s_b 1]`, or its transpose."""
        n, k = self.G.shape[:2]
        rows = self.G[..., start:stop]
        if self._inputs_first():
            return (inputs[:, None].transpose(2, 3) @ rows).reshape(n, k, -1)
        return (rows.transpose(2, 3) @ inputs[:, None]).reshape(n, k, -1)

    def stacked(self) -> torch.Tensor:
        """The per-input gradients of weight and bias together, ``(n, k, m (d + 1))`` in a layout of its
        own (see :meth:`_inputs_first`), paired only with itself."""
        if self._stacked is None and self.source is not None:
            whole, start, stop = self.source
            self._stacked = whole.stacked()[start:stop]
        if self._stacked is None:
            self._stacked = self._gradient_rows(0, self.G.shape[3], self._inputs())
        return self._stacked

    def as_gradients(self) -> PerInputGradients:
        """``s G_ic^T A_i`` flattened (weight rows then columns, as ``weight.flatten()``), then
        ``s_b sum_s g_isc``: the layout of the default rule and of :class:`~ntkbook.ntk.features.DenseFactors`,
        to pair with a batch on which the layer got another rule."""
        n, k, _, m = self.G.shape
        if self._inputs_first():
            per_row = self.stacked().reshape(n, k, -1, m).transpose(2, 3)
        else:
            per_row = self.stacked().reshape(n, k, m, -1)
        d = 0 if self.A is None else self.A.shape[2]
        parts = [per_row[..., :d].reshape(n, k, -1)] if d else []
        if self.sb2:
            parts.append(per_row[..., d])
        return PerInputGradients(torch.cat(parts, dim=2))

    def _formed(self) -> bool:
        return self._stacked is not None or (self.source is not None and self.source[0]._formed())

    def _root(self) -> tuple[SequenceFactors, int]:
        """The whole batch's feature this one is rows of, and the offset of its first row there."""
        feature, offset = self, 0
        while feature.source is not None:
            feature, start, _ = feature.source
            offset += start
        return feature, offset

    def _slice(self, start: int, stop: int, inputs: torch.Tensor, across_outputs: bool) -> torch.Tensor:
        """Entries ``start:stop`` along the longer side of each per-input gradient :math:`G_{ic}^\\top
        [s A_i, s_b 1]` (``m x (d + 1)``), in a layout of its own, ``(n, k, (stop - start) * short side)``:
        output rows when ``across_outputs``, else input columns."""
        n, k = self.G.shape[:2]
        if across_outputs:
            return self._gradient_rows(start, stop, inputs)
        columns = inputs[:, None, :, start:stop]
        if stop - start >= self.G.shape[3]:
            return (self.G.transpose(2, 3) @ columns).reshape(n, k, -1)
        return (columns.transpose(2, 3) @ self.G).reshape(n, k, -1)

    def _sliced_gram(self, other: SequenceFactors, mode: str) -> torch.Tensor:
        """The Gram of the per-input gradients summed over slices formed one at a time, so that no more
        than ``SLICE_ENTRIES`` gradient entries per side exist at once (a large fresh tensor costs a page
        fault per 4 KiB on first touch, more than the products that fill it). The slices cut the longer
        side of the ``m x (d + 1)`` gradients, so that each holds whole rows of the shorter one."""
        _, k, _, m = self.G.shape
        mine, theirs = self._inputs(), other._inputs()
        across_outputs = m >= mine.shape[2]
        long, short = (m, mine.shape[2]) if across_outputs else (mine.shape[2], m)
        step = max(1, SLICE_ENTRIES // (max(self.n, other.n) * k * short))
        total = None
        for start in range(0, long, step):
            stop = min(long, start + step)
            left = self._slice(start, stop, mine, across_outputs)
            right = left if other is self else other._slice(start, stop, theirs, across_outputs)
            part = gram(left, right, mode)
            total = part if total is None else total.add_(part)
        return total

    def _per_input_pair(self, other: SequenceFactors, mode: str) -> torch.Tensor:
        """The Gram of the per-input gradients: of the kept ones when both sides are small or formed;
        else sliced (:meth:`_sliced_gram`). Rows of one batch paired with rows of the same batch (the
        symmetric kernel, which pairs its top half with the whole and its bottom half with itself)
        take their block of the whole batch's Gram with itself, computed once: each slice is formed
        once, not once per pairing."""
        _, k, _, m = self.G.shape
        if max(self.n, other.n) * k * m * self._inputs().shape[2] <= SLICE_ENTRIES or (
            self._formed() and other._formed()
        ):
            return gram(self.stacked(), other.stacked(), mode)
        (root, r0), (other_root, o0) = self._root(), other._root()
        if root is not other_root:
            return self._sliced_gram(other, mode)
        if mode not in root._self_grams:
            root._self_grams[mode] = root._sliced_gram(root, mode)
        return root._self_grams[mode][r0 : r0 + self.n, o0 : o0 + other.n].clone()

    def pair(self, other: Feature, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(other, SequenceFactors):
            return super().pair(other, mode)
        c = self.k * self.k if mode == "full" else self.k
        (n1, k, s1, m), (n2, _, s2, _) = self.G.shape, other.G.shape
        d = 0 if self.A is None else self.A.shape[2]
        per_input = n1 * n2 * c * m * (d + 1)
        per_input += sum(side.n * k * side.G.shape[2] * m * (d + 1) for side in (self, other) if not side._formed())
        if per_input <= n1 * n2 * s1 * s2 * (d + c * m + c):
            return self._per_input_pair(other, mode), None
        return self._token_pairs(other, mode), None

    def _token_pairs(self, other: SequenceFactors, mode: str) -> torch.Tensor:
        """:math:`\\sum_{s,t} (G G'^\\top)_{is,jt} (s^2 A A'^\\top + s_b^2)_{is,jt}` in ``mode``'s shape."""
        (n1, k, s1, m), (n2, _, s2, _) = self.G.shape, other.G.shape
        if self.A is None:
            inputs = self.G.new_full((n1, s1, n2, s2), self.sb2)
        else:
            a1, a2 = self.A.reshape(n1 * s1, -1), other.A.reshape(n2 * s2, -1)
            inputs = torch.addmm(a1.new_tensor(self.sb2), a1, a2.T, beta=1.0 if self.sb2 else 0.0, alpha=self.s2)
            inputs = inputs.reshape(n1, s1, n2, s2)
        if mode == "trace":
            # sum_c <g_isc, g_jtc> is one inner product over (output, feature).
            g1 = self.G.transpose(1, 2).reshape(n1 * s1, k * m)
            g2 = other.G.transpose(1, 2).reshape(n2 * s2, k * m)
            return torch.einsum("isjt,isjt->ij", (g1 @ g2.T).reshape(n1, s1, n2, s2), inputs)
        if mode == "diagonal":
            g1 = self.G.transpose(0, 1).reshape(k, n1 * s1, m)
            g2 = other.G.transpose(0, 1).reshape(k, n2 * s2, m)
            grads = torch.bmm(g1, g2.transpose(1, 2)).reshape(k, n1, s1, n2, s2)
            return torch.einsum("cisjt,isjt->ijc", grads, inputs)
        grads = (self.G.reshape(n1 * k * s1, m) @ other.G.reshape(n2 * k * s2, m).T).reshape(n1, k, s1, n2, k, s2)
        return torch.einsum("iasjbt,isjt->ijab", grads, inputs)


def sequence_factors(a: torch.Tensor | None, g: torch.Tensor, s2: float, sb2: float) -> SequenceFactors:
    """The factors of a dense layer on ``a`` (n, ..., d) with output gradients ``g`` (n, k, ..., m):
    all positions flattened into one axis."""
    n, k, m = g.shape[0], g.shape[1], g.shape[-1]
    flat_g = g.reshape(n, k, -1, m)
    flat_a = None if a is None else a.reshape(n, flat_g.shape[2], a.shape[-1])
    return SequenceFactors(flat_a, flat_g, s2, sb2)
