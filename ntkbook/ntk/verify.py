"""The check every kernel passes before it is returned: an exact identity of the model's own autograd.

For probe cotangents :math:`u` (n1 x k) and :math:`v` (n2 x k),

.. math::
    :label: ntk-probe-identity

    u^\\top \\Theta(x_1, x_2)\\, v = \\langle J_1^\\top u, J_2^\\top v \\rangle,
    \\qquad J_1^\\top u = \\nabla_\\theta \\textstyle\\sum_i \\langle u_i, f(x_{1,i}) \\rangle,

where :math:`J_1^\\top u` is one ordinary backward pass of the model on the batch (``torch.autograd.grad``
with respect to the trainable parameters: no ``functional_call``, no hooks, no ``vmap``). The right-hand
side holds whatever the model does inside, so a kernel that passes is right whatever a method assumed.

**What is checked.** Gaussian probes from a generator of its own, seeded with ``PROBE_SEED`` and a
checksum of the inputs' bytes (the same inputs get the same probes: same machine, same result; another
batch gets other rows and probes), and the identity for every pair of them. With ``x2``
given, ``PROBES`` probes per side, :math:`u_1, \\dots, u_m` and :math:`v_1, \\dots, v_m`: :math:`m^2` checks
from :math:`2m` backward passes. For the symmetric kernel, ``SYMMETRIC_PROBES`` probes :math:`w_a` serve
both sides, every pair :math:`(w_a, w_b)` (:math:`a = b` included) a check, from one backward pass each.
Up to ``ALL_ROWS`` inputs per side every row is probed; a larger batch is probed on
``max(ALL_ROWS, ceil(n / ROW_FRACTION))`` rows drawn at random, always with the first and the last. In
trace and diagonal modes the identity holds per output, with cotangents :math:`u \\otimes e_a`, so each
probe costs ``k`` backward passes. A kernel with a NaN or infinite entry anywhere fails by name, and
probe gradients that are not finite stop the call before any method runs: where the model's gradient
is not finite, its NTK is not defined.

**Tolerance.** A check fails when :math:`|u^\\top \\hat\\Theta v - \\langle J_1^\\top u, J_2^\\top v\\rangle| > \\tau`,

.. math::
    \\tau = \\rho \\big(\\|J_1^\\top u\\| \\|J_2^\\top v\\| + \\|u\\| \\|v\\| \\operatorname{rms}(\\hat\\Theta)\\big),
    \\qquad \\rho = C \\epsilon \\sqrt{L},

with :math:`\\epsilon` the unit roundoff (float32 2^-24, float64 2^-53; 2^-11 for float32 on a GPU that
allows TF32), :math:`L` the longest chain of sums behind a checked number (``Verifier.summation_length``:
the backward pass's widths, the probed rows, a Gram chunk of ``GRAM_CHUNK`` entries and
``ELEMENTWISE`` for the elementwise functions) and ``C`` from
``TOLERANCE_FACTOR`` (``TOLERANCE_FACTORS`` by dtype). The first term is the Cauchy–Schwarz scale of the right-hand side; the second keeps
the tolerance at the rounding level of the kernel's entries when :math:`J_1^\\top u` happens to cancel (an
aligned kernel probed almost orthogonally to its top eigenvector). ``C`` was calibrated on 800 random MLPs
and CNNs (depths 1 to 3, widths 16 to 2048, every mode, 1 or 3 outputs, ReLU and tanh, every method): the
largest discrepancy was 0.14 of :math:`\\epsilon\\sqrt{L}` times the scale in float32 and 1.1 in float64,
where the check's own float64 arithmetic rounds like the model's; so ``C`` is 2 and 8, margins of 15 and 7
(measured before ``ELEMENTWISE`` joined :math:`L`, which can only lower them). ``tests/test_verify.py``
checks 600 more correct float32 kernels and prints the largest ratio (0.13 of the tolerance on the
project's machine).

**Guarantee.** Let :math:`E = \\hat\\Theta - \\Theta` on the probed rows and
:math:`S = \\sqrt{\\operatorname{tr}\\Theta_{11} \\operatorname{tr}\\Theta_{22}}`, the typical size of the
Cauchy–Schwarz scale (:math:`S \\ge \\|\\Theta\\|_F`, and close to it for the nearly low-rank kernels of
wide networks). A pair misses :math:`E` only if :math:`|u_a^\\top E v_b| \\le 2\\tau \\approx 4 \\rho S`. For a
rank-one :math:`E = \\|E\\|_F\\, e f^\\top` (the least favourable case in ``tests/test_verify.py``),
:math:`u_a^\\top E v_b = \\|E\\|_F\\, g_a h_b` with standard normals :math:`g_a = e^\\top u_a`, :math:`h_b = f^\\top v_b`,
so an error with :math:`\\|E\\|_F \\ge \\delta S` is missed only if :math:`\\max_a |g_a| \\max_b |h_b| \\le \\varepsilon
= 4\\rho/\\delta`. With ``x2`` given the :math:`g_a` and :math:`h_b` are independent, and that has probability
:math:`q_m(\\varepsilon)` (a one-dimensional integral, ``m = PROBES``); for the symmetric kernel :math:`E = E^\\top`
is :math:`\\|E\\|_F\\, e e^\\top` and :math:`h_b = g_b`, so the probability is
:math:`P(\\max_a |g_a| \\le \\sqrt\\varepsilon) = \\operatorname{erf}(\\sqrt{\\varepsilon / 2})^{m}`, ``m = SYMMETRIC_PROBES``.
For the float32 benchmark MLP ``20 -> 1024 -> 1024 -> 1`` with 256 inputs (:math:`L = 7284`,
:math:`\\rho = 1.02 \\times 10^{-5}`) an error of :math:`\\delta = 10^{-3}` is missed with probability at most
:math:`1.1 \\times 10^{-4}` (symmetric) or :math:`1.7 \\times 10^{-4}` (``x2`` given), one of
:math:`3 \\times 10^{-3}` at most :math:`10^{-5}`, one of :math:`10^{-2}` at most :math:`4 \\times 10^{-7}`.
:math:`\\rho` and with it :math:`\\delta` grow like the square root of the widths: at width 4096 the same
:math:`2 \\times 10^{-4}` holds for :math:`\\delta = 2 \\times 10^{-3}`. On a subset of rows the guarantee is
about those rows: an error spread over the kernel (a layer's share dropped, a wrong scale, a reordered
batch) shows on any subset, while an error confined to one input is seen only when that input is drawn
(with probability ``r / n`` per side).

**What it cannot promise.** The tolerance is that of well-conditioned arithmetic. A float32 model whose
gradients are ill-conditioned (inputs of size 1e4 into saturated tanh units, whose derivatives float32
rounds to a few bits) has a float32 kernel that is off by more than rounding, 1e-4 of its scale and more
in ``tests/test_verify.py``; two methods then disagree by as much, the check may refuse the kernel, and
its message says to compute in float64.

**Batch independence and determinism** are checked on the probed rows first
(``ntkbook.ntk.independence``). Gradients that mix the batch while the outputs do not (a batch
statistic added and subtracted detached) are caught by the identity itself: its batch carries one extra,
unprobed input at its end, so it never differentiates the batch the kernel was computed on. The probed
rows run in a random order in which the batch's first row never comes first, so a statistic of the
first row is caught as well. (Moving a float32 row within a batch can change how its products round;
the 600 correct kernels of ``tests/test_verify.py`` stay below half the tolerance all the same.)
What escapes is a statistic that neither a reordering nor one repeated input changes, such as the
batch's largest output, where every row holding it is probed: always for up to ``ALL_ROWS`` inputs.
"""

