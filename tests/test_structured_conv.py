"""The convolution rule of method="structured" against an independent oracle: float64 per-input
gradients from ``torch.autograd.grad``, one input and one output at a time, in a plain loop."""

from __future__ import annotations

import pytest
import torch
from autograd_oracle import in_mode, oracle
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from ntkbook import empirical_ntk
from ntkbook.convolutional import NTKConv2d, cnn
from ntkbook.ntk import MODES
from ntkbook.ntk.features import DenseFactors
from ntkbook.ntk.structured import layers, rules, structured_features
from ntkbook.ntk.structured.conv import ConvFeature, choose_patch_gram, patch_gram, weight_gram

# float64 sums the same products in another order: ~1e-16 of the kernel's scale per entry.
RTOL = 1e-10
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def relative_error(kernel: torch.Tensor, reference: torch.Tensor) -> float:
    return float((kernel - reference).abs().max() / reference.abs().max().clamp_min(1e-300))


@st.composite
def conv_layers(draw: st.DrawFn, dims: int, channels: int) -> nn.Module:
    """A random convolution on ``channels`` input channels: any groups (depthwise included), kernel,
    stride, padding (int, tuple, 'same', 'valid'), dilation, padding mode, with or without bias."""
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0] + [channels]))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = 1 if padding == "same" else tuple(draw(st.integers(1, 2)) for _ in range(dims))
    if padding == "int":
        padding = draw(st.integers(0, 2))
    elif padding == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    return CONVS[dims](
        channels,
        out_channels,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=padding_mode,
    )


@st.composite
def conv_nets(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """One or two random convolutions (sometimes an NTKConv2d), tanh, flatten, a dense readout with
    1 to 3 outputs; a frozen weight or bias now and then; a second batch or not."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    channels = draw(st.integers(1, 4))
    blocks: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 2))):
        if dims == 2 and draw(st.integers(0, 3)) == 0:
            bias_std = draw(st.sampled_from([0.0, 0.5]))
            conv = NTKConv2d(channels, draw(st.integers(1, 3)), draw(st.sampled_from([1, 3])), bias_std=bias_std)
        else:
            conv = draw(conv_layers(dims, channels))
        blocks += [conv, nn.Tanh()]
        channels = conv.out_channels
    model = nn.Sequential(*blocks, nn.Flatten(), nn.LazyLinear(draw(st.integers(1, 3)))).double()
    size = (draw(st.integers(5, 7)),) * dims
    x1 = torch.randn(draw(st.integers(1, 5)), blocks[0].in_channels, *size, generator=gen, dtype=torch.float64)
    x2 = torch.randn(draw(st.integers(1, 4)), *x1.shape[1:], generator=gen, dtype=torch.float64)
    with torch.no_grad():
        try:
            model(x1)  # sizes the readout
        except RuntimeError:  # padding larger than the input, or an empty output: not a network
            assume(False)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / p[0].numel() ** 0.5)
    frozen = draw(st.sampled_from(["none", "none", "weight", "bias"]))
    if frozen != "none" and getattr(blocks[0], frozen) is not None:
        getattr(blocks[0], frozen).requires_grad_(False)
    return model, x1, x2 if draw(st.booleans()) else None


@pytest.fixture
def default_rule_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the modules that fell back to the default rule during the test."""
    calls: list[str] = []
    original = rules.default_rule

    def counted(module: nn.Module, name: str, args: tuple, g: torch.Tensor):
        calls.append(name)
        return original(module, name, args, g)

    monkeypatch.setattr(rules, "default_rule", counted)
    return calls


@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=conv_nets(), mode=st.sampled_from(MODES), chunk_size=st.sampled_from([None, 1, 2]))
def test_conv_rule_matches_the_autograd_oracle(case, mode: str, chunk_size: int | None) -> None:
    model, x1, x2 = case
    reference = in_mode(oracle(model, x1, x2), mode)
    kernel = empirical_ntk(model, x1, x2, method="structured", mode=mode, chunk_size=chunk_size, verify=False)
    assert kernel.shape == reference.shape
    assert relative_error(kernel, reference) < RTOL, (mode, chunk_size)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=conv_nets())
def test_every_convolution_gets_the_conv_rule(case) -> None:
    model, x1, _ = case
    with torch.enable_grad():
        features = structured_features(model, layers(model), "x1", x1)
    for module, name in layers(model).items():
        expected = DenseFactors if isinstance(module, nn.Linear) else ConvFeature
        assert isinstance(features[name], expected), (name, type(features[name]).__name__)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(case=conv_nets(), mode=st.sampled_from(MODES))
