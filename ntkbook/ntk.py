"""Empirical neural tangent kernels of PyTorch models.

For a model :math:`f(\\cdot;\\theta)` with one output per input, the empirical NTK of two batches is

.. math::

    \\Theta(x, x') = \\Big\\langle \\frac{\\partial f(x;\\theta)}{\\partial \\theta},
    \\frac{\\partial f(x';\\theta)}{\\partial \\theta} \\Big\\rangle,

the inner product running over every parameter with ``requires_grad`` (Jacot, Gabriel & Hongler 2018).

Introduced in chapter 1 (:doc:`/chapters/01_loop_ntk`).
"""

from __future__ import annotations

import torch
from torch import nn

METHODS = ("loop",)


def _trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters with requires_grad=True, so its NTK is not defined")
    return params


def _check_input(name: str, x: object, reference: torch.Tensor) -> torch.Tensor:
    """Check that ``x`` is a non-empty, finite batch with the dtype and device of ``reference``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, ...), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype like the model's ({reference.dtype}), got {x.dtype}")
    if x.dtype != reference.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the model's parameters are {reference.dtype}")
    if x.device != reference.device:
        raise ValueError(f"{name} is on {x.device} but the model's parameters are on {reference.device}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch of shape (n, ...) with n >= 1, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _scalar_outputs(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on ``x`` and return outputs of shape ``(n,)``, or explain why it cannot."""
    try:
        out = model(x)
    except RuntimeError as err:
        raise ValueError(f"model cannot be applied to {name} of shape {tuple(x.shape)}: {err}") from None
    n = x.shape[0]
    if out.shape not in ((n,), (n, 1)):
        raise ValueError(
            f"method='loop' needs one output per input, i.e. model({name}) of shape ({n},) or ({n}, 1); "
            f"got {tuple(out.shape)}"
        )
    return out.reshape(n)


def _loop_gradients(model: nn.Module, params: list[torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """Per-input gradients ``(n, P)``: one forward pass for the batch, then one backward pass per input."""
    out = _scalar_outputs(model, name, x)
    rows = []
    for i in range(out.shape[0]):
        grads = torch.autograd.grad(out[i], params, retain_graph=i + 1 < out.shape[0], allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


def empirical_ntk(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    method: str = "loop",
) -> torch.Tensor:
    """The empirical NTK :math:`\\Theta_{ij} = \\langle \\partial_\\theta f(x_{1,i}), \\partial_\\theta f(x_{2,j}) \\rangle`.

    Args:
        model: a module mapping a batch ``(n, ...)`` to ``(n,)`` or ``(n, 1)``; every parameter with
            ``requires_grad`` counts. Each input's output must depend on that input alone.
        x1: inputs of shape ``(n1, ...)``, same dtype and device as the model.
        x2: inputs of shape ``(n2, ...)``; ``None`` means ``x1`` (and the kernel is computed once).
        method: ``"loop"``: one backward pass per input (``n1 + n2`` of them, never ``n1 * n2``),
            stacking the gradients into :math:`J` of shape ``(n, P)`` and returning :math:`J_1 J_2^\\top`.

    Returns:
        The kernel, shape ``(n1, n2)``, in the model's dtype and on its device.
    """
    params = _trainable_parameters(model)
    reference = params[0]
    x1 = _check_input("x1", x1, reference)
    if x2 is not None:
        x2 = _check_input("x2", x2, reference)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    jac1 = _loop_gradients(model, params, "x1", x1)
    jac2 = jac1 if x2 is None else _loop_gradients(model, params, "x2", x2)
    return (jac1 @ jac2.T).detach()
