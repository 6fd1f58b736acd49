"""ntkbook.ntk's four methods agree with the loop, in every mode, chunked or not; structure errors are clear."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from ntkbook import HadamardNet, TwoLayerNet, empirical_ntk, mlp
from ntkbook.benchmark import format_table, run_case
from ntkbook.ntk import METHODS, MODES, NotStructuredError, VerificationError, memory_estimate

FAST = ("jacobian", "implicit", "structured", "auto")
# float64 sums the same products in another order: ~1e-16 per entry, far below 1e-10. float32: ~1e-7.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def relative_error(kernel: torch.Tensor, reference: torch.Tensor) -> float:
    return float((kernel - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


@st.composite
def architectures(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """A random network from ntkbook's families, random inputs, and sometimes a frozen parameter."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["mlp", "two-layer", "hadamard"]))
    d, width, k = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    kwargs: dict[str, object] = {"generator": gen}
    if draw(st.booleans()):
        kwargs["parameterization"] = "standard"
    else:
        kwargs.update(weight_std=draw(st.sampled_from([0.5, 1.0, 1.5])), bias_std=draw(st.sampled_from([0.0, 0.3])))
    if kind == "mlp":
        activation = draw(st.sampled_from(["relu", "tanh", "erf"]))
        model = mlp(d, width, draw(st.integers(1, 3)), k, activation=activation, **kwargs)
    else:
        model = (TwoLayerNet if kind == "two-layer" else HadamardNet)(d, width, k, **kwargs)
    params = list(model.parameters())
    if len(params) > 1 and draw(st.booleans()):
        params[draw(st.integers(0, len(params) - 1))].requires_grad_(False)
    x1 = torch.randn(draw(st.integers(1, 6)), d, generator=gen)
    x2 = torch.randn(draw(st.integers(1, 5)), d, generator=gen) if draw(st.booleans()) else None
    return model, x1, x2


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    case=architectures(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    mode=st.sampled_from(MODES),
    chunk_size=st.sampled_from([None, 1, 2, 4]),
)
def test_every_method_matches_the_loop(case, dtype: torch.dtype, mode: str, chunk_size: int | None) -> None:
    model, x1, x2 = case
    model = model.to(dtype)
    x1 = x1.to(dtype)
    x2 = None if x2 is None else x2.to(dtype)
    reference = empirical_ntk(model, x1, x2, method="loop", mode=mode)
    for method in FAST:
        kernel = empirical_ntk(model, x1, x2, method=method, mode=mode, chunk_size=chunk_size)
        assert kernel.shape == reference.shape and kernel.dtype == dtype
        assert relative_error(kernel, reference) < TOLERANCE[dtype], (method, mode, chunk_size)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(case=architectures(), mode=st.sampled_from(MODES), chunk_size=st.integers(1, 5))
def test_chunked_equals_unchunked(case, mode: str, chunk_size: int) -> None:
    model, x1, x2 = case
    model, x1 = model.double(), x1.double()
    x2 = None if x2 is None else x2.double()
    for method in ("loop", "jacobian", "implicit", "structured"):
        whole = empirical_ntk(model, x1, x2, method=method, mode=mode)
        chunked = empirical_ntk(model, x1, x2, method=method, mode=mode, chunk_size=chunk_size)
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)


def test_modes_have_the_documented_shapes_and_relations() -> None:
    gen = torch.Generator().manual_seed(0)
    model = mlp(3, 5, 2, 4, bias_std=0.2, generator=gen).double()
    x1 = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    x2 = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    full = empirical_ntk(model, x1, x2, mode="full")
    trace = empirical_ntk(model, x1, x2, mode="trace")
    diagonal = empirical_ntk(model, x1, x2, mode="diagonal")
    assert full.shape == (6, 2, 4, 4) and trace.shape == (6, 2) and diagonal.shape == (6, 2, 4)
    torch.testing.assert_close(diagonal, torch.diagonal(full, dim1=2, dim2=3), rtol=1e-12, atol=1e-12)
    # "trace" is the sum over outputs, not neural-tangents' mean.
    torch.testing.assert_close(trace, torch.einsum("ijaa->ij", full), rtol=1e-12, atol=1e-12)
    single = mlp(3, 5, 2, 1, generator=gen)
    for mode in MODES:
        assert empirical_ntk(single, x1.float(), mode=mode).shape == (6, 6)


