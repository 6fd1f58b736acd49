"""Kernels larger than memory: computed block by block, to disk, resumably, and across processes.

A kernel function of two batches, ``kernel_fn(x1, x2) -> (n1, n2, ...)`` (``functools.partial(empirical_ntk,
model)``, ``functools.partial(relu_ntk, depth=2)``, ...), is applied to the blocks of the grid
``range(0, n, block_size)`` on each side, the last block of a side partial:

.. math::

    K[i_0{:}i_1,\\ j_0{:}j_1] = \\texttt{kernel\\_fn}(x_1[i_0{:}i_1],\\ x_2[j_0{:}j_1]).

With ``x2=None`` the kernel is the symmetric :math:`K(x_1, x_1)`: of the :math:`B = \\lceil n/b \\rceil` blocks
per side only the :math:`B(B+1)/2` on and above the diagonal are computed; each block below is the exact
transpose of its mirror and each diagonal block is made exactly symmetric from its upper triangle
(``ntkbook.ntk.blocks``), so ``K[i, j] == K[j, i]`` bit for bit.

With a ``path``, the kernel goes to a ``.npy`` file, never held in memory whole: each block is written
through a memory map of its own rows only, flushed, and unmapped, so peak memory is set by the block
size, not by :math:`n^2`. Progress is recorded in a manifest beside the file (``ntkbook._kernel_file``), so
rerunning the same call resumes where a crash left off; under ``torchrun`` the blocks are shared out
between the processes. Introduced in chapter 7 (:doc:`/chapters/07_large_kernels`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from numpy.lib import format as npy_format
from tqdm import tqdm

from ntkbook import _kernel_file
from ntkbook._checks import positive_int
from ntkbook.ntk.blocks import mirror_upper, ranges, transpose_block

Block = tuple[int, int]
KernelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when GPUs are visible (``torchrun`` sets
    ``LOCAL_RANK``, the process's index on its machine; 0 without it), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world == 1:
        return
    if dist.get_backend() == "nccl":
        # NCCL's barrier runs on a GPU: name this rank's, which NCCL cannot guess before a collective.
        dist.barrier(device_ids=[local_device().index])
    else:
        dist.barrier()


def _grid(n1: int, n2: int, block_size: int, symmetric: bool) -> list[Block]:
    """The blocks ``(bi, bj)`` to compute, row by row; for a symmetric kernel only ``bj >= bi``."""
    rows, columns = len(ranges(n1, block_size)), len(ranges(n2, block_size))
    return [(bi, bj) for bi in range(rows) for bj in range(columns) if not symmetric or bj >= bi]


def _check_inputs(
    kernel_fn: object, x1: object, x2: object, path: object, block_size: object, progress: object, device: object
) -> tuple[Path | None, int, torch.device]:
    if not callable(kernel_fn):
        raise TypeError(f"kernel_fn must be a function of two batches, got {type(kernel_fn).__name__}")
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None and name == "x2":
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of inputs (n, ...), got {type(x).__name__}")
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(
                f"{name} must hold at least one input along its first dimension, got shape {tuple(x.shape)}"
            )
        if x.device.type == "meta":
            raise ValueError(f"{name} is on the meta device, which holds shapes but no values")
    block_size = positive_int("block_size", block_size)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {type(progress).__name__} {progress!r}")
    if device is None:
        device = local_device() if _rank_and_world()[1] > 1 else x1.device
    elif not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"device must be a torch.device, a string such as 'cuda:0', or None, got {type(device).__name__}"
        )
    if path is None:
        return None, block_size, torch.device(device)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike naming a .npy file, got {type(path).__name__}")
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"path must name a .npy file, got {str(path)!r}")
    if not path.parent.is_dir():
        raise ValueError(f"path: the folder {str(path.parent)!r} does not exist")
    return path, block_size, torch.device(device)


class _Blocks:
    """Computes block ``(bi, bj)`` and checks its shape: ``(rows, columns, *trailing)``."""

    def __init__(self, kernel_fn: KernelFn, x1: torch.Tensor, x2: torch.Tensor | None, size: int, device: torch.device):
        self.kernel_fn, self.x1, self.symmetric, self.device = kernel_fn, x1, x2 is None, device
        self.x2 = x1 if x2 is None else x2
        self.rows, self.columns = ranges(x1.shape[0], size), ranges(self.x2.shape[0], size)
        self.trailing: tuple[int, ...] | None = None

    def entries(self, block: Block) -> int:
        (i0, i1), (j0, j1) = self.rows[block[0]], self.columns[block[1]]
        return (i1 - i0) * (j1 - j0)

    def compute(self, block: Block) -> torch.Tensor:
        (i0, i1), (j0, j1) = self.rows[block[0]], self.columns[block[1]]
        return self.call(self.x1[i0:i1], self.x2[j0:j1])

    def call(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        result = self.kernel_fn(a.to(self.device), b.to(self.device))
        if not isinstance(result, torch.Tensor) or result.ndim < 2 or tuple(result.shape[:2]) != (len(a), len(b)):
            got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise ValueError(
                f"kernel_fn must return a tensor (n1, n2, ...) for batches of {len(a)} and {len(b)}, got {got}"
            )
        trailing = tuple(result.shape[2:])
        got = tuple(result.shape)
        if self.symmetric and not (len(trailing) < 2 or (len(trailing) == 2 and trailing[0] == trailing[1])):
            raise ValueError(f"kernel_fn: with x2=None blocks must be (n, n), (n, n, k) or (n, n, k, k), got {got}")
        if self.trailing is not None and trailing != self.trailing:
            raise ValueError(f"kernel_fn returned blocks (n1, n2, *{trailing}), earlier (n1, n2, *{self.trailing})")
        self.trailing = trailing
        return result.detach()

    def pieces(self, block: Block, values: torch.Tensor) -> list[tuple[int, int, int, int, torch.Tensor]]:
        """Where a computed block goes: itself, made symmetric on the diagonal, and its mirror."""
        (i0, i1), (j0, j1) = self.rows[block[0]], self.columns[block[1]]
        if not self.symmetric:
            return [(i0, i1, j0, j1, values)]
        if block[0] == block[1]:
            return [(i0, i1, j0, j1, mirror_upper(values))]
        return [(i0, i1, j0, j1, values), (j0, j1, i0, i1, transpose_block(values))]


def _create(path: Path, blocks: _Blocks, description: dict) -> None:
    """Rank 0, before any other rank looks: the manifest, then the file if it is missing. A file
    without a manifest is refused; a manifest without its file is refused unless nothing was done."""
    manifest = _kernel_file.manifest_path(path)
    if not manifest.exists():
        if path.exists():
            raise ValueError(
                f"path: {path} exists without a manifest, so what it holds is unknown; delete it or choose another path"
            )
        probe = blocks.call(blocks.x1[:1], blocks.x2[:1])  # learns the trailing shape and dtype
        shape = [len(blocks.x1), len(blocks.x2), *probe.shape[2:]]
        _kernel_file.record(
            manifest, description, set(), shape=shape, dtype=_kernel_file.numpy_dtype(probe.dtype).str, complete=False
        )
    if not path.exists():
        record = _kernel_file.read(manifest)
        if _kernel_file.done_blocks(path, description):
            raise ValueError(f"path: {path} is missing but its manifest records finished blocks; delete the manifest")
        npy_format.open_memmap(path, "w+", np.dtype(record["dtype"]), tuple(record["shape"]))


def _file_kernel(blocks: _Blocks, path: Path, description: dict, progress: bool) -> np.memmap:
    rank, world = _rank_and_world()
    manifest_path = _kernel_file.manifest_path(path)
    if rank == 0:
        _create(path, blocks, description)
    _barrier(world)
    done = _kernel_file.done_blocks(path, description)
    manifest = _kernel_file.read(manifest_path)
    output = _kernel_file.NpyFile(path, tuple(manifest["shape"]), np.dtype(manifest["dtype"]))
    blocks.trailing = tuple(manifest["shape"][2:])
    # Every rank has read the same records before any rank adds to them: the shares below agree.
    _barrier(world)
    todo = [
        block for block in _grid(*output.shape[:2], description["block_size"], blocks.symmetric) if block not in done
    ]
    mine = todo[rank::world]
    own_path = _kernel_file.rank_path(path, rank)
    own = {tuple(b) for b in _kernel_file.read(own_path)["done"]} if own_path.exists() else set()
    with _progress(blocks, mine, progress and rank == 0, world) as bar:
        for count, block in enumerate(mine, 1):
            values = blocks.compute(block)
            if _kernel_file.numpy_dtype(values.dtype) != output.dtype:
                raise ValueError(f"kernel_fn returned {values.dtype}, the file holds {output.dtype}")
            for piece in blocks.pieces(block, values):
                output.write(*piece)
            own.add(block)
            _kernel_file.record(own_path, description, own)
            bar.set_postfix_str(f"block {count}/{len(mine)}", refresh=False)
            bar.update(blocks.entries(block))
    _barrier(world)
    if rank == 0 and not manifest["complete"]:
        finished = _kernel_file.done_blocks(path, description)
        _kernel_file.record(
            manifest_path, description, finished, shape=manifest["shape"], dtype=manifest["dtype"], complete=True
        )
        for record_path in _kernel_file.rank_paths(path):
            record_path.unlink()
    _barrier(world)
    return np.load(path, mmap_mode="r")


def _progress(blocks: _Blocks, mine: list[Block], enabled: bool, world: int) -> tqdm:
    description = "blocked kernel" if world == 1 else f"blocked kernel, rank 0 of {world}"
    total = sum(blocks.entries(b) for b in mine)
    return tqdm(total=total, unit=" entries", unit_scale=True, desc=description, disable=not enabled or not mine)


def _memory_kernel(blocks: _Blocks, block_size: int, progress: bool) -> torch.Tensor:
    kernel = None
    todo = _grid(len(blocks.x1), len(blocks.x2), block_size, blocks.symmetric)
    with _progress(blocks, todo, progress, 1) as bar:
        for count, block in enumerate(todo, 1):
            values = blocks.compute(block)
            if kernel is None:
                kernel = values.new_empty((len(blocks.x1), len(blocks.x2), *values.shape[2:]))
            for i0, i1, j0, j1, piece in blocks.pieces(block, values):
                kernel[i0:i1, j0:j1] = piece
            bar.set_postfix_str(f"block {count}/{len(todo)}", refresh=False)
            bar.update(blocks.entries(block))
    return kernel


def blocked_kernel(
    kernel_fn: KernelFn,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    path: str | os.PathLike | None = None,
    block_size: int = 1024,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor | np.memmap:
    """``kernel_fn(x1, x2)`` computed block by block: in memory, or to a ``.npy`` file larger than memory,
    resumably, and shared between the processes of a ``torchrun`` launch.

    Args:
        kernel_fn: a function of two batches ``(b1, ...)``, ``(b2, ...)`` returning ``(b1, b2, ...)``, e.g.
            ``functools.partial(ntkbook.empirical_ntk, model)``. It must compute each entry from its two
            inputs alone, so that blocks of any size give the same entries.
        x1: inputs ``(n1, ...)``; ``x2``: inputs ``(n2, ...)``, or ``None`` for the symmetric kernel of ``x1``:
            only the :math:`B(B+1)/2` blocks on and above the diagonal are computed, and ``K == K.T``
            exactly (the outputs swapped too for ``(n, n, k, k)`` blocks).
        path: a ``.npy`` file to write the kernel to through memory maps of one block's rows at a time,
            so memory stays :math:`O(\\text{block\\_size} \\cdot n)` at most, never :math:`O(n^2)`. Each finished
            block is flushed, then recorded atomically in ``<path>.rank<R>.json`` (``<path>.manifest.json``
            describes the kernel: shape, dtype, block size, fingerprints of ``x1`` and ``x2``, the kernel
            function's identity). Rerunning the same call resumes: recorded blocks are skipped, a block
            interrupted before it was recorded is recomputed, and a finished kernel is left as it is; a
            file whose manifest describes other inputs or another kernel function is refused with a
            ``ValueError``. When the file is created, one call on the first input of each side learns the
            blocks' trailing shape and dtype. ``None``: the kernel is returned as one tensor.
        block_size: inputs per block side; memory and the time per block grow as its square.
        progress: a ``tqdm`` bar of entries computed, entries per second and time left (rank 0 only).
        device: where each block's inputs are moved before ``kernel_fn`` is called (the model inside
            ``kernel_fn`` must be there too); ``None``: :func:`local_device` under ``torch.distributed``,
            else ``x1``'s device.

    When ``torch.distributed`` is initialised (``torchrun --nproc_per_node=N script.py``, or a multi-node
    launch), the blocks left to do are dealt out in turn to the ranks, each rank computes its share on its
    own device and writes into the same file (one machine, or a filesystem every machine sees), and rank 0
    completes the manifest after a barrier. Every rank must pass the same inputs and ``path``.

    Returns:
        Without ``path``, the kernel ``(n1, n2, ...)`` as a tensor on ``kernel_fn``'s device; with it, the
        file mapped read-only (``numpy.load(path, mmap_mode="r")``): pages are read only when indexed.
    """
    path, block_size, device = _check_inputs(kernel_fn, x1, x2, path, block_size, progress, device)
    blocks = _Blocks(kernel_fn, x1, x2, block_size, device)
    if path is None:
        if _rank_and_world()[1] > 1:
            raise ValueError("path is required under torch.distributed: the ranks share their blocks through the file")
        return _memory_kernel(blocks, block_size, progress)
    description = {
        "inputs": [len(blocks.x1), len(blocks.x2)],
        "block_size": block_size,
        "symmetric": blocks.symmetric,
        "x1": _kernel_file.fingerprint(x1),
        "x2": None if x2 is None else _kernel_file.fingerprint(x2),
        "kernel_fn": _kernel_file.kernel_identity(kernel_fn),
    }
    return _file_kernel(blocks, path, description, progress)
