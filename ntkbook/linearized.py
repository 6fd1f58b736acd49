"""Wrappers of a model for lazy training, and the closed-form outputs of training the linearised one.

:func:`linearize` is the first-order Taylor expansion of Lee et al. (2019); :func:`centered` and
:func:`scaled` subtract the initial output and multiply by :math:`\\alpha` (Chizat, Oyallon & Bach
2019). For the loss of :func:`~ntkbook.training.train` the linearised model's residuals on the
training inputs obey :math:`r_{t+1} = (I - \\tfrac{2\\eta}{n\\alpha^2}\\Theta)\\, r_t` exactly, which
:func:`ntk_predict` evaluates in closed form.

Introduced in chapter 3 (:doc:`/chapters/03_lazy_training`).
"""

from __future__ import annotations

import copy
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp

from ntkbook._checks import finite, positive_float, symmetric
from ntkbook.ntk.request import trainable_parameters


def _check_model(model: object) -> list[nn.Parameter]:
    return trainable_parameters(model, "there is nothing to train")


def _parameter(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor at dotted ``name``, read as an attribute: inside :func:`torch.func.functional_call`
    it is the substituted plain tensor, which ``get_parameter`` would reject."""
    prefix, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(prefix), leaf)


def _apply(call: Callable[[torch.Tensor], torch.Tensor], x: object, reference: torch.Tensor) -> torch.Tensor:
    """``call(x)`` for a wrapper's forward, with bad inputs named as ``x`` instead of surfacing as torch's
    errors from inside :func:`torch.func.functional_call`. Integer inputs pass (token ids, for models
    that embed them); ``x`` is not checked for NaN, which would cost a GPU sync on every call."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of the model's inputs, got {type(x).__name__}")
    if x.is_floating_point() and x.dtype != reference.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {reference.dtype}")
    if x.device != reference.device:
        raise ValueError(f"x is on {x.device} but the model's parameters are on {reference.device}")
    try:
        return call(x)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as err:
        raise ValueError(f"model cannot be applied to x of shape {tuple(x.shape)} and dtype {x.dtype}: {err}") from None


class Linearized(nn.Module):
    """The first-order Taylor expansion of a model around its parameters at construction.

    :math:`f_{\\mathrm{lin}}(x;\\theta) = f(x;\\theta_0) + J(x;\\theta_0)\\,(\\theta - \\theta_0)`, computed
    in one forward-mode pass by :func:`torch.func.jvp` (the Jacobian :math:`J` is never formed), which
    gives :math:`f(x;\\theta_0)` and :math:`J\\,(\\theta - \\theta_0)` together; memory stays that of a
    forward pass, time is a small multiple of it. The trainable parameters :math:`\\theta` live in
    ``self.module``, a copy of the model started at :math:`\\theta_0`; :math:`\\theta_0` is kept in
    buffers. Lee et al. (2019); introduced in chapter 3 (:doc:`/chapters/03_lazy_training`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _check_model(model)
        self.module = copy.deepcopy(model)
        self._names = [name for name, p in self.module.named_parameters() if p.requires_grad]
        for i, name in enumerate(self._names):
            self.register_buffer(f"theta0_{i}", _parameter(self.module, name).detach().clone())

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """:math:`\\theta_0`, by parameter name of ``self.module``."""
        return {name: getattr(self, f"theta0_{i}") for i, name in enumerate(self._names)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`f(x;\\theta_0) + J(x;\\theta_0)(\\theta - \\theta_0)` for a batch ``x``, shaped like ``model(x)``."""
        theta0 = self.initial_parameters()
        delta = {name: _parameter(self.module, name) - theta0[name] for name in self._names}

        def expansion(x: torch.Tensor) -> torch.Tensor:
            out0, tangent = jvp(lambda theta: functional_call(self.module, theta, (x,)), (theta0,), (delta,))
            return out0 + tangent

        return _apply(expansion, x, self.theta0_0)


