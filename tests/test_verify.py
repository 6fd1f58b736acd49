"""empirical_ntk is never silently wrong: the issue's cases against a per-input autograd oracle in
float64, the verification catching perturbed kernels and never tripping on correct ones, exact symmetry,
and a bounded number of forward passes."""

from __future__ import annotations

import contextlib
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from autograd_oracle import oracle
from torch import nn
from torch.nn.utils import parametrize

from ntkbook import empirical_ntk, mlp
from ntkbook.benchmark import build_case
from ntkbook.ntk import METHODS, MODES, NotStructuredError, VerificationError
from ntkbook.ntk import verify as verification
from ntkbook.ntk.auto import run_method
from ntkbook.ntk.features import contract
from ntkbook.ntk.request import make_request
from ntkbook.ntk.structured import layers, structured_features
from ntkbook.ntk.verify import Verifier

F64 = torch.float64


def as_full(kernel: torch.Tensor) -> torch.Tensor:
    return kernel[:, :, None, None] if kernel.ndim == 2 else kernel


def rel(kernel: torch.Tensor, reference: torch.Tensor) -> float:
    return float((as_full(kernel) - reference).norm() / reference.norm())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Sorted(nn.Module):
    """A hidden layer sees the batch sorted by its first feature, then unsorted: each output still
    depends on its own input alone, but the layer's rows are not the inputs' rows."""

    def __init__(self, d: int = 3) -> None:
        super().__init__()
        self.inner, self.out = nn.Linear(d, 6), nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        order = x[:, -1].argsort()
        h = torch.tanh(self.inner(x[order]))
        return self.out(h[order.argsort()])


class Branches(nn.Module):
    """Batches go one of two ways by their width: x1 and x2 reach different layers."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow, self.wide, self.shared = nn.Linear(3, 5), nn.Linear(4, 7), nn.Linear(1, 1)
        self.head3, self.head4 = nn.Linear(5, 1), nn.Linear(7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            return self.shared(self.head3(torch.tanh(self.narrow(x))))
        return self.shared(self.head4(torch.tanh(self.wide(x))))


class ListHeld(nn.Module):
    """A layer's weight reached through a plain Python list, which functional_call cannot substitute."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.out = nn.Linear(3, 4), nn.Linear(4, 1)
        self.held = [self.inner.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(x @ self.held[0].T + self.inner.bias))


class PartialHeld(nn.Module):
    """A parameter bound into a functools.partial at construction."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, generator=gen(5)))
        self.out = nn.Linear(4, 1)
        self.first = functools.partial(F.linear, weight=self.w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.first(x)))


class Symmetric(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (w + w.T) / 2


class CachedParametrization(nn.Module):
    """A parametrized weight used inside parametrize.cached(), which computes it once per call."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.out = nn.Linear(3, 3), nn.Linear(3, 1)
        parametrize.register_parametrization(self.inner, "weight", Symmetric())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with parametrize.cached():
            return self.out(torch.tanh(self.inner(x)))


class Tokens(nn.Module):
    """Token ids through an embedding, mean-pooled."""

    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4, sparse=sparse)
        self.out = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(ids)).mean(1))


class NoBatchingRule(torch.autograd.Function):
    """A custom function without a vmap rule: torch.func cannot differentiate through it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)


class CustomFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(NoBatchingRule.apply(self.inner(x)))


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.inner, self.out, self.reentrant = nn.Linear(3, 4), nn.Linear(4, 1), reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.inner(t)), x, use_reentrant=self.reentrant)
        return self.out(h)


def _double(model: nn.Module) -> nn.Module:
    return model.double()


class Squeezed(nn.Module):
    """Ends in ``.squeeze()``: a single input's outputs lose their batch dimension, ``()`` or ``(k,)``."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.inner, self.out = nn.Linear(3, 8), nn.Linear(8, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inner(x))).squeeze()


def _x(n: int = 6, d: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=gen(seed), dtype=F64)


def _seeded(factory):
    def build() -> nn.Module:
        torch.manual_seed(0)  # nn.Linear draws its initial weights from the global generator
        return factory().double()

    return build