def test_symmetric_kernel_of_a_large_batch_matches_the_cross_kernel() -> None:
    # n >= 64 takes the path that computes a quarter of the symmetric kernel as a transpose.
    gen = torch.Generator().manual_seed(3)
    model = mlp(4, 6, 2, 2, bias_std=0.1, generator=gen).double()
    x = torch.randn(70, 4, generator=gen, dtype=torch.float64)
    for method in ("jacobian", "structured"):
        torch.testing.assert_close(
            empirical_ntk(model, x, method=method),
            empirical_ntk(model, x, x.clone(), method=method),
            rtol=1e-12,
            atol=1e-12,
        )


class SmallCNN(nn.Module):
    """Two convolutions, BatchNorm and a dense readout to 10 outputs; the flatten size is computed."""

    def __init__(self, side: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 3, side, side)).shape[1]
        self.readout = nn.Linear(flat, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.norm(self.conv1(x))))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.features(x))


def test_cnn_with_batchnorm_in_eval_mode_agrees_across_methods() -> None:
    torch.manual_seed(0)  # nn.Conv2d draws its initial weights from the global generator
    model = SmallCNN().double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.norm.running_mean.normal_(generator=gen)
        model.norm.running_var.uniform_(0.5, 2.0, generator=gen)
    x1 = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    x2 = torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    reference = empirical_ntk(model, x1, x2, method="loop")
    assert reference.shape == (4, 3, 10, 10)
    for method in FAST:
        assert relative_error(empirical_ntk(model, x1, x2, method=method), reference) < 1e-10, method


def test_batchnorm_in_training_mode_is_refused() -> None:
    model = SmallCNN().train()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for method in METHODS:
        with pytest.raises(ValueError, match=r"'norm' \(BatchNorm2d\) normalises with batch statistics.*model.eval"):
            empirical_ntk(model, x, method=method)


class Shared(nn.Module):
    """The same layer applied twice: the factorisation per layer does not hold."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.out = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class Tied(nn.Module):
    """The readout reuses the first layer's weight outside that layer's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.embed(x)) @ self.embed.weight[:, :1]


class TiedModules(nn.Module):
    """Two layers hold the same weight tensor: each layer's share misses the cross terms."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.second = nn.Linear(3, 3)
        self.second.weight = self.first.weight
        self.out = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.second(torch.tanh(self.first(x)))))


class RowsAcrossInputs(nn.Module):
    """A layer applied to each input's three coordinates as three rows: 3n rows for n inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(1, 2)
        self.out = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return self.out(torch.tanh(self.inner(x.reshape(3 * n, 1))).reshape(n, 6))


class ConstantInput(nn.Module):
    """A layer applied to a constant, its one output row shared by every input."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.shift = nn.Linear(1, 3)
        self.out = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inner(x) + self.shift(x.new_ones(1, 1))))


class PositionTable(nn.Module):
    """Five positions per input, embedded by a table of five rows: for a batch of five inputs the
    table's first dimension equals the batch size by coincidence."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(5, 3)
        self.out = nn.Linear(15, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.pos(torch.arange(5, device=x.device))
        return self.out(torch.tanh(x[:, None, :] + table[None]).flatten(1))


class KeywordCall(nn.Module):
    """A layer called with a keyword argument, which forward hooks do not see as an input."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.out = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inner(input=x)))


class RootTiedHead(nn.Module):
    """A language-model shape: the root owns a position table, and its readout reuses the token
    embedding's weight inside the root's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(7, 3)
        self.pos = nn.Parameter(0.1 * torch.randn(3))
        self.mix = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = (3 * x[:, 0].abs()).long().clamp(max=6)
        h = torch.tanh(self.mix(self.tok(tokens) + self.pos))
        return h @ self.tok.weight.T


class ForwardBypass(nn.Module):
    """The root owns a parameter and calls a child through .forward(), which bypasses its hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.inner = nn.Linear(3, 3)
        self.out = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.forward(torch.tanh(self.scale * self.inner(x)))


class PassThrough(nn.Module):
    """A layer with a parameter that it does not use: it returns its input unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(3))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


