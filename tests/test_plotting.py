"""ntkbook.plotting: style, heat maps and log-log slopes."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from ntkbook.plotting import STYLE, add_reference_slope, loglog_slope, plot_kernel, set_style


def test_set_style_applies_the_book_style() -> None:
    set_style()
    assert matplotlib.rcParams["axes.grid"] is STYLE["axes.grid"]


def test_plot_kernel_labels_everything() -> None:
    fig, ax = plt.subplots()
    image = plot_kernel(torch.eye(3), ax=ax, title="T", colorbar_label="C")
    assert ax.get_title() == "T" and ax.get_xlabel() and ax.get_ylabel()
    assert image.colorbar.ax.get_ylabel() == "C"
    plt.close(fig)


def test_plot_kernel_symmetric_colors_centre_on_zero() -> None:
    fig, ax = plt.subplots()
    image = plot_kernel(np.array([[1.0, -3.0], [0.5, 2.0]]), ax=ax, symmetric_colors=True)
    assert image.get_clim() == (-3.0, 3.0)
    plt.close(fig)


def test_plot_kernel_rejects_non_matrices() -> None:
    with pytest.raises(ValueError, match="kernel must be a 2-d"):
        plot_kernel(torch.ones(3))
    with pytest.raises(TypeError, match="kernel must be a torch.Tensor or numpy.ndarray"):
        plot_kernel([[1.0]])


def test_loglog_slope_recovers_power_law() -> None:
    x = np.array([1.0, 10.0, 100.0, 1000.0])
    assert loglog_slope(x, 3 * x**-0.5) == pytest.approx(-0.5)


@pytest.mark.parametrize(("x", "y"), [([1.0], [1.0]), ([1.0, 2.0], [1.0]), ([0.0, 1.0], [1.0, 2.0])])
def test_loglog_slope_rejects_bad_data(x: list, y: list) -> None:
    with pytest.raises(ValueError):
        loglog_slope(x, y)


def test_reference_slope_passes_through_geometric_mean() -> None:
    fig, ax = plt.subplots()
    add_reference_slope(ax, [1.0, 100.0], [10.0, 1.0], -0.5)
    line = ax.get_lines()[0]
    xs, ys = line.get_data()
    assert np.allclose(np.log(ys[1] / ys[0]) / np.log(xs[1] / xs[0]), -0.5)
    assert line.get_label() == "slope -0.5"
    plt.close(fig)


def test_reference_slope_takes_line_options_and_sits_above_data() -> None:
    fig, ax = plt.subplots()
    default = add_reference_slope(ax, [1.0, 10.0], [1.0, 2.0], 1.0)
    styled = add_reference_slope(ax, [1.0, 10.0], [1.0, 2.0], 2.0, color="C1", linestyle=":")
    assert default.get_linestyle() == "--" and default.get_zorder() > 2  # Line2D default is 2
    assert styled.get_linestyle() == ":" and styled.get_color() == "C1"
    plt.close(fig)