def _sorted_with_timestamp() -> tuple[nn.Module, torch.Tensor, None]:
    x = _x(8, 3)
    x[:, -1] = 1.7e9 + torch.arange(8, dtype=F64).flip(0) * 3600  # raw timestamps, reversed
    x[0, -1] = 1.6e9  # the first input stays first after the sort
    return _seeded(Sorted)(), x, None


def _sorted_first_stays() -> tuple[nn.Module, torch.Tensor, None]:
    x = _x(8, 3)
    x[0, -1] = -10.0
    return _seeded(Sorted)(), x, None


CONTRACT_CASES = {
    "sorted batch, first input stays first": _sorted_first_stays,
    "sorted by a timestamp column": _sorted_with_timestamp,
    "x1 and x2 take different branches": lambda: (_seeded(Branches)(), _x(5, 3), _x(4, 3, 2)),
    "parameter in a Python list": lambda: (_seeded(ListHeld)(), _x(), None),
    "parameter in a functools.partial": lambda: (_seeded(PartialHeld)(), _x(), None),
    "parametrize.cached()": lambda: (_seeded(CachedParametrization)(), _x(), None),
    "token ids into an embedding": lambda: (_seeded(Tokens)(), torch.randint(11, (5, 4), generator=gen(3)), None),
    "sparse embedding": lambda: (
        _seeded(lambda: Tokens(sparse=True))(),
        torch.randint(11, (5, 4), generator=gen(3)),
        None,
    ),
    "custom autograd.Function without vmap": lambda: (_seeded(CustomFunction)(), _x(), None),
    "ends in .squeeze(), one output": lambda: (_seeded(lambda: Squeezed(1))(), _x(), None),
    "ends in .squeeze(), three outputs": lambda: (_seeded(lambda: Squeezed(3))(), _x(), _x(1, 3, 2)),
    "reentrant checkpoint": lambda: (_seeded(lambda: Checkpointed(True))(), _x(), None),
    "non-reentrant checkpoint": lambda: (_seeded(lambda: Checkpointed(False))(), _x(), None),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
@pytest.mark.parametrize("case", CONTRACT_CASES, ids=str)
def test_models_within_the_contract_get_the_right_kernel(case: str) -> None:
    model, x1, x2 = CONTRACT_CASES[case]()
    reference = oracle(model, x1, x2)
    assert rel(empirical_ntk(model, x1, x2), reference) < 1e-10
    for method in METHODS[1:]:
        try:
            kernel = empirical_ntk(model, x1, x2, method=method)
        except ValueError as err:  # a clear refusal (VerificationError, NotStructuredError) is allowed
            assert "method" in str(err) or "module" in str(err), err
            continue
        assert rel(kernel, reference) < 1e-10, method


def test_branching_by_width_pairs_layers_by_name() -> None:
    torch.manual_seed(0)
    model = Branches().double()
    x1, x2 = _x(5, 3), _x(4, 4, 2)
    reference = oracle(model, x1, x2)
    for method in ("auto", "structured", "loop"):
        assert rel(empirical_ntk(model, x1, x2, method=method), reference) < 1e-10


def test_inputs_attached_to_a_graph_are_detached() -> None:
    model = mlp(3, 8, 2, generator=gen(0)).double()
    weight = torch.randn(3, 3, dtype=F64, requires_grad=True)
    x = _x() @ weight  # a rollout state: a function of a tensor that requires grad
    reference = oracle(model, x.detach())
    for method in METHODS:
        assert rel(empirical_ntk(model, x, method=method), reference) < 1e-10, method
        assert rel(empirical_ntk(model, _x().requires_grad_(), method=method), oracle(model, _x())) < 1e-10


def _mean_centred(out: torch.Tensor) -> torch.Tensor:
    return out - out.mean(0)


class Mixing(nn.Module):
    def __init__(self, mix) -> None:
        super().__init__()
        self.net, self.mix = nn.Linear(3, 2), mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.net(x))


