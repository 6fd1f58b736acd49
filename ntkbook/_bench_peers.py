"""ntkbook against other NTK libraries, side by side: ``python -m ntkbook.benchmark --workloads ... --peers ...``.

Every library gets the same float32 model and inputs (``ntkbook._bench_workloads``) and must return the
kernel in ntkbook's layout (``(n, n, k, k)`` for ``"full"`` with ``k > 1`` outputs, else ``(n, n)``; trace
sums over outputs). Each kernel is compared with a float64 oracle, ``ntkbook.empirical_ntk`` of a float64
copy (itself verified against autograd), and its relative Frobenius error is reported next to the time.
Within each repeat the methods run one after the other, round robin, so a change in the machine's load
reaches all alike; the table gives the median. The peers, and how each computes an NTK:

- ``jacrev``: ``vmap(jacrev)`` over inputs with ``torch.func``, written out here, then one contraction of
  the per-input Jacobians (always available: the baseline).
- ``nngeometry``: ``nngeometry.GramMatrix`` with its dense function-space representation
  (backward hooks per layer and output; layers it does not know raise).
- ``asdl``: ASDL's ``empirical_class_wise_direct_ntk`` (per-output Grams from per-layer hooks) for a trace
  or one output, ``empirical_direct_ntk`` (per-input gradients, then one product) for a full kernel.
- ``backpack``: BackPACK's ``BatchGrad`` (per-input gradients) in one backward pass per output, then the
  Gram; parameters of modules BackPACK does not extend get no gradient, which is counted and reported.
- ``neural-tangents``: ``nt.empirical_ntk_fn(..., implementation=STRUCTURED_DERIVATIVES)``, jitted, in the
  JAX environment given by ``--jax-python`` (``ntkbook/_nt_runner.py``; the torch weights go by ``.npz``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ntkbook._bench_workloads import WORKLOADS, Workload, build, jax_spec
from ntkbook.ntk import empirical_ntk
from ntkbook.ntk.budget import available_memory

OURS = ("auto", "structured", "structured-unverified")
PEERS = ("jacrev", "nngeometry", "asdl", "backpack", "neural-tangents")
_MODULES = {"nngeometry": "nngeometry", "asdl": "asdl", "backpack": "backpack"}
TIME_BUDGET_S = 15.0  # a method slower than this per call gets fewer repeats (at least one)
RUNNER = Path(__file__).with_name("_nt_runner.py")
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


def _prepare(peer: str, model: nn.Module) -> nn.Module:
    """A copy of ``model`` (same weights) for ``peer``: hooks a library leaves behind stay on its own copy."""
    if peer == "backpack":
        from backpack import extend

        return extend(copy.deepcopy(model))
    return copy.deepcopy(model)


ADAPTERS: dict[str, Kernel] = {
    "jacrev": jacrev_kernel,
    "nngeometry": nngeometry_kernel,
    "asdl": asdl_kernel,
    "backpack": backpack_kernel,
}
_JACOBIAN_PEERS = {"jacrev", "backpack"}  # they hold all per-input gradients (n, k, p) in float32


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


class _JaxPeer:
    """neural-tangents in its own interpreter: compiled once, then timed one call per ``time`` line."""

    def __init__(self, jax_python: str, workload: Workload, model: nn.Module, x: torch.Tensor, folder: str) -> None:
        spec, out = os.path.join(folder, "spec.npz"), os.path.join(folder, "out.npz")
        np.savez(spec, **jax_spec(workload, model, x))
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
        self.process = subprocess.Popen(
            [jax_python, str(RUNNER), spec, out],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self.process.stdout.readline()
        if not line:
            error = self.process.stderr.read().strip().splitlines()
            raise RuntimeError(error[-1] if error else "the JAX runner exited")
        self.compile_s = json.loads(line)["compile_s"]
        with np.load(out) as done:
            self.kernel, self.outputs = torch.from_numpy(done["kernel"]), torch.from_numpy(done["outputs"])

    def time(self) -> float:
        self.process.stdin.write("time\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def relative_error(kernel: torch.Tensor, oracle: torch.Tensor) -> float:
    """``||kernel - oracle||_F / ||oracle||_F`` in float64."""
    if kernel.shape != oracle.shape:
        raise ValueError(f"kernel has shape {tuple(kernel.shape)}, the oracle {tuple(oracle.shape)}")
    return float((kernel.double() - oracle).norm() / oracle.norm())


def _ours(name: str, mode: str) -> Kernel:
    method = name.removesuffix("-unverified")
    return lambda model, x, _: empirical_ntk(model, x, method=method, mode=mode, verify=name == method)


def oracle_kernel(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The float64 reference: ``empirical_ntk`` (verified) of a float64 copy of the model."""
    model64 = copy.deepcopy(model).double()
    return empirical_ntk(model64, x.double() if x.is_floating_point() else x, mode=mode)


