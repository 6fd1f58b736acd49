"""One look for every figure in the book, and the log-log helpers the chapters share.

Introduced in chapter 1 (:doc:`/chapters/01_loop_ntk`).
"""

from __future__ import annotations

from typing import Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D

#: The matplotlib ``rcParams`` that :func:`set_style` applies: one look for every figure.
STYLE: dict[str, object] = {
    "figure.figsize": (6.4, 4.2),
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "figure.constrained_layout.use": True,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "lines.linewidth": 1.8,
    "image.cmap": "viridis",
}


def set_style() -> None:
    """Apply the book's matplotlib style (:data:`STYLE`) to every figure drawn afterwards."""
    mpl.rcParams.update(STYLE)


def _as_numpy(array: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    if isinstance(array, np.ndarray):
        return array
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(array).__name__}")


def plot_kernel(
    kernel: torch.Tensor | np.ndarray,
    *,
    ax: Axes | None = None,
    title: str = "Empirical NTK",
    colorbar_label: str = r"$\Theta(x_i, x_j)$",
    xlabel: str = "input index $j$",
    ylabel: str = "input index $i$",
    cmap: str = "viridis",
    symmetric_colors: bool = False,
) -> AxesImage:
    """Draw an ``(n1, n2)`` kernel matrix as a heat map with a labelled colour bar.

    The labels are matplotlib mathtext: by default the colour bar reads :math:`\\Theta(x_i, x_j)` and
    the axes "input index :math:`j`" and "input index :math:`i`".
    ``symmetric_colors=True`` centres a diverging colour scale on zero, for differences of kernels.
    Returns the image so callers can adjust it.
    """
    matrix = _as_numpy(kernel, "kernel")
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"kernel must be a 2-d (n1, n2) matrix with n1, n2 >= 1, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("kernel contains NaN or infinite values, which a heat map would show as blanks")
    ax = plt.gca() if ax is None else ax
    limits = {}
    if symmetric_colors:
        bound = float(np.abs(matrix).max()) or 1.0
        limits = {"vmin": -bound, "vmax": bound}
    image = ax.imshow(matrix, cmap=cmap, interpolation="nearest", **limits)
    ax.figure.colorbar(image, ax=ax, label=colorbar_label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(False)
    return image


def _loglog_data(x: object, y: object) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` as float arrays fit for log-log axes: 1-d, one length >= 2, finite and positive."""
    try:
        xs = np.asarray(x, dtype=float)
        ys = np.asarray(y, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(
            f"x and y must be sequences of numbers, got {type(x).__name__} and {type(y).__name__}"
        ) from None
    if xs.shape != ys.shape or xs.ndim != 1 or xs.size < 2:
        raise ValueError(f"x and y must be 1-d with the same length >= 2, got shapes {xs.shape} and {ys.shape}")
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise ValueError("x and y must be finite to fit a slope on log-log axes")
    if (xs <= 0).any() or (ys <= 0).any():
        raise ValueError("x and y must be positive to fit a slope on log-log axes")
    return xs, ys


def loglog_slope(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Least-squares slope of :math:`\\log y` against :math:`\\log x`: the exponent :math:`p` in :math:`y \\approx c x^p`."""
    xs, ys = _loglog_data(x, y)
    slope, _ = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(slope)


def add_reference_slope(
    ax: Axes,
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    slope: float,
    *,
    label: str | None = None,
    **line_options: object,
) -> Line2D:
    """Draw a line of the given log-log ``slope`` through the geometric mean of the data ``(x, y)``.

    Black, dashed and drawn above the data points by default (so the data never hide it);
    ``line_options`` (``color``, ``linestyle``, ``zorder``, ...) go to ``ax.plot`` and override
    those defaults, to tell several reference lines apart. Returns the line.
    """
    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not np.isfinite(slope):
        raise ValueError(f"slope must be a finite number, got {slope!r}")
    xs, ys = _loglog_data(x, y)
    x0, y0 = np.exp(np.log(xs).mean()), np.exp(np.log(ys).mean())
    grid = np.array([xs.min(), xs.max()])
    options = {"color": "k", "linestyle": "--", "linewidth": 1.0, "zorder": 3} | line_options
    (line,) = ax.plot(grid, y0 * (grid / x0) ** slope, label=label or f"slope {slope:g}", **options)
    return line