class Noisy(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.net = nn.Linear(3, 4)
        self.rrelu = nn.RReLU()
        self.lstm = nn.LSTM(4, 4, num_layers=2, dropout=0.5, batch_first=True)
        self.attention = nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x)
        if self.kind == "rrelu":
            h = self.rrelu(h)
        elif self.kind == "F.dropout":
            h = F.dropout(h, 0.5, training=True)
        elif self.kind == "noise":
            h = h + 0.1 * torch.randn_like(h)
        elif self.kind == "lstm":
            h = self.lstm(h[:, None, :])[0][:, 0]
        else:
            h = self.attention(h[:, None], h[:, None], h[:, None])[0][:, 0]
        return self.out(h)


@pytest.mark.parametrize(
    "mix",
    [_mean_centred, lambda out: out.softmax(0), lambda out: out.cumsum(0)],
    ids=["minus the batch mean", "softmax over inputs", "cumsum over inputs"],
)
@pytest.mark.parametrize("method", METHODS)
def test_outputs_mixed_across_the_batch_are_refused(mix, method: str) -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="depend on that input alone"):
        empirical_ntk(Mixing(mix).double(), _x(), method=method)


class Cancelling(nn.Module):
    """Adds and subtracts two large products of the input: float32 rounds them differently in a batch and
    alone, by more than the batch check's tolerance, though each output depends on its input alone."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(8, 16), nn.Linear(16, 1)
        self.register_buffer("big", torch.randn(16, 8, generator=gen(0)) * 3e3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cancelled = (x @ self.big.T).sum(1, keepdim=True) - (x @ self.big.T.flip(1)).sum(1, keepdim=True)
        return self.head(torch.tanh(self.inner(x))) + cancelled


def test_float32_rounding_with_cancellation_is_not_taken_for_mixing() -> None:
    torch.manual_seed(0)
    model, x = Cancelling(), torch.randn(40, 8, generator=gen(1))
    with torch.no_grad():
        out = model(x)
        gap = max(float((model(x[i : i + 1]) - out[i]).abs().max()) for i in range(40)) / float(
            out.pow(2).mean().sqrt()
        )
    print(f"float32 outputs alone and in the batch differ by {gap:.2g} of their scale")
    assert gap > 2 * math.sqrt(2.0**-24)  # beyond the batch check's float32 tolerance: the float64 copy decides
    exact = empirical_ntk(copy.deepcopy(model).double(), x.double())
    kernel = empirical_ntk(model, x).double()
    assert float((kernel - exact).norm() / exact.norm()) < 1e-5  # the parameters never meet the cancellation: 8e-8 here
    with pytest.raises(ValueError, match="depend on that input alone"):
        empirical_ntk(Mixing(_mean_centred), x[:, :3])  # float32 mixing is still refused, by the float64 copy too


def _one_middle_row_mixed(out: torch.Tensor) -> torch.Tensor:
    out = out.clone()
    if out.shape[0] > 6:
        out[5] = out[5] + out[6]
    return out


def _position_table(out: torch.Tensor) -> torch.Tensor:
    return out + torch.arange(out.shape[0], dtype=out.dtype)[:, None]


@pytest.mark.parametrize(
    "mix", [_one_middle_row_mixed, _position_table], ids=["one middle row mixed", "a table by batch position"]
)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [10, 100])
def test_outputs_that_depend_on_batch_position_are_refused(mix, method: str, n: int) -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="depend on that input alone|reordered"):
        empirical_ntk(Mixing(mix).double(), _x(n), method=method)


def _mixed_in_the_gradient_only(out: torch.Tensor) -> torch.Tensor:
    return out - out.mean(0) + out.mean(0).detach()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [10, 100])
def test_gradients_mixed_across_the_batch_are_refused(method: str, n: int) -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="disagrees with the model's own autograd"):
        empirical_ntk(Mixing(_mixed_in_the_gradient_only).double(), _x(n), method=method)


def _mixed_through_the_first_row(out: torch.Tensor) -> torch.Tensor:
    return out + (out[:1] - out[:1].detach())


@pytest.mark.parametrize("n", [2, 5, 100])
@pytest.mark.parametrize("method", METHODS)
def test_gradients_mixed_through_the_first_row_are_refused(method: str, n: int) -> None:
    """The probed rows run in a random order in which the batch's first row never comes first, whether
    every row is probed (2 and 5 inputs) or a subset (100)."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="disagrees with the model's own autograd"):
        empirical_ntk(Mixing(_mixed_through_the_first_row).double(), _x(n), method=method)


