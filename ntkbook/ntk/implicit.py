"""Method ``"implicit"``: NTK-vector products :math:`\\Theta e = J_1 (J_2^\\top e)`, a vjp then a jvp;
:math:`J_1` is never formed (chapter 6)."""

from __future__ import annotations

import warnings

import torch
from torch.func import functional_call, jvp, vjp, vmap

from ntkbook.ntk.jacobian import single_input_function
from ntkbook.ntk.request import Request


def implicit_block(request: Request, x1: torch.Tensor, x2: torch.Tensor, mode: str) -> torch.Tensor:
    """:math:`\\Theta e_{jb}` for every basis cotangent of ``x2``: the rows of :math:`J_2` by one vjp
    per input, then :math:`J_1` applied to each by a jvp on the batch ``x1``."""
    model, k = request.model, request.k
    n1, n2 = x1.shape[0], x2.shape[0]
    params = request.named_params()
    f_single = single_input_function(request)
    basis = torch.eye(k, dtype=request.reference.dtype, device=x2.device)

    def rows_of_j2(xj: torch.Tensor) -> dict[str, torch.Tensor]:
        # Only input j's cotangent is nonzero, so the vjp of the batch reduces to a vjp of that input alone.
        _, pullback = vjp(lambda p: f_single(p, xj), params)
        return vmap(pullback)(basis)[0]

    tangents = {key: t.reshape(n2 * k, *t.shape[2:]) for key, t in vmap(rows_of_j2)(x2).items()}

    def push_forward(tangent: dict[str, torch.Tensor]) -> torch.Tensor:
        return jvp(lambda p: functional_call(model, p, (x1,)).reshape(n1, k), (params,), (tangent,))[1]

    with warnings.catch_warnings():
        # torch's forward-mode AD scripts its own decompositions on first use and warns that torch.jit.script
        # is deprecated: a message about torch's internals, not about the caller's code.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=DeprecationWarning)
        columns = vmap(push_forward)(tangents)  # columns[(j, b), i, a] = Θ[i, j, a, b]
    full = columns.reshape(n2, k, n1, k).permute(2, 0, 3, 1)
    if mode == "full":
        return full
    if mode == "trace":
        return torch.einsum("ijaa->ij", full)
    return torch.einsum("ijaa->ija", full)