class Centered(nn.Module):
    """:math:`f(x;\\theta) - f(x;\\theta_0)`: a model minus its own output at initialisation.

    Wraps ``model`` (its parameters are shared, so training this module trains ``model``) and keeps
    :math:`\\theta_0` in buffers. The output starts at exactly zero, so scaling it by :math:`\\alpha`
    (:class:`Scaled`) changes the speed of training but not the initial function; the NTK is
    unchanged, because :math:`f(x;\\theta_0)` does not depend on :math:`\\theta`. Chizat et al. (2019);
    introduced in chapter 3 (:doc:`/chapters/03_lazy_training`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _check_model(model)
        self.module = model
        self._names = [name for name, p in model.named_parameters() if p.requires_grad]
        for i, name in enumerate(self._names):
            self.register_buffer(f"theta0_{i}", _parameter(model, name).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`f(x;\\theta) - f(x;\\theta_0)` for a batch ``x``, shaped like ``model(x)``."""
        theta0 = {name: getattr(self, f"theta0_{i}") for i, name in enumerate(self._names)}

        def difference(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                initial = functional_call(self.module, theta0, (x,))
            return self.module(x) - initial

        return _apply(difference, x, self.theta0_0)


class Scaled(nn.Module):
    """:math:`\\alpha\\, f(x;\\theta)`: the output of ``model`` (shared, not copied) times ``alpha``.

    The NTK scales by :math:`\\alpha^2`; train it with ``train(..., alpha=alpha)`` so that the loss is
    divided by :math:`\\alpha^2` and the function moves at an :math:`\\alpha`-independent speed while
    the parameters move :math:`\\alpha` times less (Chizat et al. 2019). Introduced in chapter 3
    (:doc:`/chapters/03_lazy_training`).
    """

    def __init__(self, model: nn.Module, alpha: float) -> None:
        super().__init__()
        _check_model(model)
        self.module = model
        self.alpha = positive_float("alpha", alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`\\alpha f(x;\\theta)` for a batch ``x``, shaped like ``model(x)``."""
        return self.alpha * self.module(x)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"


def linearize(model: nn.Module) -> Linearized:
    """The linearisation of ``model`` around its current parameters, a trainable copy (see :class:`Linearized`).

    ``model`` itself is neither modified nor shared. Introduced in chapter 3 (:doc:`/chapters/03_lazy_training`).
    """
    return Linearized(model)


def centered(model: nn.Module) -> Centered:
    """``model`` minus its output at the current parameters (see :class:`Centered`); shares ``model``'s parameters.

    Introduced in chapter 3 (:doc:`/chapters/03_lazy_training`).
    """
    return Centered(model)


def scaled(model: nn.Module, alpha: float) -> Scaled:
    """``alpha`` times ``model`` (see :class:`Scaled`); shares ``model``'s parameters.

    Introduced in chapter 3 (:doc:`/chapters/03_lazy_training`).
    """
    return Scaled(model, alpha)


@dataclass
class NTKPrediction:
    """Outputs of the linearised model predicted by :func:`ntk_predict`.

    - ``train``: outputs on the training inputs, shape ``(n,)`` for an int ``steps`` or ``(len(steps), n)``.
    - ``test``: outputs on the test inputs, ``(m,)`` or ``(len(steps), m)``; ``None`` without test inputs.

    Introduced in chapter 3 (:doc:`/chapters/03_lazy_training`).
    """

    train: torch.Tensor
    test: torch.Tensor | None


def _check_kernel(
    name: str, value: object, columns: int | None = None, reference: torch.Tensor | None = None
) -> torch.Tensor:
    """A finite floating-point matrix: symmetric ``(n, n)`` when ``columns`` is None, else ``(m, columns)``
    with the dtype and device of ``reference``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if columns is None:
        if value.ndim != 2 or value.shape[0] != value.shape[1] or value.shape[0] == 0:
            raise ValueError(f"{name} must be a square (n, n) matrix, got shape {tuple(value.shape)}")
    elif value.ndim != 2 or value.shape[1] != columns:
        raise ValueError(f"{name} must be a (m, {columns}) matrix Θ(x_test, x_train), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if reference is not None and (value.dtype != reference.dtype or value.device != reference.device):
        raise TypeError(
            f"{name} must have the kernel's dtype and device ({reference.dtype}, {reference.device}), "
            f"got ({value.dtype}, {value.device})"
        )
    finite(name, value)
    if columns is None:
        # A computed NTK is symmetric to within rounding; a cross kernel is asymmetric at the scale of its entries.
        symmetric(
            name, value, "the symmetric NTK Θ(X, X) of the training inputs", "; pass Θ(x_test, x_train) as kernel_test"
        )
    return value


def _check_vector(name: str, value: object, length: int | None, reference: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if value.ndim != 1 or (length is not None and value.shape[0] != length):
        expected = "(n,)" if length is None else f"({length},) or ({length}, 1)"
        raise ValueError(f"{name} must have shape {expected} (one scalar output per input), got {tuple(value.shape)}")
    if value.dtype != reference.dtype or value.device != reference.device:
        raise TypeError(
            f"{name} must have the kernel's dtype and device ({reference.dtype}, {reference.device}), "
            f"got ({value.dtype}, {value.device})"
        )
    finite(name, value)
    return value.detach()


def ntk_predict(
    kernel: torch.Tensor,
    f0: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    steps: int | Sequence[int],
    alpha: float = 1.0,
    kernel_test: torch.Tensor | None = None,
    f0_test: torch.Tensor | None = None,
) -> NTKPrediction:
    """Closed-form outputs of the linearised model after ``steps`` steps of gradient descent (Lee et al. 2019).

    With :math:`\\Theta` = ``kernel`` ``(n, n)`` on the training inputs, :math:`\\gamma = 2\\,\\mathrm{lr}/(n\\alpha^2)`
    and residual :math:`r_0 = f_0 - y`, gradient descent on the loss of :func:`~ntkbook.training.train` gives exactly

    .. math::

        f_t(X) = y + (I - \\gamma\\Theta)^t r_0, \\qquad
        f_t(x_*) = f_0(x_*) - \\gamma\\, \\Theta(x_*, X) \\sum_{s<t} (I - \\gamma\\Theta)^s r_0,

    evaluated through the eigendecomposition of :math:`\\Theta`, so a singular kernel is fine (the
    sum is :math:`t` on its null space). The continuous-time formula of Lee et al. is the limit of
    small ``lr``; this discrete one matches :func:`~ntkbook.training.train` on :func:`linearize` up to rounding.

    Args:
        kernel: the empirical NTK ``(n, n)`` of the trained model on the training inputs, symmetric up to
            rounding (include ``alpha**2`` if the model is scaled).
        f0: initial outputs on the training inputs, ``(n,)`` or ``(n, 1)``.
        y: targets ``(n,)`` or ``(n, 1)``.
        lr: the learning rate given to :func:`~ntkbook.training.train`.
        steps: one step count ``t >= 0`` or a sequence of them.
        alpha: the ``alpha`` given to :func:`~ntkbook.training.train`.
        kernel_test: :math:`\\Theta(x_*, X)` of shape ``(m, n)``, for outputs on new inputs :math:`x_*`.
        f0_test: initial outputs on the new inputs, ``(m,)`` or ``(m, 1)``; required with ``kernel_test``.

    Returns:
        An :class:`NTKPrediction`; outputs are flat, ``(n,)``/``(m,)`` per step.

    Introduced in chapter 3 (:doc:`/chapters/03_lazy_training`).
    """
    kernel = _check_kernel("kernel", kernel)
    n = kernel.shape[0]
    f0 = _check_vector("f0", f0, n, kernel)
    y = _check_vector("y", y, n, kernel)
    lr = positive_float("lr", lr)
    alpha = positive_float("alpha", alpha)
    single = isinstance(steps, numbers.Integral) and not isinstance(steps, bool)
    step_list = [steps] if single else list(steps) if isinstance(steps, (list, tuple, range)) else None
    if (
        step_list is None
        or not step_list
        or any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0 for t in step_list)
    ):
        raise ValueError(f"steps must be an int >= 0 or a non-empty sequence of them, got {steps!r}")
    if (kernel_test is None) != (f0_test is None):
        raise ValueError("kernel_test and f0_test go together: pass both or neither")
    if kernel_test is not None:
        kernel_test = _check_kernel("kernel_test", kernel_test, columns=n, reference=kernel)
        f0_test = _check_vector("f0_test", f0_test, kernel_test.shape[0], kernel)

    gamma = 2.0 * lr / (n * alpha**2)
    eigenvalues, vectors = torch.linalg.eigh(kernel.detach())
    decay = 1.0 - gamma * eigenvalues
    if bool((decay.abs() > 1.0).any()):
        warnings.warn(
            f"lr={lr:g} exceeds the stable limit n*alpha**2/lambda_max = {n * alpha**2 / float(eigenvalues.max()):g}; "
            "gradient descent on the linearised model diverges",
            RuntimeWarning,
            stacklevel=2,
        )
    t = torch.tensor([int(step) for step in step_list], dtype=kernel.dtype, device=kernel.device)[:, None]
    residual0 = vectors.T @ (f0 - y)
    train_out = y + (decay**t * residual0) @ vectors.T
    test_out = None
    if kernel_test is not None:
        # sum_{s<t} (1 - g)^s = (1 - (1 - g)^t) / g, written with expm1/log1p so that it stays accurate
        # when g = gamma * lambda is tiny, and equal to t on the null space where g = 0.
        g = gamma * eigenvalues
        small = g.abs() < 0.5
        log_decay = torch.log1p(-torch.where(small, g, torch.zeros_like(g)))
        series = torch.where(small, -torch.expm1(t * log_decay), 1.0 - decay**t) / torch.where(g == 0, 1.0, g)
        series = torch.where(g == 0, t, series)
        test_out = f0_test - (gamma * series * residual0) @ (kernel_test.detach() @ vectors).T
    if single:
        return NTKPrediction(train_out[0], None if test_out is None else test_out[0])
    return NTKPrediction(train_out, test_out)


def critical_lr(kernel: torch.Tensor, *, alpha: float = 1.0) -> float:
    """The largest stable learning rate for the linearised model, :math:`n\\alpha^2/\\lambda_{\\max}(\\Theta)`.

    Gradient descent (:func:`~ntkbook.training.train` with the same ``alpha``) multiplies the residual's
    component along each eigenvector of ``kernel``, the symmetric NTK ``(n, n)`` on the training inputs,
    by :math:`1 - 2\\,\\mathrm{lr}\\,\\lambda/(n\\alpha^2)`, which exceeds 1 in magnitude when ``lr``
    passes this value. Introduced in chapter 3 (:doc:`/chapters/03_lazy_training`).
    """
    kernel = _check_kernel("kernel", kernel)
    alpha = positive_float("alpha", alpha)
    largest = float(torch.linalg.eigvalsh(kernel.detach()).max())
    if largest <= 0:
        raise ValueError("kernel has no positive eigenvalue, so every learning rate is stable")
    return kernel.shape[0] * alpha**2 / largest
