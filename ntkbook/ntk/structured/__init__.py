"""Method ``"structured"``: record one forward pass, apply one rule per layer, contract.

The kernel is a sum over layers :math:`l` of :math:`J_l J_l'^\\top`, where :math:`J_l` holds the
gradients of the outputs with respect to layer :math:`l`'s own parameters. Each :math:`J_l` follows from
what the layer saw, its inputs :math:`a_i`, and the gradients :math:`g_{ia} = \\partial f_a(x_i)/\\partial z_i`
of the outputs with respect to its output: one forward pass and one backward pass per output (to the
layer outputs, not to the parameters), then a rule per layer (:mod:`.rules`, :mod:`.dense`, :mod:`.conv`).
"""

from __future__ import annotations

import torch
from torch import nn

from ntkbook.ntk.features import Features, PerInputGradients
from ntkbook.ntk.structured import attention as _attention  # noqa: F401  (registers each layer's rule)
from ntkbook.ntk.structured import conv as _conv  # noqa: F401
from ntkbook.ntk.structured import dense as _dense  # noqa: F401
from ntkbook.ntk.structured import embedding as _embedding  # noqa: F401
from ntkbook.ntk.structured import norms as _norms  # noqa: F401
from ntkbook.ntk.structured.record import check_graph, layers, record_layers
from ntkbook.ntk.structured.rules import NotStructuredError, layer_feature, own_parameters

__all__ = ["NotStructuredError", "layers", "structured_features"]


def _output_gradients(out: torch.Tensor, zs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """:math:`g_{ia} = \\partial f_a(x_i) / \\partial z_i` for each layer output ``z``, ``(n, k, ...)``.
    Each input's outputs depend on that input alone, so one backward pass of output ``a`` summed over
    the batch gives every input's gradient for output ``a``; ``is_grads_batched`` runs the ``k`` passes
    at once, or where a backward formula has no batching rule (``group_norm`` on images), one by one."""
    n, k = out.shape
    try:
        if k == 1:
            grads = torch.autograd.grad(out, zs, torch.ones_like(out), allow_unused=True)
            return [None if g is None else g.unsqueeze(1) for g in grads]
        basis = torch.eye(k, dtype=out.dtype, device=out.device)[:, None, :].expand(k, n, k)
        try:
            grads = torch.autograd.grad(out, zs, basis, is_grads_batched=True, allow_unused=True, retain_graph=True)
        except RuntimeError:
            passes = [torch.autograd.grad(out, zs, basis[a], allow_unused=True, retain_graph=True) for a in range(k)]
            grads = [None if g[0] is None else torch.stack(g) for g in zip(*passes)]
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as err:
        raise NotStructuredError(
            f"cannot take the gradients of the outputs with respect to each layer: {err}"
        ) from None
    return [None if g is None else g.transpose(0, 1) for g in grads]


def structured_features(
    model: nn.Module, found: dict[nn.Module, str], name: str, x: torch.Tensor, left_out: dict | None = None
) -> Features:
    """Each layer's feature by its rule, keyed by the layer's qualified name. Parameters that the graph
    never uses are left out of their layers' features; ``left_out``, shared by the batches of one kernel,
    holds their names, which must be the same for every batch, or a layer's features would not pair."""
    out, captured = record_layers(model, found, name, x)
    n, k = out.shape
    order = [m for m in found if m in captured and captured[m].z.requires_grad]
    unused: dict[int, nn.Parameter] = {}
    if order and out.requires_grad:
        unused = {id(p): p for p in check_graph(out, captured, found)}
        _same_for_every_batch(model, unused, name, left_out)
        order = [m for m in order if any(id(p) not in unused for _, p in own_parameters(m))]
    if not order or not out.requires_grad:
        # No trainable parameter reaches the output: the kernel is zero.
        return {"zero": PerInputGradients(out.new_zeros(n, k, 1).detach())}
    features: Features = {}
    try:
        # A parameter the graph never uses has no share of the kernel: its layer's rule leaves it out, as
        # every rule leaves out a frozen one.
        for p in unused.values():
            p.requires_grad_(False)
        for module, g in zip(order, _output_gradients(out, [captured[m].z for m in order])):
            args, z, kwargs = captured[module][:3]
            if g is None:
                g = torch.zeros(n, k, *z.shape[1:], dtype=z.dtype, device=z.device)
            args = tuple(t.detach() for t in args)
            features[found[module]] = layer_feature(module, found[module], args, g.detach(), kwargs)
    finally:
        for p in unused.values():
            p.requires_grad_(True)
    return features


def _same_for_every_batch(model: nn.Module, unused: dict[int, nn.Parameter], name: str, left_out: dict | None) -> None:
    """The names of the parameters left out must be those of the kernel's other batches (``left_out``)."""
    if left_out is None:
        return
    names = sorted(key for key, p in model.named_parameters() if id(p) in unused)
    if left_out.setdefault("names", names) != names:
        raise NotStructuredError(
            f"the model uses different parameters for {name} than for the other inputs (unused: "
            f"{', '.join(names) or 'none'} against {', '.join(left_out['names']) or 'none'}); method='structured' "
            "pairs each layer's features across batches that use the same parameters"
        )
