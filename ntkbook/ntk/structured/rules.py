"""The registry of per-layer rules, keyed on the exact module class.

A rule turns what one layer saw in the recorded forward pass, its inputs ``args`` (each ``(n, ...)``)
and the gradients ``g`` (n, k, ...) of the ``k`` outputs with respect to its output, into that layer's
feature. It may return ``None`` when the layer is used in a way it does not cover; the default rule
then applies. The default rule serves every module without one: per-input gradients of the layer's
own trainable parameters, :math:`J_{(i,a)} = \\partial \\langle g_{ia}, \\ell(a_i; \\theta_\\ell) \\rangle / \\partial \\theta_\\ell`,
by one ``vmap`` of a vjp over all (input, output) pairs.

Rules are exact under the layer's documented use; anything else is caught by the verification of the
finished kernel, so a rule needs no guards beyond what saves a wasted attempt.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils import parametrize

from ntkbook.ntk.features import Feature, PerInputGradients


class NotStructuredError(ValueError):
    """The model breaks an assumption of ``method="structured"``; the message names the module."""


LayerRule = Callable[..., Feature | None]
RULES: dict[type, LayerRule] = {}
# A layer called with keyword arguments or returning a tuple (``nn.MultiheadAttention``) is recorded by
# its own function: ``(module, args, kwargs, output)`` to ``(tensors, kwargs, z, rebuild, others)`` with
# batch-first ``tensors`` and ``z``, ``rebuild(z)`` the output the network goes on with (made from
# ``z``, so that gradients reach ``z``) and ``others`` the other tensors it returned, which the model
# must not use; its rule is called with ``kwargs=...``.
Recorder = Callable[[nn.Module, tuple, dict, object], tuple[tuple, dict, torch.Tensor, Callable, tuple]]
RECORDERS: dict[type, Recorder] = {}
# Layers whose rule accounts for the parameters of their submodules too (attention's ``out_proj``,
# whose forward it never calls).
WHOLE: set[type] = set()


def owns_submodules(module: nn.Module) -> bool:
    """Whether ``module`` counts as one layer with its submodules' parameters: a :data:`WHOLE` layer, or
    one parametrized by ``torch.nn.utils.parametrize``, whose parameters live in its parametrizations
    and are turned into its weight during its call (its class is made on the fly, so it gets the
    default rule)."""
    return type(module) in WHOLE or parametrize.is_parametrized(module)


def own_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters that count as ``module``'s, by name: its own, and its submodules' where
    :func:`owns_submodules`."""
    return [(key, p) for key, p in module.named_parameters(recurse=owns_submodules(module)) if p.requires_grad]


def register(*classes: type, recorder: Recorder | None = None, whole: bool = False) -> Callable[[LayerRule], LayerRule]:
    """Register a rule for these exact classes (a subclass may change ``forward``, so it gets the default);
    ``recorder`` and ``whole`` as for :data:`RECORDERS` and :data:`WHOLE`."""

    def add(rule: LayerRule) -> LayerRule:
        for cls in classes:
            RULES[cls] = rule
            if recorder is not None:
                RECORDERS[cls] = recorder
            if whole:
                WHOLE.add(cls)
        return rule

    return add


def refuse_global_pre_hooks(module: nn.Module, name: str) -> None:
    """A rule that runs the layer again must not run a global forward pre-hook
    (``register_module_forward_pre_hook``) a second time on an input recorded after it."""
    if nn.modules.module._global_forward_pre_hooks:
        raise NotStructuredError(
            f"module {name!r} ({type(module).__name__}) needs its per-input gradients taken by running it again, "
            "and global forward pre-hooks are registered (torch.nn.modules.module.register_module_forward_pre_hook): "
            "its recorded input has been through them already, and running it again would apply them twice"
        )


def same_memory(t: torch.Tensor) -> tuple:
    """What makes two tensors one: their memory, shape, strides, dtype and whether gradients flow
    through them (``h`` and ``h.view_as(h)``, not ``h`` and ``h.detach()``)."""
    return t.data_ptr(), t.shape, t.stride(), t.dtype, t.requires_grad


def distinct_tensors(tensors: tuple) -> tuple[list[torch.Tensor], list[int]]:
    """The distinct tensors among ``tensors`` (:func:`same_memory`: a layer given one tensor twice may
    rely on the two being one) and where each of ``tensors`` is among them."""
    keys: dict[tuple, int] = {}
    where = [keys.setdefault(same_memory(t), len(keys)) for t in tensors]
    distinct = {}
    for t, i in zip(tensors, where):
        distinct.setdefault(i, t)
    return list(distinct.values()), where


def default_rule(module: nn.Module, name: str, args: tuple, g: torch.Tensor) -> PerInputGradients:
    """Per-input gradients ``(n, k, p)`` of ``module``'s own trainable parameters, concatenated in
    registration order. One ``vmap`` over all (input, output) pairs: nested ``vmap`` batches some
    backward formulas wrongly (``nn.PReLU``)."""
    refuse_global_pre_hooks(module, name)
    params = {key: p.detach() for key, p in own_parameters(module)}
    n, k = g.shape[:2]
    distinct, where = distinct_tensors(args)

    def pair(*row: torch.Tensor) -> dict[str, torch.Tensor]:
        *a, gi = row

        def layer(p: dict[str, torch.Tensor]) -> torch.Tensor:
            # Copies made inside the transform: a layer may modify its input in place (x.mul_(gamma)),
            # which torch.func forbids on a tensor captured from outside it.
            copies = [t.unsqueeze(0).clone() for t in a]
            return functional_call(module, p, tuple(copies[i] for i in where)).squeeze(0)

        _, pullback = vjp(layer, params)
        return pullback(gi)[0]

    rows = (*(t.repeat_interleave(k, 0) for t in distinct), g.reshape(n * k, *g.shape[2:]))
    return per_input_gradients(module, name, params, pair, rows, n, k)


def per_input_gradients(
    module: nn.Module, name: str, params: dict[str, torch.Tensor], pair: Callable, rows: tuple, n: int, k: int
) -> PerInputGradients:
    """``vmap(pair)`` over the ``n k`` (input, output) ``rows``, ``pair`` giving one row's gradients of
    ``params`` as a dict, concatenated in the dict's order to ``(n, k, p)``; torch's failures and a
    gradient of the wrong shape are :class:`NotStructuredError` naming the module."""
    try:
        grads = vmap(pair)(*rows)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError) as err:
        raise NotStructuredError(
            f"cannot take per-input gradients of module {name!r} ({type(module).__name__}) with torch.func: {err}"
        ) from None
    for key, t in grads.items():
        if t.shape != (n * k, *params[key].shape):
            raise NotStructuredError(
                f"torch.func gave per-input gradients of shape {tuple(t.shape)} for parameter {key!r} of module "
                f"{name!r} ({type(module).__name__}), expected {(n * k, *params[key].shape)}"
            )
    return PerInputGradients(torch.cat([t.reshape(n, k, -1) for t in grads.values()], dim=2))


def layer_feature(module: nn.Module, name: str, args: tuple, g: torch.Tensor, kwargs: dict | None = None) -> Feature:
    """The registered rule for ``type(module)``, else (or where it declines) the default rule. A layer
    recorded with keyword arguments has a rule that takes them and never declines."""
    rule = RULES.get(type(module))
    if kwargs is not None:
        return rule(module, name, args, g, kwargs=kwargs)
    found = rule(module, name, args, g) if rule is not None else None
    return found if found is not None else default_rule(module, name, args, g)
