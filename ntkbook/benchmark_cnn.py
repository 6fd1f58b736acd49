"""The CNN of issue 13, side by side: ``python -m ntkbook.benchmark --cnn``.

The network maps ``(n, 3, 16, 16)`` images through two ``nn.Conv2d`` layers of 32 channels (3 x 3,
padding 1, each followed by ReLU), a flatten and an ``nn.Linear`` to 10 outputs; the kernel is the
trace-mode NTK of ``n = 64`` images, float32. Each repeat times every method once, in turn (so that a
change in the machine's load hits all of them alike), and the table gives the median over repeats.
``"vmap(jacrev)"`` is what one writes by hand with ``torch.func``: per-input Jacobians of all
parameters, then their Gram. Every kernel is compared with that one.

The floor (:func:`floor_flops`) counts the multiply-adds of the cheapest exact route we know,
the one ``method="structured"`` takes here: the forward pass; the ``k`` backward passes to the layer
outputs (through the second convolution, :math:`2 n k L C^2 9` flops); the per-input weight gradients of
each convolution, :math:`2 n k C_{out} D L` with :math:`D = 9 C_{in}` taps and :math:`L = 256`
positions; the Grams, :math:`2 \\cdot \\tfrac34 n^2 k P` for each convolution's ``P`` weights (a
symmetric kernel computes three quarters of the products) and :math:`2 \\cdot \\tfrac34 n^2 d` for the
readout's inputs. The patch-Gram route costs :math:`2 n^2 L^2 (D + k C_{out})`, a hundred times more at
:math:`L = 256`. Introduced in chapter 6 (:doc:`/chapters/06_torch_func`).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ntkbook._checks import positive_int
from ntkbook.ntk import empirical_ntk

CHANNELS, SIZE, OUTPUTS, IN_CHANNELS = 32, 16, 10, 3


def cnn_case(n: int = 64, device: torch.device | str = "cpu") -> tuple[nn.Module, torch.Tensor]:
    """The benchmark's CNN (PyTorch's initialisation, seeded) and ``n`` Gaussian images, float32."""
    n = positive_int("n", n)
    torch_gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(IN_CHANNELS, CHANNELS, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(CHANNELS * SIZE * SIZE, OUTPUTS),
    )
    with torch.no_grad():
        for p in model.parameters():  # PyTorch's bound 1/sqrt(fan_in), drawn from the generator
            fan_in = p.shape[1:].numel() if p.ndim > 1 else p.numel()
            p.uniform_(-(fan_in**-0.5), fan_in**-0.5, generator=torch_gen)
    x = torch.randn(n, IN_CHANNELS, SIZE, SIZE, generator=torch_gen)
    return model.to(device), x.to(device)


def floor_flops(n: int = 64) -> float:
    """Floating-point operations of the cheapest exact route for the trace kernel (module docstring)."""
    n = positive_int("n", n)
    L, k, C = SIZE * SIZE, OUTPUTS, CHANNELS
    taps = (9 * IN_CHANNELS, 9 * C)
    forward = 2 * n * L * C * sum(taps) + 2 * n * C * L * k
    backward = 2 * n * k * L * C * taps[1]  # to the first convolution's outputs
    gradients = sum(2 * n * k * C * d * L for d in taps)
    grams = 2 * 0.75 * n * n * (k * C * sum(taps) + C * L)
    return float(forward + backward + gradients + grams)


def _vmap_jacrev_trace(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The trace kernel by hand: ``vmap(jacrev)`` over inputs, then the Gram of each parameter's Jacobian."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    jacobians = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))[0]), (None, 0))(params, x)
    n = x.shape[0]
    return sum(j.reshape(n, -1) @ j.reshape(n, -1).T for j in jacobians.values())


def _methods(model: nn.Module, x: torch.Tensor, implicit: bool) -> dict[str, Callable[[], torch.Tensor | None]]:
    """The timed calls, by name; ``"fwd+bwd"`` is one forward and backward pass of the batch."""

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    ntk = lambda method, verify: lambda: empirical_ntk(model, x, method=method, mode="trace", verify=verify)
    calls = {
        "structured": ntk("structured", True),
        "structured, verify=False": ntk("structured", False),
        "vmap(jacrev)": lambda: _vmap_jacrev_trace(model, x),
        "jacobian": ntk("jacobian", True),
        "jacobian, verify=False": ntk("jacobian", False),
    }
    if implicit:
        calls["implicit, verify=False"] = ntk("implicit", False)
    calls["fwd+bwd"] = forward_backward
    return calls


def run_cnn(n: int = 64, repeats: int = 7, implicit: bool = False) -> list[dict[str, object]]:
    """One row per method: median, min and max ms over ``repeats`` alternating rounds after a warm-up,
    and the kernel's largest difference from vmap(jacrev)'s relative to its largest entry."""
    repeats = positive_int("repeats", repeats)
    if not isinstance(implicit, bool):
        raise TypeError(f"implicit must be True or False, got {implicit!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, x = cnn_case(n, device)
    calls = _methods(model, x, implicit)
    reference = _vmap_jacrev_trace(model, x)
    errors = {}
    for name, call in calls.items():
        kernel = call()  # the warm-up
        if kernel is not None:
            errors[name] = float((kernel - reference).abs().max() / reference.abs().max())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return [
        {
            "method": name,
            "median_ms": 1e3 * statistics.median(t),
            "min_ms": 1e3 * min(t),
            "max_ms": 1e3 * max(t),
            "error_vs_vmap_jacrev": errors.get(name),
            "n": n,
            "device": device,
            "floor_gflop": floor_flops(n) / 1e9,
        }
        for name, t in times.items()
    ]


def format_cnn(rows: list[dict[str, object]]) -> str:
    """The rows as a Markdown table, with each method's speed-up over vmap(jacrev)."""
    if not rows or not all(isinstance(r, dict) and {"method", "median_ms"} <= r.keys() for r in rows):
        raise ValueError("rows must be the non-empty list of dicts that run_cnn() returns")
    by_hand = next((r["median_ms"] for r in rows if r["method"] == "vmap(jacrev)"), None)
    lines = [
        (
            f"CNN 3x16x16 -> 2 x Conv2d(32) -> 10, trace, n={rows[0]['n']}, {rows[0]['device']}; "
            f"floor {rows[0]['floor_gflop']:.2f} GFLOP"
        ),
        "| method | median ms | min-max ms | vs vmap(jacrev) | max error vs vmap(jacrev) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        speedup = f"{by_hand / r['median_ms']:.2f}x" if by_hand else "-"
        error = "-" if r["error_vs_vmap_jacrev"] is None else f"{r['error_vs_vmap_jacrev']:.1e}"
        lines.append(
            f"| {r['method']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | {speedup} | {error} |"
        )
    return "\n".join(lines)
