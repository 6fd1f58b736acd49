"""The block grid of a kernel, and exact symmetry by construction.

A kernel of ``n1 x n2`` inputs is computed in blocks of at most ``chunk`` inputs per side, on the grid
``range(0, n, chunk)`` of each side. For the symmetric kernel of one batch only the blocks on and above
the diagonal are computed; each block below is the transpose of its mirror, and each diagonal block is
made symmetric from its upper triangle. Symmetry is then exact, whatever order a BLAS sums in:
``K[i, j] == K[j, i]`` bit for bit, and ``K[i, j, a, b] == K[j, i, b, a]`` in full mode.
"""

from __future__ import annotations

from typing import Callable

import torch

from ntkbook.ntk.features import Features, batch_size, contract, rows

# Below this many inputs a symmetric block is contracted whole; above it, as two halves whose
# lower-left quarter is the transpose of the upper-right (3/4 of the products: torch has no syrk).
HALVING_THRESHOLD = 64


def ranges(n: int, chunk: int | None) -> list[tuple[int, int]]:
    step = n if chunk is None else chunk
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def transpose_block(block: torch.Tensor) -> torch.Tensor:
    """Θ(x2, x1) from Θ(x1, x2): swap the inputs, and the outputs too in full mode."""
    block = block.transpose(0, 1)
    return block.transpose(2, 3) if block.ndim == 4 else block


def mirror_upper(block: torch.Tensor) -> torch.Tensor:
    """A square block made exactly symmetric from its upper triangle. In full mode the block
    ``(n, n, k, k)`` is the matrix ``M[(i, a), (j, b)] = K[i, j, a, b]``, mirrored as such."""
    n = block.shape[0]
    if block.ndim == 4:
        k = block.shape[2]
        matrix = block.permute(0, 2, 1, 3).reshape(n * k, n * k)
        return mirror_upper(matrix).reshape(n, k, n, k).permute(0, 2, 1, 3)
    if block.ndim == 3:
        return torch.stack([mirror_upper(block[:, :, a]) for a in range(block.shape[2])], dim=2)
    # Adding exact zeros moves no bits: the result is the upper triangle and its transpose.
    return torch.triu(block) + torch.triu(block, 1).T


def block_kernel(
    compute: Callable[[int, int, int, int], torch.Tensor],
    n1: int,
    n2: int,
    symmetric: bool,
    chunk: int | None,
) -> torch.Tensor:
    """Assemble the kernel from blocks ``compute(i0, i1, j0, j1)``; see the module docstring."""
    row_ranges, col_ranges = ranges(n1, chunk), ranges(n2, chunk)
    kernel = None
    for bi, (i0, i1) in enumerate(row_ranges):
        for bj, (j0, j1) in enumerate(col_ranges):
            if symmetric and bj < bi:
                block = transpose_block(kernel[j0:j1, i0:i1])
            else:
                block = compute(i0, i1, j0, j1)
                if symmetric and bi == bj:
                    block = mirror_upper(block)
            if len(row_ranges) == 1 and len(col_ranges) == 1:
                return block
            if kernel is None:
                kernel = block.new_empty((n1, n2, *block.shape[2:]))
            kernel[i0:i1, j0:j1] = block
    return kernel


def contract_symmetric(features: Features, mode: str) -> torch.Tensor:
    """``contract(features, features)`` with the lower-left quarter copied from the upper-right."""
    n = batch_size(features)
    if n < HALVING_THRESHOLD:
        return contract(features, features, mode)
    half = n // 2
    bottom = rows(features, half, n)
    top = contract(rows(features, 0, half), features, mode)
    kernel = top.new_empty((n, n, *top.shape[2:]))
    kernel[:half] = top
    kernel[half:, half:] = contract(bottom, bottom, mode)
    kernel[half:, :half] = transpose_block(top[:, half:])
    return kernel


def feature_kernel(
    featurize: Callable[[str, torch.Tensor], Features],
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    chunk: int | None,
    mode: str,
    keep_features: bool,
) -> torch.Tensor:
    """A kernel from per-chunk features. The current block row's features are reused along the row;
    ``keep_features`` also keeps every column chunk's features (right for "structured", whose features
    take O(n * width) memory; Jacobians are recomputed instead, to keep memory bounded)."""
    symmetric = x2 is None
    other, other_name = (x1, "x1") if symmetric else (x2, "x2")
    row: dict[str, object] = {}
    kept: dict[int, Features] = {}

    def row_features(i0: int, i1: int) -> Features:
        if row.get("start") != i0:
            found = kept[i0] if symmetric and i0 in kept else featurize("x1", x1[i0:i1])
            row.update(start=i0, features=found)
            if keep_features and symmetric:
                kept[i0] = found
        return row["features"]

    def column_features(j0: int, j1: int) -> Features:
        if j0 in kept:
            return kept[j0]
        found = featurize(other_name, other[j0:j1])
        if keep_features:
            kept[j0] = found
        return found

    def block(i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        f1 = row_features(i0, i1)
        if symmetric and i0 == j0:
            return contract_symmetric(f1, mode)
        return contract(f1, column_features(j0, j1), mode)

    return block_kernel(block, x1.shape[0], other.shape[0], symmetric, chunk)
