"""The side-by-side benchmark against other NTK libraries (``python -m ntkbook.benchmark --workloads ...``).

No test here needs the peers' environments (CI installs neither) and none times anything: the workloads
have the sizes the table states, the baseline ``vmap(jacrev)`` agrees with ntkbook in float64 on a small
version of every workload (so the MLP's twin for the peers has the same kernel as ntkbook's MLP), the JAX
side gets what it needs without torch, a peer that is not installed is reported as such, and the command
line runs on the tiny workloads.
"""

from __future__ import annotations

import ast
import contextlib
import io

import numpy as np
import pytest
import torch

from ntkbook import _bench_adapters as adapters
from ntkbook import _bench_peers as peers
from ntkbook import benchmark
from ntkbook._bench_workloads import VOCABULARY, WORKLOADS, build, jax_spec
from ntkbook.ntk import empirical_ntk

# workload -> (input shape, output width, parameter count, parameter tensors), counted by hand:
# MLP 20w + w^2 + w (no biases); CNN (3*9*32 + 32) + (32*9*32 + 32) + (32*16*16*10 + 10);
# transformer 100*64 (embedding) + 3*64*64 + 3*64 (in_proj) + 64*64 + 64 (out_proj) + 64*2048 + 2048
# + 2048*64 + 64 (feed-forward) + 4*64 (two LayerNorms) + 64 + 1 (readout).
EXPECTED = {
    "mlp256": ((256, 20), 1, 20 * 256 + 256**2 + 256, 3),
    "mlp1024": ((256, 20), 1, 20 * 1024 + 1024**2 + 1024, 3),
    "mlp4096": ((256, 20), 1, 20 * 4096 + 4096**2 + 4096, 3),
    "mlp512x10-full": ((128, 20), 10, 20 * 512 + 512**2 + 5120, 3),
    "mlp512x10-trace": ((128, 20), 10, 20 * 512 + 512**2 + 5120, 3),
    "cnn": ((64, 3, 16, 16), 10, 896 + 9248 + 32 * 256 * 10 + 10, 6),
    "transformer": ((64, 16), 1, 6400 + 12480 + 4160 + 133120 + 131136 + 256 + 65, 15),
}


def test_the_table_lists_exactly_the_stated_workloads() -> None:
    assert set(WORKLOADS) == set(EXPECTED)


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_workloads_have_the_stated_shapes_and_parameter_counts(key: str) -> None:
    shape, outputs, count, tensors = EXPECTED[key]
    model, x, peer_model = build(WORKLOADS[key])
    assert tuple(x.shape) == shape and x.dtype == (torch.long if key == "transformer" else torch.float32)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == count and len(params) == tensors
    # The peers' model holds the very same parameter tensors: one set of weights for every library.
    assert {id(p) for p in peer_model.parameters()} == {id(p) for p in params}
    with torch.no_grad():
        assert tuple(model(x[:2]).shape) == (2, outputs)
        torch.testing.assert_close(peer_model(x[:2]), model(x[:2]), rtol=1e-6, atol=1e-6)
    if key == "transformer":
        assert 0 <= int(x.min()) and int(x.max()) < VOCABULARY and not model.training


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_the_jacrev_baseline_agrees_with_ntkbook_in_float64(key: str) -> None:
    workload = WORKLOADS[key]
    model, x, peer_model = build(workload, small=True)
    model.double(), peer_model.double()
    x = x.double() if x.is_floating_point() else x
    ours = empirical_ntk(model, x, mode=workload.mode)
    theirs = adapters.jacrev_kernel(peer_model, x, "trace" if workload.outputs == 1 else workload.mode)
    assert theirs.shape == ours.shape
    assert peers.relative_error(theirs, ours) < 1e-12  # float64 round-off, orders of magnitude below


def test_the_full_kernel_layout_puts_outputs_last() -> None:
    jac = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full, trace = adapters._layout(jac, "full"), adapters._layout(jac, "trace")
    assert full.shape == (3, 3, 2, 2) and trace.shape == (3, 3)
    torch.testing.assert_close(full[1, 2, 0, 1], jac[1, 0] @ jac[2, 1])
    torch.testing.assert_close(trace, full.diagonal(dim1=2, dim2=3).sum(-1))


def test_relative_error_refuses_kernels_of_different_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        peers.relative_error(torch.zeros(2, 2), torch.ones(3, 3, dtype=torch.float64))