class TiedBehindPassThrough(nn.Module):
    """Weight tying upstream of a layer that returns its input unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.adapter = PassThrough()
        self.out = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.adapter(torch.tanh(self.inner(x)) @ self.inner.weight))


class WeightNormReused(nn.Module):
    """A weight-normed layer (the old hook-based ``nn.utils.weight_norm``, which computes the weight from
    its parameters ``weight_g`` and ``weight_v`` at each call) whose computed weight is used again
    outside the layer, or, with ``reuse=False``, not."""

    def __init__(self, reuse: bool = True) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations
            self.inner = nn.utils.weight_norm(nn.Linear(3, 3))
        self.out = nn.Linear(3, 1)
        self.reuse = reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))
        return self.out(h + F.linear(x, self.inner.weight) if self.reuse else h)


class HalfKept(nn.Module):
    """Returns one half of a product with its weight and keeps the other, which the model also uses:
    both halves are outputs of one autograd node."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        returned, self.kept = (x @ self.weight).chunk(2, dim=1)
        return returned


class HalfKeptUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = HalfKept()
        self.out = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inner(x)) * torch.tanh(self.inner.kept))


class GivenWeight(nn.Module):
    """A layer that multiplies by a weight its parent made from the layer's parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
        self.given: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.given.T


class WeightGivenBeforeTheCall(nn.Module):
    """The model computes a layer's weight from the layer's parameter before calling it and hands it over
    by attribute: the parameter's use lies outside the call, though the call reads its result."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = GivenWeight()
        self.out = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inner.given = self.inner.weight / self.inner.weight.norm()
        return self.out(torch.tanh(self.inner(x)))


class SequenceFirstAttentionTiedUpstream(nn.Module):
    """A sequence-first attention layer whose output bias is also added to its input: the recorder hands
    the rule transposed inputs, so the call's nodes are told from the model's by when they were made."""

    def __init__(self) -> None:
        super().__init__()
        self.lift = nn.Linear(3, 4)
        self.attention = nn.MultiheadAttention(4, 2)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (self.lift(x.view(x.shape[0], 1, 3)) + self.attention.out_proj.bias).transpose(0, 1)
        a, _ = self.attention(h, h, h, need_weights=False)
        return self.out(torch.tanh(a[0]))