class _Temperature(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.tensor(0.3))

    def forward(self) -> torch.Tensor:
        return self.t.exp()


class ScaledByTemperature(nn.Module):
    """A leaf module with a 0-d output, and a layer used twice so that structured declines."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.temp, self.o = nn.Linear(3, 3), _Temperature(), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.a(torch.tanh(self.a(x))))) * self.temp()


class FrozenBranch(nn.Module):
    """Inputs far from the origin take a branch without trainable parameters: their kernel rows are zero."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Linear(3, 4), nn.Linear(4, 2)
        self.frozen = nn.Linear(3, 2).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(x) if x[0, 0] > 100 else self.o(torch.tanh(self.a(x)))


def test_auto_measures_models_with_scalar_leaf_outputs() -> None:
    model = _seeded(ScaledByTemperature)()
    assert rel(empirical_ntk(model, _x()), oracle(model, _x())) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_a_side_no_parameter_reaches_gets_zero_rows(method: str) -> None:
    model = _seeded(FrozenBranch)()
    far, near = _x(5) + 200, _x(4, seed=2)
    try:
        kernel = empirical_ntk(model, far, near, method=method)
    except ValueError as err:  # vmap cannot follow data-dependent control flow
        assert method in ("jacobian", "implicit") and "cannot differentiate" in str(err), err
        return
    assert torch.equal(kernel, torch.zeros_like(kernel))


@pytest.mark.parametrize("kind", ["rrelu", "F.dropout", "noise", "lstm", "attention"])
def test_random_models_are_refused(kind: str) -> None:
    torch.manual_seed(0)
    model = Noisy(kind).double().train()
    with pytest.raises(ValueError, match="random|depend on that input alone"):
        empirical_ntk(model, _x())


