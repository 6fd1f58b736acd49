"""Robustness of ntkbook: kernel properties under random inputs (hypothesis), and bad input to every
public function refused with a ValueError or TypeError that names the argument.

The property tests are derandomised (the same examples every run) and small, so the file runs in
seconds. The NTK engine's own tests cover method agreement and chunking; here the kernels are checked
against their definitions: symmetric, positive semi-definite, and equal to a Monte Carlo average of
the definition with a standard error.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import pkgutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # figures for the plotting cases are never shown
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ntkbook
from ntkbook import (
    alignment,
    benchmark,
    benchmark_cnn,
    benchmark_large,
    blocked,
    cnn_kernels,
    convolutional,
    kernels,
    linearized,
    models,
    mup,
    ntk,
    plotting,
    predict,
    training,
)

PROPERTIES = settings(derandomize=True, max_examples=15, deadline=None, database=None)


# --- properties --------------------------------------------------------------------------------


@st.composite
def batches(draw: st.DrawFn, max_n: int = 6, max_d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 batches ``(n1, d)`` and ``(n2, d)`` from one seed; some rows scaled to zero or far out."""
    n1, n2 = draw(st.integers(1, max_n)), draw(st.integers(1, max_n))
    d = draw(st.integers(1, max_d))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(n1 + n2, d, generator=gen, dtype=torch.float64)
    scales = torch.tensor(
        draw(st.lists(st.sampled_from([0.0, 0.1, 1.0, 10.0]), min_size=n1 + n2, max_size=n1 + n2)), dtype=torch.float64
    )
    x = x * scales[:, None]
    return x[:n1], x[n1:]


stds = st.sampled_from([0.5, 1.0, 1.7])
bias_stds = st.sampled_from([0.0, 0.3, 1.0])
ANALYTIC = {
    "relu_nngp": lambda a, b, w, s: kernels.relu_nngp(a, b, 1, weight_std=w, bias_std=s),
    "relu_ntk": lambda a, b, w, s: kernels.relu_ntk(a, b, 1, weight_std=w, bias_std=s),
    "relu_ntk depth 3": lambda a, b, w, s: kernels.relu_ntk(a, b, 3, weight_std=w, bias_std=s),
    "hadamard_nngp": lambda a, b, w, s: kernels.hadamard_nngp(a, b, weight_std=w, bias_std=s),
    "hadamard_ntk": lambda a, b, w, s: kernels.hadamard_ntk(a, b, weight_std=w, bias_std=s),
}


def assert_psd(k: torch.Tensor, what: str) -> None:
    """Symmetric and positive semi-definite in float64: eigenvalues >= -1e-10 * the largest (rounding)."""
    scale = float(k.abs().max())
    assert float((k - k.T).abs().max()) <= 1e-12 * max(scale, 1e-300), f"{what} is not symmetric"
    eigenvalues = torch.linalg.eigvalsh(k)
    assert float(eigenvalues.min()) >= -1e-10 * max(float(eigenvalues.max()), 1e-300), (
        f"{what} is not PSD: eigenvalues {eigenvalues.tolist()}"
    )


@pytest.mark.parametrize("name", ANALYTIC)
@PROPERTIES
@given(pair=batches(), weight_std=stds, bias_std=bias_stds)
def test_analytic_kernels_are_symmetric_and_psd(name: str, pair, weight_std: float, bias_std: float) -> None:
    x1, x2 = pair
    kernel = ANALYTIC[name]
    x = torch.cat([x1, x2])
    assert_psd(kernel(x, x, weight_std, bias_std), name)
    # Swapping the arguments transposes the kernel (up to rounding in the recursion).
    cross, swapped = kernel(x1, x2, weight_std, bias_std), kernel(x2, x1, weight_std, bias_std)
    assert cross.shape == (x1.shape[0], x2.shape[0])
    torch.testing.assert_close(cross, swapped.T, rtol=1e-12, atol=1e-14)


@PROPERTIES
@given(pair=batches())
def test_arc_cosine_kernels_of_unit_vectors_are_psd_and_bounded(pair) -> None:
    x = torch.cat(pair)
    norms = x.norm(dim=1, keepdim=True)
    unit = x[norms[:, 0] > 0] / norms[norms[:, 0] > 0]
    if unit.shape[0] == 0:
        return
    cosines = unit @ unit.T
    for kappa in (kernels.kappa0, kernels.kappa1):
        k = kappa(cosines)
        assert float(k.min()) >= 0.0 and float(k.max()) <= 1.0 + 1e-12, f"{kappa.__name__} leaves [0, 1]"
        assert_psd(k, kappa.__name__)
        torch.testing.assert_close(k.diagonal(), torch.ones(len(k), dtype=k.dtype))


@st.composite
def small_networks(draw: st.DrawFn) -> tuple[torch.nn.Module, torch.Tensor]:
    """A random small float64 network of any of the book's kinds, and a batch for it."""
    d = draw(st.integers(1, 4))
    width = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["mlp", "two-layer", "hadamard"]))
    parameterization = draw(st.sampled_from(["ntk", "standard"]))
    options = {} if parameterization == "standard" else {"bias_std": draw(bias_stds), "weight_std": draw(stds)}
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        activation = draw(st.sampled_from(["relu", "tanh", "erf", "identity"]))
        net = models.mlp(
            d,
            width,
            draw(st.integers(1, 3)),
            parameterization=parameterization,
            activation=activation,
            generator=gen,
            **options,
        )
    elif kind == "two-layer":
        net = models.TwoLayerNet(d, width, 1, parameterization=parameterization, generator=gen, **options)
    else:
        net = models.HadamardNet(d, width, 1, parameterization=parameterization, generator=gen, **options)
    x = torch.randn(draw(st.integers(1, 7)), d, generator=gen, dtype=torch.float64)
    return net.double(), x


