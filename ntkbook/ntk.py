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
- ``"structured"``: the chain rule through each layer. For a dense layer :math:`z = s W a + s_b b`,
  :math:`\\partial f/\\partial W = s\\, g a^\\top` with :math:`g = \\partial f/\\partial z`, so its share of
  :math:`\\Theta` is :math:`(G G'^\\top) \\odot (s^2 A A'^\\top + s_b^2)`: one forward pass, one backward
  pass per output to the layer *outputs*, then Gram matrices of size :math:`n_1 \\times n_2`. Other
  layers get per-input gradients of their own parameters from their own inputs and output gradients.

Introduced in chapter 1 (:doc:`/chapters/01_loop_ntk`); the methods, modes and chunking in chapter 2
(:doc:`/chapters/02_torch_func`).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap
from torch.utils.flop_counter import FlopCounterMode

from ntkbook.models import NTKLinear

METHODS = ("auto", "loop", "jacobian", "implicit", "structured")
MODES = ("full", "trace", "diagonal")

# What a method extracts from a batch before pairing: one entry per layer or parameter tensor, either a
# dense layer's factors (A, G, s^2, s_b^2) or per-input gradients of shape (n, k, p).
Features = list


class NotStructuredError(ValueError):
    """The model breaks an assumption of ``method="structured"``; the message names the module."""


