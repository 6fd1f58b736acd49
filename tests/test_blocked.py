"""ntkbook.blocked_kernel: the same kernel in blocks as in one call, exactly symmetric, written to disk
without holding it, resumed after SIGKILL bit for bit without recomputing a finished block, refusing files
of other calls, and shared by two gloo ranks under torchrun into the file one rank writes.

Bit-for-bit comparisons are between runs that compute every block by the same calls on the same inputs,
shapes and thread count, on one machine: what they check is that nothing is lost, mixed or recomputed
differently, not that a BLAS agrees with itself across machines. A blocked kernel against one call is
compared with a tolerance, since blocks change the shapes of the products.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import blocked_worker
import numpy as np
import pytest
import torch

import ntkbook
from ntkbook import _kernel_file, benchmark_large

TESTS = Path(__file__).resolve().parent
F64 = {"dtype": torch.float64}


def _relu(depth: int = 2) -> functools.partial:
    return functools.partial(ntkbook.relu_ntk, depth=depth)


def _x(n: int, d: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), **F64)


class Counting:
    """A kernel function that records the first rows of the batches it is called on."""

    def __init__(self, kernel_fn: functools.partial):
        self.kernel_fn, self.calls = kernel_fn, []

    def __call__(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        self.calls.append((len(x1), len(x2)))
        return self.kernel_fn(x1, x2)


@pytest.mark.parametrize("block_size", [1, 3, 7, 16, 40])
def test_blocks_give_the_kernel_of_one_call_exactly_symmetric(block_size: int) -> None:
    x, y = _x(16), _x(11, seed=1)
    one_call = ntkbook.relu_ntk(x, x, 2)
    blocked = ntkbook.blocked_kernel(_relu(), x, block_size=block_size, progress=False)
    # float64 entries of size ~1, each by the same formula on the same pair, with cosines from products of
    # other shapes: rounding only. Near a cosine of 1 (the diagonal), kappa0(u) = 1 - arccos(u)/pi has an
    # infinite slope, so a rounding of 1e-16 in u moves it by sqrt(2e-16)/pi ~ 5e-9; 1e-7 covers that.
    torch.testing.assert_close(blocked, one_call, rtol=1e-13, atol=1e-7)
    assert torch.equal(blocked, blocked.T), "the mirror is not exact"
    cross = ntkbook.blocked_kernel(_relu(), x, y, block_size=block_size, progress=False)
    torch.testing.assert_close(cross, ntkbook.relu_ntk(x, y, 2), rtol=1e-13, atol=1e-7)


@pytest.mark.parametrize("mode", ["full", "diagonal"])
def test_mirror_swaps_outputs_in_full_mode(mode: str) -> None:
    model = ntkbook.mlp(3, 8, 1, 3, generator=torch.Generator().manual_seed(0)).double()
    x = _x(10)
    kernel_fn = functools.partial(ntkbook.empirical_ntk, model, mode=mode)
    blocked = ntkbook.blocked_kernel(kernel_fn, x, block_size=4, progress=False)
    torch.testing.assert_close(blocked, ntkbook.empirical_ntk(model, x, mode=mode), rtol=1e-12, atol=1e-12)
    swapped = blocked.transpose(0, 1).transpose(2, 3) if mode == "full" else blocked.transpose(0, 1)
    assert torch.equal(blocked, swapped)


def test_the_file_holds_the_kernel_and_only_the_triangle_is_computed(tmp_path: Path) -> None:
    x = _x(18)
    kernel_fn = Counting(_relu())
    in_memory = ntkbook.blocked_kernel(kernel_fn, x, block_size=4, progress=False)
    assert len(kernel_fn.calls) == 5 * 6 // 2  # B(B+1)/2 blocks for B = 5
    on_disk = ntkbook.blocked_kernel(_relu(), x, path=tmp_path / "k.npy", block_size=4, progress=False)
    assert isinstance(on_disk, np.memmap) and not on_disk.flags.writeable
    assert np.array_equal(np.load(tmp_path / "k.npy"), in_memory.numpy())  # same blocks, same calls
    manifest = json.loads((tmp_path / "k.npy.manifest.json").read_text())
    assert manifest["complete"] and len(manifest["done"]) == 15 and manifest["shape"] == [18, 18]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.npy", "k.npy.manifest.json"]


def test_rerunning_a_finished_call_computes_nothing_and_leaves_the_file(tmp_path: Path) -> None:
    path = tmp_path / "k.npy"
    ntkbook.blocked_kernel(_relu(), _x(9), _x(7, seed=1), path=path, block_size=4, progress=False)
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    again = ntkbook.blocked_kernel(_relu(), _x(9), _x(7, seed=1), path=path, block_size=4, progress=False)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == files
    assert again.shape == (9, 7)


def test_a_finished_call_calls_the_kernel_function_zero_times(tmp_path: Path) -> None:
    path, kernel_fn = tmp_path / "k.npy", Counting(_relu())
    ntkbook.blocked_kernel(kernel_fn, _x(9), path=path, block_size=4, progress=False)
    assert kernel_fn.calls[0] == (1, 1) and len(kernel_fn.calls) == 1 + 6  # the probe, then 3 * 4 / 2 blocks
    kernel_fn.calls.clear()
    ntkbook.blocked_kernel(kernel_fn, _x(9), path=path, block_size=4, progress=False)
    assert kernel_fn.calls == []


def _refusal(tmp_path: Path, **change: object) -> str:
    """Run a 9-input kernel to disk, then the call with ``change``: the refusal's message."""
    path = tmp_path / "k.npy"
    model = ntkbook.mlp(3, 4, 1, generator=torch.Generator().manual_seed(0)).double()
    call = {"kernel_fn": functools.partial(ntkbook.empirical_ntk, model), "x1": _x(9), "x2": None, "block_size": 4}
    ntkbook.blocked_kernel(**call, path=path, progress=False)
    if change.pop("perturb_model", False):
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-9
    with pytest.raises(ValueError, match="path") as refused:
        ntkbook.blocked_kernel(**{**call, **change}, path=path, progress=False)
    return str(refused.value)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"x1": _x(9, seed=5)}, "x1"),
        ({"x1": _x(10)}, "inputs"),
        ({"x2": _x(9)}, "symmetric"),
        ({"block_size": 3}, "block_size"),
        ({"kernel_fn": _relu()}, "kernel_fn"),
        ({"perturb_model": True}, "kernel_fn"),
    ],
    ids=["other x1", "more inputs", "x2=x1 given", "other block size", "other function", "model changed"],
)
def test_a_file_of_another_call_is_refused(tmp_path: Path, change: dict, named: str) -> None:
    message = _refusal(tmp_path, **change)
    assert named in message and "describes another kernel" in message


