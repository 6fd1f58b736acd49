"""Full-batch gradient descent with a record of the loss, the parameters' travel, the NTK and a callback.

:func:`train` minimises one loss. For a model :math:`f(\\cdot;\\theta)` with ``n`` training pairs
:math:`(x_i, y_i)` and a scale :math:`\\alpha > 0`,

.. math::

    L(\\theta) = \\frac{1}{\\alpha^2}\\,\\frac{1}{n}\\sum_{i=1}^{n} \\big(f(x_i;\\theta) - y_i\\big)^2,

the mean squared error divided by :math:`\\alpha^2` as in Chizat, Oyallon & Bach (2019), and gradient
descent takes :math:`\\theta_{t+1} = \\theta_t - \\eta\\, \\nabla L(\\theta_t)` with learning rate
:math:`\\eta` (``lr``). For the linearisation of Lee et al. (2019) the residuals
:math:`r_t = f_t(X) - Y` then obey :math:`r_{t+1} = (I - \\tfrac{2\\eta}{n\\alpha^2}\\Theta)\\, r_t` exactly,
which :func:`~ntkbook.linearized.ntk_predict` evaluates in closed form.

Introduced in chapter 3 (:doc:`/chapters/03_lazy_training`).
"""

from __future__ import annotations

import collections.abc
import importlib.util
import math
import numbers
import sys
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

from ntkbook._checks import positive_float, positive_int
from ntkbook.ntk import empirical_ntk
from ntkbook.ntk.request import check_batch, trainable_parameters

if TYPE_CHECKING:
    from tqdm import tqdm


class DivergenceError(FloatingPointError, ValueError):
    """Gradient descent produced a NaN or infinite loss; usually the learning rate is too large.

    ``step`` is the first step whose loss is not finite and ``history`` holds the steps before it.
    It is a :class:`ValueError` too, because the cure is a different ``lr`` argument. Introduced in
    chapter 3 (:doc:`/chapters/03_lazy_training`).
    """

    def __init__(self, message: str, step: int, history: History) -> None:
        super().__init__(message)
        self.step = step
        self.history = history


@dataclass
class History:
    """What :func:`train` records, one entry per step ``t = 0, ..., steps`` (``t = 0`` is the initialisation).

    - ``loss``: ``(steps + 1,)`` float64, the plain mean squared error :math:`\\frac1n\\sum_i (f(x_i;\\theta_t) - y_i)^2`
      (not divided by :math:`\\alpha^2`, so runs with different ``alpha`` compare directly).
    - ``relative_change``: ``(steps + 1,)`` float64, :math:`\\lVert\\theta_t - \\theta_0\\rVert / \\lVert\\theta_0\\rVert`
      over all trainable parameters flattened into one vector; NaN if every parameter starts at zero.
    - ``initial_norm``: :math:`\\lVert\\theta_0\\rVert`, so ``relative_change * initial_norm`` is the distance travelled.
    - ``ntk``: ``{step: kernel}``, empirical NTKs ``(n, n)`` on the training inputs, when ``ntk_every`` was set.
    - ``records``: ``{step: callback(model, step)}``, what ``callback`` returned at the steps it was called.

    Introduced in chapter 3 (:doc:`/chapters/03_lazy_training`); ``records`` in
    :doc:`/chapters/05_feature_learning`.
    """

    loss: torch.Tensor
    relative_change: torch.Tensor
    initial_norm: float
    ntk: dict[int, torch.Tensor] = field(default_factory=dict)
    records: dict[int, object] = field(default_factory=dict)


