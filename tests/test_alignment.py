"""ntkbook.kernel_alignment: the centred kernel-target alignment of Cortes, Mohri & Rostamizadeh (2012)."""

from __future__ import annotations

import pytest
import torch

from ntkbook import kernel_alignment


def random_psd(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n + 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T


def by_definition(kernel: torch.Tensor, y: torch.Tensor) -> float:
    """<HKH, H YY^T H>_F / (|HKH|_F |H YY^T H|_F) with the centring matrix H built explicitly."""
    n = kernel.shape[0]
    h = torch.eye(n, dtype=kernel.dtype) - torch.full((n, n), 1 / n, dtype=kernel.dtype)
    y = y.reshape(n, -1)
    kc, tc = h @ kernel @ h, h @ y @ y.T @ h
    return float((kc * tc).sum() / (torch.linalg.matrix_norm(kc) * torch.linalg.matrix_norm(tc)))


@pytest.mark.parametrize("outputs", [1, 3])
def test_alignment_equals_its_definition(outputs: int) -> None:
    kernel = random_psd(9, 0)
    y = torch.randn(9, outputs, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert kernel_alignment(kernel, y) == pytest.approx(by_definition(kernel, y), rel=1e-12)


def test_alignment_is_one_for_the_target_kernel_and_minus_one_for_its_negative() -> None:
    y = torch.randn(7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = torch.outer(y, y)
    # Adding a constant matrix (what an unnormalised NTK carries) changes nothing after centring.
    assert kernel_alignment(3 * target + 5.0, y) == pytest.approx(1.0, rel=1e-12)
    assert kernel_alignment(-target, y) == pytest.approx(-1.0, rel=1e-12)


def test_alignment_is_invariant_to_scale_and_shifts_and_takes_vector_or_column_targets() -> None:
    kernel = random_psd(8, 3)
    y = torch.randn(8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    reference = kernel_alignment(kernel, y)
    assert kernel_alignment(0.01 * kernel + 2.0, y) == pytest.approx(reference, rel=1e-12)
    assert kernel_alignment(kernel, -3 * y + 1.0) == pytest.approx(reference, rel=1e-12)
    assert kernel_alignment(kernel, y[:, None]) == pytest.approx(reference, rel=1e-12)


def test_alignment_of_psd_kernels_lies_in_zero_one() -> None:
    for seed in range(50):
        kernel = random_psd(6, seed)
        y = torch.randn(6, 2, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
        assert 0.0 <= kernel_alignment(kernel, y) <= 1.0


def test_one_hot_classes_align_perfectly_with_a_class_block_kernel() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    one_hot = torch.nn.functional.one_hot(labels).double()
    same_class = (labels[:, None] == labels[None, :]).double()
    assert kernel_alignment(same_class, one_hot) == pytest.approx(1.0, rel=1e-12)
