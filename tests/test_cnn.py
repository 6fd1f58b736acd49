"""ntkbook.cnn and ntkbook.cnn_kernels: the convolutional network and its exact infinite-width kernels.

Exact identities are checked in float64 to rounding; the statistical tests use fixed seeds and say
how often they would fail for a fresh one.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import ntkbook.cnn_kernels
from ntkbook import empirical_ntk
from ntkbook.cnn_kernels import cnn_nngp, cnn_ntk
from ntkbook.convolutional import NTKConv2d, cnn
from ntkbook.kernels import relu_nngp, relu_ntk
from ntkbook.plotting import loglog_slope

POOLINGS = ["gap", "flatten"]


def images(n: int, c: int, h: int, w: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def network(x: torch.Tensor, channels: int, depth: int, seed: int, **kwargs: object) -> torch.nn.Module:
    """A float64 ``cnn`` for images like ``x`` (``image_size`` passed when flattening)."""
    if kwargs.get("pooling") == "flatten":
        kwargs["image_size"] = tuple(x.shape[2:])
    net = cnn(x.shape[1], channels, depth, generator=torch.Generator().manual_seed(seed), **kwargs)
    return net.double()


# --- the model -------------------------------------------------------------------------------------


def test_conv_layer_scales_by_the_fan_in_including_padded_taps() -> None:
    layer = NTKConv2d(3, 5, 3, weight_std=1.7, bias_std=0.4, generator=torch.Generator().manual_seed(0)).double()
    assert layer.weight_scale == pytest.approx(1.7 / math.sqrt(3 * 9))
    x = images(2, 3, 4, 5, seed=1)
    expected = 1.7 / math.sqrt(27) * F.conv2d(x, layer.weight, padding=1) + 0.4 * layer.bias[:, None, None]
    torch.testing.assert_close(layer(x), expected, rtol=1e-14, atol=1e-14)
    # A corner pixel sees 4 of the 9 taps but is still divided by sqrt(27): the variance of a
    # bias-free pre-activation there is (4/9) sigma_w^2 |x|^2 / C, which cnn_nngp's box filter reproduces.
    assert layer(x).shape == (2, 5, 4, 5)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_network_shapes_and_layers(pooling: str) -> None:
    x = images(3, 2, 5, 6, seed=2)
    net = network(x, 7, 2, seed=0, pooling=pooling, outputs=4)
    assert net(x).shape == (3, 4)
    readout = net[-1]
    assert readout.in_features == (7 if pooling == "gap" else 7 * 5 * 6)
    assert [type(m).__name__ for m in net[:4]] == ["NTKConv2d", "ReLU", "NTKConv2d", "ReLU"]


def test_global_average_pooling_takes_any_image_size() -> None:
    net = cnn(1, 4, 1, generator=torch.Generator().manual_seed(0))
    assert net(torch.ones(2, 1, 3, 3)).shape == net(torch.ones(2, 1, 9, 4)).shape == (2, 1)


def test_standard_parameterization_is_pytorchs_and_reproducible() -> None:
    nets = [cnn(2, 6, 2, parameterization="standard", generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    conv = nets[0][0]
    assert isinstance(conv, torch.nn.Conv2d) and conv.padding == (1, 1)
    assert float(conv.weight.detach().abs().max()) <= 1 / math.sqrt(2 * 9)


# --- exact identities ------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize(("depth", "weight_std", "bias_std"), [(1, 1.0, 0.0), (2, 1.4, 0.5), (3, 0.8, 1.0)])
def test_one_pixel_images_and_one_by_one_filters_are_the_mlp(
    pooling: str, depth: int, weight_std: float, bias_std: float
) -> None:
    # A 1x1 filter on a 1x1 image is a dense layer on the c channels, so every recursion is the MLP's.
    x1, x2 = images(5, 4, 1, 1, seed=3), images(3, 4, 1, 1, seed=4)
    stds = {"weight_std": weight_std, "bias_std": bias_std}
    options = dict(kernel_size=1, pooling=pooling, **stds)
    flat1, flat2 = x1.flatten(1), x2.flatten(1)
    torch.testing.assert_close(
        cnn_ntk(x1, x2, depth, **options), relu_ntk(flat1, flat2, depth, **stds), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        cnn_nngp(x1, x2, depth, **options), relu_nngp(flat1, flat2, depth, **stds), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("depth", [1, 3])
def test_one_by_one_filters_average_the_mlp_kernel_over_pixel_pairs(depth: int) -> None:
    # With k = 1 every pixel pair runs its own MLP recursion on the two pixels' channel vectors;
    # global average pooling averages it over all pairs, flattening over same-pixel pairs.
    x1, x2 = images(3, 2, 3, 4, seed=5), images(2, 2, 3, 4, seed=6)
    pixels1, pixels2 = x1.flatten(2).transpose(1, 2), x2.flatten(2).transpose(1, 2)  # (n, hw, c)
    per_pair = relu_ntk(pixels1.reshape(-1, 2), pixels2.reshape(-1, 2), depth, bias_std=0.3).reshape(3, 12, 2, 12)
    gap = per_pair.mean(dim=(1, 3))
    flatten = per_pair.diagonal(dim1=1, dim2=3).mean(dim=-1)
    options = {"kernel_size": 1, "bias_std": 0.3}
    torch.testing.assert_close(cnn_ntk(x1, x2, depth, pooling="gap", **options), gap, rtol=1e-12, atol=0)
    torch.testing.assert_close(cnn_ntk(x1, x2, depth, pooling="flatten", **options), flatten, rtol=1e-12, atol=0)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_square_kernel_is_symmetric_psd_and_agrees_with_the_cross_kernel(pooling: str) -> None:
    x = images(7, 2, 4, 4, seed=7)
    square = cnn_ntk(x, x, 2, pooling=pooling, bias_std=0.2)
    assert torch.equal(square, square.T)
    assert float(torch.linalg.eigvalsh(square).min()) > -1e-12 * float(square.abs().max())
    # x2 = a copy of x takes the general path (no symmetry shortcut): same numbers up to rounding, which
    # kappa0's infinite slope at cosine 1 (an image with itself) amplifies to ~1e-8 relative (relu_ntk's docstring).
    torch.testing.assert_close(cnn_ntk(x, x.clone(), 2, pooling=pooling, bias_std=0.2), square, rtol=1e-8, atol=0)
    torch.testing.assert_close(
        cnn_ntk(x[:3], x[3:], 2, pooling=pooling, bias_std=0.2), square[:3, 3:], rtol=1e-13, atol=0
    )


@pytest.mark.parametrize("pooling", POOLINGS)
def test_blocks_do_not_change_the_kernel(pooling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x1, x2 = images(7, 2, 4, 4, seed=8), images(5, 2, 4, 4, seed=9)
    whole = (cnn_ntk(x1, x2, 2, pooling=pooling), cnn_ntk(x1, x1, 2, pooling=pooling))
    # 2**8 entries per block: one pair of 4x4 images with "gap" (256 entries), four with "flatten".
    monkeypatch.setattr(ntkbook.cnn_kernels, "_BLOCK_ENTRIES", 2**8)
    blocked = (cnn_ntk(x1, x2, 2, pooling=pooling), cnn_ntk(x1, x1, 2, pooling=pooling))
    # Rounding only, amplified on the diagonal of the square kernel as above.
    torch.testing.assert_close(whole[0], blocked[0], rtol=1e-13, atol=0)
    torch.testing.assert_close(whole[1], blocked[1], rtol=1e-8, atol=0)


def test_bias_free_kernels_are_homogeneous_of_degree_two_and_zero_images_get_zero() -> None:
    x = images(4, 3, 5, 5, seed=10)
    # The NTK's same-image entries carry kappa0's amplified rounding (~1e-8 relative, relu_ntk's docstring).
    for kernel, rtol in ((cnn_ntk, 1e-8), (cnn_nngp, 1e-12)):
        torch.testing.assert_close(kernel(2.5 * x, x, 2), 2.5 * kernel(x, x, 2), rtol=rtol, atol=0)
        torch.testing.assert_close(kernel(2.5 * x, 2.5 * x, 2), 6.25 * kernel(x, x, 2), rtol=rtol, atol=0)
    zero = torch.cat([x[:1], torch.zeros_like(x[:1])])
    assert torch.equal(cnn_ntk(zero, zero, 2)[1], torch.zeros(2, dtype=torch.float64))


def test_float32_in_float32_out() -> None:
    x = images(3, 1, 4, 4, seed=11)
    k32 = cnn_ntk(x.float(), x.float(), 2)
    assert k32.dtype == torch.float32
    # kappa0's infinite slope at cosine 1 turns float32 rounding (1e-7) into ~1e-4 relative (relu_ntk's docstring).
    torch.testing.assert_close(k32.double(), cnn_ntk(x, x, 2), rtol=1e-3, atol=0)


# --- against finite networks -----------------------------------------------------------------------


@pytest.mark.parametrize(("pooling", "stds"), [("gap", {}), ("flatten", {"weight_std": 1.3, "bias_std": 0.4})])
def test_one_conv_layer_kernels_are_the_mean_over_networks(pooling: str, stds: dict[str, float]) -> None:
    # One conv layer: the empirical NTK and f(x) f(x') are averages over i.i.d. channels (E[v^2] = 1),
    # so their means over networks equal the limits at EVERY width. 4x4 images with 3x3 filters put
    # 12 of 16 pixels on the border, where a wrong padding convention (fan-in without the padded taps)
    # would be off by up to 9/4. 5 standard errors over 150 networks: a false alarm below 1e-5 per entry.
    x = images(4, 2, 4, 4, seed=12)
    kernels, products = [], []
    for seed in range(150):
        net = network(x, 8, 1, seed, pooling=pooling, **stds)
        # The comparison with the limit is the check here; autograd verification would triple the cost.
        kernels.append(empirical_ntk(net, x, verify=False))
        out = net(x).detach()[:, 0]
        products.append(out[:, None] * out[None, :])
    for samples, exact in [(kernels, cnn_ntk), (products, cnn_nngp)]:
        samples = torch.stack(samples)
        standard_error = samples.std(dim=0) / math.sqrt(samples.shape[0])
        gap = samples.mean(dim=0) - exact(x, x, 1, pooling=pooling, **stds)
        assert (gap.abs() <= 5 * standard_error).all(), (exact.__name__, gap / standard_error)


def test_deep_networks_converge_at_rate_one_over_sqrt_channels() -> None:
    x = images(5, 1, 5, 5, seed=13)
    exact = cnn_ntk(x, x, 2, bias_std=0.3)
    channels = [16, 64, 256]
    errors = []
    for width in channels:
        per_seed = [
            float(torch.linalg.norm(empirical_ntk(network(x, width, 2, seed, bias_std=0.3), x) - exact))
            / float(torch.linalg.norm(exact))
            for seed in range(6)
        ]
        errors.append(sum(per_seed) / len(per_seed))
    slope = loglog_slope(channels, errors)
    # Fluctuations of an average over channels give -1/2 (the O(1/m) bias is smaller at these widths);
    # six seeds leave ~10% noise on each mean, which over a factor 16 moves the slope by < 0.15.
    assert abs(slope + 0.5) < 0.15, (slope, errors)
    assert errors[-1] < 0.15, errors