def _targets_like(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` reshaped to the model's output shape, refusing shapes that would silently broadcast."""
    if y.shape[0] != out.shape[0] or y.numel() != out.numel():
        raise ValueError(
            f"y of shape {tuple(y.shape)} does not match model(x) of shape {tuple(out.shape)}: "
            "expected one target per output (the same shape, or (n,) for outputs of shape (n, 1))"
        )
    return y.reshape(out.shape)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    alpha: float = 1.0,
    ntk_every: int | None = None,
    callback: Callable[[nn.Module, int], object] | None = None,
    callback_steps: Iterable[int] | None = None,
    progress: bool | None = None,
) -> History:
    """Full-batch gradient descent on :math:`L = \\mathrm{MSE}/\\alpha^2`, updating ``model`` in place.

    Takes ``steps`` steps :math:`\\theta \\leftarrow \\theta - \\mathrm{lr}\\, \\nabla_\\theta L` on every
    parameter with ``requires_grad`` (plain gradient descent: no momentum, no weight decay).

    Args:
        model: maps ``x`` of shape ``(n, ...)`` to outputs with one entry per target.
        x: inputs ``(n, ...)``, the model's dtype and device.
        y: targets, the shape of ``model(x)``, or ``(n,)`` for outputs ``(n, 1)``.
        steps: number of gradient steps, >= 1.
        lr: learning rate, > 0.
        alpha: the output scale of Chizat et al. (2019); the loss is divided by ``alpha**2``. Pass the
            same ``alpha`` that :func:`~ntkbook.linearized.scaled` multiplies the model by.
        ntk_every: record the empirical NTK on ``x`` at step 0, every ``ntk_every`` steps and at the end.
        callback: ``callback(model, step)`` is called with the parameters :math:`\\theta_t` of step ``t``
            (before that step's update; ``t = steps`` is the trained model) and its return value is kept in
            ``History.records[t]``: a kernel, an alignment, hidden features. It must not change the
            parameters; return detached tensors, or the records keep autograd graphs alive. Without a
            callback the loop does nothing extra.
        callback_steps: the steps in ``0..steps`` at which to call ``callback``; ``None`` (the default)
            calls it at every step.
        progress: show a ``tqdm.auto`` progress bar: ``True`` always, ``False`` never, ``None`` (the
            default) where it can be drawn cleanly, i.e. with tqdm installed, in a terminal or in a
            Jupyter kernel that has ipywidgets (Colab). Without ipywidgets tqdm would print a warning and a text bar into the
            cell's output, and from there into a built page, so ``None`` shows no bar there.

    Returns:
        A :class:`History` of the loss and the relative parameter change at steps ``0..steps``.

    Raises:
        DivergenceError: the loss became NaN or infinite; it names the step and suggests a smaller ``lr``.

    Introduced in chapter 3 (:doc:`/chapters/03_lazy_training`).
    """
    params = trainable_parameters(model, "there is nothing to train")
    x = check_batch("x", x, params[0])
    y = check_batch("y", y, params[0])
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of examples, got {x.shape[0]} and {y.shape[0]}")
    steps = positive_int("steps", steps)
    lr = positive_float("lr", lr)
    alpha = positive_float("alpha", alpha)
    if ntk_every is not None:
        ntk_every = positive_int("ntk_every", ntk_every)
    record_at = _check_callback(callback, callback_steps, steps)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or None, got {type(progress).__name__}")
    if progress is None:
        progress = _bar_draws_cleanly()

    theta0 = [p.detach().clone() for p in params]
    initial_norm = math.sqrt(sum(float((p0**2).sum()) for p0 in theta0))
    losses: list[float] = []
    changes: list[float] = []
    kernels: dict[int, torch.Tensor] = {}
    records: dict[int, object] = {}
    bar = _progress_bar(steps, lr) if progress else None
    for step in range(steps + 1):
        if ntk_every is not None and (step % ntk_every == 0 or step == steps):
            kernels[step] = empirical_ntk(model, x)
        if callback is not None and (record_at is None or step in record_at):
            records[step] = callback(model, step)
        try:
            out = model(x)
        except RuntimeError as err:
            if step > 0:
                raise
            raise ValueError(f"model cannot be applied to x of shape {tuple(x.shape)}: {err}") from None
        target = _targets_like(out, y)
        mse = ((out - target) ** 2).mean()
        if not torch.isfinite(mse):
            history = History(
                torch.tensor(losses, dtype=torch.float64),
                torch.tensor(changes, dtype=torch.float64),
                initial_norm,
                kernels,
                records,
            )
            if bar is not None:
                bar.close()
            raise DivergenceError(
                f"the loss became {float(mse.detach())} at step {step} of {steps} with lr={lr:g}: gradient descent "
                f"diverged; try a smaller learning rate, e.g. lr={lr / 10:g}",
                step,
                history,
            )
        losses.append(float(mse.detach()))
        with torch.no_grad():
            distance = math.sqrt(sum(float(((p - p0) ** 2).sum()) for p, p0 in zip(params, theta0)))
        # With every parameter at zero there is no scale to be relative to.
        changes.append(distance / initial_norm if initial_norm > 0 else math.nan)
        if step == steps:
            break
        grads = torch.autograd.grad(mse / alpha**2, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(lr * g)
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3g}", refresh=False)
            bar.update()
    if bar is not None:
        bar.close()
    return History(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(changes, dtype=torch.float64),
        initial_norm,
        kernels,
        records,
    )


def _check_callback(
    callback: Callable[[nn.Module, int], object] | None, callback_steps: Iterable[int] | None, steps: int
) -> frozenset[int] | None:
    """The steps at which to call ``callback``, ``None`` for every step."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(model, step), got {type(callback).__name__}")
    if callback_steps is None:
        return None
    if callback is None:
        raise ValueError("callback_steps was given without a callback to call at those steps")
    if isinstance(callback_steps, (str, bytes)) or not isinstance(callback_steps, collections.abc.Iterable):
        raise TypeError(f"callback_steps must be an iterable of ints, got {type(callback_steps).__name__}")
    chosen = list(callback_steps)
    for step in chosen:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"callback_steps must hold ints, got {type(step).__name__} {step!r}")
        if not 0 <= step <= steps:
            raise ValueError(f"callback_steps must lie in 0..steps = 0..{steps}, got {step}")
    if not chosen:
        raise ValueError("callback_steps is empty: pass None to call the callback at every step")
    return frozenset(int(step) for step in chosen)


def _bar_draws_cleanly() -> bool:
    """tqdm is installed, and this is a terminal or a Jupyter kernel with ipywidgets: where
    ``tqdm.auto`` draws a bar in place."""
    if importlib.util.find_spec("tqdm") is None:
        return False
    if "ipykernel" in sys.modules:
        return importlib.util.find_spec("ipywidgets") is not None
    return sys.stderr is not None and sys.stderr.isatty()


def _progress_bar(steps: int, lr: float) -> tqdm:
    """A ``tqdm.auto`` bar that vanishes when done, imported only when a bar is shown.

    In a Jupyter kernel without ipywidgets ``tqdm.auto`` falls back to a text bar and warns about it;
    the caller asked for a bar, so the fallback is what they get, without the warning.
    """
    if importlib.util.find_spec("tqdm") is None:
        raise ImportError("progress=True needs the tqdm package: pip install tqdm, or pass progress=False")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"gradient descent (lr={lr:g})", leave=False)
