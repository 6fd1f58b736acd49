"""What a call will cost, measured in one forward pass on one input, and how much memory is free."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ntkbook.models import NTKLinear
from ntkbook.mup import MuPLinear
from ntkbook.ntk.request import Request, apply
from ntkbook.ntk.structured.dense import dense_multipliers


@dataclass
class Measurements:
    """From one forward pass on one input: floating-point operations (matrix products and
    convolutions), and per leaf module its input and output sizes."""

    flops: int
    sizes: list[tuple[nn.Module, int, int]]


def measure(request: Request) -> Measurements:
    sizes: list[tuple[nn.Module, int, int]] = []

    def per_input(t: torch.Tensor) -> int:
        """Entries of one input's slice; a 0-d tensor (a learnable temperature) or an empty batch (an
        expert that no input is routed to) has no leading batch dimension to slice."""
        return t[0].numel() if t.ndim and t.shape[0] else t.numel()

    def record(module: nn.Module, args: tuple, output: object) -> None:
        inputs = sum(per_input(a) for a in args if isinstance(a, torch.Tensor))
        sizes.append((module, inputs, per_input(output) if isinstance(output, torch.Tensor) else 0))

    model = request.model
    leaves = [m for m in model.modules() if not list(m.children()) and not isinstance(m, torch.jit.ScriptModule)]
    handles = [m.register_forward_hook(record) for m in leaves]  # a ScriptModule takes no hooks
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            apply(model, "x1", request.x1[:1])
        flops = counter.get_total_flops()
    except (RuntimeError, AssertionError):
        # torch's flop counter fails on some models (a view of a parameter changed in place under
        # no_grad); the estimate then goes by the sizes alone.
        sizes.clear()
        with torch.no_grad():
            apply(model, "x1", request.x1[:1])
        flops = 0
    finally:
        for handle in handles:
            handle.remove()
    return Measurements(flops, sizes)


def available_memory(device: torch.device) -> int:
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


def estimate(request: Request, measured: Measurements, method: str, chunk_size: int | None) -> int:
    """Bytes beyond the model and inputs, to leading order (see :func:`~ntkbook.ntk.memory_estimate`)."""
    n1 = request.x1.shape[0]
    n2 = request.other.shape[0]
    k, b = request.k, request.reference.element_size()
    p = request.num_params
    kernel = n1 * n2 * {"full": k * k, "trace": 1, "diagonal": k}[request.mode] * b
    c1, c2 = min(n1, chunk_size or n1), min(n2, chunk_size or n2)
    activations = sum(outputs for _, _, outputs in measured.sizes)
    if method in ("loop", "jacobian"):
        blocks = c1 if request.symmetric and c1 == n1 else c1 + c2
        return kernel + blocks * k * p * b + c1 * activations * b
    if method == "implicit":
        return kernel + c2 * k * p * b + c2 * k * c1 * activations * b
    per_input = 0
    for module, inputs, outputs in measured.sizes:
        own = sum(q.numel() for q in module.parameters(recurse=False) if q.requires_grad)
        if not own:
            continue
        dense = type(module) in (nn.Linear, NTKLinear, MuPLinear) and dense_multipliers(module) is not None
        dense = dense and inputs == module.in_features
        per_input += inputs + k * outputs if dense else k * own
    stored = n1 if request.symmetric else n1 + n2
    return kernel + stored * per_input * b + c1 * activations * b + 2 * c1 * c2 * k * k * b


def fitting_chunk(request: Request, measured: Measurements, method: str) -> int:
    """The largest chunk, from the smaller batch halving down to 1, that fits in half the free memory."""
    budget = available_memory(request.reference.device) // 2
    chunk = max(1, min(request.x1.shape[0], request.other.shape[0]))
    while chunk > 1 and estimate(request, measured, method, chunk) > budget:
        chunk //= 2
    return chunk


def pick_torch_func_method(request: Request, measured: Measurements) -> tuple[str, int | None]:
    """The cheaper of "jacobian" and "implicit" by the cost model of Novak et al. (2022), if it fits in
    half the free memory; else "implicit" in chunks that fit. ``chunk_size``, when given, is kept."""
    n1, n2, k = request.x1.shape[0], request.other.shape[0], request.k
    p = request.num_params
    flops = max(measured.flops, p)
    contraction = n1 * n2 * p * (k * k if request.mode == "full" else k)
    jacobian_cost = (n1 + n2) * k * 3 * flops + 2 * contraction
    implicit_cost = n2 * k * 3 * flops + n2 * k * n1 * 3 * flops
    chunk = request.chunk_size
    budget = available_memory(request.reference.device) // 2
    fits = {m: estimate(request, measured, m, chunk) <= budget for m in ("jacobian", "implicit")}
    if fits["jacobian"] and (jacobian_cost <= implicit_cost or not fits["implicit"]):
        return "jacobian", chunk
    if fits["implicit"] or chunk is not None:
        return "implicit", chunk
    return "implicit", fitting_chunk(request, measured, "implicit")
