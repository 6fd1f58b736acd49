"""ntkbook.training and ntkbook.linearized: gradient descent, linearised/centred/scaled models, and the
closed-form NTK prediction."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ntkbook import mlp
from ntkbook.linearized import centered, critical_lr, linearize, ntk_predict, scaled
from ntkbook.ntk import empirical_ntk
from ntkbook.training import DivergenceError, train


def data(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.linspace(-2, 2, n, dtype=torch.float64)[:, None]
    y = torch.sin(2 * x) + 0.1 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    return x, y


def net(width: int = 32, depth: int = 1, seed: int = 0, **kwargs: object) -> nn.Module:
    return mlp(1, width, depth, bias_std=1.0, generator=torch.Generator().manual_seed(seed), **kwargs).double()


def test_train_is_plain_gradient_descent_on_mse_over_alpha_squared() -> None:
    x, y = data()
    alpha, lr, steps = 3.0, 0.05, 4
    model, reference = net(), net()
    history = train(model, x, y, steps=steps, lr=lr, alpha=alpha, progress=False)
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (nn.functional.mse_loss(reference(x), y) / alpha**2).backward()
        optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert history.loss.shape == history.relative_change.shape == (steps + 1,)
    assert history.relative_change[0] == 0.0
    torch.testing.assert_close(history.loss[-1], nn.functional.mse_loss(model(x), y).detach())


def test_relative_change_is_the_distance_from_initialisation() -> None:
    x, y = data()
    model = net()
    theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    history = train(model, x, y, steps=3, lr=0.1, progress=False)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = torch.linalg.vector_norm(theta - theta0) / torch.linalg.vector_norm(theta0)
    assert history.initial_norm == pytest.approx(float(torch.linalg.vector_norm(theta0)))
    assert float(history.relative_change[-1]) == pytest.approx(float(expected), rel=1e-12)


def test_ntk_snapshots_at_start_every_k_steps_and_end() -> None:
    x, y = data()
    model = net()
    kernel0 = empirical_ntk(model, x)
    history = train(model, x, y, steps=5, lr=0.1, ntk_every=2, progress=False)
    assert sorted(history.ntk) == [0, 2, 4, 5]
    torch.testing.assert_close(history.ntk[0], kernel0)
    torch.testing.assert_close(history.ntk[5], empirical_ntk(model, x))


def test_targets_of_shape_n_train_an_n_by_1_model_without_broadcasting() -> None:
    x, y = data()
    a, b = net(), net()
    train(a, x, y, steps=3, lr=0.1, progress=False)
    train(b, x, y[:, 0], steps=3, lr=0.1, progress=False)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_linearize_starts_at_the_model_and_matches_it_to_first_order() -> None:
    x, _ = data()
    model = net(depth=2)
    lin = linearize(model)
    torch.testing.assert_close(lin(x), model(x), rtol=0, atol=1e-14)
    gen = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
    gaps = []
    for eps in (1e-2, 1e-3):
        with torch.no_grad():
            moved = net(depth=2)
            for p, q, d in zip(moved.parameters(), lin.module.parameters(), direction):
                p.add_(eps * d)
                q.copy_(p)
        gaps.append(float((lin(x) - moved(x)).detach().abs().max()))
    # f - f_lin is second order in the step, so a 10x smaller step leaves a 100x smaller gap.
    assert gaps[0] / gaps[1] == pytest.approx(100, rel=0.05)


def test_linearize_copies_and_has_the_same_ntk() -> None:
    x, y = data()
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    lin = linearize(model)
    torch.testing.assert_close(empirical_ntk(lin, x), empirical_ntk(model, x), rtol=1e-12, atol=1e-12)
    train(lin, x, y, steps=3, lr=0.1, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert sum(p.numel() for p in lin.parameters()) == sum(p.numel() for p in model.parameters())


def test_linearized_model_kernel_stays_constant_during_training() -> None:
    x, y = data()
    history = train(linearize(net(width=8)), x, y, steps=20, lr=0.2, ntk_every=20, progress=False)
    torch.testing.assert_close(history.ntk[20], history.ntk[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 4.0])
@pytest.mark.parametrize("depth", [1, 2])
def test_ntk_predict_equals_trained_linearised_model(alpha: float, depth: int) -> None:
    x, y = data(n=7)
    x_test = torch.linspace(-3, 3, 11, dtype=torch.float64)[:, None]
    model = scaled(centered(net(width=16, depth=depth)), alpha)
    lin = linearize(model)
    kernel, kernel_test = empirical_ntk(model, x), empirical_ntk(model, x_test, x)
    f0, f0_test = model(x).detach(), model(x_test).detach()
    lr, steps = 0.5 * critical_lr(kernel, alpha=alpha), 60
    history = train(lin, x, y, steps=steps, lr=lr, alpha=alpha, progress=False)
    prediction = ntk_predict(
        kernel, f0, y, lr=lr, steps=list(range(steps + 1)), alpha=alpha, kernel_test=kernel_test, f0_test=f0_test
    )
    torch.testing.assert_close(prediction.train[-1], lin(x).detach()[:, 0], rtol=0, atol=1e-10)
    torch.testing.assert_close(prediction.test[-1], lin(x_test).detach()[:, 0], rtol=0, atol=1e-10)
    predicted_loss = ((prediction.train - y[:, 0]) ** 2).mean(dim=1)
    torch.testing.assert_close(predicted_loss, history.loss, rtol=1e-9, atol=1e-12)


def test_ntk_predict_single_step_and_singular_kernel() -> None:
    # A rank-one kernel: the null-space component of the residual never moves, and on test inputs
    # the geometric series there is exactly t.
    features = torch.tensor([[1.0], [2.0], [0.0]], dtype=torch.float64)
    kernel = features @ features.T
    f0 = torch.zeros(3, dtype=torch.float64)
    y = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    lr, steps = 0.3, 7
    out = ntk_predict(kernel, f0, y, lr=lr, steps=steps, kernel_test=kernel[:1], f0_test=f0[:1])
    theta = torch.zeros(1, dtype=torch.float64)
    for _ in range(steps):
        residual = features @ theta - y
        theta = theta - lr * 2 / 3 * features.T @ residual
    torch.testing.assert_close(out.train, features @ theta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.test, features[:1] @ theta, rtol=1e-12, atol=1e-12)
    assert out.train.shape == (3,) and out.test.shape == (1,)
    assert ntk_predict(kernel, f0, y, lr=lr, steps=0).train.equal(f0)
    # numpy integers count as step numbers too.
    several = ntk_predict(kernel, f0, y, lr=lr, steps=np.arange(0, steps + 1, 7).tolist() + [np.int64(steps)])
    torch.testing.assert_close(several.train[-1], out.train, rtol=0, atol=0)


def test_ntk_predict_warns_beyond_the_critical_learning_rate() -> None:
    kernel = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    assert critical_lr(kernel) == pytest.approx(2 / 4)
    with pytest.warns(RuntimeWarning, match="stable limit"):
        ntk_predict(kernel, torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), lr=0.6, steps=3)


def test_kernels_symmetric_up_to_rounding_are_accepted_and_cross_kernels_refused() -> None:
    x, y = data(8)
    model = net(width=64).float()
    f0 = model(x.float()).detach()
    exact = empirical_ntk(model, x.float())
    assert exact.equal(exact.T)
    crossed = empirical_ntk(model, x.float(), x.float())  # asked for as a cross kernel of X with itself
    # Features of 1e5 entries summed in two orders, one per triangle: float32 rounding makes the
    # triangles differ (by a few eps of the largest entry), as in a kernel assembled from blocks.
    features = torch.randn(8, 100_000, generator=torch.Generator().manual_seed(0))
    one_order = features @ features.T
    two_halves = features[:, :50_000] @ features[:, :50_000].T + features[:, 50_000:] @ features[:, 50_000:].T
    rounded = one_order.triu() + two_halves.tril(-1)
    assert not rounded.equal(rounded.T)
    for kernel in (exact, crossed, rounded):
        lr = 0.5 * critical_lr(kernel)
        torch.testing.assert_close(
            ntk_predict(kernel, f0, y.float(), lr=lr, steps=5).train,
            ntk_predict((kernel + kernel.T) / 2, f0, y.float(), lr=lr, steps=5).train,
            rtol=1e-4,
            atol=1e-5,
        )
    # Θ(x_test, x_train) with as many test as training inputs is square, but its triangles disagree.
    cross = empirical_ntk(model, x.float() + 0.5, x.float())
    with pytest.raises(ValueError, match="kernel must be the symmetric NTK"):
        ntk_predict(cross, f0, y.float(), lr=0.1, steps=5)
    with pytest.raises(ValueError, match="kernel must be the symmetric NTK"):
        critical_lr(cross)


def test_centered_starts_at_zero_shares_parameters_and_keeps_the_ntk() -> None:
    x, y = data()
    model = net()
    wrapped = centered(model)
    assert wrapped(x).abs().max() == 0.0
    torch.testing.assert_close(empirical_ntk(wrapped, x), empirical_ntk(model, x), rtol=1e-12, atol=1e-12)
    train(wrapped, x, y, steps=2, lr=0.1, progress=False)
    assert wrapped(x).abs().max() > 0.0
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in model.parameters()]


def test_scaled_multiplies_output_and_kernel() -> None:
    x, _ = data()
    model = net()
    big = scaled(model, 5.0)
    torch.testing.assert_close(big(x), 5.0 * model(x))
    torch.testing.assert_close(empirical_ntk(big, x), 25.0 * empirical_ntk(model, x), rtol=1e-12, atol=1e-12)


def test_scaled_centred_model_moves_its_parameters_alpha_times_less() -> None:
    # In the lazy limit the function follows the same path for every alpha, and the parameters travel 1/alpha
    # as far; the linearised model is exactly that limit.
    x, y = data()
    changes = {}
    for alpha in (1.0, 10.0):
        lin = linearize(scaled(centered(net()), alpha))
        changes[alpha] = train(lin, x, y, steps=10, lr=0.1, alpha=alpha, progress=False).relative_change[-1]
    assert float(changes[1.0] / changes[10.0]) == pytest.approx(10.0, rel=1e-9)


def test_divergence_names_the_step_and_suggests_a_smaller_lr() -> None:
    x, y = data()
    model = net()
    with pytest.raises(DivergenceError, match=r"step \d+ .*smaller learning rate") as info:
        train(model, x, y, steps=500, lr=1e3, progress=False)
    assert isinstance(info.value, ValueError) and 0 < info.value.step <= 500
    assert len(info.value.history.loss) == info.value.step


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0, "lr": 0.1}, ValueError, "steps must be a positive int"),
        ({"steps": 2.0, "lr": 0.1}, TypeError, "steps must be a positive int"),
        ({"steps": 2, "lr": 0.0}, ValueError, "lr must be a finite positive"),
        ({"steps": 2, "lr": -1.0}, ValueError, "lr must be a finite positive"),
        ({"steps": 2, "lr": float("nan")}, ValueError, "lr must be a finite positive"),
        ({"steps": 2, "lr": 0.1, "alpha": 0.0}, ValueError, "alpha must be a finite positive"),
        ({"steps": 2, "lr": 0.1, "ntk_every": 0}, ValueError, "ntk_every must be a positive int"),
        ({"steps": 2, "lr": 0.1, "progress": "yes"}, TypeError, "progress must be a bool"),
    ],
)
def test_train_rejects_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    x, y = data()
    with pytest.raises(error, match=match):
        train(net(), x, y, **kwargs)


def test_train_rejects_mismatched_data() -> None:
    x, y = data()
    model = net()
    with pytest.raises(ValueError, match="same number of examples"):
        train(model, x, y[:-1], steps=1, lr=0.1, progress=False)
    with pytest.raises(ValueError, match="does not match model"):
        train(model, x, torch.cat([y, y], dim=1), steps=1, lr=0.1, progress=False)
    with pytest.raises(TypeError, match="dtype"):
        train(model, x.float(), y, steps=1, lr=0.1, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        train(model, x, torch.full_like(y, float("nan")), steps=1, lr=0.1, progress=False)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        train("model", x, y, steps=1, lr=0.1)


def test_ntk_predict_rejects_bad_arguments() -> None:
    kernel = torch.eye(3, dtype=torch.float64)
    f0, y = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="square"):
        ntk_predict(kernel[:2], f0, y, lr=0.1, steps=1)
    with pytest.raises(ValueError, match="y must have shape"):
        ntk_predict(kernel, f0, y[:2], lr=0.1, steps=1)
    with pytest.raises(ValueError, match="steps must be"):
        ntk_predict(kernel, f0, y, lr=0.1, steps=-1)
    with pytest.raises(ValueError, match="lr must be"):
        ntk_predict(kernel, f0, y, lr=0.0, steps=1)
    with pytest.raises(ValueError, match="pass both or neither"):
        ntk_predict(kernel, f0, y, lr=0.1, steps=1, kernel_test=kernel)
    with pytest.raises(ValueError, match=r"\(m, 3\)"):
        ntk_predict(kernel, f0, y, lr=0.1, steps=1, kernel_test=kernel[:, :2], f0_test=f0)
    with pytest.raises(TypeError, match=r"kernel_test must have the kernel's dtype"):
        ntk_predict(kernel, f0, y, lr=0.1, steps=1, kernel_test=kernel.float(), f0_test=f0)
    with pytest.raises(ValueError, match="kernel_test contains NaN"):
        ntk_predict(kernel, f0, y, lr=0.1, steps=1, kernel_test=torch.full_like(kernel, float("nan")), f0_test=f0)
    with pytest.raises(TypeError, match="kernel must have a floating dtype"):
        critical_lr(torch.eye(3, dtype=torch.int64))


def test_parameters_all_zero_give_an_undefined_relative_change() -> None:
    x, y = data()
    model = nn.Linear(1, 1).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    history = train(model, x, y, steps=3, lr=0.1, progress=False)
    assert history.initial_norm == 0.0 and bool(history.relative_change.isnan().all())
    assert history.loss[-1] < history.loss[0]


def test_progress_bar_is_optional_and_quiet_when_off(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = data()
    train(net(), x, y, steps=3, lr=0.1, progress=False)
    assert capsys.readouterr() == ("", "")
    train(net(), x, y, steps=3, lr=0.1, progress=True)
    assert "gradient descent" in capsys.readouterr().err


def test_default_progress_draws_no_text_bar_into_a_notebook_without_ipywidgets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the book build is: a Jupyter kernel, no ipywidgets. A text bar there would land in the page.
    monkeypatch.setitem(sys.modules, "ipykernel", sys.modules.get("ipykernel", sys))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real_find_spec(name, *a)
    )
    x, y = data()
    train(net(), x, y, steps=3, lr=0.1)
    assert capsys.readouterr() == ("", "")


def test_wrappers_keep_the_ntk_of_the_trained_model() -> None:
    # After training the wrapped model has moved away from theta0; the frozen theta0 pass of `centered`
    # must not leak into the kernel, and the linearisation's kernel is the model's at its own theta0.
    x, y = data()
    model = net(width=16, depth=2)
    wrapped = centered(model)
    train(wrapped, x, y, steps=30, lr=0.1, progress=False)
    kernel = empirical_ntk(model, x)
    torch.testing.assert_close(empirical_ntk(wrapped, x), kernel, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(empirical_ntk(scaled(wrapped, 2.0), x), 4.0 * kernel, rtol=1e-12, atol=1e-12)
    lin = linearize(wrapped)
    train(lin, x, y, steps=30, lr=0.1, progress=False)
    torch.testing.assert_close(empirical_ntk(lin, x), kernel, rtol=1e-12, atol=1e-12)


def flat_parameters(model: nn.Module, step: int) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def test_callback_records_what_it_returns_at_the_chosen_steps_with_that_steps_parameters() -> None:
    x, y = data()
    model, reference = net(), net()
    calls: list[int] = []

    def snapshot(module: nn.Module, step: int) -> torch.Tensor:
        calls.append(step)
        return flat_parameters(module, step)

    history = train(model, x, y, steps=6, lr=0.1, callback=snapshot, callback_steps=[0, 2, 6, 2], progress=False)
    assert calls == [0, 2, 6] and sorted(history.records) == [0, 2, 6]
    # The same run in pieces: the parameters after 2 steps and after all 6.
    torch.testing.assert_close(history.records[0], flat_parameters(reference, 0))
    train(reference, x, y, steps=2, lr=0.1, progress=False)
    torch.testing.assert_close(history.records[2], flat_parameters(reference, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(history.records[6], flat_parameters(model, 6))


def test_callback_defaults_to_every_step_and_changes_nothing_else() -> None:
    x, y = data()
    plain = train(net(), x, y, steps=4, lr=0.1, progress=False)
    recorded = train(net(), x, y, steps=4, lr=0.1, callback=lambda m, t: t * t, progress=False)
    assert plain.records == {} and recorded.records == {t: t * t for t in range(5)}
    torch.testing.assert_close(recorded.loss, plain.loss, rtol=0, atol=0)
    torch.testing.assert_close(recorded.relative_change, plain.relative_change, rtol=0, atol=0)


def test_a_kernel_recorded_by_callback_equals_the_ntk_snapshot() -> None:
    x, y = data()
    history = train(
        net(),
        x,
        y,
        steps=4,
        lr=0.1,
        ntk_every=2,
        callback=lambda m, t: empirical_ntk(m, x),
        callback_steps=range(0, 5, 2),
        progress=False,
    )
    assert sorted(history.records) == sorted(history.ntk) == [0, 2, 4]
    for step, kernel in history.ntk.items():
        torch.testing.assert_close(history.records[step], kernel)


def test_divergence_keeps_the_records_made_before_it() -> None:
    x, y = data()
    with pytest.raises(DivergenceError) as raised:
        train(net(), x, y, steps=500, lr=1e3, callback=lambda m, t: t, progress=False)
    assert sorted(raised.value.history.records) == list(range(raised.value.step + 1))
