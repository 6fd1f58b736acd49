"""The PyTorch peers of the side-by-side benchmark (``ntkbook._bench_peers``), each as one adapter
``kernel(model, x, mode) -> tensor`` in ntkbook's layout: ``(n, n, k, k)`` for ``mode="full"``, ``(n, n)`` for
``mode="trace"`` (the sum over outputs; with one output both are the same kernel and the table asks for the
trace). How each computes an NTK:

- ``jacrev``: ``vmap(jacrev)`` over inputs with ``torch.func``, written out here, then one contraction of
  the per-input Jacobians (always available: the baseline).
- ``nngeometry``: ``nngeometry.GramMatrix`` with its dense function-space representation
  (backward hooks per layer and output; layers it does not know raise).
- ``asdl``: ASDL's ``empirical_class_wise_direct_ntk`` (per-output Grams from per-layer hooks) for a trace
  or one output, ``empirical_direct_ntk`` (per-input gradients, then one product) for a full kernel.
- ``asdl-hadamard``: ASDL's ``empirical_class_wise_hadamard_ntk``, per layer the Hadamard product of the
  Grams of the layer's inputs and of its output gradients: exact for ``nn.Linear`` on ``(n, d)`` inputs,
  an approximation for convolutions and sequences (the oracle shows by how much); a trace only.
- ``backpack``: BackPACK's ``BatchGrad`` (per-input gradients), one forward and backward pass per output, then the
  Gram; parameters of modules BackPACK does not extend get no gradient, which is counted and reported.
- ``neural-tangents``: ``nt.empirical_ntk_fn(..., implementation=STRUCTURED_DERIVATIVES)``, jitted, in the
  JAX environment given by ``--jax-python`` (``ntkbook/_nt_runner.py``; the torch weights go by ``.npz``).
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

PEERS = ("jacrev", "nngeometry", "asdl", "asdl-hadamard", "backpack", "neural-tangents")
_MODULES = {"nngeometry": "nngeometry", "asdl": "asdl", "asdl-hadamard": "asdl", "backpack": "backpack"}
Kernel = Callable[[nn.Module, torch.Tensor, str], torch.Tensor]


class Dropped(RuntimeError):
    """A peer returned a kernel without some parameters (it did not handle their modules)."""


def _layout(jac: torch.Tensor, mode: str) -> torch.Tensor:
    """The kernel of per-input Jacobians ``jac`` of shape ``(n, k, p)`` in ntkbook's layout."""
    if mode == "trace" or jac.shape[1] == 1:
        return torch.einsum("iap,jap->ij", jac, jac)
    return torch.einsum("iap,jbp->ijab", jac, jac)


def jacrev_kernel(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """``vmap(jacrev)`` of the model's output for one input, flattened and contracted."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(one), (None, 0))(params, x)
    return _layout(torch.cat([j.flatten(2) for j in jac.values()], dim=2), mode)


def nngeometry_kernel(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    from nngeometry import GramMatrix

    gram = GramMatrix(model, (x,)).data.permute(1, 3, 0, 2)  # (k, n, k, n) -> (n, n, k, k)
    if mode == "trace" or gram.shape[-1] == 1:
        return gram.diagonal(dim1=2, dim2=3).sum(-1)
    return gram


def asdl_kernel(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    from asdl.kernel import empirical_class_wise_direct_ntk, empirical_direct_ntk

    if mode == "trace":
        return empirical_class_wise_direct_ntk(model, x).sum(-1)  # (n, n, k) -> (n, n)
    return empirical_direct_ntk(model, x)


def asdl_hadamard_kernel(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    from asdl.kernel import empirical_class_wise_hadamard_ntk

    if mode != "trace":
        raise NotImplementedError("ASDL's Hadamard-factored kernel is class-wise only: no full kernel")
    return empirical_class_wise_hadamard_ntk(model, x).sum(-1)


def backpack_kernel(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    from backpack import backpack
    from backpack.extensions import BatchGrad

    params = list(model.parameters())

    def gradients_of_output(a: int) -> tuple[int, torch.Tensor]:
        output = model(x)  # again for every output: BackPACK frees what it stored at each backward pass
        for p in params:
            p.grad_batch = None
        output[:, a].sum().backward()
        missing = sum(getattr(p, "grad_batch", None) is None for p in params)
        if missing:
            raise Dropped(f"silently drops {missing} of {len(params)} parameter tensors (no per-input gradient)")
        return output.shape[1], torch.cat([p.grad_batch.flatten(1) for p in params], dim=1)

    with backpack(BatchGrad()):  # BackPACK stores the layers' inputs only inside its context
        outputs, first = gradients_of_output(0)
        rows = [first] + [gradients_of_output(a)[1] for a in range(1, outputs)]
    return _layout(torch.stack(rows, dim=1), mode)


def prepare(peer: str, model: nn.Module) -> nn.Module:
    """A copy of ``model`` (same weights) for ``peer``: hooks a library leaves behind stay on its own copy."""
    if peer == "backpack":
        from backpack import extend

        return extend(copy.deepcopy(model))
    return copy.deepcopy(model)


ADAPTERS: dict[str, Kernel] = {
    "jacrev": jacrev_kernel,
    "nngeometry": nngeometry_kernel,
    "asdl": asdl_kernel,
    "asdl-hadamard": asdl_hadamard_kernel,
    "backpack": backpack_kernel,
}


def memory_needed(peer: str, n: int, outputs: int, params: int, mode: str) -> int:
    """Bytes of per-input float32 gradients ``peer`` holds at once (0 for peers that hold none): ``jacrev``
    and BackPACK keep all ``n * outputs * params``; ASDL's class-wise kernel (measured: about twice
    ``n * params`` per output at width 4096) and its direct kernel (``n * outputs * params``, twice)."""
    per_input = 4 * n * params
    if peer in ("jacrev", "backpack"):
        return per_input * outputs
    if peer == "asdl":
        return 2 * per_input * (1 if mode == "trace" else outputs)
    return 0


def unavailable(peer: str, jax_python: str | None) -> str | None:
    """Why ``peer`` cannot run here (``"not installed"``, ...), or ``None`` when it can."""
    if peer not in PEERS:
        raise ValueError(f"peer must be one of {PEERS}, got {peer!r}")
    if peer == "neural-tangents":
        if jax_python is None:
            return "not installed (give --jax-python)"
        return None if Path(jax_python).exists() else f"not installed (no {jax_python})"
    module = _MODULES.get(peer)
    return None if module is None or importlib.util.find_spec(module) else "not installed"