class FlippedBatch(nn.Module):
    """Each output depends on its own input alone, but the hidden layer sees the batch in reverse."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inner(x.flip(0))).flip(0))


@pytest.mark.parametrize(
    ("model_class", "match"),
    [
        (Shared, r"module 'inner' \(Linear\) is applied more than once"),
        (TiedModules, r"modules 'first' and 'second' share a parameter"),
        (
            RowsAcrossInputs,
            r"module 'inner' \(Linear\) takes or gives a tensor of shape \(15, 1\), not one row per "
            r"input for a batch of 5",
        ),
        (ConstantInput, r"module 'shift' \(Linear\) takes or gives a tensor of shape \(1, 1\)"),
        (KeywordCall, r"module 'inner' \(Linear\) is called with keyword arguments \(input\)"),
        (RootTiedHead, r"parameter 'weight' of module 'tok' \(Embedding\) is used outside the module's own call"),
        (ForwardBypass, r"parameter 'weight' of module 'out' \(Linear\) is used outside the module's own call"),
        (TiedBehindPassThrough, r"parameter 'weight' of module 'inner' \(Linear\) is used outside"),
        (Tied, r"parameter 'weight' of module 'embed' \(Linear\) is used outside the module's own call"),
        (WeightNormReused, r"module 'inner' \(Linear\) computes a tensor from its parameters during its call"),
        (HalfKeptUsed, r"module 'inner' \(HalfKept\) computes a tensor from its parameters during its call"),
        (WeightGivenBeforeTheCall, r"parameter 'weight' of module 'inner' \(GivenWeight\) is used outside"),
        (SequenceFirstAttentionTiedUpstream, r"parameter 'out_proj.bias' of module 'attention' \(MultiheadAttention\)"),
    ],
)
def test_structured_names_the_module_it_cannot_handle_and_auto_falls_back(model_class: type, match: str) -> None:
    torch.manual_seed(0)  # nn.Linear draws its initial weights from the global generator
    model = model_class().double()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(NotStructuredError, match=match):
        empirical_ntk(model, x, method="structured")
    assert not any(m._forward_hooks for m in model.modules()), "hooks must be removed after an error"
    reference = empirical_ntk(model, x, method="loop")
    assert relative_error(empirical_ntk(model, x), reference) < 1e-10


def test_structured_takes_a_weight_normed_layer_whose_weight_stays_inside() -> None:
    """The weight that weight_norm computes at each call is used inside the call alone: structured
    differentiates weight_g and weight_v through it, exactly, with no verification to fall back on."""
    torch.manual_seed(0)  # nn.Linear draws its initial weights from the global generator
    model = WeightNormReused(reuse=False).double()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = empirical_ntk(model, x, method="loop")
    assert relative_error(empirical_ntk(model, x, method="structured", verify=False), reference) < 1e-10


@pytest.mark.parametrize(
    "model_class",
    [FlippedBatch, PositionTable],
)
def test_structured_kernels_that_break_the_factorisation_fail_verification(model_class: type) -> None:
    """A layer that sees the batch reordered, a table whose first dimension equals the batch size: the
    factorisation is wrong, no guard sees it, and the verification says so."""
    torch.manual_seed(0)  # nn.Linear draws its initial weights from the global generator
    model = model_class().double()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    unverified = empirical_ntk(model, x, method="structured", verify=False)
    reference = empirical_ntk(model, x, method="loop")
    assert relative_error(unverified, reference) > 1e-3, "the case must break the per-layer factorisation"
    with pytest.raises(VerificationError, match=r"method='structured' gave a kernel that disagrees"):
        empirical_ntk(model, x, method="structured")
    assert not any(m._forward_hooks for m in model.modules()), "hooks must be removed after an error"
    assert relative_error(empirical_ntk(model, x), reference) < 1e-10


def test_pruned_layer_is_differentiated_through_its_mask() -> None:
    # Pruning replaces the weight parameter by weight_orig times a mask, applied by a forward pre-hook;
    # taken as a plain Linear layer the kernel is off by order one.
    torch.manual_seed(0)  # nn.Linear and the pruning mask draw from the global generator
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    prune.random_unstructured(model[0], "weight", amount=0.5)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = empirical_ntk(model, x, method="loop")
    assert relative_error(empirical_ntk(model, x, method="structured"), reference) < 1e-10


@pytest.mark.parametrize("channels", [1, 8])
def test_prelu_layers_get_correct_per_input_gradients(channels: int) -> None:
    # Nested vmap (over inputs, then outputs) batches PReLU's backward wrongly: 6e-2 off before the fix.
    torch.manual_seed(0)  # nn.Linear draws its initial weights from the global generator
    model = nn.Sequential(nn.Linear(4, 8), nn.PReLU(channels), nn.Linear(8, 3)).double()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = empirical_ntk(model, x, method="loop")
    for method in ("structured", "auto"):
        assert relative_error(empirical_ntk(model, x, method=method), reference) < 1e-10


def test_hooks_and_a_replaced_forward_are_differentiated_through() -> None:
    # A pre-hook that doubles a layer's input, a forward replaced on the instance, a global hook that
    # doubles every Linear output: none of them is z = W a + b, and the pre-hook must not run twice.
    torch.manual_seed(0)  # nn.Linear draws its initial weights from the global generator
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()

    pre_hooked = model()
    pre_hooked[0].register_forward_pre_hook(lambda module, args: (2 * args[0],))
    replaced = model()
    original = replaced[0].forward
    replaced[0].forward = lambda a: 2 * original(a)
    for net in (pre_hooked, replaced):
        reference = empirical_ntk(net, x, method="loop")
        assert relative_error(empirical_ntk(net, x, method="structured"), reference) < 1e-10
    plain = model()
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: 2 * out if isinstance(module, nn.Linear) else None
    )
    try:
        reference = empirical_ntk(plain, x, method="loop")
        assert relative_error(empirical_ntk(plain, x, method="structured"), reference) < 1e-10
    finally:
        handle.remove()


def test_auto_falls_back_to_the_loop_where_torch_func_fails() -> None:
    # nn.GRU builds its default initial state with the batch size, which vmap over single inputs breaks.
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(2, 4, batch_first=True)
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)  # nn.GRU and nn.Linear draw their initial weights from the global generator
    model = Recurrent().double()
    x = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = empirical_ntk(model, x, method="loop")
    with pytest.warns(RuntimeWarning, match="falls back on method='loop'"):
        kernel = empirical_ntk(model, x)
    assert relative_error(kernel, reference) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_kernel_is_the_same_inside_no_grad(method: str) -> None:
    model = mlp(3, 8, 2, output_dim=2, generator=torch.Generator().manual_seed(0)).double()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = empirical_ntk(model, x, method=method)
    with torch.no_grad():
        kernel = empirical_ntk(model, x, method=method)
    assert reference.abs().max() > 0 and torch.equal(kernel, reference)


def test_inference_mode_is_refused_and_its_tensors_are_accepted_outside() -> None:
    model = mlp(3, 8, 1, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
        with pytest.raises(ValueError, match=r"torch.inference_mode\(\) forbids"):
            empirical_ntk(model, x)
    assert torch.equal(empirical_ntk(model, x), empirical_ntk(model, x.clone()))


def test_dropout_in_training_mode_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    for method in METHODS:
        with pytest.raises(ValueError, match=r"'2' \(Dropout\) is in training mode.*model.eval"):
            empirical_ntk(model, x, method=method)
    model.eval()
    assert relative_error(empirical_ntk(model, x), empirical_ntk(model, x, method="loop")) < 1e-4


def test_different_outputs_per_input_for_x1_and_x2_are_refused_by_every_method() -> None:
    torch.manual_seed(0)  # nn.Linear draws its initial weights from the global generator
    model = nn.Sequential(nn.Linear(3, 2), nn.Flatten())
    x1, x2 = torch.randn(4, 2, 3), torch.randn(3, 3, 3)
    for method in METHODS:
        with pytest.raises(ValueError, match="outputs per input"):
            empirical_ntk(model, x1, x2, method=method)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_auto_falls_back_to_reverse_mode_where_forward_mode_is_missing() -> None:
    # weight_norm's fused kernel has no forward-mode derivative, which "implicit" needs; applied twice,
    # the layer is refused by "structured" too.
    torch.manual_seed(0)  # nn.Linear draws its initial weights from the global generator
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    model = nn.Sequential(normed, nn.Tanh(), normed, nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = empirical_ntk(model, x, method="loop")
    with pytest.raises(NotStructuredError, match="applied more than once"):
        empirical_ntk(model, x, method="structured")
    assert relative_error(empirical_ntk(model, x), reference) < 1e-10
    with pytest.raises(ValueError, match="(?s)method='implicit' cannot differentiate.*needs reverse mode only"):
        empirical_ntk(model, x, method="implicit")


def test_in_place_activations_do_not_corrupt_the_structured_factors() -> None:
    # ReLU(inplace=True) overwrites the Linear output that the structured method differentiates against;
    # recorded naively, the kernel is 40% off.
    torch.manual_seed(0)  # nn.Linear draws its initial weights from the global generator
    model = nn.Sequential(
        nn.Linear(3, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 2)
    ).double()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = empirical_ntk(model, x, method="loop")
    assert relative_error(empirical_ntk(model, x, method="structured"), reference) < 1e-10


def test_structured_takes_no_parameter_gradients_and_leaves_no_hooks() -> None:
    model = mlp(3, 8, 2, generator=torch.Generator().manual_seed(0))
    calls = []
    for p in model.parameters():
        p.register_hook(lambda grad: calls.append(1))
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    empirical_ntk(model, x, method="structured", verify=False)
    assert calls == [] and all(p.grad is None for p in model.parameters())
    # The verification's backward passes reach the parameters but leave no .grad behind.
    empirical_ntk(model, x, method="structured")
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"mode": "sum"}, ValueError, "mode must be one of"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"chunk_size": 2.0}, TypeError, "chunk_size must be a positive int, got float"),
        ({"chunk_size": True}, TypeError, "chunk_size must be a positive int, got bool"),
    ],
)
def test_bad_options_get_clear_errors(options: dict, error: type, match: str) -> None:
    model = TwoLayerNet(3, 4, 1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(error, match=match):
        empirical_ntk(model, torch.ones(2, 3), **options)


def test_memory_estimate_scales_as_documented() -> None:
    x = torch.randn(64, 20, generator=torch.Generator().manual_seed(0))
    small = mlp(20, 256, 2, generator=torch.Generator().manual_seed(0))
    large = mlp(20, 1024, 2, generator=torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in large.parameters())
    # The Jacobian of 64 inputs dominates: 64 * P * 4 bytes, plus the 64 x 64 kernel and activations.
    jacobian = memory_estimate(large, x, method="jacobian")
    assert 64 * params * 4 <= jacobian < 1.1 * 64 * params * 4
    # Chunks of 16 from each side hold two 16-row Jacobians instead of one 64-row one.
    assert memory_estimate(large, x, method="jacobian", chunk_size=16) < jacobian / 1.9
    # Structured features grow with the width, not its square.
    growth = memory_estimate(large, x, method="structured") / memory_estimate(small, x, method="structured")
    assert growth < 4.5
    with pytest.raises(ValueError, match="not 'auto'"):
        memory_estimate(large, x, method="auto")


def test_benchmark_case_and_table() -> None:
    row = run_case("structured", width=8, n=4, device=torch.device("cpu"), repeats=3)
    assert row["repeats"] >= 3 and row["min_s"] <= row["median_s"] <= row["max_s"] and row["peak_bytes"] >= 0
    row.update(x_floor=1.0, speedup_vs_jacobian=None)
    missing = {"method": "jacobian", "width": 8, "n": 4, "does_not_fit": "needs about 9.0 GiB, 1.0 GiB free"}
    table = format_table([row, missing])
    assert "| 8 | structured |" in table and "needs about 9.0 GiB" in table


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_stay_on_the_gpu_and_agree() -> None:
    device = torch.device("cuda")
    model = mlp(3, 16, 2, 3, bias_std=0.1, generator=torch.Generator().manual_seed(0)).double().to(device)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    reference = empirical_ntk(model, x, method="loop")
    for method in FAST:
        kernel = empirical_ntk(model, x, method=method, chunk_size=3)
        assert kernel.device.type == "cuda" and relative_error(kernel, reference) < 1e-10


def test_global_forward_pre_hooks_are_not_applied_twice() -> None:
    """A global pre-hook that doubles every ``nn.Linear`` input has already acted on the input that
    "structured" records, so a layer it must run again is refused, not run through the hook twice."""
    torch.manual_seed(0)  # nn.Linear draws its initial weights from the global generator
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: tuple(2 * a for a in args) if isinstance(module, nn.Linear) else None
    )
    try:
        reference = empirical_ntk(model, x, method="loop")
        with pytest.raises(NotStructuredError, match=r"module '0' \(Linear\) needs its per-input gradients taken by"):
            empirical_ntk(model, x, method="structured", verify=False)
        assert relative_error(empirical_ntk(model, x), reference) < 1e-10
    finally:
        hook.remove()


class OnAnotherThread(nn.Module):
    """Runs its hidden layer on a worker thread, whose autograd sequence numbers are its own."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with ThreadPoolExecutor(1) as pool:
            h = pool.submit(self.inner, x).result()
        return self.out(torch.tanh(h))


def test_a_layer_called_on_another_thread_is_refused_by_name() -> None:
    torch.manual_seed(0)  # nn.Linear draws its initial weights from the global generator
    model = OnAnotherThread().double()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(NotStructuredError, match=r"module 'inner' \(Linear\) is called on another thread"):
        empirical_ntk(model, x, method="structured", verify=False)
    assert relative_error(empirical_ntk(model, x), empirical_ntk(model, x, method="loop")) < 1e-10


def test_auto_takes_a_model_with_a_scripted_layer() -> None:
    """A ``torch.jit.script``'ed layer takes no hooks: "structured" says so and "auto" goes on (its cost
    model, which hooks the leaf modules, leaves the scripted one out)."""
    torch.manual_seed(0)  # nn.Linear draws its initial weights from the global generator
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), torch.jit.script(nn.Linear(6, 6)), nn.Linear(6, 2)).double()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert relative_error(empirical_ntk(model, x), empirical_ntk(model, x, method="loop")) < 1e-10