def _trainable_parameters(
    model: nn.Module, consequence: str = "its NTK is not defined"
) -> list[torch.nn.Parameter]:
    """The parameters with ``requires_grad``; refuses a non-module or a model without any, saying
    what follows (``consequence``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"model has no parameters with requires_grad=True, so {consequence}")
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
    if x.device.type == "meta":
        raise ValueError(f"{name} and the model are on the meta device, which holds shapes but no values")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch of shape (n, ...) with n >= 1, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    # A tensor made under torch.inference_mode() cannot be saved for a backward pass; a copy can.
    return x.clone() if x.is_inference() else x


def _check_options(method: object, mode: object, chunk_size: object) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(f"chunk_size must be a positive int or None, got {type(chunk_size).__name__} {chunk_size!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")


def _refuse_training_mode_layers(model: nn.Module) -> None:
    """BatchNorm with batch statistics mixes the inputs of a batch, so one input's NTK is undefined; active
    dropout makes the model random, so its NTK changes from call to call."""
    for name, module in model.named_modules():
        label = f"module {name or type(model).__name__!r} ({type(module).__name__})"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None):
            raise ValueError(
                f"{label} normalises with batch statistics, so each output depends on the whole batch and the "
                "NTK of one input is undefined; call model.eval() (with running statistics) first"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise ValueError(
                f"{label} is in training mode, so the model is random and its NTK changes from call to call; "
                "call model.eval() first"
            )


def _as_rows(name: str, out: object, n: int) -> torch.Tensor:
    """Outputs of shape ``(n,)`` or ``(n, k)`` as ``(n, k)``, or explain why not."""
    if not isinstance(out, torch.Tensor) or out.ndim not in (1, 2) or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"the model must map {name} to one output row per input, of shape (n,) or (n, k) with n = {n} "
            f"inputs here; got {shape}"
        )
    return out.reshape(n, -1)


def _apply(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    try:
        return _as_rows(name, model(x), x.shape[0])
    except RuntimeError as err:
        raise ValueError(f"model cannot be applied to {name} of shape {tuple(x.shape)}: {err}") from None


def _probe(model: nn.Module, name: str, x: torch.Tensor) -> int:
    """The number of outputs per input, from one input, without building a graph."""
    with torch.no_grad():
        try:
            out = model(x[:1])
        except RuntimeError as err:
            raise ValueError(f"model cannot be applied to {name} of shape {tuple(x.shape)}: {err}") from None
    return _as_rows(name, out, 1).shape[1]


def _gram(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """Contract per-input features ``a`` (n1, k, p) and ``b`` (n2, k, p) over ``p`` in the given mode."""
    n1, k, p = a.shape
    n2 = b.shape[0]
    if mode == "full":
        return (a.reshape(n1 * k, p) @ b.reshape(n2 * k, p).T).reshape(n1, k, n2, k).permute(0, 2, 1, 3)
    if mode == "trace":
        return a.reshape(n1, k * p) @ b.reshape(n2, k * p).T
    return torch.bmm(a.transpose(0, 1), b.permute(1, 2, 0)).permute(1, 2, 0)


def _outputs_per_input(features: Features) -> int:
    """``k``, from the first feature entry: ``(A, G, s^2, s_b^2)`` with ``G`` of shape ``(n, k, ...)``, or
    per-input gradients ``(n, k, p)``."""
    first = features[0]
    return first[1].shape[1] if isinstance(first, tuple) else first.shape[1]


def _contract(f1: Features, f2: Features, mode: str) -> torch.Tensor:
    """Sum the per-layer kernels of two feature lists (see :func:`_structured_features`).

    Dense entries ``(A, G, s^2, s_b^2)`` contribute :math:`(G G'^\\top) \\odot (s^2 A A'^\\top + s_b^2)`, other
    entries :math:`J J'^\\top`. With one output every mode is the ``(n1, n2)`` matrix, computed as such."""
    mode = "trace" if _outputs_per_input(f1) == 1 else mode
    total = None
    for e1, e2 in zip(f1, f2):
        if not isinstance(e1, tuple):
            term = _gram(e1, e2, mode)
            total = term if total is None else total.add_(term)
            continue
        (a1, g1, s2, sb2), (a2, g2, _, _) = e1, e2
        gram = _gram(g1, g2, mode)
        if a1 is None:
            factor = torch.as_tensor(sb2, dtype=gram.dtype, device=gram.device)
        else:
            # s^2 A A'^T + s_b^2 in one BLAS call; beta=0 skips the bias term of a layer without one.
            inputs = torch.addmm(a1.new_tensor(sb2), a1, a2.T, beta=1.0 if sb2 else 0.0, alpha=s2)
            factor = inputs if mode == "trace" else inputs[:, :, None] if mode == "diagonal" else inputs[:, :, None, None]
        total = gram.mul_(factor) if total is None else total.addcmul_(gram, factor)
    return total


def _rows(features: Features, start: int, stop: int) -> Features:
    return [
        (None if e[0] is None else e[0][start:stop], e[1][start:stop], e[2], e[3]) if isinstance(e, tuple) else e[start:stop]
        for e in features
    ]


def _contract_symmetric(features: Features, mode: str) -> torch.Tensor:
    """``_contract(features, features)``, computing the lower-left quarter as the transpose of the upper-right:
    three quarters of the matrix-product work, since torch has no symmetric rank-k product."""
    n = features[0][1].shape[0] if isinstance(features[0], tuple) else features[0].shape[0]
    if n < 64:
        return _contract(features, features, mode)
    half = n // 2
    bottom = _rows(features, half, n)
    top = _contract(_rows(features, 0, half), features, mode)
    kernel = top.new_empty((n, n, *top.shape[2:]))
    kernel[:half] = top
    kernel[half:, half:] = _contract(bottom, bottom, mode)
    kernel[half:, :half] = _transpose_block(top[:, half:])
    return kernel


# --- method "loop" ---------------------------------------------------------------------------------------

def _loop_features(model: nn.Module, params: list[torch.Tensor], name: str, x: torch.Tensor) -> Features:
    """Per-input gradients ``(n, k, P)``: one forward pass for the batch, one backward pass per input and output."""
    out = _apply(model, name, x)
    n, k = out.shape
    rows = []
    for i in range(n):
        for a in range(k):
            last = i + 1 == n and a + 1 == k
            grads = torch.autograd.grad(out[i, a], params, retain_graph=not last, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return [torch.stack(rows).reshape(n, k, -1)]


# --- method "jacobian" -----------------------------------------------------------------------------------

def _single_input_function(model: nn.Module, k: int) -> Callable:
    def f(params: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (xi.unsqueeze(0),)).reshape(k)

    return f


def _jacobian_features(model: nn.Module, params: dict[str, torch.Tensor], k: int, x: torch.Tensor) -> Features:
    """``vmap(jacrev)`` over inputs: one ``(n, k, p)`` Jacobian per parameter tensor."""
    jac = vmap(jacrev(_single_input_function(model, k)), in_dims=(None, 0))(params, x)
    return [j.reshape(x.shape[0], k, -1) for j in jac.values()]


# --- method "implicit" -----------------------------------------------------------------------------------

def _implicit_block(
    model: nn.Module, params: dict[str, torch.Tensor], k: int, x1: torch.Tensor, x2: torch.Tensor, mode: str
) -> torch.Tensor:
    """:math:`\\Theta e_{jb} = J_1 (J_2^\\top e_{jb})` for every basis cotangent of ``x2``: a vjp, then a jvp."""
    n1, n2 = x1.shape[0], x2.shape[0]
    f_single = _single_input_function(model, k)
    basis = torch.eye(k, dtype=x2.dtype, device=x2.device)

    def rows_of_j2(xj: torch.Tensor) -> dict[str, torch.Tensor]:
        # Only input j's cotangent is nonzero, so the vjp of the batch reduces to a vjp of that input alone.
        _, pullback = vjp(lambda p: f_single(p, xj), params)
        return vmap(pullback)(basis)[0]

    tangents = {name: t.reshape(n2 * k, *t.shape[2:]) for name, t in vmap(rows_of_j2)(x2).items()}

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


# --- method "structured" ---------------------------------------------------------------------------------

def _layers(model: nn.Module) -> dict[nn.Module, str]:
    """Modules that own trainable parameters directly, in registration order, with their qualified names."""
    return {
        module: name or type(model).__name__
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    }


def _structured_layers(model: nn.Module) -> dict[nn.Module, str]:
    """:func:`_layers`, refusing a trainable parameter registered in two modules (weight tying): each
    module's share would miss the cross terms between the two uses."""
    owner: dict[int, str] = {}
    layers = _layers(model)
    for module, name in layers.items():
        for p in module.parameters(recurse=False):
            if p.requires_grad and owner.setdefault(id(p), name) != name:
                raise NotStructuredError(
                    f"modules {owner[id(p)]!r} and {name!r} share a parameter; method='structured' needs each "
                    "parameter to belong to one module"
                )
    return layers


