"""One recorded forward pass: each layer's inputs and output, for the per-layer rules.

Layers are recorded by their positional tensor inputs and their one tensor output, except those with
a recorder of their own (:data:`~ntkbook.ntk.structured.rules.RECORDERS`: attention, which takes
keyword arguments and returns a tuple), which also keep their keyword arguments."""

from __future__ import annotations

import threading
from collections import Counter
from typing import NamedTuple

import torch
from torch import nn

from ntkbook.ntk.request import apply
from ntkbook.ntk.structured.rules import (
    RECORDERS,
    NotStructuredError,
    distinct_tensors,
    own_parameters,
    owns_submodules,
)


def layers(model: nn.Module) -> dict[nn.Module, str]:
    """Modules that own trainable parameters directly, in registration order, with their qualified
    names. A parameter registered in two modules (weight tying) is refused here, before any work: the
    verification would catch the missing cross terms, but only after a wasted attempt. A layer whose
    rule covers its submodules, or a parametrized layer
    (:func:`~ntkbook.ntk.structured.rules.owns_submodules`), owns their parameters."""
    covered = {
        sub for module in model.modules() if owns_submodules(module) for sub in module.modules() if sub is not module
    }
    found = {
        module: name or type(model).__name__
        for name, module in model.named_modules()
        if module not in covered and own_parameters(module)
    }
    owner: dict[int, str] = {}
    for module, name in found.items():
        for _, p in own_parameters(module):
            if owner.setdefault(id(p), name) != name:
                raise NotStructuredError(
                    f"modules {owner[id(p)]!r} and {name!r} share a parameter; method='structured' needs each "
                    "parameter to belong to one module"
                )
    return found


def _check_one_row_per_input(label: str, tensors: tuple, n: int) -> None:
    """A layer must take and give one row per input, or its feature would have other rows than the
    kernel. (A first dimension equal to ``n`` by coincidence passes here and is left to the verification.)"""
    for t in tensors:
        if t.ndim == 0 or t.shape[0] != n:
            raise NotStructuredError(
                f"{label} takes or gives a tensor of shape {tuple(t.shape)}, not one row per input for a batch "
                f"of {n}; method='structured' needs every layer to act on the rows of its inputs"
            )


class Recorded(NamedTuple):
    """What one layer's call left: its positional tensor inputs ``args``, its output ``z``, its keyword
    arguments (layers with a recorder of their own, else ``None``), the autograd nodes of the other
    tensors it returned, which its rule does not differentiate (taken when the layer returns, before the
    model can modify those tensors in place), and the span ``[start, stop)`` of the autograd sequence
    numbers of the nodes made during the call."""

    args: tuple
    z: torch.Tensor
    kwargs: dict | None
    others: tuple
    span: tuple[int, int]


def _next_sequence_nr() -> int:
    """The sequence number the next autograd node made on this thread gets: each node takes the next
    one when it is made (``torch.autograd.graph.Node._sequence_nr``), so a span of them is a span of time."""
    with torch.enable_grad():
        return torch.zeros((), requires_grad=True).view(()).grad_fn._sequence_nr() + 1


