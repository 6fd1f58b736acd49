"""What tests/test_blocked.py runs in other processes: a traced kernel that can kill its own process
with SIGKILL at a chosen point, a run to interrupt, a memory probe, and a ``torchrun`` entry point.

Imported as ``blocked_worker`` both by the tests and by the processes they start, so that the traced
kernel has the same identity (``blocked_worker.traced_kernel``) in both and a run can be resumed.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

import ntkbook
from ntkbook import _kernel_file

N, DIM, BLOCK = 18, 3, 4  # 5 blocks per side, the last of 2 rows: 15 blocks in the upper triangle
LOG = "BLOCKED_LOG"  # environment: the file where traced_kernel logs its calls
KILL_POINTS = ("computing", "writing", "recording")


def inputs() -> torch.Tensor:
    return torch.randn(N, DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def row_of(x: torch.Tensor) -> int:
    """The index in :func:`inputs` of the batch's first row."""
    return int(torch.nonzero((inputs() == x[0]).all(dim=1))[0])


def traced_kernel(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``relu_ntk(x1, x2, 2)``; each call appends ``i0 j0 rows columns`` to the file named by ``$BLOCKED_LOG``."""
    if LOG in os.environ:
        with open(os.environ[LOG], "a") as log:
            log.write(f"{row_of(x1)} {row_of(x2)} {len(x1)} {len(x2)}\n")
    result = ntkbook.relu_ntk(x1, x2, 2)
    if (len(x1), len(x2)) != (1, 1):  # not the probe that creates the file
        _reached("computing")
    return result


def logged_blocks(log: Path) -> list[tuple[int, int]]:
    """The blocks ``(bi, bj)`` a log shows computed, leaving out the 1 x 1 probe that creates the file."""
    calls = [tuple(map(int, line.split())) for line in log.read_text().splitlines()] if log.exists() else []
    return [(i0 // BLOCK, j0 // BLOCK) for i0, j0, rows, columns in calls if (rows, columns) != (1, 1)]


# Where and when this process kills itself: set by die_at, in processes started to be killed only.
_KILL = {"point": None, "at": 0, "seen": 0}


def _reached(point: str) -> None:
    if _KILL["point"] == point:
        _KILL["seen"] += 1
        if _KILL["seen"] == _KILL["at"]:
            os.kill(os.getpid(), signal.SIGKILL)


def die_at(count: int, point: str) -> None:
    """Make this process kill itself with SIGKILL at its ``count``-th block: once it is computed
    (``"computing"``), once one half of it is written but not its mirror (``"writing"``), or once it is
    written but before it is recorded (``"recording"``)."""
    _KILL.update(point=point, at=count, seen=0)
    write, record = _kernel_file.NpyFile.write, _kernel_file.record

    def write_then_maybe_die(
        self: _kernel_file.NpyFile, i0: int, i1: int, j0: int, j1: int, values: torch.Tensor
    ) -> None:
        write(self, i0, i1, j0, j1, values)
        if i0 <= j0:  # a block's first piece; an off-diagonal block's mirror (rows j0:j1) comes next
            _reached("writing")

    def maybe_die_then_record(path: Path, *args: object, **kwargs: object) -> None:
        if ".rank" in path.name:
            _reached("recording")
        record(path, *args, **kwargs)

    _kernel_file.NpyFile.write = write_then_maybe_die
    _kernel_file.record = maybe_die_then_record


def interrupted_run(path: str, count: int, point: str) -> None:
    """The symmetric kernel of :func:`inputs` in blocks of ``BLOCK``, killed during its ``count``-th block."""
    die_at(count, point)
    ntkbook.blocked_kernel(traced_kernel, inputs(), path=path, block_size=BLOCK, progress=False)
    raise AssertionError("the run was not killed")


def linear_kernel(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The cheapest kernel, ``x1 @ x2.T``: a run of it is mostly writing."""
    return x1 @ x2.T


def _held_bytes(path: str) -> int:
    """Anonymous resident memory plus the resident pages of ``path``'s mappings: what this process holds
    of its own and of the kernel's file, without the pages of shared libraries, which the system may
    evict and fault back in at any time."""
    held, in_file = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if line[0] in "0123456789abcdef" and " " in line and "-" in line.split(" ", 1)[0]:
                in_file = line.rstrip().endswith(path)
            elif line.startswith("Anonymous:") or (in_file and line.startswith("Rss:")):
                held += int(line.split()[1]) * 1024
    return held


def memory_growth(n: int, block_size: int, path: str) -> None:
    """Print, as JSON, the peak growth of :func:`_held_bytes` while a float32 kernel on ``n`` inputs goes
    to ``path``, sampled every 2 ms by a thread (a block lasts longer), beyond its value before the call.

    A first kernel of two blocks per side, to another file, faults in what any call needs (the allocator's
    pools), so that the growth measured is what the size of the kernel adds."""
    path = os.path.abspath(path)
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    ntkbook.blocked_kernel(
        linear_kernel, x[: 2 * block_size], path=path + ".warm-up.npy", block_size=block_size, progress=False
    )
    before, peak, running = _held_bytes(path), [0], threading.Event()

    def sample() -> None:
        while not running.wait(0.002):
            peak[0] = max(peak[0], _held_bytes(path))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        ntkbook.blocked_kernel(linear_kernel, x, path=path, block_size=block_size, progress=False)
    finally:
        running.set()
        sampler.join()
    print(json.dumps({"before_bytes": before, "growth_bytes": peak[0] - before, "kernel_bytes": n * n * 4}))


def distributed_case() -> tuple[functools.partial, torch.Tensor, torch.Tensor]:
    """The kernel function and inputs of the torchrun test: a cross NTK of a small MLP, 3 outputs, full mode."""
    model = ntkbook.mlp(4, 16, 2, 3, generator=torch.Generator().manual_seed(0)).double()
    gen = torch.Generator().manual_seed(1)
    x1, x2 = (
        torch.randn(23, 4, generator=gen, dtype=torch.float64),
        torch.randn(17, 4, generator=gen, dtype=torch.float64),
    )
    return functools.partial(ntkbook.empirical_ntk, model), x1, x2


def torchrun_main(path: str, block_size: int) -> None:
    """Run under ``torchrun``: every rank computes its share of :func:`distributed_case` into ``path``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        kernel_fn, x1, x2 = distributed_case()
        ntkbook.blocked_kernel(kernel_fn, x1, x2, path=path, block_size=block_size, progress=False)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # Run as a script (torchrun), this file is __main__; import it by name so its functions are the tests'.
    import blocked_worker

    blocked_worker.torchrun_main(sys.argv[1], int(sys.argv[2]))