@PROPERTIES
@given(case=small_networks())
def test_empirical_ntk_is_symmetric_psd_with_the_gradient_norms_on_its_diagonal(case) -> None:
    net, x = case
    kernel = ntkbook.empirical_ntk(net, x)
    assert kernel.shape == (x.shape[0], x.shape[0]) and kernel.dtype == torch.float64
    assert_psd(kernel, "empirical_ntk")
    # The diagonal is |df(x_i)/dtheta|^2, from one backward pass per input, independent of the engine.
    norms = []
    for xi in x:
        grads = torch.autograd.grad(net(xi[None]).sum(), [p for p in net.parameters()], allow_unused=True)
        norms.append(sum(float((g**2).sum()) for g in grads if g is not None))
    torch.testing.assert_close(kernel.diagonal(), torch.tensor(norms, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def monte_carlo_one_layer(
    x1: torch.Tensor, x2: torch.Tensor, weight_std: float, bias_std: float, kind: str, samples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definitions, averaged over hidden units drawn at random: mean and standard error ``(n1, n2)``.

    One hidden unit of a width-m layer in the NTK parameterisation has pre-activation
    h(x) = s_w w.x / sqrt(d) + s_b b with w, b standard normal. Summed over m units and divided by m
    (the readout's 1/sqrt(m), squared), the NNGP and the NTK are averages over units of
      plain:    NNGP t = s_w^2 relu(h)relu(h') + s_b^2,
                NTK  t = NNGP t + s_w^2 K 1(h>0)1(h'>0),
      Hadamard: NNGP t = s_w^2 a a' + s_b^2 with a = relu(h1) relu(h2) (two independent units),
                NTK  t = NNGP t + s_w^2 K [relu(h2)relu(h2') 1(h1>0)1(h1'>0) + (1 <-> 2)],
    where K = s_w^2 x.x'/d + s_b^2 comes from the unit's own weights and bias, and E[v^2] = 1 for its
    readout weight. Their expectations are the infinite-width kernels.
    """
    gen = torch.Generator().manual_seed(seed)
    d = x1.shape[1]
    k = weight_std**2 * (x1 @ x2.T) / d + bias_std**2

    def unit() -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randn(samples, d, generator=gen, dtype=x1.dtype)
        b = torch.randn(samples, generator=gen, dtype=x1.dtype)
        return (
            weight_std * x1 @ w.T / math.sqrt(d) + bias_std * b,
            weight_std * x2 @ w.T / math.sqrt(d) + bias_std * b,
        )

    h1, h1p = unit()
    relu, on = torch.relu, lambda h: (h > 0).to(h.dtype)
    if kind.startswith("relu"):
        t = weight_std**2 * relu(h1)[:, None, :] * relu(h1p)[None, :, :] + bias_std**2
        if kind == "relu_ntk":
            t = t + weight_std**2 * k[:, :, None] * on(h1)[:, None, :] * on(h1p)[None, :, :]
    else:
        h2, h2p = unit()
        a, ap = relu(h1) * relu(h2), relu(h1p) * relu(h2p)
        t = weight_std**2 * a[:, None, :] * ap[None, :, :] + bias_std**2
        if kind == "hadamard_ntk":
            branch = (
                relu(h2)[:, None, :] * relu(h2p)[None, :, :] * on(h1)[:, None, :] * on(h1p)[None, :, :]
                + relu(h1)[:, None, :] * relu(h1p)[None, :, :] * on(h2)[:, None, :] * on(h2p)[None, :, :]
            )
            t = t + weight_std**2 * k[:, :, None] * branch
    return t.mean(dim=2), t.std(dim=2) / math.sqrt(samples)


@pytest.mark.parametrize("name", ["relu_nngp", "relu_ntk", "hadamard_nngp", "hadamard_ntk"])
@settings(derandomize=True, max_examples=8, deadline=None, database=None)
@given(pair=batches(max_n=4, max_d=4), weight_std=stds, bias_std=bias_stds, seed=st.integers(0, 2**31 - 1))
def test_analytic_kernels_equal_a_monte_carlo_average_of_their_definition(
    name: str, pair, weight_std: float, bias_std: float, seed: int
) -> None:
    x1, x2 = pair
    estimate, standard_error = monte_carlo_one_layer(x1, x2, weight_std, bias_std, name, 100_000, seed)
    exact = ANALYTIC[name](x1, x2, weight_std, bias_std)
    # 6 standard errors: with at most 16 entries per example, a false alarm has probability ~1e-8.
    # Plus rounding in the analytic kernel, relative to the entry's Cauchy-Schwarz scale
    # sqrt(K(x,x) K(x',x')): near cosines of +-1, kappa0(u) = 1 - arccos(u)/pi has an infinite slope,
    # so a rounding error of 1e-16 in u moves it by sqrt(2e-16)/pi ~ 5e-9; 1e-7 covers that. It also
    # covers entries whose samples are all equal (zero inputs without bias), where the error is 0.
    scale = torch.sqrt(
        ANALYTIC[name](x1, x1, weight_std, bias_std).diagonal()[:, None]
        * ANALYTIC[name](x2, x2, weight_std, bias_std).diagonal()[None, :]
    )
    gap = (estimate - exact).abs()
    assert bool((gap <= 6 * standard_error + 1e-7 * scale).all()), (
        f"{name}: analytic {exact.tolist()}\nMonte Carlo {estimate.tolist()} ± {standard_error.tolist()}"
    )


# --- bad input ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One call that must fail: ``call()`` raises ``error`` with ``argument`` in its message."""

    function: str
    case: str
    call: Callable[[], object]
    error: type[Exception]
    argument: str


def _net() -> torch.nn.Module:
    return models.mlp(3, 8, 1, generator=torch.Generator().manual_seed(0))


def _x(n: int = 4, d: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _with(value: float, n: int = 4, d: int = 3) -> torch.Tensor:
    x = _x(n, d)
    x[1, 1] = value
    return x


def _frozen() -> torch.nn.Module:
    net = _net()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


META = torch.device("meta")  # a device other than the model's, on any machine
NAN, INF = float("nan"), float("inf")


def _ntk_cases(name: str, f: Callable[..., object], **kw: object) -> list[Bad]:
    return [
        Bad(name, "model is not a Module", lambda: f("net", _x(), **kw), TypeError, "model"),
        Bad(name, "no trainable parameters", lambda: f(_frozen(), _x(), **kw), ValueError, "model"),
        Bad(name, "x1 is a list", lambda: f(_net(), [[0.0, 1.0, 2.0]], **kw), TypeError, "x1"),
        Bad(name, "x1 wrong trailing shape", lambda: f(_net(), _x(4, 5), **kw), ValueError, "x1"),
        # Integer inputs are accepted (token ids); a float model that cannot take them is named with x1.
        Bad(
            name,
            "x1 integer, model float",
            lambda: f(_net(), torch.ones(4, 3, dtype=torch.int64), **kw),
            ValueError,
            "x1",
        ),
        Bad(name, "x1 complex", lambda: f(_net(), torch.ones(4, 3, dtype=torch.complex64), **kw), TypeError, "x1"),
        Bad(name, "x1 sparse", lambda: f(_net(), _x().to_sparse(), **kw), TypeError, "x1"),
        Bad(name, "x2 of another rank", lambda: f(_net(), _x(), _x()[None], **kw), ValueError, "x2"),
        Bad(name, "chunk_size bool", lambda: f(_net(), _x(), chunk_size=True, **kw), TypeError, "chunk_size"),
        Bad(name, "x1 float64, model float32", lambda: f(_net(), _x(dtype=torch.float64), **kw), TypeError, "x1"),
        Bad(name, "x1 empty", lambda: f(_net(), _x(0), **kw), ValueError, "x1"),
        Bad(name, "x1 NaN", lambda: f(_net(), _with(NAN), **kw), ValueError, "x1"),
        Bad(name, "x1 inf", lambda: f(_net(), _with(INF), **kw), ValueError, "x1"),
        Bad(name, "x1 on another device", lambda: f(_net(), _x().to(META), **kw), ValueError, "x1"),
        Bad(name, "x2 wrong trailing shape", lambda: f(_net(), _x(), _x(2, 4), **kw), ValueError, "x2"),
        Bad(name, "x2 on another device", lambda: f(_net(), _x(), _x(2).to(META), **kw), ValueError, "x2"),
        Bad(name, "x2 -inf", lambda: f(_net(), _x(), _with(-INF, 2), **kw), ValueError, "x2"),
        Bad(name, "unknown mode", lambda: f(_net(), _x(), mode="diag", **kw), ValueError, "mode"),
        Bad(name, "chunk_size 0", lambda: f(_net(), _x(), chunk_size=0, **kw), ValueError, "chunk_size"),
        Bad(name, "chunk_size float", lambda: f(_net(), _x(), chunk_size=1.5, **kw), TypeError, "chunk_size"),
    ]


def _pair_cases(name: str, f: Callable[..., object]) -> list[Bad]:
    """Cases for the analytic kernels ``f(x1, x2)`` of batches ``(n, d)``."""
    return [
        Bad(name, "x1 is a list", lambda: f([[1.0, 2.0]], _x()), TypeError, "x1"),
        Bad(name, "x1 integer dtype", lambda: f(torch.ones(2, 3, dtype=torch.int64), _x()), TypeError, "x1"),
        Bad(name, "x1 one-dimensional", lambda: f(_x()[0], _x()), ValueError, "x1"),
        Bad(name, "x1 empty", lambda: f(_x(0), _x()), ValueError, "x1"),
        Bad(name, "x1 NaN", lambda: f(_with(NAN), _x()), ValueError, "x1"),
        Bad(name, "x2 inf", lambda: f(_x(), _with(INF)), ValueError, "x2"),
        Bad(name, "x2 other dimension", lambda: f(_x(), _x(2, 4)), ValueError, "x2"),
        Bad(name, "x2 other dtype", lambda: f(_x(), _x(dtype=torch.float64)), TypeError, "x2"),
        Bad(name, "x2 on another device", lambda: f(_x(), _x().to(META)), ValueError, "x2"),
        Bad(name, "x1 and x2 on the meta device", lambda: f(_x().to(META), _x().to(META)), ValueError, "x1"),
    ]


def _std_cases(name: str, f: Callable[..., object]) -> list[Bad]:
    return [
        Bad(name, "weight_std negative", lambda: f(_x(), _x(), weight_std=-1.0), ValueError, "weight_std"),
        Bad(name, "bias_std NaN", lambda: f(_x(), _x(), bias_std=NAN), ValueError, "bias_std"),
        Bad(name, "weight_std a string", lambda: f(_x(), _x(), weight_std="1"), TypeError, "weight_std"),
    ]


def _kappa_cases(name: str, f: Callable[..., object]) -> list[Bad]:
    return [
        Bad(name, "u is a list", lambda: f([0.5]), TypeError, "u"),
        Bad(name, "u integer dtype", lambda: f(torch.ones(3, dtype=torch.int64)), TypeError, "u"),
        Bad(name, "u NaN", lambda: f(torch.tensor([0.5, NAN])), ValueError, "u"),
        Bad(name, "u inf", lambda: f(torch.tensor([0.5, INF])), ValueError, "u"),
        Bad(name, "u 3, no cosine", lambda: f(torch.tensor([0.5, 3.0])), ValueError, "u"),
        Bad(name, "u -1.001 in float64", lambda: f(torch.tensor([-1.001], dtype=torch.float64)), ValueError, "u"),
        Bad(name, "u on the meta device", lambda: f(torch.zeros(3, device=META)), ValueError, "u"),
    ]


def _model_cases(name: str, f: Callable[..., object], first: str) -> list[Bad]:
    """Constructors ``f(input_dim, hidden_dim, ...)`` whose first argument is called ``first``."""
    return [
        Bad(name, f"{first} 0", lambda: f(0, 4), ValueError, first),
        Bad(name, f"{first} a float", lambda: f(2.0, 4), TypeError, first),
        Bad(name, "weight_std negative", lambda: f(2, 4, weight_std=-1.0), ValueError, "weight_std"),
        Bad(name, "bias_std inf", lambda: f(2, 4, bias_std=INF), ValueError, "bias_std"),
        Bad(name, "generator is a seed", lambda: f(2, 4, generator=0), TypeError, "generator"),
        Bad(
            name,
            "unknown parameterization",
            lambda: f(2, 4, parameterization="mean-field"),
            ValueError,
            "parameterization",
        ),
    ]


def _img(n: int = 3, c: int = 2, h: int = 4, w: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(3), dtype=dtype)


def _img_with(value: float, n: int = 3) -> torch.Tensor:
    x = _img(n)
    x[1, 0, 2, 2] = value
    return x


def _image_kernel_cases(name: str, f: Callable[..., object]) -> list[Bad]:
    """Cases for the convolutional kernels ``f(x1, x2, ...)`` of image batches ``(n, c, h, w)``."""
    return [
        Bad(name, "x1 is a list", lambda: f([[[[1.0]]]], _img()), TypeError, "x1"),
        Bad(name, "x1 integer dtype", lambda: f(torch.ones(2, 2, 4, 4, dtype=torch.int64), _img()), TypeError, "x1"),
        Bad(name, "x1 a batch of vectors", lambda: f(_x(), _img()), ValueError, "x1"),
        Bad(name, "x1 empty", lambda: f(_img(0), _img()), ValueError, "x1"),
        Bad(name, "x1 NaN", lambda: f(_img_with(NAN), _img()), ValueError, "x1"),
        Bad(name, "x2 inf", lambda: f(_img(), _img_with(INF)), ValueError, "x2"),
        Bad(name, "x2 other channels", lambda: f(_img(), _img(c=3)), ValueError, "x2"),
        Bad(name, "x2 other image size", lambda: f(_img(), _img(h=5)), ValueError, "x2"),
        Bad(name, "x2 other dtype", lambda: f(_img(), _img(dtype=torch.float64)), TypeError, "x2"),
        Bad(name, "x2 on another device", lambda: f(_img(), _img().to(META)), ValueError, "x2"),
        Bad(name, "x1 and x2 on the meta device", lambda: f(_img().to(META), _img().to(META)), ValueError, "x1"),
        Bad(name, "depth 0", lambda: f(_img(), _img(), 0), ValueError, "depth"),
        Bad(name, "kernel_size even", lambda: f(_img(), _img(), kernel_size=2), ValueError, "kernel_size"),
        Bad(name, "kernel_size a float", lambda: f(_img(), _img(), kernel_size=3.0), TypeError, "kernel_size"),
        Bad(name, "unknown pooling", lambda: f(_img(), _img(), pooling="max"), ValueError, "pooling"),
        Bad(name, "weight_std negative", lambda: f(_img(), _img(), weight_std=-1.0), ValueError, "weight_std"),
        Bad(name, "bias_std NaN", lambda: f(_img(), _img(), bias_std=NAN), ValueError, "bias_std"),
    ]


CNN_CASES: list[Bad] = [
    *_image_kernel_cases("cnn_kernels.cnn_ntk", cnn_kernels.cnn_ntk),
    *_image_kernel_cases("cnn_kernels.cnn_nngp", cnn_kernels.cnn_nngp),
    *_model_cases("convolutional.cnn", lambda a, b, **kw: convolutional.cnn(a, b, 2, **kw), "in_channels"),
    Bad("convolutional.cnn", "channels 0", lambda: convolutional.cnn(2, 0, 2), ValueError, "channels"),
    Bad("convolutional.cnn", "depth 0", lambda: convolutional.cnn(2, 4, 0), ValueError, "depth"),
    Bad("convolutional.cnn", "outputs 0", lambda: convolutional.cnn(2, 4, 1, 0), ValueError, "outputs"),
    Bad(
        "convolutional.cnn",
        "kernel_size even",
        lambda: convolutional.cnn(2, 4, 1, kernel_size=4),
        ValueError,
        "kernel_size",
    ),
    Bad(
        "convolutional.cnn", "unknown pooling", lambda: convolutional.cnn(2, 4, 1, pooling="max"), ValueError, "pooling"
    ),
    Bad(
        "convolutional.cnn",
        "flatten without image_size",
        lambda: convolutional.cnn(2, 4, 1, pooling="flatten"),
        ValueError,
        "image_size",
    ),
    Bad(
        "convolutional.cnn",
        "image_size with gap",
        lambda: convolutional.cnn(2, 4, 1, image_size=8),
        ValueError,
        "image_size",
    ),
    Bad(
        "convolutional.cnn",
        "image_size a float",
        lambda: convolutional.cnn(2, 4, 1, pooling="flatten", image_size=8.0),
        TypeError,
        "image_size",
    ),
    Bad(
        "convolutional.cnn",
        "image_size with a zero side",
        lambda: convolutional.cnn(2, 4, 1, pooling="flatten", image_size=(8, 0)),
        ValueError,
        "image_size",
    ),
    Bad(
        "convolutional.cnn",
        "standard with weight_std",
        lambda: convolutional.cnn(2, 4, 1, parameterization="standard", weight_std=2.0),
        ValueError,
        "weight_std",
    ),
    Bad("convolutional.NTKConv2d", "in_channels 0", lambda: convolutional.NTKConv2d(0, 4), ValueError, "in_channels"),
    Bad(
        "convolutional.NTKConv2d",
        "out_channels a float",
        lambda: convolutional.NTKConv2d(2, 4.0),
        TypeError,
        "out_channels",
    ),
    Bad(
        "convolutional.NTKConv2d",
        "kernel_size even",
        lambda: convolutional.NTKConv2d(2, 4, 2),
        ValueError,
        "kernel_size",
    ),
    Bad(
        "convolutional.NTKConv2d",
        "weight_std inf",
        lambda: convolutional.NTKConv2d(2, 4, weight_std=INF),
        ValueError,
        "weight_std",
    ),
    Bad(
        "convolutional.NTKConv2d",
        "generator is a seed",
        lambda: convolutional.NTKConv2d(2, 4, generator=0),
        TypeError,
        "generator",
    ),
]


def _axes() -> object:
    return plt.figure().add_subplot()


BAD_INPUT: list[Bad] = [
    *_ntk_cases("ntk.empirical_ntk", ntk.empirical_ntk),
    Bad(
        "ntk.empirical_ntk",
        "unknown method",
        lambda: ntk.empirical_ntk(_net(), _x(), method="fast"),
        ValueError,
        "method",
    ),
    *_ntk_cases("ntk.memory_estimate", ntk.memory_estimate, method="jacobian"),
    Bad(
        "ntk.memory_estimate",
        "method auto",
        lambda: ntk.memory_estimate(_net(), _x(), method="auto"),
        ValueError,
        "method",
    ),
    *_kappa_cases("kernels.kappa0", kernels.kappa0),
    *_kappa_cases("kernels.kappa1", kernels.kappa1),
    *_pair_cases("kernels.relu_nngp", kernels.relu_nngp),
    *_std_cases("kernels.relu_nngp", kernels.relu_nngp),
    Bad("kernels.relu_nngp", "depth 0", lambda: kernels.relu_nngp(_x(), _x(), 0), ValueError, "depth"),
    *_pair_cases("kernels.relu_ntk", kernels.relu_ntk),
    *_std_cases("kernels.relu_ntk", kernels.relu_ntk),
    Bad("kernels.relu_ntk", "depth a float", lambda: kernels.relu_ntk(_x(), _x(), 1.5), TypeError, "depth"),
    *_pair_cases("kernels.mc_relu_ntk", lambda a, b: kernels.mc_relu_ntk(a, b, 10)),
    Bad("kernels.mc_relu_ntk", "num_samples 1", lambda: kernels.mc_relu_ntk(_x(), _x(), 1), ValueError, "num_samples"),
    Bad(
        "kernels.mc_relu_ntk",
        "num_samples a float",
        lambda: kernels.mc_relu_ntk(_x(), _x(), 1e4),
        TypeError,
        "num_samples",
    ),
    Bad(
        "kernels.mc_relu_ntk",
        "generator is a seed",
        lambda: kernels.mc_relu_ntk(_x(), _x(), 10, generator=0),
        TypeError,
        "generator",
    ),
    *_pair_cases("kernels.hadamard_nngp", kernels.hadamard_nngp),
    *_std_cases("kernels.hadamard_nngp", kernels.hadamard_nngp),
    *_pair_cases("kernels.hadamard_ntk", kernels.hadamard_ntk),
    *_std_cases("kernels.hadamard_ntk", kernels.hadamard_ntk),
    *_model_cases(
        "models.NTKLinear",
        lambda a, b, parameterization="ntk", **kw: (
            models.NTKLinear(a, b, **kw)
            if parameterization == "ntk"
            else models.dense(a, b, parameterization=parameterization)
        ),
        "in_features",
    ),
    Bad("models.NTKLinear", "out_features -1", lambda: models.NTKLinear(2, -1), ValueError, "out_features"),
    *_model_cases("models.dense", models.dense, "in_features"),
    Bad(
        "models.dense",
        "standard with weight_std",
        lambda: models.dense(2, 3, parameterization="standard", weight_std=2.0),
        ValueError,
        "weight_std",
    ),
    Bad("models.dense", "mup without layer", lambda: models.dense(2, 3, parameterization="mup"), ValueError, "layer"),
    Bad("models.dense", "layer with ntk", lambda: models.dense(2, 3, layer="input"), ValueError, "layer"),
    Bad(
        "models.HadamardNet",
        "mup",
        lambda: models.HadamardNet(2, 3, parameterization="mup"),
        ValueError,
        "parameterization",
    ),
    Bad("mup.MuPLinear", "in_features 0", lambda: mup.MuPLinear(0, 4, layer="input"), ValueError, "in_features"),
    Bad(
        "mup.MuPLinear", "out_features a float", lambda: mup.MuPLinear(2, 4.0, layer="input"), TypeError, "out_features"
    ),
    Bad("mup.MuPLinear", "unknown layer", lambda: mup.MuPLinear(2, 4, layer="readout"), ValueError, "layer"),
    Bad("mup.MuPLinear", "layer missing", lambda: mup.MuPLinear(2, 4), TypeError, "layer"),
    Bad(
        "mup.MuPLinear",
        "weight_std negative",
        lambda: mup.MuPLinear(2, 4, layer="hidden", weight_std=-1.0),
        ValueError,
        "weight_std",
    ),
    Bad(
        "mup.MuPLinear",
        "bias_std NaN",
        lambda: mup.MuPLinear(2, 4, layer="output", bias_std=NAN),
        ValueError,
        "bias_std",
    ),
    Bad(
        "mup.MuPLinear",
        "generator is a seed",
        lambda: mup.MuPLinear(2, 4, layer="input", generator=0),
        TypeError,
        "generator",
    ),
    *_model_cases("models.TwoLayerNet", models.TwoLayerNet, "input_dim"),
    Bad("models.TwoLayerNet", "hidden_dim 0", lambda: models.TwoLayerNet(2, 0), ValueError, "hidden_dim"),
    *_model_cases("models.HadamardNet", models.HadamardNet, "input_dim"),
    Bad("models.HadamardNet", "output_dim 0", lambda: models.HadamardNet(2, 3, 0), ValueError, "output_dim"),
    *_model_cases("models.mlp", lambda a, b, **kw: models.mlp(a, b, 2, **kw), "input_dim"),
    Bad("models.mlp", "width 0", lambda: models.mlp(2, 0, 2), ValueError, "width"),
    Bad("models.mlp", "depth 0", lambda: models.mlp(2, 4, 0), ValueError, "depth"),
    Bad("models.mlp", "unknown activation", lambda: models.mlp(2, 4, 1, activation="gelu"), ValueError, "activation"),
    Bad(
        "plotting.plot_kernel",
        "kernel is a list",
        lambda: plotting.plot_kernel([[1.0]], ax=_axes()),
        TypeError,
        "kernel",
    ),
    Bad(
        "plotting.plot_kernel",
        "kernel one-dimensional",
        lambda: plotting.plot_kernel(torch.ones(3), ax=_axes()),
        ValueError,
        "kernel",
    ),
    Bad(
        "plotting.plot_kernel",
        "kernel empty",
        lambda: plotting.plot_kernel(torch.ones(0, 3), ax=_axes()),
        ValueError,
        "kernel",
    ),
    Bad(
        "plotting.plot_kernel",
        "kernel NaN",
        lambda: plotting.plot_kernel(torch.tensor([[1.0, NAN]]), ax=_axes()),
        ValueError,
        "kernel",
    ),
    Bad(
        "plotting.loglog_slope",
        "lengths differ",
        lambda: plotting.loglog_slope([1, 2, 3], [1, 2]),
        ValueError,
        "x and y",
    ),
    Bad("plotting.loglog_slope", "one point", lambda: plotting.loglog_slope([1], [1]), ValueError, "x and y"),
    Bad("plotting.loglog_slope", "a zero", lambda: plotting.loglog_slope([0, 1], [1, 2]), ValueError, "x and y"),
    Bad("plotting.loglog_slope", "NaN", lambda: plotting.loglog_slope([1, 2], [1, NAN]), ValueError, "x and y"),
    Bad("plotting.loglog_slope", "inf", lambda: plotting.loglog_slope([1, INF], [1, 2]), ValueError, "x and y"),
    Bad("plotting.loglog_slope", "strings", lambda: plotting.loglog_slope(["a", "b"], [1, 2]), TypeError, "x"),
    Bad(
        "plotting.add_reference_slope",
        "lengths differ",
        lambda: plotting.add_reference_slope(_axes(), [1, 2], [1], 1.0),
        ValueError,
        "x and y",
    ),
    Bad(
        "plotting.add_reference_slope",
        "negative x",
        lambda: plotting.add_reference_slope(_axes(), [-1, 2], [1, 2], 1.0),
        ValueError,
        "x and y",
    ),
    Bad(
        "plotting.add_reference_slope",
        "NaN slope",
        lambda: plotting.add_reference_slope(_axes(), [1, 2], [1, 2], NAN),
        ValueError,
        "slope",
    ),
    Bad(
        "plotting.add_reference_slope",
        "ax is not Axes",
        lambda: plotting.add_reference_slope(None, [1, 2], [1, 2], 1.0),
        TypeError,
        "ax",
    ),
]


def _y(n: int = 4) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(2))


def _train(**overrides: object) -> object:
    args = {"model": _net(), "x": _x(), "y": _y(), "steps": 2, "lr": 0.1, "progress": False} | overrides
    return training.train(**args)


def _gram() -> torch.Tensor:
    x = _x(4, 3, torch.float64)
    return x @ x.T + torch.eye(4, dtype=torch.float64)


def _cross() -> torch.Tensor:
    """Θ(x_test, x_train) for as many test as training inputs: square, but not symmetric."""
    return _x(4, 3, torch.float64) @ (_x(4, 3, torch.float64) + 1.0).T


def _predict(**overrides: object) -> object:
    args = {"kernel": _gram(), "f0": _y().double(), "y": _y().double(), "lr": 0.1, "steps": 3} | overrides
    return linearized.ntk_predict(**args)


def _wrapper_cases(name: str, f: Callable[[object], object]) -> list[Bad]:
    return [
        Bad(name, "model is not a Module", lambda: f("net"), TypeError, "model"),
        Bad(name, "no trainable parameters", lambda: f(_frozen()), ValueError, "model"),
    ]


def _forward_cases(name: str, wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> list[Bad]:
    """Bad ``x`` in a call of the wrapped model, which runs the model inside torch.func."""
    return [
        Bad(name, "called on x of the wrong trailing shape", lambda: wrap(_net())(_x(4, 5)), ValueError, "x"),
        Bad(name, "called on x float64, model float32", lambda: wrap(_net())(_x(dtype=torch.float64)), TypeError, "x"),
        Bad(
            name,
            "called on integer x, model float",
            lambda: wrap(_net())(torch.ones(4, 3, dtype=torch.int64)),
            ValueError,
            "x",
        ),
        Bad(name, "called on a list", lambda: wrap(_net())([[0.0, 1.0, 2.0]]), TypeError, "x"),
        Bad(name, "called on x on another device", lambda: wrap(_net())(_x().to(META)), ValueError, "x"),
    ]


TRAINING_CASES: list[Bad] = [
    Bad("training.train", "model is not a Module", lambda: _train(model=lambda x: x), TypeError, "model"),
    Bad("training.train", "no trainable parameters", lambda: _train(model=_frozen()), ValueError, "model"),
    # Integer inputs are accepted (token ids), as by empirical_ntk; a float model that cannot take them is named with x.
    Bad(
        "training.train",
        "x integer, model float",
        lambda: _train(x=torch.ones(4, 3, dtype=torch.int64)),
        ValueError,
        "x",
    ),
    Bad("training.train", "x empty", lambda: _train(x=_x(0), y=_y(0)), ValueError, "x"),
    Bad("training.train", "x NaN", lambda: _train(x=_with(NAN)), ValueError, "x"),
    Bad("training.train", "x on another device", lambda: _train(x=_x().to(META)), ValueError, "x"),
    Bad("training.train", "y wrong length", lambda: _train(y=_y(3)), ValueError, "y"),
    Bad("training.train", "y inf", lambda: _train(y=torch.tensor([1.0, INF, 0.0, 0.0])), ValueError, "y"),
    Bad("training.train", "y float64", lambda: _train(y=_y().double()), TypeError, "y"),
    Bad("training.train", "steps 0", lambda: _train(steps=0), ValueError, "steps"),
    Bad("training.train", "steps a float", lambda: _train(steps=2.0), TypeError, "steps"),
    Bad("training.train", "lr negative", lambda: _train(lr=-0.1), ValueError, "lr"),
    Bad("training.train", "lr NaN", lambda: _train(lr=NAN), ValueError, "lr"),
    Bad("training.train", "alpha 0", lambda: _train(alpha=0.0), ValueError, "alpha"),
    Bad("training.train", "ntk_every 0", lambda: _train(ntk_every=0), ValueError, "ntk_every"),
    Bad("training.train", "callback not callable", lambda: _train(callback=3), TypeError, "callback"),
    Bad(
        "training.train",
        "callback_steps without callback",
        lambda: _train(callback_steps=[0]),
        ValueError,
        "callback_steps",
    ),
    Bad(
        "training.train",
        "callback_steps beyond steps",
        lambda: _train(callback=lambda m, t: t, callback_steps=[0, 3]),
        ValueError,
        "callback_steps",
    ),
    Bad(
        "training.train",
        "callback_steps negative",
        lambda: _train(callback=lambda m, t: t, callback_steps=[-1]),
        ValueError,
        "callback_steps",
    ),
    Bad(
        "training.train",
        "callback_steps of floats",
        lambda: _train(callback=lambda m, t: t, callback_steps=[0.5]),
        TypeError,
        "callback_steps",
    ),
    Bad(
        "training.train",
        "callback_steps an int",
        lambda: _train(callback=lambda m, t: t, callback_steps=2),
        TypeError,
        "callback_steps",
    ),
    Bad(
        "training.train",
        "callback_steps empty",
        lambda: _train(callback=lambda m, t: t, callback_steps=[]),
        ValueError,
        "callback_steps",
    ),
    *_wrapper_cases("linearized.linearize", linearized.linearize),
    *_wrapper_cases("linearized.Linearized", linearized.Linearized),
    *_forward_cases("linearized.linearize", linearized.linearize),
    *_wrapper_cases("linearized.centered", linearized.centered),
    *_wrapper_cases("linearized.Centered", linearized.Centered),
    *_forward_cases("linearized.centered", linearized.centered),
    *_wrapper_cases("linearized.scaled", lambda m: linearized.scaled(m, 2.0)),
    Bad("linearized.scaled", "alpha 0", lambda: linearized.scaled(_net(), 0.0), ValueError, "alpha"),
    Bad("linearized.scaled", "alpha inf", lambda: linearized.scaled(_net(), INF), ValueError, "alpha"),
    *_wrapper_cases("linearized.Scaled", lambda m: linearized.Scaled(m, 2.0)),
    Bad("linearized.Scaled", "alpha a string", lambda: linearized.Scaled(_net(), "2"), TypeError, "alpha"),
    Bad("linearized.ntk_predict", "kernel not square", lambda: _predict(kernel=_gram()[:3]), ValueError, "kernel"),
    Bad("linearized.ntk_predict", "kernel a list", lambda: _predict(kernel=[[1.0]]), TypeError, "kernel"),
    Bad(
        "linearized.ntk_predict",
        "kernel empty",
        lambda: _predict(kernel=torch.ones(0, 0, dtype=torch.float64), f0=_y(0).double(), y=_y(0).double()),
        ValueError,
        "kernel",
    ),
    Bad("linearized.ntk_predict", "f0 wrong length", lambda: _predict(f0=_y(3).double()), ValueError, "f0"),
    Bad("linearized.ntk_predict", "f0 float32", lambda: _predict(f0=_y()), TypeError, "f0"),
    Bad("linearized.ntk_predict", "y on another device", lambda: _predict(y=_y().double().to(META)), TypeError, "y"),
    Bad("linearized.ntk_predict", "lr 0", lambda: _predict(lr=0.0), ValueError, "lr"),
    Bad("linearized.ntk_predict", "steps negative", lambda: _predict(steps=-1), ValueError, "steps"),
    Bad(
        "linearized.ntk_predict",
        "kernel_test without f0_test",
        lambda: _predict(kernel_test=_gram()),
        ValueError,
        "f0_test",
    ),
    Bad(
        "linearized.ntk_predict",
        "kernel_test wrong width",
        lambda: _predict(kernel_test=_gram()[:, :3], f0_test=_y().double()),
        ValueError,
        "kernel_test",
    ),
    Bad(
        "linearized.critical_lr", "kernel not square", lambda: linearized.critical_lr(_gram()[:3]), ValueError, "kernel"
    ),
    Bad(
        "linearized.critical_lr",
        "alpha negative",
        lambda: linearized.critical_lr(_gram(), alpha=-1.0),
        ValueError,
        "alpha",
    ),
    Bad("training.train", "x wrong trailing shape", lambda: _train(x=_x(4, 5)), ValueError, "x"),
    Bad(
        "linearized.ntk_predict",
        "kernel NaN",
        lambda: _predict(kernel=_gram().fill_diagonal_(NAN)),
        ValueError,
        "kernel",
    ),
    Bad(
        "linearized.ntk_predict",
        "y inf",
        lambda: _predict(y=torch.tensor([1.0, INF, 0.0, 0.0], dtype=torch.float64)),
        ValueError,
        "y",
    ),
    Bad("linearized.ntk_predict", "kernel not symmetric", lambda: _predict(kernel=_cross()), ValueError, "kernel"),
    Bad(
        "linearized.ntk_predict",
        "kernel on the meta device",
        lambda: _predict(kernel=_gram().to(META)),
        ValueError,
        "kernel",
    ),
    Bad(
        "linearized.critical_lr", "kernel not symmetric", lambda: linearized.critical_lr(_cross()), ValueError, "kernel"
    ),
    Bad(
        "linearized.critical_lr",
        "kernel on the meta device",
        lambda: linearized.critical_lr(_gram().to(META)),
        ValueError,
        "kernel",
    ),
    Bad("linearized.critical_lr", "kernel a list", lambda: linearized.critical_lr([[1.0]]), TypeError, "kernel"),
    Bad(
        "linearized.critical_lr",
        "kernel NaN",
        lambda: linearized.critical_lr(_gram().fill_diagonal_(NAN)),
        ValueError,
        "kernel",
    ),
]


def _posterior(**overrides: object) -> object:
    args = {
        "nngp_train": _gram(),
        "nngp_test_train": _gram()[:3],
        "y_train": _y().double(),
        "nngp_test": _gram()[:3, :3],
    } | overrides
    return predict.nngp_predict(**args)


def _ensemble(**overrides: object) -> object:
    args = {
        "ntk_train": _gram(),
        "ntk_test_train": _gram()[:3],
        "y_train": _y().double(),
        "nngp_train": _gram(),
        "nngp_test_train": _gram()[:3],
        "nngp_test": _gram()[:3, :3],
    } | overrides
    return predict.ntk_gp_predict(**args)


def _not_psd() -> torch.Tensor:
    """Symmetric, with one eigenvalue -0.5 and the others positive."""
    return _gram() - (float(torch.linalg.eigvalsh(_gram())[0]) + 0.5) * torch.eye(4, dtype=torch.float64)


PREDICT_CASES: list[Bad] = [
    Bad("predict.nngp_predict", "nngp_train a list", lambda: _posterior(nngp_train=[[1.0]]), TypeError, "nngp_train"),
    Bad(
        "predict.nngp_predict",
        "nngp_train not square",
        lambda: _posterior(nngp_train=_gram()[:3]),
        ValueError,
        "nngp_train",
    ),
    Bad(
        "predict.nngp_predict",
        "nngp_train not symmetric",
        lambda: _posterior(nngp_train=_cross()),
        ValueError,
        "nngp_train",
    ),
    Bad(
        "predict.nngp_predict",
        "nngp_train not PSD",
        lambda: _posterior(nngp_train=_not_psd()),
        ValueError,
        "nngp_train",
    ),
    Bad(
        "predict.nngp_predict",
        "nngp_train singular",
        lambda: _posterior(nngp_train=torch.ones(4, 4, dtype=torch.float64)),
        ValueError,
        "diag_reg",
    ),
    Bad(
        "predict.nngp_predict",
        "nngp_train NaN",
        lambda: _posterior(nngp_train=_gram().fill_diagonal_(NAN)),
        ValueError,
        "nngp_train",
    ),
    Bad(
        "predict.nngp_predict",
        "nngp_test_train wrong width",
        lambda: _posterior(nngp_test_train=_gram()[:3, :2]),
        ValueError,
        "nngp_test_train",
    ),
    Bad(
        "predict.nngp_predict",
        "nngp_test_train float32",
        lambda: _posterior(nngp_test_train=_gram()[:3].float()),
        TypeError,
        "nngp_test_train",
    ),
    Bad(
        "predict.nngp_predict",
        "y_train wrong length",
        lambda: _posterior(y_train=_y(3).double()),
        ValueError,
        "y_train",
    ),
    Bad("predict.nngp_predict", "y_train 3-d", lambda: _posterior(y_train=_gram()[:, :, None]), ValueError, "y_train"),
    Bad(
        "predict.nngp_predict",
        "y_train inf",
        lambda: _posterior(y_train=torch.tensor([1.0, INF, 0.0, 0.0], dtype=torch.float64)),
        ValueError,
        "y_train",
    ),
    Bad("predict.nngp_predict", "y_train an array", lambda: _posterior(y_train=np.zeros(4)), TypeError, "y_train"),
    Bad("predict.nngp_predict", "nngp_test wrong size", lambda: _posterior(nngp_test=_gram()), ValueError, "nngp_test"),
    Bad("predict.nngp_predict", "diag_reg negative", lambda: _posterior(diag_reg=-0.1), ValueError, "diag_reg"),
    Bad("predict.nngp_predict", "diag_reg a string", lambda: _posterior(diag_reg="0.1"), TypeError, "diag_reg"),
    Bad(
        "predict.ntk_gp_predict",
        "ntk_train not symmetric",
        lambda: _ensemble(ntk_train=_cross()),
        ValueError,
        "ntk_train",
    ),
    Bad(
        "predict.ntk_gp_predict", "ntk_train not PSD", lambda: _ensemble(ntk_train=_not_psd()), ValueError, "ntk_train"
    ),
    Bad(
        "predict.ntk_gp_predict",
        "ntk_train singular at t = None",
        lambda: _ensemble(ntk_train=torch.ones(4, 4, dtype=torch.float64)),
        ValueError,
        "diag_reg",
    ),
    Bad(
        "predict.ntk_gp_predict",
        "ntk_train on the meta device",
        lambda: _ensemble(ntk_train=_gram().to(META)),
        ValueError,
        "ntk_train",
    ),
    Bad(
        "predict.ntk_gp_predict",
        "ntk_test_train wrong width",
        lambda: _ensemble(ntk_test_train=_gram()[:3, :2]),
        ValueError,
        "ntk_test_train",
    ),
    Bad("predict.ntk_gp_predict", "y_train float32", lambda: _ensemble(y_train=_y()), TypeError, "y_train"),
    Bad(
        "predict.ntk_gp_predict",
        "only two NNGP blocks",
        lambda: _ensemble(nngp_test=None),
        ValueError,
        "nngp_test",
    ),
    Bad(
        "predict.ntk_gp_predict",
        "nngp_train of another size",
        lambda: _ensemble(nngp_train=_gram()[:3, :3]),
        ValueError,
        "nngp_train",
    ),
    Bad(
        "predict.ntk_gp_predict",
        "nngp_test_train of another test count",
        lambda: _ensemble(nngp_test_train=_gram()[:2]),
        ValueError,
        "nngp_test_train",
    ),
    Bad(
        "predict.ntk_gp_predict",
        "nngp_test not symmetric",
        lambda: _ensemble(nngp_test=_cross()[:3, :3]),
        ValueError,
        "nngp_test",
    ),
    Bad("predict.ntk_gp_predict", "t negative", lambda: _ensemble(t=-1.0), ValueError, "t must"),
    Bad("predict.ntk_gp_predict", "t infinite", lambda: _ensemble(t=INF), ValueError, "t must"),
    Bad("predict.ntk_gp_predict", "t a string", lambda: _ensemble(t="10"), TypeError, "t must"),
    Bad("predict.ntk_gp_predict", "learning_rate 0", lambda: _ensemble(learning_rate=0.0), ValueError, "learning_rate"),
    Bad("predict.ntk_gp_predict", "diag_reg NaN", lambda: _ensemble(diag_reg=NAN), ValueError, "diag_reg"),
]


ALIGNMENT_CASES: list[Bad] = [
    Bad(
        "alignment.kernel_alignment",
        "kernel a list",
        lambda: alignment.kernel_alignment([[1.0]], _y()),
        TypeError,
        "kernel",
    ),
    Bad(
        "alignment.kernel_alignment",
        "kernel not square",
        lambda: alignment.kernel_alignment(_gram()[:3], _y().double()),
        ValueError,
        "kernel",
    ),
    Bad(
        "alignment.kernel_alignment",
        "kernel 1 x 1",
        lambda: alignment.kernel_alignment(_gram()[:1, :1], _y(1).double()),
        ValueError,
        "kernel",
    ),
    Bad(
        "alignment.kernel_alignment",
        "kernel integer",
        lambda: alignment.kernel_alignment(torch.eye(4, dtype=torch.int64), _y().double()),
        TypeError,
        "kernel",
    ),
    Bad(
        "alignment.kernel_alignment",
        "kernel NaN",
        lambda: alignment.kernel_alignment(_gram().fill_diagonal_(NAN), _y().double()),
        ValueError,
        "kernel",
    ),
    Bad(
        "alignment.kernel_alignment",
        "kernel not symmetric",
        lambda: alignment.kernel_alignment(_cross(), _y().double()),
        ValueError,
        "kernel",
    ),
    Bad(
        "alignment.kernel_alignment",
        "kernel constant",
        lambda: alignment.kernel_alignment(torch.ones(4, 4, dtype=torch.float64), _y().double()),
        ValueError,
        "kernel",
    ),
    Bad(
        "alignment.kernel_alignment",
        "kernel on the meta device",
        lambda: alignment.kernel_alignment(_gram().to(META), _y().double().to(META)),
        ValueError,
        "kernel",
    ),
    Bad(
        "alignment.kernel_alignment", "y a list", lambda: alignment.kernel_alignment(_gram(), [1.0] * 4), TypeError, "y"
    ),
    Bad(
        "alignment.kernel_alignment",
        "y wrong length",
        lambda: alignment.kernel_alignment(_gram(), _y(3).double()),
        ValueError,
        "y",
    ),
    Bad(
        "alignment.kernel_alignment",
        "y three-dimensional",
        lambda: alignment.kernel_alignment(_gram(), _y().double().reshape(4, 1, 1)),
        ValueError,
        "y",
    ),
    Bad("alignment.kernel_alignment", "y float32", lambda: alignment.kernel_alignment(_gram(), _y()), TypeError, "y"),
    Bad(
        "alignment.kernel_alignment",
        "y inf",
        lambda: alignment.kernel_alignment(_gram(), torch.tensor([1.0, INF, 0.0, 0.0], dtype=torch.float64)),
        ValueError,
        "y",
    ),
    Bad(
        "alignment.kernel_alignment",
        "y constant",
        lambda: alignment.kernel_alignment(_gram(), torch.ones(4, dtype=torch.float64)),
        ValueError,
        "y",
    ),
]

BENCHMARK_CASES: list[Bad] = [
    Bad(
        "benchmark.build_case", "width 0", lambda: benchmark.build_case(0, 4, torch.device("cpu")), ValueError, "width"
    ),
    Bad("benchmark.build_case", "n 0", lambda: benchmark.build_case(8, 0, torch.device("cpu")), ValueError, "n"),
    Bad(
        "benchmark.run_case",
        "unknown method",
        lambda: benchmark.run_case("fast", 8, 4, torch.device("cpu"), 1),
        ValueError,
        "method",
    ),
    Bad(
        "benchmark.run_case",
        "repeats 0",
        lambda: benchmark.run_case("jacobian", 8, 4, torch.device("cpu"), 0),
        ValueError,
        "repeats",
    ),
    Bad(
        "benchmark.benchmark",
        "unknown method",
        lambda: benchmark.benchmark([8], 4, ["fast"], "cpu", 1),
        ValueError,
        "method",
    ),
    Bad(
        "benchmark.benchmark",
        "no widths",
        lambda: benchmark.benchmark([], 4, ["jacobian"], "cpu", 1),
        ValueError,
        "widths",
    ),
    Bad(
        "benchmark.format_table",
        "rows not a list of rows",
        lambda: benchmark.format_table([{"width": 8}]),
        ValueError,
        "rows",
    ),
]


def _relu_blocks(x1: object = None, x2: object = None, **kw: object) -> object:
    """``blocked_kernel`` of the depth-1 ReLU NTK, on the standard batch unless told otherwise."""
    kernel_fn = kw.pop("kernel_fn", lambda a, b: kernels.relu_ntk(a, b, 1))
    return blocked.blocked_kernel(kernel_fn, _x() if x1 is None else x1, x2, progress=False, **kw)


BLOCKED_CASES: list[Bad] = [
    Bad(
        "blocked.blocked_kernel",
        "kernel_fn not callable",
        lambda: _relu_blocks(kernel_fn="relu"),
        TypeError,
        "kernel_fn",
    ),
    Bad("blocked.blocked_kernel", "x1 a list", lambda: _relu_blocks([[0.0, 1.0, 2.0]]), TypeError, "x1"),
    Bad("blocked.blocked_kernel", "x1 empty", lambda: _relu_blocks(_x(0)), ValueError, "x1"),
    Bad("blocked.blocked_kernel", "x1 a scalar", lambda: _relu_blocks(torch.tensor(1.0)), ValueError, "x1"),
    Bad("blocked.blocked_kernel", "x1 on the meta device", lambda: _relu_blocks(_x().to(META)), ValueError, "x1"),
    Bad("blocked.blocked_kernel", "x2 a numpy array", lambda: _relu_blocks(x2=np.ones((2, 3))), TypeError, "x2"),
    Bad("blocked.blocked_kernel", "x2 empty", lambda: _relu_blocks(x2=_x(0)), ValueError, "x2"),
    Bad("blocked.blocked_kernel", "block_size 0", lambda: _relu_blocks(block_size=0), ValueError, "block_size"),
    Bad("blocked.blocked_kernel", "block_size float", lambda: _relu_blocks(block_size=2.0), TypeError, "block_size"),
    Bad(
        "blocked.blocked_kernel",
        "progress 1",
        lambda: blocked.blocked_kernel(kernels.relu_ntk, _x(), progress=1),
        TypeError,
        "progress",
    ),
    Bad("blocked.blocked_kernel", "device an int", lambda: _relu_blocks(device=0), TypeError, "device"),
    Bad("blocked.blocked_kernel", "path an int", lambda: _relu_blocks(path=3), TypeError, "path"),
    Bad("blocked.blocked_kernel", "path not .npy", lambda: _relu_blocks(path="kernel.bin"), ValueError, "path"),
    Bad(
        "blocked.blocked_kernel",
        "path in no folder",
        lambda: _relu_blocks(path="/no/such/folder/k.npy"),
        ValueError,
        "path",
    ),
    Bad(
        "blocked.blocked_kernel",
        "kernel_fn returns a list",
        lambda: _relu_blocks(kernel_fn=lambda a, b: [[0.0]]),
        ValueError,
        "kernel_fn",
    ),
    Bad(
        "blocked.blocked_kernel",
        "kernel_fn returns the wrong shape",
        lambda: _relu_blocks(kernel_fn=lambda a, b: (a @ b.T)[:, :1]),
        ValueError,
        "kernel_fn",
    ),
    Bad(
        "blocked.blocked_kernel",
        "kernel_fn returns bfloat16 to a file",
        lambda: _relu_blocks(kernel_fn=lambda a, b: (a @ b.T).bfloat16(), path=_fresh_npy()),
        TypeError,
        "kernel_fn",
    ),
]


def _fresh_npy() -> str:
    """A path for a file that does not exist; the cases that use it are refused before creating it."""
    return os.path.join(tempfile.gettempdir(), f"ntkbook-refused-{os.getpid()}.npy")


LARGE_CASES: list[Bad] = [
    Bad("benchmark_large.run_large", "n 0", lambda: benchmark_large.run_large(0), ValueError, "n"),
    Bad(
        "benchmark_large.run_large",
        "block_size > n",
        lambda: benchmark_large.run_large(8, 4, 9),
        ValueError,
        "block_size",
    ),
    Bad(
        "benchmark_large.run_large",
        "repeats 0.5",
        lambda: benchmark_large.run_large(8, 4, 4, repeats=0.5),
        TypeError,
        "repeats",
    ),
    Bad(
        "benchmark_large.run_large",
        "no such folder",
        lambda: benchmark_large.run_large(8, 4, 4, "/no/such"),
        ValueError,
        "folder",
    ),
    Bad(
        "benchmark_large.format_large",
        "row of another table",
        lambda: benchmark_large.format_large({"n": 8}),
        ValueError,
        "row",
    ),
]


BENCHMARK_CNN_CASES: list[Bad] = [
    Bad("benchmark_cnn.cnn_case", "n 0", lambda: benchmark_cnn.cnn_case(0), ValueError, "n"),
    Bad("benchmark_cnn.floor_flops", "n 2.5", lambda: benchmark_cnn.floor_flops(2.5), TypeError, "n"),
    Bad("benchmark_cnn.run_cnn", "repeats 0", lambda: benchmark_cnn.run_cnn(2, 0), ValueError, "repeats"),
    Bad("benchmark_cnn.run_cnn", "implicit 'yes'", lambda: benchmark_cnn.run_cnn(2, 1, "yes"), TypeError, "implicit"),
    Bad(
        "benchmark_cnn.format_cnn",
        "row of another table",
        lambda: benchmark_cnn.format_cnn([{"n": 8}]),
        ValueError,
        "rows",
    ),
]


# Public callables with nothing to refuse: no arguments, or a command line (argparse reports its own errors).
NO_ARGUMENTS = {"ntkbook.default_device", "plotting.set_style", "benchmark.main", "blocked.local_device"}
# Result containers that ntkbook's own functions fill in (train, ntk_predict, nngp_predict), never built by readers.
NOT_CALLED_BY_USERS = {"training.History", "linearized.NTKPrediction", "predict.GaussianPrediction"}
BAD_INPUT += (
    TRAINING_CASES
    + PREDICT_CASES
    + ALIGNMENT_CASES
    + BENCHMARK_CASES
    + BLOCKED_CASES
    + LARGE_CASES
    + CNN_CASES
    + BENCHMARK_CNN_CASES
)


def public_callables() -> set[str]:
    names = {"ntkbook.default_device"}
    for info in pkgutil.iter_modules(ntkbook.__path__):
        if info.name.startswith("_"):  # private modules (ntkbook._checks) serve the public ones
            continue
        module = importlib.import_module(f"ntkbook.{info.name}")
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj) or (inspect.isclass(obj) and not issubclass(obj, BaseException)):
                names.add(f"{info.name}.{name}")
    return names


def test_integral_numbers_are_accepted_where_an_int_is_wanted() -> None:
    i = np.int64
    layer = models.NTKLinear(i(3), i(2))
    assert (layer.in_features, layer.out_features) == (3, 2) and type(layer.in_features) is int
    assert models.dense(i(3), i(2), parameterization="standard").in_features == 3
    for net in (
        models.TwoLayerNet(i(3), i(4), i(1)),
        models.HadamardNet(i(3), i(4), i(1)),
        models.mlp(i(3), i(4), i(2), i(1)),
    ):
        assert net(_x()).shape == (4, 1)
    torch.testing.assert_close(kernels.relu_ntk(_x(), _x(), i(2)), kernels.relu_ntk(_x(), _x(), 2))
    assert kernels.mc_relu_ntk(_x(), _x(), i(10))[0].shape == (4, 4)
    history = _train(steps=i(2), ntk_every=i(1))
    assert history.loss.shape == (3,) and sorted(history.ntk) == [0, 1, 2]
    assert _predict(steps=i(3)).train.shape == (4,) and _predict(steps=[i(1), i(2)]).train.shape == (2, 4)
    _, x = benchmark.build_case(i(8), i(4), torch.device("cpu"))
    assert x.shape == (4, benchmark.INPUT_DIM)


@pytest.mark.parametrize("bad", BAD_INPUT, ids=lambda b: f"{b.function}: {b.case}")
def test_bad_input_is_refused_naming_the_argument(bad: Bad) -> None:
    try:
        with pytest.raises(bad.error) as raised:
            bad.call()
    finally:
        plt.close("all")
    assert bad.argument in str(raised.value), f"the message does not name {bad.argument!r}: {raised.value}"


def test_every_public_function_has_bad_input_cases() -> None:
    covered = {bad.function for bad in BAD_INPUT} | NO_ARGUMENTS | NOT_CALLED_BY_USERS
    missing = sorted(public_callables() - covered)
    assert not missing, f"add bad-input cases to BAD_INPUT for {missing}"
