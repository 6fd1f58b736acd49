"""One object for a call of :func:`~ntkbook.ntk.empirical_ntk`: the model, its trainable parameters,
the two batches and the options, all checked once on entry."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ntkbook._checks import positive_int

METHODS = ("auto", "loop", "jacobian", "implicit", "structured")
MODES = ("full", "trace", "diagonal")


@dataclass
class Request:
    """A checked call: ``x2 is None`` means the symmetric kernel of ``x1`` with itself; ``k`` is the
    number of outputs per input; ``chunk_size`` bounds the inputs of each side per block."""

    model: nn.Module
    params: list[nn.Parameter]
    x1: torch.Tensor
    x2: torch.Tensor | None
    mode: str
    chunk_size: int | None
    k: int

    @property
    def symmetric(self) -> bool:
        return self.x2 is None

    @property
    def other(self) -> torch.Tensor:
        """The batch of the kernel's columns: ``x2``, or ``x1`` for the symmetric kernel."""
        return self.x1 if self.x2 is None else self.x2

    @property
    def reference(self) -> torch.Tensor:
        return self.params[0]

    @property
    def num_params(self) -> int:
        """``P``, the number of trainable parameters: the length of one flat gradient."""
        return sum(p.numel() for p in self.params)

    def named_params(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by qualified name, detached: what ``functional_call`` substitutes."""
        return {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}


def trainable_parameters(model: object, consequence: str = "its NTK is not defined") -> list[nn.Parameter]:
    """The parameters with ``requires_grad``; refuses a non-module or a model without any, saying
    what follows (``consequence``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"model has no parameters with requires_grad=True, so {consequence}")
    for name, p in named:
        if not p.is_floating_point():
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}; ntkbook handles real floating parameters only")
    return [p for _, p in named]


def check_batch(name: str, x: object, reference: torch.Tensor) -> torch.Tensor:
    """A non-empty, finite, dense batch ``(n, ...)`` on the device of ``reference``, detached from any
    graph (the NTK differentiates parameters, never inputs). Integer and boolean inputs (token ids)
    are accepted as they are; floating inputs must have the parameters' dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, ...), got {type(x).__name__}")
    if x.layout != torch.strided or x.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}; call .to_dense() first")
    if x.is_complex():
        raise TypeError(f"{name} must be real (floating, integer or boolean), got {x.dtype}")
    if x.is_floating_point() and x.dtype != reference.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the model's parameters are {reference.dtype}")
    if x.device != reference.device:
        raise ValueError(f"{name} is on {x.device} but the model's parameters are on {reference.device}")
    if x.device.type == "meta":
        raise ValueError(f"{name} and the model are on the meta device, which holds shapes but no values")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch of shape (n, ...) with n >= 1, got shape {tuple(x.shape)}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    x = x.detach()
    # A tensor made under torch.inference_mode() cannot be saved for a backward pass; a copy can.
    return x.clone() if x.is_inference() else x


def check_options(method: object, mode: object, chunk_size: object) -> int | None:
    """``chunk_size`` as an int (any integral number, such as ``numpy.int64``) or ``None``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return None if chunk_size is None else positive_int("chunk_size", chunk_size)


def refuse_random_or_batch_layers(model: nn.Module) -> None:
    """BatchNorm with batch statistics mixes the inputs of a batch, and active dropout makes the model
    random. The verification's batch-independence and determinism checks refuse both as well; this
    guard stays because it names the layer and the fix (``model.eval()``) before any work is done."""
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


def as_rows(name: str, out: object, n: int) -> torch.Tensor:
    """Outputs of shape ``(n,)`` or ``(n, k)`` with ``k >= 1`` as ``(n, k)``, or explain why not. A single
    input may give ``()`` or ``(k,)``: a model that ends in ``.squeeze()`` drops its batch dimension then."""
    if n == 1 and isinstance(out, torch.Tensor) and out.ndim <= 1 and out.numel() > 0:
        out = out.reshape(1, -1)
    if not isinstance(out, torch.Tensor) or out.ndim not in (1, 2) or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"the model must map {name} to one output row per input, of shape (n,) or (n, k) with n = {n} "
            f"inputs here; got {shape}"
        )
    if out.ndim == 2 and out.shape[1] == 0:
        raise ValueError(f"the model maps {name} to 0 outputs per input (shape {tuple(out.shape)}); its NTK is empty")
    if not out.is_floating_point():
        raise ValueError(f"the model maps {name} to {out.dtype} outputs, which cannot be differentiated")
    return out.reshape(n, -1)


def apply(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The model's ``(n, k)`` outputs on a copy of ``x`` (a model may change its input in place, and
    methods run it more than once), with torch's errors turned into one naming the batch."""
    try:
        out = model(x.clone())
    except (RuntimeError, IndexError, TypeError) as err:
        raise ValueError(f"model cannot be applied to {name} of shape {tuple(x.shape)}: {err}") from None
    return as_rows(name, out, x.shape[0])


def outputs_per_input(model: nn.Module, name: str, x: torch.Tensor) -> int:
    """``k``, from one input, without building a graph."""
    with torch.no_grad():
        return apply(model, name, x[:1]).shape[1]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit the same batch: ``torch.equal`` would also pair -0.0 with 0.0, which a model can tell
    apart (``atan2``, ``1 / x``)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def make_request(model: nn.Module, x1: object, x2: object, method: object, mode: object, chunk_size: object) -> Request:
    """Check every argument of :func:`~ntkbook.ntk.empirical_ntk` and count the outputs per input."""
    params = trainable_parameters(model)
    if torch.is_inference_mode_enabled():
        raise ValueError(
            "empirical_ntk differentiates the model, which torch.inference_mode() forbids; call it outside "
            "inference mode (inside torch.no_grad() is fine)"
        )
    if parametrize._cache_enabled:
        raise ValueError(
            "empirical_ntk is called inside torch.nn.utils.parametrize.cached(), which would keep a parametrized "
            "weight computed once without its graph; call it outside cached()"
        )
    x1 = check_batch("x1", x1, params[0])
    if x2 is not None:
        x2 = check_batch("x2", x2, params[0])
        if x2 is x1 or _same_bits(x1, x2):
            x2 = None  # the same batch twice: its kernel is the symmetric one, at the symmetric one's cost
    chunk_size = check_options(method, mode, chunk_size)
    refuse_random_or_batch_layers(model)
    k = outputs_per_input(model, "x1", x1)
    if x2 is not None and (k2 := outputs_per_input(model, "x2", x2)) != k:
        raise ValueError(f"the model gives x1 {k} outputs per input but x2 {k2}")
    return Request(model, params, x1, x2, mode, chunk_size, k)
