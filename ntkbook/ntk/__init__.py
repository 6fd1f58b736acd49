"""Empirical neural tangent kernels of PyTorch models, by four methods behind one function.

For a model :math:`f(\\cdot;\\theta)` with :math:`k` outputs per input, the empirical NTK of two batches is

.. math::

    \\Theta_{ab}(x, x') = \\Big\\langle \\frac{\\partial f_a(x;\\theta)}{\\partial \\theta},
    \\frac{\\partial f_b(x';\\theta)}{\\partial \\theta} \\Big\\rangle,

the inner product running over every parameter with ``requires_grad`` (Jacot, Gabriel & Hongler 2018).
Stacking per-input gradients as the rows of the Jacobians :math:`J_1, J_2` gives :math:`\\Theta = J_1 J_2^\\top`.
The methods differ only in how they avoid paying for that product (Novak, Sohl-Dickstein & Schoenholz 2022):

- ``"loop"``: one backward pass per input and output, :math:`J` stacked explicitly (chapter 1).
- ``"jacobian"``: :func:`torch.func.vmap` of :func:`torch.func.jacrev` over inputs, then one matrix
  product per parameter tensor. Memory :math:`O((n_1 + n_2) k P)`.
- ``"implicit"``: NTK-vector products :math:`\\Theta e = J_1 (J_2^\\top e)`, a ``vjp`` then a ``jvp``;
  :math:`J_1` is never formed and at most ``chunk_size`` rows of :math:`J_2` are held at a time.
- ``"structured"``: the chain rule through each layer, one rule per layer type. For a dense layer
  :math:`z = s W a + s_b b`, :math:`\\partial f/\\partial W = s\\, g a^\\top` with :math:`g = \\partial f/\\partial z`,
  so its share of :math:`\\Theta` is :math:`(G G'^\\top) \\odot (s^2 A A'^\\top + s_b^2)`: one forward
  pass, one backward pass per output to the layer *outputs*, then Gram matrices of size
  :math:`n_1 \\times n_2`. The same layer on sequences ``(n, ..., d)`` sums over positions
  (``structured/sequence.py``). A convolution's weight gradient is :math:`s\\, g P^\\top` with :math:`P`
  its unfolded input patches, so its share is formed from per-input weight gradients (one batched
  product) or from patch Grams, whichever costs fewer flops (``conv.py``). ``nn.Embedding`` pairs equal
  token ids (``embedding.py``); LayerNorm, GroupNorm and eval-mode BatchNorm take their affine gradients
  from the normalised input (``norms.py``); ``nn.MultiheadAttention`` is four dense layers on sequences
  (``attention.py``). Other layers get per-input gradients of their own parameters, by ``vmap``.

Whatever the method, the kernel is verified before it is returned (``ntkbook.ntk.verify``, below).

Introduced in chapter 1 (:doc:`/chapters/01_loop_ntk`); the methods, modes and chunking in chapter 6
(:doc:`/chapters/06_torch_func`).

The package's modules: ``request`` (the checked call), ``features`` (per-input features and their Grams),
``blocks`` (the block grid and exact symmetry), ``loop``, ``jacobian``, ``implicit`` and ``structured``
(one method each; ``structured/rules.py`` holds the registry of per-layer rules, ``structured/dense.py``
and ``structured/conv.py`` the rules for dense layers and convolutions), ``verify``, ``budget``
(memory and cost) and ``auto`` (the fallback ladder).
"""

from __future__ import annotations

import torch
from torch import nn

from ntkbook.ntk.budget import estimate, measure
from ntkbook.ntk.empirical import empirical_ntk
from ntkbook.ntk.request import METHODS, MODES, make_request
from ntkbook.ntk.structured.rules import NotStructuredError
from ntkbook.ntk.verify import VerificationError

__all__ = ["METHODS", "MODES", "NotStructuredError", "VerificationError", "empirical_ntk", "memory_estimate"]


def memory_estimate(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    method: str,
    mode: str = "full",
    chunk_size: int | None = None,
) -> int:
    """Bytes that :func:`empirical_ntk` needs beyond the model and inputs, to leading order.

    With :math:`P` trainable parameters, :math:`k` outputs, :math:`c` inputs per chunk (``chunk_size``,
    else the whole batch), :math:`H` activations per input and :math:`b` bytes per number:
    ``"loop"`` and ``"jacobian"`` hold one or two chunks of Jacobian, :math:`c k P b` each; ``"implicit"`` holds
    :math:`c k P b` of vjps plus :math:`c k \\cdot c H b` of jvp tangents; ``"structured"`` holds each
    layer's input and output gradients, :math:`O(n (H + k H))`, and per-input gradients of any
    non-dense layer. All add the kernel itself, :math:`n_1 n_2 k^2 b` in full mode. ``method="auto"``
    is not accepted: ask about the method it would pick.

    Introduced in chapter 6 (:doc:`/chapters/06_torch_func`).
    """
    request = make_request(model, x1, x2, method, mode, chunk_size)
    if method == "auto":
        raise ValueError("method must name one method for memory_estimate, not 'auto'")
    return estimate(request, measure(request), method, request.chunk_size)


for _public in (empirical_ntk, memory_estimate, NotStructuredError, VerificationError):
    _public.__module__ = __name__