@pytest.mark.parametrize(
    ("x1", "x2", "error", "match"),
    [
        (_x(), _x()[None], ValueError, "x2"),
        (_x().to_sparse(), None, TypeError, "x1 must be a dense"),
        (torch.nested.nested_tensor([_x(2), _x(3)]), None, TypeError, "x1 must be a dense"),
    ],
)
def test_unusual_inputs_get_clear_errors(x1: torch.Tensor, x2: torch.Tensor | None, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        empirical_ntk(mlp(3, 4, 1, generator=gen(0)).double(), x1, x2)


def test_a_model_with_zero_outputs_is_refused() -> None:
    model = nn.Linear(3, 0).double()
    with pytest.raises(ValueError, match="0 outputs per input"):
        empirical_ntk(model, _x())


# --- the verification itself -----------------------------------------------------------------------


def random_model(seed: int, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, int]:
    g = gen(seed)
    width = int(torch.randint(4, 96, (1,), generator=g))
    depth = int(torch.randint(1, 4, (1,), generator=g))
    k = int(torch.randint(1, 4, (1,), generator=g))
    activation = ("relu", "tanh")[seed % 2]
    model = mlp(5, width, depth, k, bias_std=0.5 * (seed % 3 == 0), activation=activation, generator=g)
    return model.to(dtype), torch.randn(12, 5, generator=g).to(dtype), k


def test_rounding_never_trips_the_check_on_correct_float32_kernels() -> None:
    worst = 0.0
    for seed in range(300):
        model, x, _ = random_model(seed, torch.float32)
        mode = MODES[seed % 3]
        request = make_request(model, x, None if seed % 4 else x[:5] * 1.5, "auto", mode, None)
        verifier = Verifier(request)

        for method in ("structured", "loop"):
            verifier.check(run_method(request, method, None), method)
            worst = max(worst, verifier.last_ratio)
    print(f"largest discrepancy over 600 correct float32 kernels: {worst:.3f} of the tolerance")
    assert worst < 0.5


def test_an_ill_conditioned_float32_kernel_is_refused_with_a_hint_or_accurate() -> None:
    # Inputs of 1e4 into tanh units: most saturate, and float32 rounds the derivatives of the rest to a few bits.
    model, x, _ = random_model(59, torch.float32)
    model64, x64, _ = random_model(59, F64)
    exact = empirical_ntk(model64, x64 * 1e4, method="loop")
    float32 = empirical_ntk(model, x * 1e4, method="loop", chunk_size=3, verify=False)
    assert rel(float32.double(), exact) > 1e-4  # the docstring's "1e-4 of its scale and more"
    try:
        kernel = empirical_ntk(model, x * 1e4, chunk_size=3)
    except VerificationError as err:
        assert "float64" in str(err)
    else:
        assert rel(kernel.double(), exact) < 1e-3


@pytest.mark.parametrize("with_x2", [False, True], ids=["symmetric", "x2"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("perturbation", ["drop a layer's share", "swap two rows", "scale a block by 1.01"])
def test_perturbed_kernels_are_caught(perturbation: str, mode: str, with_x2: bool) -> None:
    """In every mode, with and without x2: a third of the models have one output, the rest 2 or 3, so
    the per-output identities of trace and diagonal modes are exercised."""
    caught = 0
    for seed in range(30):
        model, x, _ = random_model(seed, torch.float32)
        x2 = torch.randn(10, x.shape[1], generator=gen(100 + seed)) if with_x2 else None
        request = make_request(model, x, x2, "auto", mode, None)
        kernel = run_method(request, "structured", None).clone()
        if perturbation == "drop a layer's share":
            found = layers(model)
            f1 = structured_features(model, found, "x1", x)
            f2 = f1 if x2 is None else structured_features(model, found, "x2", x2)
            last = list(f1)[-1]
            kernel = kernel - contract({last: f1[last]}, {last: f2[last]}, mode)
        elif perturbation == "swap two rows":
            kernel[[2, 7]] = kernel[[7, 2]]
        else:
            kernel[:4, :4] *= 1.01
        try:
            Verifier(request).check(kernel, "structured")
        except VerificationError:
            caught += 1
    assert caught == 30


def miss_bound(eps: float, m: int) -> float:
    """P(max_a |g_a| max_b |h_b| <= eps) for 2m independent standard normals, by quadrature: the chance
    that all m^2 probe pairs miss a rank-one error."""
    s = torch.linspace(1e-12, 14, 2_000_001, dtype=F64)
    cdf = torch.erf(s / math.sqrt(2))
    density = m * cdf ** (m - 1) * torch.exp(-s * s / 2) * math.sqrt(2 / math.pi)
    return float(torch.trapezoid(density * torch.erf(eps / (s * math.sqrt(2))) ** m, s))


def symmetric_miss_bound(eps: float, m: int) -> float:
    """P(max_a |g_a| <= sqrt(eps)) for m independent standard normals: the chance that all pairs of m
    shared probes miss a symmetric rank-one error."""
    return math.erf(math.sqrt(eps / 2)) ** m


def test_the_rank_one_error_is_the_least_favourable_and_the_stated_bounds_hold() -> None:
    g = gen(0)
    samples = 200_000
    eps = 0.04
    m, m_sym = verification.PROBES, verification.SYMMETRIC_PROBES
    bound, bound_sym = miss_bound(eps, m), symmetric_miss_bound(eps, m_sym)
    for rank in (1, 2, 5, 20):
        sigma = torch.rand(rank, generator=g, dtype=F64) + 0.1
        sigma /= sigma.norm()
        u = torch.randn(samples, m, rank, generator=g, dtype=F64)
        v = torch.randn(samples, m, rank, generator=g, dtype=F64)
        largest = torch.einsum("sar,r,sbr->sab", u, sigma, v).abs().flatten(1).max(1).values
        miss = float((largest <= eps).double().mean())
        assert miss <= bound + 4 * math.sqrt(bound / samples), rank
        # Symmetric errors of either sign, probed by shared probes on both sides.
        signed = sigma * torch.where(torch.rand(rank, generator=g) < 0.5, -1.0, 1.0).to(F64)
        w = torch.randn(samples, m_sym, rank, generator=g, dtype=F64)
        largest = torch.einsum("sar,r,sbr->sab", w, signed, w).abs().flatten(1).max(1).values
        miss = float((largest <= eps).double().mean())
        assert miss <= bound_sym + 4 * math.sqrt(bound_sym / samples), rank
    # The docstring's figures for the float32 benchmark MLP 20 -> 1024 -> 1024 -> 1 (n = 256).
    model, x = build_case(1024, 256, torch.device("cpu"))
    verifier = Verifier(make_request(model, x, None, "structured", "full", None))
    length = verifier.summation_length(max(verification.ALL_ROWS, 256 // verification.ROW_FRACTION))
    rho = verification.TOLERANCE_FACTOR * 2.0**-24 * math.sqrt(length)
    assert length == 7284 and abs(rho - 1.02e-5) < 5e-8
    assert symmetric_miss_bound(4 * rho / 1e-3, m_sym) < 1.1e-4 and miss_bound(4 * rho / 1e-3, m) < 1.7e-4
    for delta, stated in ((3e-3, 1e-5), (1e-2, 4e-7)):
        assert symmetric_miss_bound(4 * rho / delta, m_sym) < stated and miss_bound(4 * rho / delta, m) < stated
    # At width 4096 the same bound holds for an error twice as large.
    model, x = build_case(4096, 256, torch.device("cpu"))
    verifier = Verifier(make_request(model, x, None, "structured", "full", None))
    rho = verification.TOLERANCE_FACTOR * 2.0**-24 * math.sqrt(verifier.summation_length(16))
    assert max(symmetric_miss_bound(4 * rho / 2e-3, m_sym), miss_bound(4 * rho / 2e-3, m)) < 2e-4


def test_probed_rows_follow_the_inputs_not_only_their_number() -> None:
    """An error confined to one batch position is not missed for every batch of that size: the rows and
    probes are drawn from a seed that depends on the inputs, and the same inputs get the same draw."""
    model = mlp(4, 8, 1, generator=gen(0))

    def probed(x: torch.Tensor) -> torch.Tensor:
        return Verifier(make_request(model, x, None, "structured", "full", None))._rows(x.shape[0])

    batches = [torch.randn(320, 4, generator=gen(seed)) for seed in range(8)]
    draws = [probed(x) for x in batches]
    assert torch.equal(draws[0], probed(batches[0].clone()))
    assert all(d[0] == 0 and d[-1] == 319 and len(d) == 20 for d in draws)
    seen = torch.unique(torch.cat(draws))
    print(f"8 batches of 320 probed {len(seen)} distinct rows, 20 each")
    assert len(seen) > 100  # 8 independent draws of 18 of the 318 middle rows cover about 118; one seed, 18


# --- exact symmetry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 70])
@pytest.mark.parametrize("method", METHODS)
def test_symmetric_kernels_are_exactly_symmetric(n: int, method: str) -> None:
    model = mlp(4, 16, 2, 3, generator=gen(0))
    x = torch.randn(n, 4, generator=gen(1))
    for mode in MODES:
        for chunk in (1, 3, n) if method in ("structured", "auto") or n == 10 else (n,):
            kernel = empirical_ntk(model, x, method=method, mode=mode, chunk_size=chunk, verify=False)
            if mode == "full":
                assert torch.equal(kernel, kernel.permute(1, 0, 3, 2)), (mode, chunk)
            elif mode == "diagonal":
                assert torch.equal(kernel, kernel.transpose(0, 1)), (mode, chunk)
            else:
                assert torch.equal(kernel, kernel.T), (mode, chunk)


@pytest.mark.parametrize("method", METHODS)
def test_the_same_batch_twice_costs_what_one_batch_costs(method: str) -> None:
    """``empirical_ntk(model, x, x)`` is the symmetric kernel: the same runs of the model, the same bits."""
    model = mlp(4, 16, 2, 3, generator=gen(0))
    x = torch.randn(20, 4, generator=gen(1))
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    once = empirical_ntk(model, x, method=method)
    runs_once, calls[:] = list(calls), []
    twice = empirical_ntk(model, x, x.clone(), method=method)
    assert calls == runs_once
    assert torch.equal(twice, once)


class Gate(nn.Module):
    """A layer's weight also used outside the layer, for one input of 64 only: a subset of rows probed by
    the verification would see it only if that input were drawn."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = (x[:, :1] > 3.0).to(x.dtype)
        return self.l2(torch.tanh(self.l1(x))) + gate * F.linear(x, self.l1.weight).sum(1, keepdim=True)


def test_a_weight_used_outside_its_layer_for_one_input_is_refused_by_name() -> None:
    model = _seeded(Gate)()
    x = _x(64, 4)
    x[:, 0] = x[:, 0].clamp(max=2.0)
    x[5, 0] = 4.0
    with pytest.raises(ValueError, match=r"parameter 'weight' of module 'l1' \(Linear\) is used outside"):
        empirical_ntk(model, x, method="structured")
    assert rel(empirical_ntk(model, x), oracle(model, x)) < 1e-10


class Angle(nn.Module):
    """``atan2(x, -1)`` is pi at 0.0 and -pi at -0.0: a model that tells the two zeros apart."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.atan2(x, -torch.ones_like(x)))


def test_a_batch_equal_to_x1_only_up_to_the_sign_of_zero_is_its_own_batch() -> None:
    model = _seeded(Angle)()
    x1, x2 = torch.tensor([[0.0], [1.0]], dtype=F64), torch.tensor([[-0.0], [1.0]], dtype=F64)
    for method in METHODS:
        kernel = empirical_ntk(model, x1, x2, method=method)
        assert abs(float(kernel[0, 0]) - (1 - math.pi**2)) < 1e-12, method  # 1 + atan2(0, -1) atan2(-0, -1)


def test_auto_runs_the_model_a_bounded_number_of_times() -> None:
    class TiedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(3, 8, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.embed(x)) @ self.embed.weight[:, :1]

    torch.manual_seed(0)
    model = TiedHead()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(64, 3, generator=gen(1))
    empirical_ntk(model, x)
    # 1 output count, 1 verification batch, 4 single inputs, then structured (1), its budget (1)
    # and jacobian (functional_call runs count too, 1).
    assert len(calls) <= 10, len(calls)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 4])
def test_mixing_is_refused_whatever_the_chunks(chunk_size: int | None) -> None:
    torch.manual_seed(0)
    model = Mixing(lambda out: out.cumsum(0)).double()
    with pytest.raises(ValueError, match="depend on that input alone"):
        empirical_ntk(model, _x(10), method="loop", chunk_size=chunk_size)


def test_a_call_inside_parametrize_cached_is_refused() -> None:
    model = _seeded(CachedParametrization)()
    with parametrize.cached(), pytest.raises(ValueError, match="parametrize.cached"):
        empirical_ntk(model, _x())


@pytest.mark.parametrize("method", METHODS)
def test_reentrant_checkpoint_gets_the_right_kernel_or_a_clear_error(method: str) -> None:
    model = _seeded(lambda: Checkpointed(True))()
    try:
        kernel = empirical_ntk(model, _x(), method=method)
    except ValueError as err:
        assert "method" in str(err), err
        return
    assert rel(kernel, oracle(model, _x())) < 1e-10


class SquareRootTrap(nn.Module):
    """``torch.where(h > -5, (h + 5).sqrt(), h)``: where a pre-activation is below -5 the unused branch's
    gradient is NaN * 0 = NaN. Inputs of size about 1 stay above -5; input 5, set to 100, does not."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 8, bias=False)
        self.readout = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        return self.readout(torch.where(h > -5, (h + 5).sqrt(), h))


@pytest.mark.parametrize("n", [6, 40])
def test_gradients_that_are_not_finite_get_a_clear_error(n: int) -> None:
    """Only input 5's gradient is NaN; with 40 inputs it may be left out of the probed rows, and the
    kernel's own NaN entries are then what is caught."""
    model = _seeded(SquareRootTrap)()
    x = _x(n)
    x[5] = 100.0
    assert float(model.hidden(x[5]).min()) < -5 < float(model.hidden(x[torch.arange(n) != 5]).min())
    for method in ("auto", "structured", "jacobian", "loop"):
        with pytest.warns(RuntimeWarning) if method == "auto" and n == 40 else contextlib.nullcontext():
            with pytest.raises(ValueError, match="NaN or infinite") as err:
                empirical_ntk(model, x, method=method)
        assert "mix" not in str(err.value), "a NaN must not be blamed on mixing across the batch"


def test_a_kernel_with_a_nan_entry_fails_the_check_by_name() -> None:
    model, x = mlp(3, 4, 1, generator=gen(0)).double(), _x(20)
    request = make_request(model, x, None, "structured", "full", None)
    kernel = run_method(request, "structured", None)
    kernel[17, 3] = float("nan")  # a row the probes may not visit
    with pytest.raises(VerificationError, match=r"1 NaN or infinite entries, the first at inputs \(17, 3\)"):
        Verifier(request).check(kernel, "structured")


def test_a_compiled_part_that_donates_its_buffers_gets_a_clear_error() -> None:
    model = nn.Sequential(
        nn.Linear(3, 4), torch.compile(nn.Sequential(nn.Tanh(), nn.Linear(4, 2)), backend="aot_eager")
    )
    with pytest.raises(ValueError, match=r"torch.compile'd part .*donated_buffer = False"):
        empirical_ntk(model.double(), _x())


class MixedPrecision(nn.Module):
    """A float64 layer, then a float32 one: the model rounds like float32."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8).double()
        self.second = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)).float()).double()


class ScalarTanh(nn.Module):
    """``tanh(s x)`` with one parameter: sums of a few terms, where elementwise rounding dominates."""

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.s * x)


@pytest.mark.parametrize("method", ["structured", "jacobian", "loop"])
def test_correct_kernels_of_unusual_precisions_are_not_refused(method: str) -> None:
    torch.manual_seed(0)
    mixed, x = MixedPrecision(), _x(5, 4)
    assert rel(empirical_ntk(mixed, x, method=method), oracle(mixed, x)) < 1e-6
    # float16: the probe gradients' squared norms (about 3e4 per row, 16 rows) exceed float16's range.
    half = nn.Linear(64, 1, bias=False).half()
    xh = (torch.randn(16, 64, generator=gen(3)) * 6).half()
    assert rel(empirical_ntk(half, xh, method=method).double(), oracle(half.double(), xh.double())) < 1e-2
    for seed in range(40):
        g = gen(seed)
        tiny = ScalarTanh(float(torch.rand((), generator=g)) + 0.5)
        empirical_ntk(tiny, torch.randn(4, 3, generator=g), method=method)


def test_complex_parameters_are_refused_by_name() -> None:
    model = nn.Linear(3, 2).double()
    model.register_parameter("phase", nn.Parameter(torch.ones(2, dtype=torch.complex128)))
    with pytest.raises(TypeError, match="parameter 'phase' has dtype torch.complex128"):
        empirical_ntk(model, _x())


class DiscardedLayer(nn.Module):
    """``lin`` runs and its output is thrown away; ``reuse`` says whether its weight then works elsewhere."""

    def __init__(self, reuse: bool) -> None:
        super().__init__()
        self.a, self.lin, self.o = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.reuse = reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        self.lin(h)
        if self.reuse:
            h = F.linear(2 * h, self.lin.weight, self.lin.bias)
        return self.o(torch.tanh(h))


def test_a_discarded_layer_whose_weight_works_elsewhere_is_refused_by_name() -> None:
    model = _seeded(lambda: DiscardedLayer(True))()
    with pytest.raises(NotStructuredError, match="parameter 'weight' of module 'lin'"):
        empirical_ntk(model, _x(), method="structured", verify=False)
    assert rel(empirical_ntk(model, _x()), oracle(model, _x())) < 1e-10
    unused = _seeded(lambda: DiscardedLayer(False))()  # its share is zero, and structured knows it
    assert rel(empirical_ntk(unused, _x(), method="structured", verify=False), oracle(unused, _x())) < 1e-10