def _dense_factors(module: nn.Module) -> tuple[float, float] | None:
    """``(s, s_b)`` with ``z = s W a + s_b b`` for the dense layers whose forward ntkbook knows exactly: an
    ``nn.Linear`` or :class:`~ntkbook.models.NTKLinear` whose ``weight`` and ``bias`` are its own
    parameters, used as they are: no pruning mask or other hook in between, and no ``forward`` replaced
    on the instance."""
    if type(module) is nn.Linear:
        factors = 1.0, 1.0
    elif type(module) is NTKLinear:
        factors = module.weight_scale, module.bias_std
    else:
        return None
    own = module._parameters
    if own.get("weight") is not module.weight or own.get("bias") is not module.bias:
        return None
    if module._forward_pre_hooks or module._forward_hooks or "forward" in vars(module):
        return None
    global_hooks = (getattr(nn.modules.module, hooks, None) for hooks in ("_global_forward_pre_hooks", "_global_forward_hooks"))
    if any(global_hooks):
        return None
    return factors


def _check_parameters_stay_inside(out: torch.Tensor, captured: dict, layers: dict[nn.Module, str]) -> None:
    """Each trainable parameter must be used inside its own module's forward only, or the per-layer
    factorisation misses its other uses (weight tying, a parent reading ``child.weight``, a child called
    through ``.forward()``, which bypasses hooks). Walk the autograd graph region by region: outside every
    layer, from the output down to the layers' outputs; and for each layer, from its output down to its
    inputs, jumping over the layers nested in it. A parameter found in another module's region is refused."""
    owner = {id(p): module for module in layers for p in module.parameters(recurse=False) if p.requires_grad}
    # A layer's output node -> (layer, the nodes that produced its inputs). A layer that returns its input
    # unchanged has its output node among those, and is walked through like a parameter-free operation.
    sources = {
        module: {a.grad_fn for a in args if isinstance(a, torch.Tensor) and a.grad_fn is not None}
        for module, (args, z) in captured.items()
        if z.grad_fn is not None
    }
    layers_at: dict[object, list[tuple[nn.Module, set]]] = {}
    for module, inputs in sources.items():
        layers_at.setdefault(captured[module][1].grad_fn, []).append((module, inputs))

    def walk(start: object, region: nn.Module | None, stops: set) -> None:
        stack, seen = [start], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen or node in stops:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) in owner and owner[id(variable)] is not region:
                used = owner[id(variable)]
                where = "outside every layer" if region is None else f"inside module {layers[region]!r}"
                raise NotStructuredError(
                    f"a parameter of module {layers[used]!r} ({type(used).__name__}) is used {where}, not only in "
                    "its own forward (weight tying, or a module called through .forward(), which bypasses "
                    "hooks); method='structured' needs each parameter used only inside its own module"
                )
            nested = [inputs for module, inputs in layers_at.get(node, []) if module is not region and node not in inputs]
            if nested:
                stack.extend(set().union(*nested))
            else:
                stack.extend(next_node for next_node, _ in node.next_functions)

    walk(out.grad_fn, None, set())
    for module, inputs in sources.items():
        walk(captured[module][1].grad_fn, module, inputs)