def test_a_file_without_manifest_or_a_manifest_without_its_file_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((9, 9)))
    with pytest.raises(ValueError, match="without a manifest"):
        ntkbook.blocked_kernel(_relu(), _x(9), path=tmp_path / "a.npy", block_size=4, progress=False)
    ntkbook.blocked_kernel(_relu(), _x(9), path=tmp_path / "b.npy", block_size=4, progress=False)
    (tmp_path / "b.npy").unlink()
    with pytest.raises(ValueError, match="missing but its manifest records finished blocks"):
        ntkbook.blocked_kernel(_relu(), _x(9), path=tmp_path / "b.npy", block_size=4, progress=False)


def test_a_kernel_function_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="kernel_fn"):
        ntkbook.blocked_kernel(lambda a, b: a @ b.T @ a, _x(6), _x(4), block_size=2, progress=False)
    with pytest.raises(ValueError, match="kernel_fn"):
        ntkbook.blocked_kernel(lambda a, b: torch.zeros(len(a), len(b), 2, 3, **F64), _x(4), progress=False)


def test_progress_shows_entries_per_second_and_blocks(capsys: pytest.CaptureFixture) -> None:
    ntkbook.blocked_kernel(_relu(), _x(9), block_size=4, progress=True)
    bar = capsys.readouterr().err
    # Entries computed: blocks of 4, 4 and 1 inputs, the upper triangle only: 16 + 16 + 4 + 16 + 4 + 1.
    assert "blocked kernel" in bar and "entries/s" in bar and "57.0/57.0" in bar and "block 6/6" in bar