from __future__ import annotations

import math
import zlib

import torch

from ntkbook.ntk.blocks import ranges
from ntkbook.ntk.features import GRAM_CHUNK
from ntkbook.ntk.grads import float64_gram, parameter_gradients
from ntkbook.ntk.identity import NOT_FINITE, failure_message, identity_terms
from ntkbook.ntk.independence import BatchCheck, check_batch
from ntkbook.ntk.request import Request, apply

PROBE_SEED = 2018
PROBES = 3
SYMMETRIC_PROBES = 5
ALL_ROWS = 16
ROW_FRACTION = 16
TOLERANCE_FACTOR = 2.0
ELEMENTWISE = 100  # summands' worth of rounding from elementwise functions (Verifier.summation_length)
# The check computes in float64, so for a float64 model its own rounding adds to the model's.
TOLERANCE_FACTORS = {torch.float64: 8.0}


class VerificationError(ValueError):
    """A kernel disagrees with the model's own autograd on the probe identity; the message gives the
    discrepancy in units of the tolerance."""


def unit_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """The unit roundoff of products in ``dtype`` on ``device``: TF32's 2^-11 where a GPU allows it."""
    tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cudnn.allow_tf32
    if dtype == torch.float32 and device.type == "cuda" and tf32:
        return 2.0**-11
    return torch.finfo(dtype).eps / 2