def test_peers_that_are_not_installed_are_reported_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    for peer in ("nngeometry", "asdl", "backpack"):
        monkeypatch.setitem(adapters._MODULES, peer, "ntkbook_no_such_module")
        assert adapters.unavailable(peer, None) == "not installed"
    assert adapters.unavailable("neural-tangents", None) == "not installed (give --jax-python)"
    assert adapters.unavailable("neural-tangents", "/no/such/python").startswith("not installed")
    assert adapters.unavailable("jacrev", None) is None
    with pytest.raises(ValueError, match="peer"):
        adapters.unavailable("tensorflow", None)
    row = peers.run_workload(WORKLOADS["mlp256"], ["jacrev", "asdl", "neural-tangents"], 1, None, small=True)
    cells = row["cells"]
    assert cells["asdl"] == {"skipped": "not installed"} and "not installed" in cells["neural-tangents"]["skipped"]
    assert cells["jacrev"]["repeats"] == 1 and cells["jacrev"]["error"] < 1e-5  # float32 against float64
    table = peers.format_peer_table([row], ["jacrev", "asdl", "neural-tangents"])
    assert "| not installed |" in table


def test_failures_and_dropped_parameters_appear_in_the_table() -> None:
    row = {
        "label": "w",
        "cells": {
            "a": {"median_ms": 1.5, "error": 3e-8, "repeats": 5},
            "b": {"failed": "ValueError: bad | shape"},
            "c": {"failed": "Dropped: silently drops 8 of 15 parameter tensors"},
            "d": {"skipped": "out of memory (needs 17 GiB)"},
        },
    }
    line = peers.format_peer_table([row], ["a", "b", "c", "d"]).splitlines()[-1]
    assert line == (
        "| w | 1.5 (3e-08, x5) | fails: ValueError: bad / shape | Dropped: silently drops 8 of 15 parameter "
        "tensors | out of memory (needs 17 GiB) |"
    )


def test_the_jax_runner_gets_every_weight_and_needs_neither_torch_nor_ntkbook() -> None:
    tree = ast.parse(peers.RUNNER.read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported.isdisjoint({"torch", "ntkbook"}) and {"jax", "neural_tangents"} <= imported
    for key in ("mlp256", "cnn", "transformer"):
        workload = WORKLOADS[key]
        model, x, _ = build(workload, small=True)
        spec = jax_spec(workload, model, x)
        named = {k.removeprefix("param:") for k in spec if k.startswith("param:")}
        assert named == {name for name, _ in model.named_parameters()}
        assert str(spec["family"]) == workload.family and np.array_equal(spec["x"], x.numpy())
    assert list(jax_spec(WORKLOADS["mlp256"], *build(WORKLOADS["mlp256"], small=True)[:2])["scales"]) == [
        20**-0.5,
        16**-0.5,
        16**-0.5,
    ]


def test_the_command_line_prints_the_table_on_tiny_workloads() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        benchmark.main(["--workloads", "mlp256", "--peers", "jacrev", "--repeats", "1", "--small"])
    text = out.getvalue()
    assert "| workload | auto | structured | structured-unverified | jacrev |" in text
    assert "| MLP 20-256-256-1, n=256 |" in text and "GEMM GFLOP/s" in text
    with pytest.raises(ValueError, match="workloads"):
        benchmark.main(["--workloads", "resnet", "--small"])
    with pytest.raises(ValueError, match="peers"):
        benchmark.main(["--workloads", "mlp256", "--peers", "jax", "--small"])


def test_peers_that_hold_per_input_gradients_are_not_run_past_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    params = EXPECTED["mlp4096"][2]
    assert adapters.memory_needed("jacrev", 256, 1, params, "trace") == 4 * 256 * params  # about 16 GiB
    assert adapters.memory_needed("asdl", 256, 10, params, "trace") == 2 * 4 * 256 * params
    assert adapters.memory_needed("asdl", 256, 10, params, "full") == 10 * 2 * 4 * 256 * params
    assert adapters.memory_needed("nngeometry", 256, 1, params, "trace") == 0
    monkeypatch.setattr(peers, "available_memory", lambda device: 1024)
    row = peers.run_workload(WORKLOADS["mlp256"], ["jacrev"], 1, None, small=True)
    assert row["cells"]["jacrev"] == {"skipped": "out of memory (needs 0.0 GiB)"}
