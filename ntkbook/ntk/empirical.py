"""The one public entry point, :func:`empirical_ntk`."""

from __future__ import annotations

import torch
from torch import nn

from ntkbook.ntk.auto import auto_kernel, explicit_kernel
from ntkbook.ntk.request import make_request
from ntkbook.ntk.verify import Verifier


def empirical_ntk(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    method: str = "auto",
    mode: str = "full",
    chunk_size: int | None = None,
    verify: bool = True,
) -> torch.Tensor:
    """The empirical NTK :math:`\\Theta_{ab}(x_{1,i}, x_{2,j}) = \\langle \\partial_\\theta f_a(x_{1,i}), \\partial_\\theta f_b(x_{2,j}) \\rangle`.

    Args:
        model: a module mapping a batch ``(n, ...)`` to ``(n,)`` or ``(n, k)``; every parameter with
            ``requires_grad`` counts, the others and buffers are constants. Each input's output must
            depend on that input alone, and the model must not be random: both are checked, and
            BatchNorm in training mode and active dropout are refused by name (call ``model.eval()``).
        x1: inputs of shape ``(n1, ...)`` on the model's device: floating inputs in the model's dtype,
            or integer inputs (token ids for an ``nn.Embedding``). Detached on entry: the NTK
            differentiates the parameters, never the inputs.
        x2: inputs of shape ``(n2, ...)``; ``None`` (or a batch equal to ``x1``) means ``x1``: per-input
            quantities are computed once, and the kernel is exactly symmetric (one triangle of blocks
            computed, the other mirrored).
        method: ``"loop"`` (one backward pass per input and output), ``"jacobian"`` (``vmap(jacrev)``
            and a contraction per parameter tensor), ``"implicit"`` (``vjp`` then ``jvp``, never forming
            the Jacobian of ``x1``), ``"structured"`` (one forward pass, one backward pass per output to
            the layer outputs, then a rule per layer: for ``nn.Linear`` and
            :class:`~ntkbook.models.NTKLinear` on ``(n, d)`` inputs
            :math:`\\Theta_l = (G_l G_l'^\\top) \\odot (s_l^2 A_l A_l'^\\top + s_{b,l}^2)`, summed over
            positions on sequences; for ``nn.Conv1d``/``Conv2d``/``Conv3d`` and
            :class:`~ntkbook.convolutional.NTKConv2d` weight gradients from unfolded patches or patch
            Grams; rules of their own for ``nn.Embedding`` on token ids, LayerNorm, GroupNorm, eval-mode
            BatchNorm and ``nn.MultiheadAttention``; for any other layer per-input gradients of its own
            parameters, those of its parametrizations included (``torch.nn.utils.parametrize``); a
            layer it cannot handle raises
            :class:`NotStructuredError` naming the module), or ``"auto"``: "structured", else whichever
            of "jacobian" and "implicit" is cheaper and fits in memory, and finally "loop" (with a
            warning), each tried kernel verified before it is accepted.
        mode: for ``k`` outputs, ``"full"`` gives ``(n1, n2, k, k)``; ``"trace"`` gives ``(n1, n2)``, the
            *sum* over outputs :math:`\\sum_a \\Theta_{aa}` (neural-tangents' ``trace_axes`` averages
            instead, so its values are ours divided by ``k``); ``"diagonal"`` gives ``(n1, n2, k)``,
            :math:`\\Theta_{aa}` per output. With one output every mode gives ``(n1, n2)``.
        chunk_size: compute the kernel in blocks of at most ``chunk_size`` inputs from each side, so memory
            stays bounded by the blocks (see :func:`memory_estimate`); ``None`` does it in one block.
        verify: check the kernel before returning it (the default). Every kernel is compared with the
            model's own autograd on the identity :math:`u^\\top \\Theta v = \\langle J_1^\\top u, J_2^\\top v\\rangle`
            for random probes (module ``ntkbook.ntk.verify`` states the tolerance and the guarantee:
            for a float32 MLP of width 1024 an error of 1e-3 of the kernel's scale is missed with
            probability below 2e-4, one of 1e-2 below 4e-7), and the model is checked to be
            deterministic and to treat each input alone.
            An explicit method whose kernel fails raises :class:`VerificationError`; ``"auto"`` moves
            on to the next method. ``verify=False`` skips both checks and their cost (one forward and
            5 backward passes on up to 16 rows, or a sixteenth of a larger batch; with ``x2`` 3 per side;
            ``k`` times as many in trace and diagonal modes): for hot loops on a model already
            verified once, accepting that a kernel wrong for a model that breaks a method's assumptions
            would be returned without a word: for ``"structured"``, a layer applied to ``(L, n, ...)``
            tensors whose length ``L`` equals the batch size ``n`` (a sequence-first
            ``nn.TransformerEncoderLayer``), which no shape can tell from a batch; for the ``torch.func``
            methods, an operation whose batching rule in torch is wrong (``torch.cdist`` under
            ``"jacobian"`` in torch 2.13); for any method, a model that mixes the batch or treats an input
            by its place in it (a context tensor sliced to the batch's size).

    Returns:
        The kernel in the parameters' dtype and on their device, detached from the graph. The same
        inside ``torch.no_grad()``; inside ``torch.inference_mode()``, which forbids differentiation, a
        ``ValueError``.
    """
    request = make_request(model, x1, x2, method, mode, chunk_size)
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {type(verify).__name__} {verify!r}")
    # Every method differentiates the model, whether or not the caller is inside torch.no_grad().
    with torch.enable_grad():
        verifier = Verifier(request) if verify else None
        if verifier is not None:
            verifier.sides()  # an out-of-contract model is refused before any method runs
        if method == "auto":
            kernel = auto_kernel(request, verifier)
        else:
            kernel = explicit_kernel(request, method, verifier)
    return squeeze(kernel.detach())


def squeeze(kernel: torch.Tensor) -> torch.Tensor:
    """One output per input: every mode is the ``(n1, n2)`` matrix."""
    if kernel.ndim > 2 and kernel.shape[-1] == 1:
        return kernel.reshape(kernel.shape[:2])
    return kernel