def record_layers(
    model: nn.Module, found: dict[nn.Module, str], name: str, x: torch.Tensor, copy: bool = False
) -> tuple[torch.Tensor, dict[nn.Module, Recorded]]:
    """Run the model once on ``x``, recording each layer's positional tensor inputs (before its forward
    pre-hooks run), its output (after its forward hooks) and, for a layer with its own recorder, its
    keyword arguments (else ``None``). ``copy`` records copies of each layer's inputs and gives the rest
    of the network a copy of each layer's output, so that in-place operations (``nn.ReLU(inplace=True)``,
    a layer's own ``x.mul_(gamma)``) cannot overwrite what was recorded; it is used when a first run
    finds a recorded tensor modified. The layers themselves get the network's tensors, so that an
    in-place change still reaches every other use of the tensor it changes."""
    captured: dict[nn.Module, Recorded] = {}
    versions: dict[nn.Module, list[int]] = {}  # of what each layer's record holds, when it was taken
    inputs: dict[nn.Module, tuple] = {}  # what is recorded: the tensors given, or copies of them
    given: dict[nn.Module, tuple] = {}  # the tensors given, and their versions before the layer ran
    buffers: dict[nn.Module, list[int]] = {}
    starts: dict[nn.Module, int] = {}
    modified: list[nn.Module] = []  # layers that modified their own input in place (x.mul_(gamma))
    thread = threading.get_ident()

    def take_inputs(module: nn.Module, args: tuple) -> None:
        if threading.get_ident() != thread:
            raise NotStructuredError(
                f"module {found[module]!r} ({type(module).__name__}) is called on another thread than the model; "
                "method='structured' tells each layer's call by the autograd sequence numbers of one thread"
            )
        starts[module] = _next_sequence_nr()
        given[module] = args, _versions(args)
        buffers[module] = _versions(tuple(module.buffers()))
        inputs[module] = _copies(args) if copy else args

    def record(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        args = inputs[module]
        label = f"module {found[module]!r} ({type(module).__name__})"
        # Each guard below names the module where the rules could not apply at all.
        args_given, before = given[module]
        if before != _versions(args_given):
            _check_no_partial_aliases(label, args_given)
            modified.append(module)
        if module in captured:
            raise NotStructuredError(
                f"{label} is applied more than once per forward pass; method='structured' needs each layer "
                "with trainable parameters applied once"
            )
        recorder = RECORDERS.get(type(module))
        if recorder is not None:
            args, kwargs, z, rebuild, others = recorder(module, args, kwargs, output)
        elif kwargs:
            raise NotStructuredError(
                f"{label} is called with keyword arguments ({', '.join(kwargs)}); method='structured' needs "
                "layers called with positional tensors only"
            )
        else:
            z, kwargs, others = output, None, ()
        if not isinstance(z, torch.Tensor) or any(not isinstance(a, torch.Tensor) for a in args):
            raise NotStructuredError(
                f"{label} takes or returns something other than tensors; method='structured' needs tensor "
                "inputs and one tensor output per layer"
            )
        _check_one_row_per_input(label, (*args, z), x.shape[0])
        nodes = tuple(t.grad_fn for t in others if t.grad_fn is not None)
        if copy and kwargs:  # a mask may be changed in place after the call
            kwargs = dict(zip(kwargs, _copies(tuple(kwargs.values()))))
        versions[module] = _versions((*args, z, *(kwargs or {}).values()))
        result = rebuild(z.clone() if copy else z) if recorder is not None else z.clone() if copy else None
        captured[module] = Recorded(args, z, kwargs, nodes, (starts[module], _next_sequence_nr()))
        return result

    handles = [module.register_forward_pre_hook(take_inputs, prepend=True) for module in found]
    handles += [module.register_forward_hook(record, with_kwargs=True) for module in found]
    try:
        out = apply(model, name, x)
    finally:
        for handle in handles:
            handle.remove()
    for module in captured:
        if buffers[module] != _versions(tuple(module.buffers())):
            raise NotStructuredError(
                f"a buffer of module {found[module]!r} ({type(module).__name__}) is changed in place during the "
                "forward pass; method='structured' needs each layer's buffers as they were when it ran"
            )
    changed = [m for m, r in captured.items() if versions[m] != _versions((*r.args, r.z, *(r.kwargs or {}).values()))]
    if not copy and (modified or changed):
        return record_layers(model, found, name, x, copy=True)
    if changed:
        raise NotStructuredError(
            f"the output of module {found[changed[0]]!r} ({type(changed[0]).__name__}) is modified in place after "
            "the layer returns, even when the network is given a copy of it; method='structured' needs each "
            "layer's output as the layer left it"
        )
    return out, captured


def _versions(values: tuple) -> list[int]:
    """The version counters of the tensors among ``values`` (an inference tensor has none: 0)."""
    return [0 if t.is_inference() else t._version for t in values if isinstance(t, torch.Tensor)]


def _copies(values: tuple) -> tuple:
    """Detached copies of the tensors among ``values``, one per distinct tensor
    (:func:`~ntkbook.ntk.structured.rules.distinct_tensors`): a layer given one tensor twice, which may
    rely on the two being one, keeps them one."""
    distinct, where = distinct_tensors(tuple(t for t in values if isinstance(t, torch.Tensor)))
    copies = [t.detach().clone() for t in distinct]
    position = iter(where)
    return tuple(copies[next(position)] if isinstance(t, torch.Tensor) else t for t in values)


def _check_no_partial_aliases(label: str, values: tuple) -> None:
    """A layer that changes an input in place must not be given two inputs that overlap without being
    one (``h`` and ``h.unsqueeze(1)``, two overlapping slices): its rule could not rerun it so that the
    change reaches the other."""
    distinct, _ = distinct_tensors(tuple(t for t in values if isinstance(t, torch.Tensor)))
    storages = [t.untyped_storage().data_ptr() for t in distinct]
    if len(set(storages)) < len(storages):
        raise NotStructuredError(
            f"{label} changes an input in place and is given inputs that share memory without being one tensor; "
            "method='structured' cannot rerun it with the change reaching the others"
        )


def _walk(roots: list, span: tuple[int, int] | None = None) -> tuple[Counter, dict]:
    """The autograd graph reached from ``roots``, entering only nodes made within ``span`` (sequence
    numbers; every node if ``None``): how many edges lead to each output of a node, keyed
    ``(node, output number)``, and to each leaf, keyed by the ``id`` of its tensor; and the keys each
    entered node's edges lead to."""
    uses: Counter = Counter()
    children: dict = {}
    todo = [r for r in roots if r is not None]
    while todo:
        node = todo.pop()
        if node in children or (span is not None and not span[0] <= node._sequence_nr() < span[1]):
            continue
        children[node] = keys = []
        for child, number in node.next_functions:
            if child is None:
                continue
            leaf = getattr(child, "variable", None)
            keys.append((child, number) if leaf is None else id(leaf))
            uses[keys[-1]] += 1
            if leaf is None:
                todo.append(child)
    return uses, children


def _computed_from(children: dict, leaves: set[int]) -> set:
    """The entered nodes of a walk from which a path of edges leads to one of ``leaves``."""
    parents: dict = {}
    for node, keys in children.items():
        for key in keys:
            parents.setdefault(key[0] if isinstance(key, tuple) else key, []).append(node)
    found: set = set()
    todo = [parent for leaf in leaves for parent in parents.get(leaf, ())]
    while todo:
        node = todo.pop()
        if node not in found:
            found.add(node)
            todo.extend(parents.get(node, ()))
    return found


def check_graph(
    out: torch.Tensor, captured: dict[nn.Module, Recorded], found: dict[nn.Module, str]
) -> list[nn.Parameter]:
    """What reaches ``out`` must be what the rules differentiate, checked on one walk of its graph; the
    trainable parameters of layers whose output reaches ``out`` that the graph never uses (a mask token
    used only when masks are given, a weight replaced through ``torch.func.functional_call``), whose
    share of the kernel is zero, are returned for the rules to leave out:

    - every use of a trainable parameter, and of any output of a node made from the module's parameters
      during its call other than the layer's output (the weight of ``nn.utils.weight_norm``, the other
      half of a ``chunk``), lies inside the module's recorded call, and that call's output reaches ``out``.
      A tied weight (``F.linear(h, embedding.weight)``), a layer called through ``layer.forward`` (which
      runs no hooks), ``F.conv2d(x, conv.weight)`` beside ``conv(x)``, a weight computed from a layer's
      parameters before its call and read by it, a weight-normed layer's weight used again after it, or
      a layer whose output is discarded while its weight is used elsewhere are refused by name. The
      call is the nodes made between its forward pre-hooks and its forward hooks (by their sequence
      numbers), reached from its output.
    - no tensor a layer returns besides its output (attention's weights with ``need_weights=True``)
      reaches ``out``: its rule differentiates the layer's output only."""
    total, graph = _walk([out.grad_fn])
    unused: list[nn.Parameter] = []
    params: dict[int, nn.Parameter] = {}
    outputs: dict = {}  # each node's outputs that edges lead to
    for key in total:
        if isinstance(key, tuple):
            outputs.setdefault(key[0], []).append(key)
    for module, name in found.items():
        label = f"module {name!r} ({type(module).__name__})"
        named = own_parameters(module)
        own = {id(p): key for key, p in named}
        params.update((id(p), p) for _, p in named)
        inside: Counter = Counter()
        computed: set = set()
        result = None
        if module in captured:
            record = captured[module]
            if record.z.grad_fn in graph:  # uses inside a call whose output the model discards cover nothing
                inside, call = _walk([record.z.grad_fn], record.span)
                computed = _computed_from(call, set(own))
                result = (record.z.grad_fn, record.z.output_nr)
            if any(node in graph for node in record.others):
                raise NotStructuredError(
                    f"{label} returns a second tensor that the model uses (the attention weights of "
                    "need_weights=True, say); method='structured' differentiates each layer's output only"
                )
        for pid, key in own.items():
            if total[pid] > inside[pid]:
                raise NotStructuredError(
                    f"parameter {key!r} of {label} is used outside the module's own call (a tied weight, a layer "
                    "run through .forward(), a weight computed from it before the call, or its weight passed to a "
                    "function directly); method='structured' needs each parameter used inside its module's call only"
                )
            if result is not None and not inside[pid]:
                unused.append(params[pid])
        uses = (key for node in computed for key in outputs.get(node, ()) if key != result)
        if any(total[key] > inside[key] for key in uses):
            raise NotStructuredError(
                f"{label} computes a tensor from its parameters during its call that the model also uses outside "
                "the call (the weight of nn.utils.weight_norm, say); method='structured' needs each parameter "
                "used inside its module's call only"
            )
    return unused