def run_workload(
    workload: Workload, methods: list[str], repeats: int, jax_python: str | None, small: bool = False
) -> dict[str, object]:
    """Time every method on one workload; returns ``{"workload", "cells": {method: {...}}}``, where a cell
    holds ``median_ms``, ``repeats`` and ``error`` (relative to the oracle), or ``failed``/``skipped``."""
    model, x, peer_model = build(workload, small)
    peer_mode = "trace" if workload.outputs == 1 else workload.mode  # one output: the same kernel either way
    oracle = oracle_kernel(model, x, workload.mode)
    params = sum(p.numel() for p in model.parameters())
    cells: dict[str, dict[str, object]] = {}
    calls: dict[str, Callable[[], float]] = {}
    jax_peer = None
    with tempfile.TemporaryDirectory() as folder:
        for method in methods:
            reason = None if method in OURS else unavailable(method, jax_python)
            need = x.shape[0] * workload.outputs * params * 4
            if reason is None and method in _JACOBIAN_PEERS and need > available_memory(torch.device("cpu")) / 2:
                reason = f"out of memory (needs {need / 2**30:.0f} GiB)"
            if reason is not None:
                cells[method] = {"skipped": reason}
                continue
            try:
                if method == "neural-tangents":
                    jax_peer = _JaxPeer(jax_python, workload, model, x, folder)
                    kernel, first = jax_peer.kernel, jax_peer.time()
                    calls[method] = jax_peer.time
                else:
                    fn = _ours(method, workload.mode) if method in OURS else ADAPTERS[method]
                    target = model if method in OURS else _prepare(method, peer_model)
                    start = time.perf_counter()
                    kernel = fn(target, x, peer_mode).detach()
                    first = time.perf_counter() - start
                    calls[method] = _timer(fn, target, x, peer_mode)
                cells[method] = {"error": relative_error(kernel, oracle), "times": [], "budget": first}
            except Exception as exc:  # a peer that fails is reported, not hidden
                cells[method] = {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"}
                calls.pop(method, None)
        try:
            for r in range(repeats):  # round robin: every method once per repeat
                for method, call in calls.items():
                    cell = cells[method]
                    if r == 0 or cell["budget"] * (r + 1) <= TIME_BUDGET_S:
                        cell["times"].append(call())
        finally:
            if jax_peer is not None:
                jax_peer.close()
    for cell in cells.values():
        if "times" in cell:
            times = cell.pop("times")
            cell.pop("budget")
            cell.update(median_ms=statistics.median(times) * 1e3, repeats=len(times))
    return {"workload": workload.key, "label": workload.label, "cells": cells}


def _timer(fn: Kernel, model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], float]:
    def call() -> float:
        start = time.perf_counter()
        fn(model, x, mode)
        return time.perf_counter() - start

    return call


def gemm_gflops(jax_python: str | None, size: int = 2048) -> dict[str, float | str]:
    """GFLOP/s of one ``size^3`` float32 product in torch and, with ``jax_python``, in JAX (XLA)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    a @ b
    times = []
    for _ in range(7):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    result: dict[str, float | str] = {"torch": 2 * size**3 / statistics.median(times) / 1e9}
    if jax_python is not None:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
        done = subprocess.run([jax_python, str(RUNNER), "--gemm"], capture_output=True, text=True, env=env)
        lines = done.stdout.strip().splitlines()
        result["jax"] = json.loads(lines[-1])["gflops"] if done.returncode == 0 and lines else "failed"
    return result


def format_peer_table(rows: list[dict[str, object]], methods: list[str]) -> str:
    """Markdown: one row per workload, one column per method, ``median ms (relative error)``."""
    lines = ["| workload | " + " | ".join(methods) + " |", "| --- |" + " ---: |" * len(methods)]
    for row in rows:
        cells = []
        for method in methods:
            cell = row["cells"][method]
            if "median_ms" in cell:
                cells.append(f"{cell['median_ms']:.3g} ({cell['error']:.0e}, x{cell['repeats']})")
            else:
                failed = cell.get("failed", "")
                text = cell.get("skipped") or (failed if failed.startswith("Dropped") else f"fails: {failed}")
                cells.append(text.replace("|", "/"))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_table(workloads: list[str], peers: list[str], repeats: int, jax_python: str | None, as_json: bool) -> None:
    """The ``--workloads``/``--peers`` table of ``python -m ntkbook.benchmark``, printed."""
    keys = list(WORKLOADS) if workloads == ["all"] else workloads
    unknown = sorted(set(keys) - set(WORKLOADS))
    if unknown:
        raise ValueError(f"workloads must be 'all' or among {list(WORKLOADS)}, got {unknown}")
    methods = list(OURS) + (list(PEERS) if peers == ["all"] else peers)
    rows = [run_workload(WORKLOADS[key], methods, repeats, jax_python) for key in keys]
    gemm = gemm_gflops(jax_python)
    if as_json:
        print(json.dumps({"rows": rows, "gemm_gflops": gemm}, indent=1))
        return
    print(format_peer_table(rows, methods))
    print(
        f"\nmedian ms (relative error to the float64 oracle, timed calls); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; 2048^3 float32 GEMM GFLOP/s: {gemm}"
    )
    sys.stdout.flush()