@pytest.mark.parametrize("point", blocked_worker.KILL_POINTS)
def test_sigkill_then_resume_gives_the_uninterrupted_file_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    path, killed_log, resumed_log = tmp_path / "k.npy", tmp_path / "killed.log", tmp_path / "resumed.log"
    killed_at = 7  # of 15 blocks: off-diagonal, so that "writing" dies between the block and its mirror
    script = f"import blocked_worker; blocked_worker.interrupted_run({str(path)!r}, {killed_at}, {point!r})"
    env = {**os.environ, "PYTHONPATH": str(TESTS), blocked_worker.LOG: str(killed_log), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, f"the run was not killed by SIGKILL: {done.returncode}\n{done.stderr}"
    computed_before = blocked_worker.logged_blocks(killed_log)
    recorded = {tuple(b) for b in _kernel_file.read(_kernel_file.rank_path(path, 0))["done"]}
    assert len(computed_before) == killed_at and recorded == set(computed_before[: killed_at - 1])
    assert not _kernel_file.read(_kernel_file.manifest_path(path))["complete"]

    monkeypatch.setenv(blocked_worker.LOG, str(resumed_log))
    resumed = ntkbook.blocked_kernel(blocked_worker.traced_kernel, blocked_worker.inputs(), path=path, block_size=4)
    computed_after = blocked_worker.logged_blocks(resumed_log)
    everything = {(bi, bj) for bi in range(5) for bj in range(bi, 5)}
    assert not recorded & set(computed_after), "a finished block was recomputed"
    assert sorted(computed_after) == sorted(everything - recorded)  # the interrupted block among them, once
    assert computed_before[-1] in computed_after

    uninterrupted = ntkbook.blocked_kernel(
        blocked_worker.traced_kernel, blocked_worker.inputs(), path=tmp_path / "u.npy", block_size=4, progress=False
    )
    assert np.load(path).tobytes() == np.load(tmp_path / "u.npy").tobytes() and resumed.shape == uninterrupted.shape
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("k.npy")) == ["k.npy", "k.npy.manifest.json"]


def test_two_gloo_ranks_under_torchrun_write_the_file_of_one_rank(tmp_path: Path) -> None:
    path = tmp_path / "two.npy"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(TESTS / "blocked_worker.py"), str(path), "5"]
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each rank: every block by the same single-threaded calls
    try:
        kernel_fn, x1, x2 = blocked_worker.distributed_case()
        one = ntkbook.blocked_kernel(kernel_fn, x1, x2, path=tmp_path / "one.npy", block_size=5, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert one.shape == (23, 17, 3, 3)
    assert np.load(path).tobytes() == np.load(tmp_path / "one.npy").tobytes()
    manifests = [_kernel_file.read(_kernel_file.manifest_path(tmp_path / name)) for name in ("two.npy", "one.npy")]
    assert manifests[0] == manifests[1] and manifests[0]["complete"] and len(manifests[0]["done"]) == 5 * 4
    assert not _kernel_file.rank_paths(path), "rank records left behind"


def test_writing_a_kernel_to_disk_does_not_hold_it_in_memory(tmp_path: Path) -> None:
    """The 6,000-input float32 kernel (144 MB) in blocks of 512 grows what the process holds (anonymous
    memory and the resident pages of the file's maps, sampled during the run) by under half its size.
    Held whole, or through one map of the file that keeps every page it wrote, it would grow it by all
    144 MB (one map of the whole file, filled, holds 144.0 MB by the same measure); what is held is one
    block, its mirror, the pages of one band of rows (about 1 MB each) and temporaries of a few blocks'
    size: about 15 MB as measured on the project's machine. Peak resident memory (ru_maxrss) is not
    used: it also counts the pages of torch's shared libraries, which the system evicts and faults back
    in at will, and it read up to 121 MB above its baseline in runs on the shared machine. (The issue's
    case, 12,000 inputs in blocks of 1,024, writes 576 MB with an fsync per block, for a minute on that
    machine: too slow for a unit test. Measured once with relu_ntk, its ru_maxrss grew by 126 MB.)"""
    script = f"import blocked_worker; blocked_worker.memory_growth(6000, 512, {str(tmp_path / 'k.npy')!r})"
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["growth_bytes"] < measured["kernel_bytes"] / 2, measured


def test_the_large_benchmark_counts_the_entries_it_computes_and_cleans_up(tmp_path: Path) -> None:
    row = benchmark_large.run_large(50, 16, 20, folder=tmp_path, repeats=1, progress=False)
    # Blocks of 20, 20 and 10 inputs, the upper triangle: (n^2 + the sum of squared block sizes) / 2.
    assert row["entries_computed"] == (50**2 + 20**2 + 20**2 + 10**2) // 2
    assert row["file_bytes"] >= 50 * 50 * 4 and row["peak_rss_bytes"] > 0 and row["seconds"] > 0
    assert list(tmp_path.iterdir()) == [], "the benchmark left its file behind"
    assert "overhead" in benchmark_large.format_large(row)
