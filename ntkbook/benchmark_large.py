"""A kernel larger than memory, to disk: ``python -m ntkbook.benchmark --large``.

Computes the float32 NTK of the MLP ``64 -> 1024 -> 1024 -> 1`` (NTK parameterisation, ReLU) on 40,000
Gaussian inputs with :func:`~ntkbook.blocked.blocked_kernel`, in blocks of 4,096 inputs (10 per side, 55 computed),
to a ``.npy`` file (6.4 GB), and reports the wall
time, the process's peak resident memory (``ru_maxrss``, which counts the file's mapped pages), and the
overhead per kernel entry against one in-memory :func:`~ntkbook.ntk.empirical_ntk` call on a block:

.. math::

    \\text{overhead} = \\frac{T_{\\text{blocked}} / E}{t_{\\text{call}} / b^2} - 1,

where :math:`E` is the number of entries the blocked run computes (the :math:`B(B+1)/2` blocks of the
upper triangle, about :math:`n^2/2`; the mirrored half is copied), and :math:`t_{\\text{call}}` the median
time of ``empirical_ntk(model, x_a, x_b)`` on two batches of ``b = block_size`` inputs, the same call a
block makes. The overhead is what blocking adds: writing through the maps, the flush and the manifest
per block, the mirror. Introduced in chapter 7 (:doc:`/chapters/07_large_kernels`).
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ntkbook._checks import positive_int
from ntkbook.benchmark import build_case
from ntkbook.blocked import blocked_kernel
from ntkbook.ntk import empirical_ntk

LARGE_N, LARGE_WIDTH, LARGE_INPUT_DIM, LARGE_BLOCK = 40_000, 1024, 64, 4096


def run_large(
    n: int = LARGE_N,
    width: int = LARGE_WIDTH,
    block_size: int = LARGE_BLOCK,
    folder: str | os.PathLike | None = None,
    repeats: int = 3,
    progress: bool = True,
) -> dict[str, object]:
    """Time the blocked NTK of ``n`` inputs to a file in ``folder`` (a temporary folder, removed after,
    when ``None``) and ``repeats`` in-memory calls on one pair of blocks; returns a row of figures."""
    n, block_size, repeats = (
        positive_int("n", n),
        positive_int("block_size", block_size),
        positive_int("repeats", repeats),
    )
    if block_size > n:
        raise ValueError(f"block_size must be at most n = {n}, got {block_size}")
    if folder is not None and not Path(folder).is_dir():
        raise ValueError(f"folder must be an existing folder, got {folder!r}")
    model, x = build_case(width, n, torch.device("cpu"), input_dim=LARGE_INPUT_DIM)
    kernel_fn = functools.partial(empirical_ntk, model)
    work = Path(tempfile.mkdtemp(dir=folder))
    try:
        start = time.perf_counter()
        kernel = blocked_kernel(kernel_fn, x, path=work / "kernel.npy", block_size=block_size, progress=progress)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        file_bytes = (work / "kernel.npy").stat().st_size
        del kernel
    finally:
        shutil.rmtree(work)
    block_a, block_b = x[:block_size], x[n - block_size :]
    kernel_fn(block_a, block_b)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        kernel_fn(block_a, block_b)
        times.append(time.perf_counter() - start)
    rows = [min(start + block_size, n) - start for start in range(0, n, block_size)]
    computed = sum(rows[bi] * rows[bj] for bi in range(len(rows)) for bj in range(bi, len(rows)))
    per_entry, per_entry_call = seconds / computed, statistics.median(times) / block_size**2
    return {
        "n": n,
        "width": width,
        "input_dim": LARGE_INPUT_DIM,
        "block_size": block_size,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "peak_rss_bytes": peak,
        "file_bytes": file_bytes,
        "entries_computed": computed,
        "ns_per_entry": per_entry * 1e9,
        "ns_per_entry_one_call": per_entry_call * 1e9,
        "overhead": per_entry / per_entry_call - 1,
    }


def format_large(row: dict[str, object]) -> str:
    """A row of :func:`run_large` as a few lines of text."""
    if not isinstance(row, dict) or "overhead" not in row:
        raise ValueError("row must be the dict that run_large() returns")
    return (
        f"NTK of {row['n']:,} inputs (MLP {row['input_dim']} -> {row['width']} -> {row['width']} -> 1, float32), "
        f"blocks of {row['block_size']}, {row['threads']} threads\n"
        f"  time {row['seconds']:.0f} s, peak resident memory {row['peak_rss_bytes'] / 2**30:.2f} GiB, "
        f"file {row['file_bytes'] / 1e9:.2f} GB\n"
        f"  {row['ns_per_entry']:.1f} ns per computed entry ({row['entries_computed']:,} entries), "
        f"one in-memory call {row['ns_per_entry_one_call']:.1f} ns: overhead {100 * row['overhead']:+.1f}%"
    )
