"""Method ``"jacobian"``: ``vmap(jacrev)`` over inputs, then one Gram per parameter tensor (chapter 6)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import functional_call, jacrev, vmap

from ntkbook.ntk.features import Features, PerInputGradients
from ntkbook.ntk.request import Request


def single_input_function(request: Request) -> Callable:
    """``f(params, x_i)``: the model on one input as a function of its parameters, ``(k,)`` outputs."""
    model, k = request.model, request.k

    def f(params: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (xi.unsqueeze(0),)).reshape(k)

    return f


def jacobian_features(request: Request, name: str, x: torch.Tensor) -> Features:
    """One ``(n, k, p)`` Jacobian per parameter tensor, keyed by the parameter's qualified name.
    Memory :math:`O(n k P)`."""
    params = request.named_params()
    jac = vmap(jacrev(single_input_function(request)), in_dims=(None, 0))(params, x)
    return {key: PerInputGradients(j.reshape(x.shape[0], request.k, -1)) for key, j in jac.items()}