def _per_input_parameter_gradients(module: nn.Module, name: str, args: tuple, g: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``module``'s own trainable parameters for each input, ``(n, k, p)`` per tensor, from the
    layer's inputs ``args`` (each ``(n, ...)``) and the output gradients ``g`` (n, k, ...). One ``vmap``
    over all (input, output) pairs: nested ``vmap`` batches some backward formulas wrongly (``nn.PReLU``)."""
    params = {key: p.detach() for key, p in module.named_parameters(recurse=False) if p.requires_grad}
    n, k = g.shape[:2]

    def pair(*row: torch.Tensor) -> dict[str, torch.Tensor]:
        *a, gi = row
        _, pullback = vjp(lambda p: functional_call(module, p, tuple(t.unsqueeze(0) for t in a)).squeeze(0), params)
        return pullback(gi)[0]

    try:
        grads = vmap(pair)(*(t.repeat_interleave(k, 0) for t in args), g.reshape(n * k, *g.shape[2:]))
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as err:
        raise NotStructuredError(
            f"cannot take per-input gradients of module {name!r} ({type(module).__name__}) with torch.func: {err}"
        ) from None
    for key, t in grads.items():
        if t.shape != (n * k, *params[key].shape):
            raise NotStructuredError(
                f"torch.func gave per-input gradients of shape {tuple(t.shape)} for parameter {key!r} of module "
                f"{name!r} ({type(module).__name__}), expected {(n * k, *params[key].shape)}"
            )
    return [t.reshape(n, k, -1) for t in grads.values()]


def _check_one_row_per_input(module: nn.Module, name: str, tensors: tuple, n: int) -> None:
    """A layer must take and give one row per input. A tensor with another first dimension (a constant,
    a table of positions, a reshape across inputs) is shared by several inputs or splits one, and the
    per-layer factorisation would pair the wrong rows."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and (t.ndim == 0 or t.shape[0] != n):
            raise NotStructuredError(
                f"module {name!r} ({type(module).__name__}) takes or gives a tensor of shape {tuple(t.shape)}, "
                f"not one row per input for a batch of {n}; method='structured' needs every layer to act on "
                "the rows of its inputs"
            )


def _same_rows(alone: tuple, batch_rows: tuple) -> bool:
    """Whether a layer's inputs and output for one input alone equal their rows in the batch: exactly for
    integers; for floats to a fraction of the largest entry of any of them, since the batch and the single
    input may sum the same products in another order (and an output that cancels to nearly 0 keeps the
    rounding of its inputs' size). The fraction is 1e-4, or 1e-2 on a GPU, where float32 products may
    round to TF32's 10-bit mantissa, and at least 100 rounding units of the dtype; a row of another input
    differs by order one."""
    floats = [t for t in batch_rows if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not floats:
        return all(not isinstance(one, torch.Tensor) or torch.equal(one, row) for one, row in zip(alone, batch_rows))
    scale = max(float(t.abs().max()) for t in floats)
    fraction = max(1e-4 if floats[0].device.type == "cpu" else 1e-2, 100 * torch.finfo(floats[0].dtype).eps)
    for one, row in zip(alone, batch_rows):
        if not isinstance(one, torch.Tensor):
            continue
        if one.shape != row.shape:
            return False
        if not one.is_floating_point():
            if not torch.equal(one, row):
                return False
        elif not bool(((one - row).abs() <= fraction * scale).all()):
            return False
    return True


def _check_rows_at_one_input(
    model: nn.Module, layers: dict[nn.Module, str], name: str, x: torch.Tensor, captured: dict
) -> None:
    """Run the first input alone and compare what each layer sees with its first row in the batch
    (``captured``). A first dimension that only happened to equal the batch size (``n`` positions for ``n``
    inputs) is then not 1; a layer that sees the inputs in another order (a sort or a flip of the batch)
    gets another first row. A reordering that leaves the first input in place is not detected."""
    inputs: dict[nn.Module, tuple] = {}

    def take_inputs(module: nn.Module, args: tuple) -> None:
        inputs[module] = args

    def check(module: nn.Module, args: tuple, output: object) -> None:
        alone = (*inputs[module], output)
        _check_one_row_per_input(module, layers[module], alone, 1)
        if module not in captured:
            return
        batch_args, batch_output = captured[module]
        batch_rows = tuple(t[:1].detach() if isinstance(t, torch.Tensor) else t for t in (*batch_args, batch_output))
        if not _same_rows(alone, batch_rows):
            raise NotStructuredError(
                f"module {layers[module]!r} ({type(module).__name__}) sees the first input differently alone "
                "than in the batch, so its rows are reordered or mixed across inputs; method='structured' "
                "needs row i of every layer to belong to input i"
            )

    handles = [module.register_forward_pre_hook(take_inputs, prepend=True) for module in layers]
    handles += [module.register_forward_hook(check) for module in layers]
    try:
        _probe(model, name, x)
    finally:
        for handle in handles:
            handle.remove()


def _record_layers(
    model: nn.Module, layers: dict[nn.Module, str], name: str, x: torch.Tensor, copy: bool
) -> tuple[torch.Tensor, dict[nn.Module, tuple[tuple, torch.Tensor]]]:
    """Run the model once, recording each layer's inputs and output. ``copy`` hands each layer copies of
    its inputs and the rest of the network a copy of its output, so that in-place operations elsewhere
    (``nn.ReLU(inplace=True)``) cannot overwrite what was recorded.

    The inputs are recorded before any forward pre-hook of the layer runs, and the output after its
    forward hooks: the per-input replay calls the layer, hooks included, on the recorded inputs."""
    captured: dict[nn.Module, tuple[tuple, torch.Tensor]] = {}
    versions: dict[nn.Module, list[int]] = {}
    inputs: dict[nn.Module, tuple] = {}

    def take_inputs(module: nn.Module, args: tuple) -> tuple | None:
        if copy:
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        inputs[module] = args
        return args if copy else None

    def record(module: nn.Module, args: tuple, kwargs: dict, output: object) -> torch.Tensor | None:
        args = inputs[module]
        label = f"module {layers[module]!r} ({type(module).__name__})"
        if module in captured:
            raise NotStructuredError(
                f"{label} is applied more than once per forward pass; method='structured' needs each layer "
                "with trainable parameters applied once"
            )
        if kwargs:
            raise NotStructuredError(
                f"{label} is called with keyword arguments ({', '.join(kwargs)}); method='structured' needs "
                "layers called with positional tensors only"
            )
        if not isinstance(output, torch.Tensor) or any(not isinstance(a, torch.Tensor) for a in args):
            raise NotStructuredError(
                f"{label} takes or returns something other than tensors; method='structured' needs tensor "
                "inputs and one tensor output per layer"
            )
        _check_one_row_per_input(module, layers[module], (*args, output), x.shape[0])
        captured[module] = (args, output)
        versions[module] = [t._version for t in (*args, output)]
        return output.clone() if copy else None

    handles = [module.register_forward_pre_hook(take_inputs, prepend=True) for module in layers]
    handles += [module.register_forward_hook(record, with_kwargs=True) for module in layers]
    try:
        out = _apply(model, name, x)
    finally:
        for handle in handles:
            handle.remove()
    if not copy and any(versions[m] != [t._version for t in (*a, z)] for m, (a, z) in captured.items()):
        return _record_layers(model, layers, name, x, copy=True)
    return out, captured


def _structured_features(model: nn.Module, layers: dict[nn.Module, str], name: str, x: torch.Tensor) -> Features:
    """One forward pass recording each layer's input and output, one backward pass per output to the layer
    outputs, then per-layer factors: ``(A, G, s^2, s_b^2)`` for dense layers, per-input gradients otherwise."""
    out, captured = _record_layers(model, layers, name, x, copy=False)
    _check_parameters_stay_inside(out, captured, layers)
    if x.shape[0] > 1:
        _check_rows_at_one_input(model, layers, name, x, captured)
    n, k = out.shape
    order = [m for m in layers if m in captured and captured[m][1].requires_grad]
    if not order or not out.requires_grad:
        # No trainable parameter reaches the output: the kernel is zero.
        return [out.new_zeros(n, k, 1)]
    zs = [captured[m][1] for m in order]
    if k == 1:
        grads = torch.autograd.grad(out, zs, torch.ones_like(out), allow_unused=True)
        grads = [None if g is None else g.unsqueeze(1) for g in grads]
    else:
        # Each input's outputs depend on that input alone, so one backward pass of output a summed over
        # the batch gives every input's gradient for output a; is_grads_batched runs the k passes at once.
        basis = torch.eye(k, dtype=out.dtype, device=out.device)[:, None, :].expand(k, n, k)
        grads = torch.autograd.grad(out, zs, basis, is_grads_batched=True, allow_unused=True)
        grads = [None if g is None else g.transpose(0, 1) for g in grads]
    features: Features = []
    for module, g in zip(order, grads):
        args, z = captured[module]
        if g is None:
            g = torch.zeros(n, k, *z.shape[1:], dtype=z.dtype, device=z.device)
        factors = _dense_factors(module)
        if factors is not None and args[0].ndim == 2:
            s, s_b = factors
            a = args[0].detach() if module.weight.requires_grad else None
            s_b2 = s_b**2 if module.bias is not None and module.bias.requires_grad else 0.0
            features.append((a, g.detach(), s**2, s_b2))
        else:
            features.extend(_per_input_parameter_gradients(module, layers[module], tuple(t.detach() for t in args), g.detach()))
    return features


# --- the driver ------------------------------------------------------------------------------------------

def _ranges(n: int, chunk: int | None) -> list[tuple[int, int]]:
    step = n if chunk is None else chunk
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _transpose_block(block: torch.Tensor) -> torch.Tensor:
    """Θ(x2, x1) from Θ(x1, x2): swap the inputs, and the outputs too in full mode."""
    block = block.transpose(0, 1)
    return block.transpose(2, 3) if block.ndim == 4 else block


def _blockwise(
    compute: Callable[[int, int, int, int], torch.Tensor],
    n1: int,
    n2: int,
    symmetric: bool,
    chunk: int | None,
) -> torch.Tensor:
    """Assemble the kernel from blocks ``compute(i0, i1, j0, j1)``; a symmetric kernel computes each
    off-diagonal block once."""
    rows, cols = _ranges(n1, chunk), _ranges(n2, chunk)
    if len(rows) == 1 and len(cols) == 1:
        return compute(0, n1, 0, n2)
    kernel = None
    for bi, (i0, i1) in enumerate(rows):
        for bj, (j0, j1) in enumerate(cols):
            if symmetric and bj < bi:
                block = _transpose_block(kernel[j0:j1, i0:i1])
            else:
                block = compute(i0, i1, j0, j1)
            if kernel is None:
                kernel = block.new_empty((n1, n2, *block.shape[2:]))
            kernel[i0:i1, j0:j1] = block
    return kernel


def _feature_kernel(
    featurize: Callable[[str, torch.Tensor], Features],
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    chunk: int | None,
    mode: str,
    keep_features: bool,
) -> torch.Tensor:
    """Kernel from per-chunk features. The current block row's features are reused along the row;
    ``keep_features`` also keeps every column chunk's features (right for "structured", whose features
    take O(n * width) memory; Jacobians are recomputed instead, to keep memory bounded)."""
    symmetric = x2 is None
    other, other_name = (x1, "x1") if symmetric else (x2, "x2")
    row: dict[str, object] = {}
    kept: dict[int, Features] = {}

    def row_features(i0: int, i1: int) -> Features:
        if row.get("start") != i0:
            row.update(start=i0, features=kept.get(i0) if symmetric and i0 in kept else featurize("x1", x1[i0:i1]))
            if keep_features and symmetric:
                kept[i0] = row["features"]
        return row["features"]

    def column_features(j0: int, j1: int) -> Features:
        if j0 in kept:
            return kept[j0]
        found = featurize(other_name, other[j0:j1])
        if keep_features:
            kept[j0] = found
        return found

    def block(i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        f1 = row_features(i0, i1)
        if symmetric and i0 == j0:
            return _contract_symmetric(f1, mode)
        f2 = column_features(j0, j1)
        k1, k2 = _outputs_per_input(f1), _outputs_per_input(f2)
        if k1 != k2:
            raise ValueError(f"the model gives x1 {k1} outputs per input but x2 {k2}")
        return _contract(f1, f2, mode)

    return _blockwise(block, x1.shape[0], other.shape[0], symmetric, chunk)


def _available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``: free CUDA memory, or MemAvailable on Linux."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Floating-point operations of one forward pass on one input (matrix products and convolutions)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    return counter.get_total_flops()


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

    Introduced in chapter 2 (:doc:`/chapters/02_torch_func`).
    """
    params = _trainable_parameters(model)
    x1 = _check_input("x1", x1, params[0])
    if x2 is not None:
        x2 = _check_input("x2", x2, params[0])
    _check_options(method, mode, chunk_size)
    if method == "auto":
        raise ValueError("method must name one method for memory_estimate, not 'auto'")
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    sizes: list[tuple[nn.Module, int, int]] = []

    def record(module: nn.Module, args: tuple, output: object) -> None:
        inputs = sum(a[0].numel() for a in args if isinstance(a, torch.Tensor))
        sizes.append((module, inputs, output[0].numel() if isinstance(output, torch.Tensor) else 0))

    handles = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    try:
        k = _probe(model, "x1", x1)
    finally:
        for handle in handles:
            handle.remove()
    if x2 is not None:
        _probe(model, "x2", x2)
    b = x1.element_size()
    p = sum(q.numel() for q in params)
    kernel = n1 * n2 * {"full": k * k, "trace": 1, "diagonal": k}[mode] * b
    c1, c2 = min(n1, chunk_size or n1), min(n2, chunk_size or n2)
    activations = sum(outputs for _, _, outputs in sizes)
    if method in ("loop", "jacobian"):
        blocks = c1 if x2 is None and c1 == n1 else c1 + c2
        return kernel + blocks * k * p * b + c1 * activations * b
    if method == "implicit":
        return kernel + c2 * k * p * b + c2 * k * c1 * activations * b
    layers = _layers(model)
    per_input = 0
    for module, inputs, outputs in sizes:
        if module in layers:
            own = sum(q.numel() for q in module.parameters(recurse=False) if q.requires_grad)
            dense = _dense_factors(module) is not None and inputs == module.in_features
            per_input += inputs + k * outputs if dense else k * own
    stored = n1 if x2 is None else n1 + n2
    return kernel + stored * per_input * b + c1 * activations * b + 2 * c1 * c2 * k * k * b


def _pick_method(
    model: nn.Module, params: list[torch.Tensor], x1: torch.Tensor, x2: torch.Tensor | None, k: int, mode: str
) -> tuple[str, int | None]:
    """For models "structured" cannot handle: the cheaper of "jacobian" and "implicit" by the cost model of
    Novak et al. (2022), if it fits in half the free memory; else "implicit" in chunks that fit."""
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    p = sum(q.numel() for q in params)
    flops = max(_forward_flops(model, x1), p)
    contraction = n1 * n2 * p * (k * k if mode == "full" else k)
    jacobian_cost = (n1 + n2) * k * 3 * flops + 2 * contraction
    implicit_cost = n2 * k * 3 * flops + n2 * k * n1 * 3 * flops
    budget = _available_memory(x1.device) // 2
    fits = {m: memory_estimate(model, x1, x2, method=m, mode=mode) <= budget for m in ("jacobian", "implicit")}
    if fits["jacobian"] and (jacobian_cost <= implicit_cost or not fits["implicit"]):
        return "jacobian", None
    if fits["implicit"]:
        return "implicit", None
    return "implicit", _fitting_chunk(model, x1, x2, "implicit", mode)


def _fitting_chunk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None, method: str, mode: str) -> int:
    """The largest ``chunk_size``, from the smaller batch halving down to 1, whose
    :func:`memory_estimate` fits in half the free memory."""
    budget = _available_memory(x1.device) // 2
    chunk = max(1, min(x1.shape[0], x1.shape[0] if x2 is None else x2.shape[0]))
    while chunk > 1 and memory_estimate(model, x1, x2, method=method, mode=mode, chunk_size=chunk) > budget:
        chunk //= 2
    return chunk


def empirical_ntk(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    method: str = "auto",
    mode: str = "full",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The empirical NTK :math:`\\Theta_{ab}(x_{1,i}, x_{2,j}) = \\langle \\partial_\\theta f_a(x_{1,i}), \\partial_\\theta f_b(x_{2,j}) \\rangle`.

    Args:
        model: a module mapping a batch ``(n, ...)`` to ``(n,)`` or ``(n, k)``; every parameter with
            ``requires_grad`` counts, the others and buffers are constants. Each input's output must
            depend on that input alone, and the model must not be random: BatchNorm in training mode
            and active dropout are refused (call ``model.eval()``).
        x1: inputs of shape ``(n1, ...)``, same dtype and device as the model.
        x2: inputs of shape ``(n2, ...)``; ``None`` means ``x1``, whose per-input quantities are then
            computed once, and a quarter of the symmetric kernel is copied instead of computed.
        method: ``"loop"`` (one backward pass per input and output), ``"jacobian"`` (``vmap(jacrev)``
            and a contraction per parameter tensor), ``"implicit"`` (``vjp`` then ``jvp``, never forming
            the Jacobian of ``x1``), ``"structured"`` (the per-layer factorisation
            :math:`\\Theta = \\sum_l (G_l G_l'^\\top) \\odot (s_l^2 A_l A_l'^\\top + s_{b,l}^2)` for
            ``nn.Linear`` and :class:`~ntkbook.models.NTKLinear`, per-input gradients of the layer's own
            parameters for any other layer; each layer must be applied once per forward pass, to
            positional tensors whose row i belongs to input i, and own its parameters alone, using them
            only inside its forward, else :class:`NotStructuredError` names the module), or
            ``"auto"``: "structured" when it applies, else whichever of "jacobian" and "implicit" is
            cheaper and fits in memory, and "loop" (with a warning) where ``torch.func`` fails.
        mode: for ``k`` outputs, ``"full"`` gives ``(n1, n2, k, k)``; ``"trace"`` gives ``(n1, n2)``, the
            *sum* over outputs :math:`\\sum_a \\Theta_{aa}` (neural-tangents' ``trace_axes`` averages
            instead, so its values are ours divided by ``k``); ``"diagonal"`` gives ``(n1, n2, k)``,
            :math:`\\Theta_{aa}` per output. With one output every mode gives ``(n1, n2)``.
        chunk_size: compute the kernel in blocks of at most ``chunk_size`` inputs from each side, so memory
            stays bounded by the blocks (see :func:`memory_estimate`); ``None`` does it in one block.

    Returns:
        The kernel in the model's dtype and on its device, detached from the graph. The same inside
        ``torch.no_grad()``; inside ``torch.inference_mode()``, which forbids differentiation, a
        ``ValueError``.
    """
    params = _trainable_parameters(model)
    reference = params[0]
    if torch.is_inference_mode_enabled():
        raise ValueError(
            "empirical_ntk differentiates the model, which torch.inference_mode() forbids; call it outside "
            "inference mode (inside torch.no_grad() is fine)"
        )
    x1 = _check_input("x1", x1, reference)
    if x2 is not None:
        x2 = _check_input("x2", x2, reference)
    _check_options(method, mode, chunk_size)
    _refuse_training_mode_layers(model)
    # Every method differentiates the model, whether or not the caller is inside torch.no_grad().
    with torch.enable_grad():
        return _squeeze(_kernel(model, params, x1, x2, method, mode, chunk_size).detach())


def _kernel(
    model: nn.Module,
    params: list[torch.Tensor],
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    method: str,
    mode: str,
    chunk_size: int | None,
) -> torch.Tensor:
    """:func:`empirical_ntk` after its checks: dispatch to a method, falling back as ``"auto"`` promises."""
    chunk = chunk_size
    if method in ("auto", "structured"):
        try:
            layers = _structured_layers(model)
            return _feature_kernel(
                lambda name, x: _structured_features(model, layers, name, x), x1, x2, chunk, mode, True
            )
        except NotStructuredError:
            if method == "structured":
                raise
        auto = True
        method, picked = _pick_method(model, params, x1, x2, _probe(model, "x1", x1), mode)
        chunk = chunk_size or picked
    else:
        auto = False

    def loop() -> torch.Tensor:
        return _feature_kernel(lambda name, x: _loop_features(model, params, name, x), x1, x2, chunk, mode, False)

    if method == "loop":
        return loop()
    k = _probe(model, "x1", x1)
    if x2 is not None and _probe(model, "x2", x2) != k:
        raise ValueError("the model gives x1 and x2 different numbers of outputs per input")
    try:
        return _torch_func_kernel(model, k, x1, x2, method, mode, chunk, chunk_size, auto)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as err:
        if not auto:
            raise
        warnings.warn(
            f"torch.func cannot take this model's per-input derivatives ({err}); method='auto' falls back on "
            "method='loop', one backward pass per input and output",
            RuntimeWarning,
            stacklevel=3,
        )
        chunk = chunk_size or _fitting_chunk(model, x1, x2, "loop", mode)
        return loop()


def _torch_func_kernel(
    model: nn.Module,
    k: int,
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    method: str,
    mode: str,
    chunk: int | None,
    chunk_size: int | None,
    auto: bool,
) -> torch.Tensor:
    """Method "implicit" or "jacobian" with ``k`` outputs per input; ``auto`` turns "implicit" into
    "jacobian" (in blocks that fit, unless ``chunk_size`` was given) for a model without forward-mode AD."""
    named = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if method == "implicit":
        other = x1 if x2 is None else x2
        try:
            return _blockwise(
                lambda i0, i1, j0, j1: _implicit_block(model, named, k, x1[i0:i1], other[j0:j1], mode),
                x1.shape[0], other.shape[0], x2 is None, chunk,
            )
        except NotImplementedError as err:
            if not auto:
                raise NotImplementedError(
                    "method='implicit' needs forward-mode AD, which torch lacks for an operation of this model "
                    f"({err}); method='jacobian' needs reverse mode only"
                ) from None
            chunk = chunk_size or _fitting_chunk(model, x1, x2, "jacobian", mode)
    return _feature_kernel(lambda name, x: _jacobian_features(model, named, k, x), x1, x2, chunk, mode, False)


def _squeeze(kernel: torch.Tensor) -> torch.Tensor:
    """One output per input: every mode is the ``(n1, n2)`` matrix."""
    if kernel.ndim > 2 and kernel.shape[-1] == 1:
        return kernel.reshape(kernel.shape[:2])
    return kernel
