"""Running one method, and ``method="auto"``'s ladder of methods, each kernel verified."""

from __future__ import annotations

import warnings

import torch

from ntkbook.ntk.blocks import block_kernel, feature_kernel
from ntkbook.ntk.budget import fitting_chunk, measure, pick_torch_func_method
from ntkbook.ntk.implicit import implicit_block
from ntkbook.ntk.jacobian import jacobian_features
from ntkbook.ntk.loop import loop_features
from ntkbook.ntk.request import Request
from ntkbook.ntk.structured import NotStructuredError, layers, structured_features
from ntkbook.ntk.verify import VerificationError, Verifier

# What torch raises where torch.func or forward-mode AD cannot handle a model.
TORCH_FUNC_FAILURES = (RuntimeError, NotImplementedError)


def run_method(request: Request, method: str, chunk: int | None) -> torch.Tensor:
    """The unverified kernel of one method, in blocks of ``chunk`` inputs per side."""
    x1, x2, mode = request.x1, request.x2, request.mode
    if method == "structured":
        found, left_out = layers(request.model), {}
        featurize = lambda name, x: structured_features(request.model, found, name, x, left_out)
        return feature_kernel(featurize, x1, x2, chunk, mode, keep_features=True)
    if method == "loop":
        return feature_kernel(lambda name, x: loop_features(request, name, x), x1, x2, chunk, mode, False)
    if method == "jacobian":
        return feature_kernel(lambda name, x: jacobian_features(request, name, x), x1, x2, chunk, mode, False)
    other = request.other
    return block_kernel(
        lambda i0, i1, j0, j1: implicit_block(request, x1[i0:i1], other[j0:j1], mode),
        x1.shape[0],
        other.shape[0],
        request.symmetric,
        chunk,
    )


def explicit_kernel(request: Request, method: str, verifier: Verifier | None) -> torch.Tensor:
    """One named method; a failure inside torch is a clear error naming the method."""
    try:
        kernel = run_method(request, method, request.chunk_size)
    except NotStructuredError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise
    except TORCH_FUNC_FAILURES as err:
        hint = "; method='jacobian' needs reverse mode only" if method == "implicit" else ""
        raise ValueError(f"method={method!r} cannot differentiate this model: {err}{hint}") from None
    if verifier is not None:
        verifier.check(kernel, method)
    return kernel


def _attempt(
    request: Request, method: str, chunk: int | None, verifier: Verifier | None, reasons: list
) -> torch.Tensor | None:
    """One rung of the ladder: the verified kernel, or ``None`` with the reason appended."""
    try:
        kernel = run_method(request, method, chunk)
        if verifier is not None:
            verifier.check(kernel, method)
        return kernel
    except torch.cuda.OutOfMemoryError:
        raise
    except (*TORCH_FUNC_FAILURES, NotStructuredError, VerificationError) as err:
        reasons.append(f"{method}: {err}")
        return None


def auto_kernel(request: Request, verifier: Verifier | None) -> torch.Tensor:
    """The ladder: "structured"; then the cheaper of "jacobian" and "implicit" that fits (with
    "jacobian" after "implicit" where forward-mode AD is missing); finally "loop", the model's own
    autograd, with a warning. A method that raises, or whose kernel fails verification, hands over
    to the next; the loop's kernel failing verification is an error."""
    reasons: list[str] = []
    kernel = _attempt(request, "structured", request.chunk_size, verifier, reasons)
    if kernel is not None:
        return kernel
    measured = measure(request)
    method, chunk = pick_torch_func_method(request, measured)
    ladder = [(method, chunk)]
    if method == "implicit":
        ladder.append(("jacobian", request.chunk_size or fitting_chunk(request, measured, "jacobian")))
    for method, chunk in ladder:
        kernel = _attempt(request, method, chunk, verifier, reasons)
        if kernel is not None:
            return kernel
    warnings.warn(
        "method='auto' falls back on method='loop', one backward pass per input and output, since "
        + "; ".join(reasons),
        RuntimeWarning,
        stacklevel=4,
    )
    kernel = run_method(request, "loop", request.chunk_size or fitting_chunk(request, measured, "loop"))
    if verifier is not None:
        verifier.check(kernel, "loop")
    return kernel