def test_both_routes_equal_the_oracle(case, mode: str) -> None:
    """Each route alone on the first convolution's weight, every other parameter frozen."""
    model, x1, x2 = case
    for p in model.parameters():
        p.requires_grad_(p is model[0].weight)
    mode = mode if model[-1].out_features > 1 else "trace"  # one output: every mode is the (n1, n2) matrix
    reference = in_mode(oracle(model, x1, x2), mode)
    with torch.enable_grad():
        f1 = structured_features(model, layers(model), "x1", x1)["0"]
        f2 = f1 if x2 is None else structured_features(model, layers(model), "x2", x2)["0"]
    for route in (weight_gram, patch_gram):
        kernel = route(f1, f2, mode) * f1.geo.s**2
        assert relative_error(kernel, reference) < RTOL, route.__name__


def test_as_gradients_equals_the_default_rule() -> None:
    """The explicit gradients, used to pair with a batch on which the layer fell back, match the
    default rule's entry for entry: same order (weight, then bias) and same scale."""
    gen = torch.Generator().manual_seed(3)
    for conv in (nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, groups=2), NTKConv2d(3, 5, 3, bias_std=0.7)):
        model = nn.Sequential(conv.double(), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2).double())
        x = torch.randn(3, conv.in_channels, 6, 6, generator=gen, dtype=torch.float64)
        model(x)
        with torch.enable_grad():
            feature = structured_features(model, layers(model), "x1", x)["0"]
        g = torch.randn(3, 2, *conv(x).shape[1:], generator=gen, dtype=torch.float64)
        ours = rules.RULES[type(conv)](conv, "0", (x,), g).as_gradients().J
        default = rules.default_rule(conv, "0", (x,), g).J
        assert isinstance(feature, ConvFeature)
        assert relative_error(ours, default) < RTOL


def test_the_cost_model_picks_patch_grams_for_small_outputs_and_gradients_for_large_ones() -> None:
    gen = torch.Generator().manual_seed(4)
    small = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Tanh(), nn.Flatten(), nn.Linear(16, 10)).double()
    large = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 256, 10)).double()
    for model, size, patch_expected in ((small, 3, True), (large, 16, False)):
        x = torch.randn(4, model[0].in_channels, size, size, generator=gen, dtype=torch.float64)
        with torch.enable_grad():
            feature = structured_features(model, layers(model), "x1", x)["0"]
        assert choose_patch_gram(feature, feature, "trace") is patch_expected
        kernel = empirical_ntk(model, x, method="structured", mode="trace")
        assert relative_error(kernel, in_mode(oracle(model, x, None), "trace")) < RTOL


def test_the_book_cnn_and_the_verified_default_use_the_rule(default_rule_calls: list[str]) -> None:
    gen = torch.Generator().manual_seed(5)
    for parameterization in ("ntk", "standard"):
        model = cnn(2, 4, 2, 3, pooling="flatten", image_size=5, bias_std=0.0, parameterization=parameterization)
        model = model.double()
        x1 = torch.randn(4, 2, 5, 5, generator=gen, dtype=torch.float64)
        x2 = torch.randn(3, 2, 5, 5, generator=gen, dtype=torch.float64)
        for mode in MODES:
            kernel = empirical_ntk(model, x1, x2, method="structured", mode=mode)
            assert relative_error(kernel, in_mode(oracle(model, x1, x2), mode)) < RTOL
    assert default_rule_calls == []


def test_a_changed_forward_falls_back_to_the_default_rule(default_rule_calls: list[str]) -> None:
    """A subclass (its forward may differ) or a forward hook: the rule does not claim to know the
    layer, and the default rule gives the same exact kernel."""

    class Shifted(nn.Conv1d):
        def forward(self, a: torch.Tensor) -> torch.Tensor:
            return super().forward(a) + 1.0

    gen = torch.Generator().manual_seed(6)
    hooked = nn.Conv1d(2, 3, 3)
    hooked.register_forward_hook(lambda m, a, z: 2.0 * z)
    for conv in (Shifted(2, 3, 3), hooked):
        model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
        x = torch.randn(3, 2, 6, generator=gen, dtype=torch.float64)
        model(x)
        kernel = empirical_ntk(model, x, method="structured", mode="full")
        assert relative_error(kernel, in_mode(oracle(model, x, None), "full")) < RTOL
    assert default_rule_calls == ["0", "0"]


@pytest.mark.parametrize("padding", [(1, 1), "same", "valid"])
def test_padding_changed_after_construction_is_the_one_used(padding) -> None:
    """``nn.Conv2d`` with zero padding pads by its live ``padding``, not the amounts cached when it was built."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 2, stride=1 if padding == "same" else 3)
    conv.padding = padding
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model(x)  # materialises the lazy readout
    for mode in MODES:
        kernel = empirical_ntk(model, x, method="structured", mode=mode, verify=False)
        reference = in_mode(oracle(model, x, None), mode)
        assert float((kernel - reference).norm() / reference.norm()) < 1e-10, mode
