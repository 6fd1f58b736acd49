"""A blocked kernel's ``.npy`` file, written one band of rows at a time, and the manifest beside it: what
the file holds and which blocks are done.

:func:`ntkbook.blocked.blocked_kernel` writes ``K.npy`` block by block and records its progress in small JSON
files beside it, each replaced atomically (written under a temporary name, fsynced, renamed, and the
folder fsynced), so a crash at any instant leaves either the old record or the new one:

- ``K.npy.manifest.json``, written by rank 0 only: the description of the kernel (its shape, dtype,
  block size, whether it is the symmetric kernel of one batch, a fingerprint of ``x1`` and ``x2``, the
  kernel function's identity), the blocks known to be done and whether the kernel is complete.
- ``K.npy.rank<R>.json``, one per process of a run: the blocks that rank has finished, appended after
  each block is flushed to the file. Ranks never write the same record, so no locking is needed, on one
  machine or on a shared filesystem. Rank 0 merges them into the manifest when the kernel is complete and
  then removes them; until then a resumed run, with any number of ranks, reads them all.

A block is recorded only after its entries are flushed, so a block being written when the process died
is not recorded, and is recomputed on resume.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from numpy.lib import format as npy_format
from torch import nn

FORMAT = 1
# The fields of a call that must agree before a file may be resumed, in the order they are checked. The
# blocks' trailing shape and dtype are not among them: they are learnt from kernel_fn when the file is
# created, recorded in the manifest, and every block computed later is checked against them.
DESCRIPTION = ("inputs", "block_size", "symmetric", "x1", "x2", "kernel_fn")


def fingerprint(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and bytes (any dtype: the bytes are read as ``uint8``)."""
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)} {data.dtype}".encode())
    if data.numel():
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _argument_identity(value: object) -> str:
    if isinstance(value, nn.Module):
        state = hashlib.sha256()
        for name, tensor in value.state_dict().items():
            state.update(f"{name} {fingerprint(tensor)}".encode())
        return f"{type(value).__qualname__}(state {state.hexdigest()[:16]})"
    if isinstance(value, torch.Tensor):
        return f"tensor {fingerprint(value)[:16]}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return type(value).__qualname__


def kernel_identity(kernel_fn: object) -> str:
    """What identifies a kernel function across runs: ``module.qualname`` of a function; for a
    ``functools.partial`` also its arguments, a module by its class and a hash of its state dict (its
    parameters and buffers), a tensor by its fingerprint; for a module, its class and state. A closure
    or lambda is known by its name only, so a changed model captured by one goes unnoticed: pass
    ``functools.partial(empirical_ntk, model)`` instead."""
    if isinstance(kernel_fn, functools.partial):
        arguments = [_argument_identity(a) for a in kernel_fn.args]
        arguments += [f"{k}={_argument_identity(v)}" for k, v in sorted(kernel_fn.keywords.items())]
        return f"{kernel_identity(kernel_fn.func)}({', '.join(arguments)})"
    if isinstance(kernel_fn, nn.Module):
        return _argument_identity(kernel_fn)
    module = getattr(kernel_fn, "__module__", None) or type(kernel_fn).__module__
    name = getattr(kernel_fn, "__qualname__", None) or type(kernel_fn).__qualname__
    return f"{module}.{name}"


def write_atomically(path: Path, record: dict) -> None:
    """Replace ``path`` by ``record`` as JSON: temporary file, fsync, rename, fsync of the folder."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as file:
        json.dump(record, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def rank_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.name}.rank{rank}.json")


def rank_paths(path: Path) -> list[Path]:
    """Every rank's record beside ``path``, whatever the number of ranks that wrote them."""
    return sorted(p for p in path.parent.glob(f"{path.name}.rank*.json") if p.name[len(path.name) + 5 : -5].isdigit())


def read(path: Path) -> dict:
    with open(path) as file:
        return json.load(file)


def check_description(found: dict, wanted: dict, where: Path) -> None:
    """Refuse a record that describes another kernel, naming the first field that differs."""
    if found.get("format") != FORMAT:
        raise ValueError(f"path: {where} is not a blocked-kernel manifest of format {FORMAT}")
    for field in DESCRIPTION:
        if found.get(field) != wanted[field]:
            raise ValueError(
                f"path: {where} describes another kernel ({field} {found.get(field)!r}, this call "
                f"{wanted[field]!r}); refusing to mix them. Delete the file and its manifest, or choose another path"
            )


def done_blocks(path: Path, description: dict) -> set[tuple[int, int]]:
    """Blocks recorded as done in the manifest and in every rank's record, each checked against
    ``description``."""
    done = set()
    for record_path in [manifest_path(path), *rank_paths(path)]:
        record = read(record_path)
        check_description(record, description, record_path)
        done |= {(bi, bj) for bi, bj in record["done"]}
    return done


def record(path: Path, description: dict, done: set[tuple[int, int]], **extra: object) -> None:
    """Write a record of ``done`` blocks (the manifest itself when ``path`` is the manifest's path)."""
    write_atomically(path, {"format": FORMAT, **description, "done": sorted(done), **extra})


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        raise TypeError(f"kernel_fn returns {dtype}, which a .npy file cannot hold; convert its blocks") from None


def npy_layout(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Shape, Fortran order, dtype and data offset of a ``.npy`` file, from its header alone."""
    with open(path, "rb") as file:
        version = npy_format.read_magic(file)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"path: {path} is a .npy file of version {version}, not one blocked_kernel writes")
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = read_header(file)
        return shape, fortran, dtype, file.tell()


class NpyFile:
    """The kernel's ``.npy`` file, written one band of rows at a time through its own memory map."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype):
        found, fortran, found_dtype, self.offset = npy_layout(path)
        if found != shape or fortran or found_dtype != dtype:
            raise ValueError(f"path: {path} holds {found_dtype} {found}, its manifest says {dtype} {shape}")
        self.path, self.shape, self.dtype = path, shape, dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def write(self, i0: int, i1: int, j0: int, j1: int, values: torch.Tensor) -> None:
        # Mapping only rows i0:i1 and unmapping them after the flush keeps the file's pages out of this
        # process's resident memory: a map of the whole file would keep every page it ever wrote.
        rows = np.memmap(
            self.path, self.dtype, "r+", offset=self.offset + i0 * self.row_bytes, shape=(i1 - i0, *self.shape[1:])
        )
        rows[:, j0:j1] = values.to("cpu").numpy()
        rows.flush()
        del rows