def probe_seed(x1: torch.Tensor, x2: torch.Tensor | None) -> int:
    """``PROBE_SEED`` combined with a CRC-32 of the inputs' bytes: a method's error confined to one batch
    position is then probed on some batches and not others, never missed for every batch of one size."""
    seed = PROBE_SEED
    for x in (x1, x2):
        if x is not None:
            seed = zlib.crc32(x.detach().reshape(-1).view(torch.uint8).cpu().numpy(), seed)
    return seed


class Verifier:
    """The model's side of the identity for one call, computed once and reused along ``auto``'s ladder."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.generator = torch.Generator().manual_seed(probe_seed(request.x1, request.x2))
        # A model with parameters of several dtypes rounds like its least precise one.
        self.dtype = max((p.dtype for p in request.params), key=lambda d: torch.finfo(d).eps)
        self.roundoff = unit_roundoff(self.dtype, request.reference.device)
        self._sides: tuple | None = None
        self.last_ratio = 0.0  # the last check's largest discrepancy, in units of the tolerance

    def _rows(self, n: int) -> torch.Tensor:
        if n <= ALL_ROWS:
            return torch.arange(n)
        r = max(ALL_ROWS, math.ceil(n / ROW_FRACTION))
        middle = torch.randperm(n - 2, generator=self.generator)[: r - 2] + 1
        return torch.cat([torch.tensor([0, n - 1]), middle]).sort().values

    def _probes(self, count: int, r: int) -> torch.Tensor:
        """``(count, r, k)`` standard normal probes, drawn on the CPU in float64."""
        probes = torch.randn(count, r, self.request.k, generator=self.generator, dtype=torch.float64)
        # Rounded to the model's dtype once, so that both sides of the identity use the same numbers.
        return probes.to(self.dtype).double()

    def _cotangents(self, probes: torch.Tensor) -> torch.Tensor:
        """One cotangent per backward pass: the probes themselves in full mode, else ``u_a e_o`` for
        each probe ``a`` and output ``o``, ``(m, k, r, k)``."""
        if self.request.mode == "full" or self.request.k == 1:
            return probes[:, None]
        eye = torch.eye(self.request.k, dtype=probes.dtype)
        if self.request.mode == "trace":
            probes = probes[:, :, :1].expand_as(probes)
        return probes.transpose(1, 2)[:, :, :, None] * eye[None, :, None, :]

    def _gradients(self, name: str, x: torch.Tensor, rows: torch.Tensor, cot: torch.Tensor) -> tuple:
        """:math:`J^\\top c` for every cotangent ``c`` of ``cot`` (m, o, r, k), ``m o`` lists of tensors shaped
        like the parameters, in the model's dtype, and the outputs ``(r, k)`` in the order of ``rows``; in
        chunks of ``chunk_size`` rows, as the kernel was, so memory stays bounded alike.

        Each chunk runs with one extra, unprobed input (a copy of the first probed row, with a zero
        cotangent), so the batch the identity differentiates is never the one the kernel was computed
        on: for a model within the contract the extra row changes nothing, while a model whose gradients
        mix the batch (a batch statistic detached in the forward pass, which no output shows) then
        differentiates another batch than the kernel's, and its kernel fails the identity. The rows also
        run in a random order in which the batch's first row never comes first, so a statistic of the
        first row, which the extra input at the end leaves alone, is caught too."""
        request = self.request
        m, o = cot.shape[:2]
        total: list[list[torch.Tensor]] = []
        outputs = []
        order = torch.randperm(len(rows), generator=self.generator)
        if len(rows) > 1 and int(order[0]) == 0:
            # The batch's first row (always probed) never runs first, so a statistic of it is seen.
            swap = int(torch.randint(1, len(rows), (1,), generator=self.generator))
            order[[0, swap]] = order[[swap, 0]]
        rows, cot = rows[order], cot[:, :, order]
        extra = rows[:1]
        for start, stop in ranges(len(rows), request.chunk_size):
            out = apply(request.model, name, x[torch.cat([rows[start:stop], extra]).to(x.device)])
            outputs.append(out[:-1].detach())
            c = cot[:, :, start:stop].to(out.dtype).to(out.device)
            c = torch.cat([c, c.new_zeros(m, o, 1, c.shape[-1])], dim=2).reshape(m * o, *out.shape)
            grads = [parameter_gradients(out, request.params, ci, retain_graph=i + 1 < m * o) for i, ci in enumerate(c)]
            # Out of place: a gradient autograd returns may share memory with the cotangent or the model.
            total = grads if not total else [[a + b for a, b in zip(t, g)] for t, g in zip(total, grads)]
        return total, torch.cat(outputs)[order.argsort().to(x.device)]

    def sides(self) -> tuple:
        """``(rows1, probes1, rows2, probes2, dots, norms1, norms2)``, after the batch checks: the probed
        rows and probes of each side, the inner products :math:`\\langle J_1^\\top c_1, J_2^\\top c_2\\rangle`
        ``(m1, m2, o)`` of every pair of cotangents for one output (``o = 1`` in full mode, where each
        cotangent covers every output) and their norms ``(m, o)``, in float64."""
        if self._sides is None:
            request = self.request
            rows1 = self._rows(request.x1.shape[0])
            # With x2 = x1 one set of probes serves both sides: every pair (a, b), a = b included, is a check.
            probes1 = self._probes(SYMMETRIC_PROBES if request.symmetric else PROBES, len(rows1))
            grads, out1 = self._gradients("x1", request.x1, rows1, self._cotangents(probes1))
            rows2, probes2, grads2 = rows1, probes1, []
            if not request.symmetric:
                rows2 = self._rows(request.x2.shape[0])
                probes2 = self._probes(PROBES, len(rows2))
                grads2, out2 = self._gradients("x2", request.x2, rows2, self._cotangents(probes2))
            self._check_batch("x1", request.x1, rows1, out1, True)
            if not request.symmetric:
                self._check_batch("x2", request.x2, rows2, out2, False)
            # The inner products of the J^T c, by partial Grams that round like a kernel entry's, once for
            # every method the ladder tries; the gradients are dropped once they are known. Only
            # cotangents of one output pair up (in full mode each cotangent covers every output).
            m1, m2 = probes1.shape[0], probes2.shape[0]
            o = len(grads) // m1
            dots = torch.empty(m1, m2, o, dtype=torch.float64)
            norms1, norms2 = torch.empty(m1, o, dtype=torch.float64), torch.empty(m2, o, dtype=torch.float64)
            for c in range(o):
                mine, theirs = grads[c::o], grads2[c::o]
                products = float64_gram(mine + theirs)
                norms = products.diagonal().sqrt()
                dots[:, :, c] = products[:m1, m1:] if theirs else products
                norms1[:, c] = norms[:m1]
                norms2[:, c] = norms[m1:] if theirs else norms
            for name, norms in (("x1", norms1), ("x2", norms2)):
                if not bool(torch.isfinite(norms).all()):
                    raise ValueError(f"the model's gradients on {name} are not finite (NaN or infinite): {NOT_FINITE}")
            self._sides = rows1, probes1, rows2, probes2, dots, norms1, norms2
        return self._sides

    def _check_batch(self, name: str, x: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, again: bool) -> None:
        """Batch independence and determinism on the probed rows (``ntkbook.ntk.independence``)."""
        picks = [0, len(rows) - 1]
        if len(rows) > 2:
            picks.append(int(torch.randint(1, len(rows) - 1, (1,), generator=self.generator)))
        order = torch.randperm(len(rows), generator=self.generator)
        # With chunks, the probed rows run again as one batch: a chunk boundary must not hide mixing.
        whole = self.request.chunk_size is None or self.request.chunk_size >= len(rows)
        check = BatchCheck(name, rows, picks, order, again)
        check_batch(self.request.model, x, check, out if whole else None, self.roundoff)

    def summation_length(self, rows: int) -> int:
        """How many products the longest chain of sums behind one checked number adds up: the backward
        pass sums over each layer's width in turn (the sum over parameters of their largest dimension),
        over the probed rows, and a kernel entry over at most ``GRAM_CHUNK`` entries of a parameter
        tensor before the pairwise tree (times ``k`` in trace mode, which also sums over outputs); plus
        ``ELEMENTWISE`` for the activations and their derivatives, each rounding by a unit or so, which
        a tiny model's short sums cannot hide (``tanh(s x)`` with one parameter ``s`` and 4 inputs
        failed by 1.2 tolerances without it)."""
        params = self.request.params
        length = ELEMENTWISE + sum(max(p.shape) if p.ndim else 1 for p in params) + rows
        length += min(max(p.numel() for p in params), GRAM_CHUNK)
        return length * (self.request.k if self.request.mode == "trace" else 1)

    def check(self, kernel: torch.Tensor, method: str) -> None:
        """Raise :class:`VerificationError` if ``kernel`` fails the identity on any probe pair."""
        rows1, probes1, rows2, probes2, dots, norms1, norms2 = self.sides()
        finite = torch.isfinite(kernel.detach())
        if not bool(finite.all()):
            i, j = (int(t) for t in torch.nonzero(~finite)[0, :2])
            raise VerificationError(
                f"method={method!r} gave a kernel with {int((~finite).sum())} NaN or infinite entries, the first at "
                f"inputs ({i}, {j}) of x1 and x2: {NOT_FINITE}"
            )
        factor = TOLERANCE_FACTORS.get(self.dtype, TOLERANCE_FACTOR)
        rho = factor * self.roundoff * math.sqrt(self.summation_length(max(len(rows1), len(rows2))))
        block = kernel.detach()[rows1.to(kernel.device)][:, rows2.to(kernel.device)].double().cpu()
        if block.ndim == 2 and self.request.k == 1:
            block = block[:, :, None, None]
        lhs, rhs, grad_scale, probe_scale, rms = identity_terms(block, probes1, probes2, dots, norms1, norms2)
        tau = rho * (grad_scale + probe_scale * rms)
        ratio = float(((lhs - rhs).abs() / tau.clamp_min(torch.finfo(torch.float64).tiny)).max())
        self.last_ratio = ratio
        if not ratio <= 1.0:
            raise VerificationError(failure_message(method, ratio, self.dtype))
