"""The workloads of the side-by-side benchmark (``python -m ntkbook.benchmark --peers ...``).

Each workload is one seeded float32 PyTorch model and its inputs, the same weights for every library:

- ``mlp256``, ``mlp1024``, ``mlp4096``: :func:`ntkbook.models.mlp` ``20 -> w -> w -> 1`` (NTK
  parameterisation, ReLU, no biases), ``n = 256`` Gaussian inputs.
- ``mlp512x10-full``, ``mlp512x10-trace``: the same with ``w = 512`` and 10 outputs, ``n = 128``, the full
  ``(n, n, 10, 10)`` kernel and its trace over outputs ``(n, n)``.
- ``cnn``: :func:`ntkbook.convolutional.cnn` in PyTorch's standard parameterisation, ``3 x 16 x 16 ->``
  two ``nn.Conv2d(32, 3 x 3, 'same')`` with biases and ReLU ``->`` flatten ``->`` ``nn.Linear(8192, 10)``
  (the CNN of ``ntkbook.benchmark_cnn``); trace over the 10 outputs, ``n = 64`` Gaussian images.
- ``transformer``: ``nn.Embedding(100, 64)`` ``->`` ``nn.TransformerEncoderLayer(d_model=64, nhead=4,
  dim_feedforward=2048, dropout=0, batch_first=True)`` (post-norm, ReLU: PyTorch's defaults) ``->`` mean
  over the 16 tokens ``->`` ``nn.Linear(64, 1)``; ``n = 64`` sequences of token ids.

The peer libraries recognise layers by class (``nn.Linear``), not ntkbook's :class:`~ntkbook.models.NTKLinear`,
so each MLP also has a *twin* for them: ``x -> s x -> nn.Linear(bias=False)`` sharing the very same weight
tensor. Its Jacobian equals the original's entry by entry, because :math:`z = s\\,W a` is
:math:`W (s a)` and :math:`\\partial z / \\partial W = g\\,(s a)^\\top` either way; so is its kernel.
``small=True`` builds a tiny version of each for the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ntkbook.convolutional import cnn
from ntkbook.models import NTKLinear, mlp

VOCABULARY = 100  # token ids of the transformer workload are drawn from range(VOCABULARY)


@dataclass(frozen=True)
class Workload:
    """One row of the table: what it is called, which kernel it asks for, and how big it is."""

    key: str
    label: str
    family: str  # "mlp", "cnn" or "transformer": the builder and the JAX model
    mode: str  # ntkbook's mode: "full" or "trace"
    n: int
    width: int = 0
    outputs: int = 1


WORKLOADS = {
    w.key: w
    for w in (
        Workload("mlp256", "MLP 20-256-256-1, n=256", "mlp", "full", 256, 256),
        Workload("mlp1024", "MLP 20-1024-1024-1, n=256", "mlp", "full", 256, 1024),
        Workload("mlp4096", "MLP 20-4096-4096-1, n=256", "mlp", "full", 256, 4096),
        Workload("mlp512x10-full", "MLP 20-512-512-10, full, n=128", "mlp", "full", 128, 512, 10),
        Workload("mlp512x10-trace", "MLP 20-512-512-10, trace, n=128", "mlp", "trace", 128, 512, 10),
        Workload("cnn", "CNN 3x16x16, 2 conv(32), flatten, 10 out, trace, n=64", "cnn", "trace", 64, 32, 10),
        Workload(
            "transformer",
            "Embedding + encoder layer(64, 4 heads) + mean, 16 tokens, n=64",
            "transformer",
            "full",
            64,
            64,
        ),
    )
}


class Scale(nn.Module):
    """Multiplies its input by a constant ``factor`` (no parameters): the NTK scaling, outside ``nn.Linear``."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.factor * a


class MeanTokens(nn.Module):
    """``(n, s, d) -> (n, d)``: the mean over tokens."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a.mean(dim=1)


def _twin(model: nn.Sequential) -> nn.Sequential:
    """The MLP with each :class:`NTKLinear` as ``Scale(weight_scale)`` then ``nn.Linear`` on the same weight."""
    layers: list[nn.Module] = []
    for layer in model:
        if isinstance(layer, NTKLinear):
            if layer.bias is not None:
                raise ValueError("the twin is built for NTKLinear layers without bias (bias_std=0)")
            linear = nn.Linear(layer.in_features, layer.out_features, bias=False)
            linear.weight = layer.weight  # the same Parameter: one set of weights for every library
            layers += [Scale(layer.weight_scale), linear]
        else:
            layers.append(layer)
    return nn.Sequential(*layers)


def _transformer(d_model: int, heads: int, feedforward: int, vocabulary: int, gen: torch.Generator) -> nn.Module:
    model = nn.Sequential(
        nn.Embedding(vocabulary, d_model),
        nn.TransformerEncoderLayer(d_model, heads, feedforward, dropout=0.0, batch_first=True),
        MeanTokens(),
        nn.Linear(d_model, 1),
    )
    with torch.no_grad():  # PyTorch's initialisations draw from the global RNG: redraw every tensor seeded
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name == "0.weight":  # the embedding table
                p.copy_(noise)
            elif p.dim() == 2:  # dense weights, variance 1 / fan-in
                p.copy_(noise / p.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:  # biases
                p.copy_(0.1 * noise)
    return model.eval()


def build(workload: Workload, small: bool = False) -> tuple[nn.Module, torch.Tensor, nn.Module]:
    """``(model, x, peer_model)``: the seeded float32 model, its inputs, and the model the peers get
    (the MLP's twin, else the model itself)."""
    model_gen, data_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    n = 5 if small else workload.n
    if workload.family == "mlp":
        width = 16 if small else workload.width
        model = mlp(20, width, 2, workload.outputs, generator=model_gen)
        return model, torch.randn(n, 20, generator=data_gen), _twin(model)
    if workload.family == "cnn":
        channels, side = (4, 6) if small else (workload.width, 16)
        model = cnn(
            3,
            channels,
            2,
            workload.outputs,
            pooling="flatten",
            image_size=side,
            parameterization="standard",
            generator=model_gen,
        )
        return model, torch.randn(n, 3, side, side, generator=data_gen), model
    if workload.family == "transformer":
        d_model, heads, feedforward, tokens = (8, 2, 16, 5) if small else (workload.width, 4, 2048, 16)
        model = _transformer(d_model, heads, feedforward, VOCABULARY, model_gen)
        return model, torch.randint(VOCABULARY, (n, tokens), generator=data_gen), model
    raise ValueError(f"unknown workload family {workload.family!r}")


def jax_spec(workload: Workload, model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The arrays ``ntkbook/_nt_runner.py`` rebuilds the model from in JAX: ``family``, ``mode``, ``x``,
    every parameter under its PyTorch name (PyTorch's layouts), and the family's constants."""
    arrays = {f"param:{name}": p.detach().numpy() for name, p in model.named_parameters()}
    arrays.update(family=np.array(workload.family), mode=np.array(workload.mode), x=x.numpy())
    if workload.family == "mlp":
        scales = [layer.weight_scale for layer in model if isinstance(layer, NTKLinear)]
        arrays["scales"] = np.array(scales)
    elif workload.family == "transformer":
        encoder = model[1]
        arrays["heads"] = np.array(encoder.self_attn.num_heads)
        arrays["eps"] = np.array(encoder.norm1.eps)
    return arrays
