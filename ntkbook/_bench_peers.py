"""ntkbook against other NTK libraries, side by side: ``python -m ntkbook.benchmark --workloads ... --peers ...``.

Every library gets the same float32 model and inputs (``ntkbook._bench_workloads``) and must return the
kernel in ntkbook's layout (``(n, n, k, k)`` for ``"full"`` with ``k > 1`` outputs, else ``(n, n)``; trace
sums over outputs). Each kernel is compared with a float64 oracle, ``ntkbook.empirical_ntk`` of a float64
copy (itself verified against autograd), and its relative Frobenius error is reported next to the time.
Within each repeat the methods run one after the other, round robin in an order drawn anew each repeat,
so a change in the machine's load reaches all alike and no method always follows the same other; the
table gives the median. The peers and how each computes an NTK: ``ntkbook._bench_adapters``.
"""

from __future__ import annotations

import copy
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

from ntkbook._bench_adapters import ADAPTERS, PEERS, Kernel, memory_needed, prepare, unavailable
from ntkbook._bench_workloads import WORKLOADS, Workload, build, jax_spec
from ntkbook.ntk import empirical_ntk
from ntkbook.ntk.budget import available_memory

OURS = ("auto", "structured", "structured-unverified")  # ntkbook's columns
TIME_BUDGET_S = 15.0  # a method slower than this per call gets fewer repeats (at least one)
RUNNER = Path(__file__).with_name("_nt_runner.py")


def _jax_env(threads: int | None) -> dict[str, str]:
    """The runner's environment: CPU only, tensorflow quiet, and one thread when ``threads == 1``."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    if threads == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return env


class _JaxPeer:
    """neural-tangents in its own interpreter: compiled once, then timed one call per ``time`` line."""

    def __init__(
        self, jax_python: str, workload: Workload, model: nn.Module, x: torch.Tensor, folder: str, threads: int | None
    ) -> None:
        spec, out = os.path.join(folder, "spec.npz"), os.path.join(folder, "out.npz")
        np.savez(spec, **jax_spec(workload, model, x))
        env = _jax_env(threads)
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
            lines = self.process.stderr.read().strip().splitlines()
            errors = [line for line in lines if "Error" in line] or lines or ["the JAX runner exited"]
            raise RuntimeError(errors[-1])
        self.compile_s = json.loads(line)["compile_s"]
        with np.load(out) as done:
            self.kernel = torch.from_numpy(done["kernel"])

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
    workload: Workload,
    methods: list[str],
    repeats: int,
    jax_python: str | None,
    small: bool = False,
    threads: int | None = None,
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
            need = memory_needed(method, x.shape[0], workload.outputs, params, peer_mode)
            if reason is None and need > available_memory(torch.device("cpu")) / 2:
                reason = f"out of memory (needs {need / 2**30:.1f} GiB)"
            if reason is not None:
                cells[method] = {"skipped": reason}
                continue
            try:
                if method == "neural-tangents":
                    jax_peer = _JaxPeer(jax_python, workload, model, x, folder, threads)
                    kernel, first = jax_peer.kernel, jax_peer.time()
                    calls[method] = jax_peer.time
                else:
                    fn = _ours(method, workload.mode) if method in OURS else ADAPTERS[method]
                    target = model if method in OURS else prepare(method, peer_model)
                    start = time.perf_counter()
                    kernel = fn(target, x, peer_mode).detach()
                    first = time.perf_counter() - start
                    calls[method] = _timer(fn, target, x, peer_mode)
                cells[method] = {"error": relative_error(kernel, oracle), "times": [], "budget": first}
            except Exception as exc:  # noqa: BLE001  (a peer that fails is reported, not hidden)
                cells[method] = {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"}
                calls.pop(method, None)
        try:
            # A new order each repeat (seeded), so that no method always follows the same other: in a fixed
            # order, auto (right after neural-tangents) read 5-30% slower than structured, which it runs.
            rng, timed = np.random.default_rng(0), list(calls.items())
            for r in range(repeats):  # round robin: every method once per repeat
                for i in rng.permutation(len(timed)):
                    method, call = timed[i]
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


def _torch_gemm_gflops(size: int) -> float:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    a @ b
    times = []
    for _ in range(7):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def gemm_gflops(jax_python: str | None, size: int = 2048, threads: int | None = None) -> dict[str, float | str]:
    """GFLOP/s of one ``size^3`` float32 product (median of 7) in torch and, with ``jax_python``, in JAX
    (XLA), then in torch again: the load of a shared machine can change between the two."""
    result: dict[str, float | str] = {"torch": round(_torch_gemm_gflops(size), 1)}
    if jax_python is not None:
        done = subprocess.run(
            [jax_python, str(RUNNER), "--gemm", str(size)],
            check=False,
            capture_output=True,
            text=True,
            env=_jax_env(threads),
        )
        lines = done.stdout.strip().splitlines()
        result["jax"] = round(json.loads(lines[-1])["gflops"], 1) if done.returncode == 0 and lines else "failed"
        result["torch again"] = round(_torch_gemm_gflops(size), 1)
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


def main_table(
    workloads: list[str],
    peers: list[str],
    repeats: int,
    jax_python: str | None,
    as_json: bool,
    small: bool = False,
    threads: int | None = None,
) -> None:
    """The ``--workloads``/``--peers`` table of ``python -m ntkbook.benchmark``, printed; ``small`` runs the
    tiny versions of the workloads and a ``256^3`` product (a smoke test)."""
    keys = list(WORKLOADS) if workloads == ["all"] else workloads
    unknown = sorted(set(keys) - set(WORKLOADS))
    if unknown:
        raise ValueError(f"workloads must be 'all' or among {list(WORKLOADS)}, got {unknown}")
    methods = list(OURS) + (list(PEERS) if peers == ["all"] else peers)
    unknown = sorted(set(methods) - set(OURS) - set(PEERS))
    if unknown:
        raise ValueError(f"peers must be 'all' or among {list(PEERS)}, got {unknown}")
    rows = [run_workload(WORKLOADS[key], methods, repeats, jax_python, small, threads) for key in keys]
    gemm = gemm_gflops(jax_python, 256 if small else 2048, threads)
    if as_json:
        print(json.dumps({"rows": rows, "gemm_gflops": gemm}, indent=1))
        return
    print(format_peer_table(rows, methods))
    print(
        f"\nmedian ms (relative error to the float64 oracle, timed calls); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {'256' if small else '2048'}^3 float32 GEMM GFLOP/s: {gemm}"
    )
    sys.stdout.flush()
