"""Training-time samplers, fixed-step time grids and sampling on another path (docs/math.md §1.4, §5.1, §5.4)."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from ko_lightning import FlowMatching
from ko_lightning.kinetic import SeparationFunction, default_theta_grid, solve_ko
from ko_lightning.nets import TimeMLP
from ko_lightning.paths import CondOTPath, CosinePath, TabulatedPath
from ko_lightning.time_grids import path_time_grid
from ko_lightning.time_samplers import (
    AutoTime,
    CondOTWeightedTime,
    LogitNormalTime,
    SpeedImportanceTime,
    UniformTime,
    make_time_sampler,
)


# ---------------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (-0.5, 0.7)])
def test_logit_normal_histogram_fits_its_density(mean: float, std: float) -> None:
    """Pearson's chi-square on 20 bins of equal probability under the logit-normal law, at the 0.1% level."""
    n, bins = 50_000, 20
    sampler = make_time_sampler(f"logit_normal({mean}, {std})")
    u = sampler(n, torch.Generator().manual_seed(0)).double()
    # bin edges: sigmoid(m + s * Phi^-1(k / bins))
    z = [NormalDist().inv_cdf(k / bins) for k in range(1, bins)]
    edges = torch.sigmoid(torch.tensor([mean + std * v for v in z], dtype=torch.float64))
    counts = torch.bincount(torch.bucketize(u, edges), minlength=bins).double()
    chi2 = float(((counts - n / bins) ** 2 / (n / bins)).sum())
    assert chi2 < 43.82, chi2  # chi-square with 19 degrees of freedom: P(X > 43.82) = 0.001


def test_logit_normal_density_integrates_to_one_and_matches_the_normal_law() -> None:
    law = LogitNormalTime(0.3, 0.8)
    u = torch.linspace(1e-6, 1 - 1e-6, 200_001, dtype=torch.float64)
    assert abs(float(torch.trapezoid(law.density(u), u)) - 1.0) < 1e-4
    # p(u) du = phi((logit u - m)/s) / s dlogit, and dlogit/du = 1 / (u (1 - u))
    x = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    logit = torch.log(x / (1 - x))
    phi = torch.tensor([NormalDist(0.3, 0.8).pdf(float(v)) for v in logit], dtype=torch.float64)
    assert torch.allclose(law.density(x), phi / (x * (1 - x)), rtol=1e-12)


def test_time_samplers_map_onto_the_trained_range_and_are_recorded_in_the_hyperparameters() -> None:
    model = FlowMatching(TimeMLP(2, hidden=16, depth=1), t_eps=0.01, time_sampler="logit_normal(1, 2)")
    assert model.hparams["time_sampler"] == "logit_normal(1, 2)"
    g = torch.Generator().manual_seed(0)
    t = model.sample_time(10_000, torch.device("cpu"), g)
    u = LogitNormalTime(1.0, 2.0)(10_000, torch.Generator().manual_seed(0))
    assert torch.equal(t, 0.01 + 0.98 * u)

    def late(batch: int, generator: torch.Generator | None) -> torch.Tensor:
        return 0.5 + 0.5 * torch.rand(batch, generator=generator)

    custom = FlowMatching(TimeMLP(2, hidden=16, depth=1), time_sampler=late)
    assert custom.hparams["time_sampler"].startswith("callable:")
    assert float(custom.sample_time(1000, torch.device("cpu")).min()) >= 0.5


def test_the_uniform_sampler_draws_the_numbers_the_loss_always_drew() -> None:
    model = FlowMatching(TimeMLP(2, hidden=16, depth=1), t_eps=0.02)
    t = model.sample_time(64, torch.device("cpu"), torch.Generator().manual_seed(5))
    assert torch.equal(t, 0.02 + (1.0 - 0.04) * torch.rand(64, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("lognormal", "time_sampler='lognormal' is not a known sampler"),
        ("logit_normal(0, -1)", "std > 0"),
        (3, "time_sampler must be a name or a callable"),
    ],
)
def test_bad_time_samplers_are_errors_naming_time_sampler(spec: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FlowMatching(TimeMLP(2, hidden=16, depth=1), time_sampler=spec)  # type: ignore[arg-type]


def test_a_callable_returning_times_outside_the_unit_interval_is_named() -> None:
    def bad(batch: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.full((batch,), 1.5)

    model = FlowMatching(TimeMLP(2, hidden=16, depth=1), time_sampler=bad)
    with pytest.raises(ValueError, match=r"time_sampler callable:.*bad returned values outside \[0, 1\]"):
        model.loss(torch.randn(8, 2))


# ---------------------------------------------------------------------------------------------- time grids
def test_the_angle_grid_of_cond_ot_is_its_closed_form() -> None:
    grid = torch.tensor(path_time_grid(CondOTPath(), 8, 0.0, 1.0, "angle"), dtype=torch.float64)
    theta = torch.linspace(0, math.pi / 2, 9, dtype=torch.float64)
    expected = torch.sin(theta) / (torch.sin(theta) + torch.cos(theta))
    assert torch.allclose(grid, expected, atol=2e-7)  # fp32 bisection of the SNR inverse


def test_euler_on_a_given_time_grid_matches_a_hand_written_loop() -> None:
    torch.manual_seed(0)
    model = FlowMatching(TimeMLP(2, hidden=32, depth=2), data_shape=(2,))
    grid = model.time_grid(5)
    x0 = torch.randn(50, 2, generator=torch.Generator().manual_seed(1))
    result = model.sample(x0=x0, time_grid=grid)
    assert result.nfe == 5
    x = x0.clone()
    with torch.no_grad():
        for a, b in zip(grid[:-1], grid[1:], strict=True):
            x = x + (b - a) * model.net(x, torch.full((50,), a))
    assert torch.allclose(result.samples, x, atol=1e-5)
    uniform = model.sample(x0=x0, steps=5).samples
    assert not torch.allclose(uniform, x, atol=1e-3)  # the grid is used: not the uniform one


@pytest.mark.parametrize(
    ("time_grid", "kwargs", "match"),
    [
        ([0.0, 0.6, 0.4, 1.0], {}, "time_grid must be strictly increasing"),
        ([0.0, 0.5, 1.2], {}, r"time_grid must run from t_eps = 0 to 1 - t_eps = 1"),
        ([0.1, 0.5, 1.0], {}, r"time_grid must run from t_eps = 0"),
        ([0.0, 1.0], {"steps": 3}, "time_grid replaces steps"),
        ([0.0, 1.0], {"method": "dopri5"}, "time_grid is for fixed-step methods"),
        ([[0.0, 1.0]], {}, "time_grid must be 1D"),
    ],
)
def test_bad_time_grids_are_errors_naming_time_grid(time_grid: object, kwargs: dict[str, object], match: str) -> None:
    model = FlowMatching(TimeMLP(2, hidden=16, depth=1), data_shape=(2,))
    with pytest.raises(ValueError, match=match):
        model.sample(4, time_grid=time_grid, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- another path
def test_sampling_on_another_path_solves_the_same_ode_in_other_coordinates() -> None:
    """The scale-time map is a change of variables of the ODE, exact for any velocity field: with an accurate
    solver a Cond-OT model sampled on the cosine path ends where it ends on its own path (c = 1 at both ends)."""
    torch.manual_seed(0)
    model = FlowMatching(TimeMLP(2, hidden=32, depth=2), data_shape=(2,))
    x0 = torch.randn(200, 2, generator=torch.Generator().manual_seed(1))
    own = model.sample(x0=x0, method="dopri5", atol=1e-7, rtol=1e-7).samples
    moved = model.sample(x0=x0, method="dopri5", atol=1e-7, rtol=1e-7, path=CosinePath()).samples
    # the transfer evaluates inside [1e-5, 1 - 1e-5]: an O(1e-5) change of the field at the ends
    assert (own - moved).abs().max() < 1e-3
    coarse_own = model.sample(x0=x0, steps=3).samples
    coarse_moved = model.sample(x0=x0, steps=3, path=CosinePath()).samples
    assert (coarse_own - coarse_moved).abs().max() > 1e-2  # three Euler steps: the grid differs


# ---------------------------------------------------------------------------------------------- importance sampling
def _ko_like_path() -> TabulatedPath:
    """A solved KO path with a fast turn near t = 0 (Gaussian-like lambda at low SNR), floor 0.1."""
    theta = default_theta_grid(64)
    lam = torch.sin(theta) ** 2 * (1 - torch.exp(-20 * theta)) + torch.exp(-20 * theta) * torch.sin(theta) ** 2
    lam = torch.maximum(lam, torch.sin(theta) ** 2) ** 0.7
    return solve_ko(SeparationFunction(theta, lam.clamp(0, 1), torch.ones_like(theta)), gamma_floor=0.1).path


def test_speed_importance_sampling_is_an_unbiased_estimate_of_the_uniform_objective() -> None:
    """E_q[w f(t)] = mean over [t_eps, 1 - t_eps] of f, for any f; here f(t) = cos(3t) + t^2, exact integral."""
    path, t_eps = _ko_like_path(), 0.01
    sampler = SpeedImportanceTime()
    t, w = sampler.weighted_times(path, 400_000, torch.Generator().manual_seed(0), torch.device("cpu"), t_eps)
    t, w = t.double(), w.double()
    assert float(t.min()) >= t_eps and float(t.max()) <= 1 - t_eps
    assert float(w.max()) <= 1 / sampler.mix + 1e-6  # bounded weights
    f = torch.cos(3 * t) + t**2
    estimate, se = float((w * f).mean()), float((w * f).std() / math.sqrt(t.numel()))
    a, b = t_eps, 1 - t_eps
    exact = ((math.sin(3 * b) - math.sin(3 * a)) / 3 + (b**3 - a**3) / 3) / (b - a)
    assert abs(estimate - exact) < 4 * se + 1e-6
    # the times follow q(t) = (1/2 + s(t) / (2 mean s)) / (b - a): compare P(t < 0.1) with its quadrature
    grid = torch.linspace(a, b, 20_001, dtype=torch.float64)
    c = path(grid.float())
    speed = (c.d_alpha.double() ** 2 + c.d_sigma.double() ** 2).sqrt()
    q = 0.5 + 0.5 * speed / float(torch.trapezoid(speed, grid) / (b - a))
    q = q / float(torch.trapezoid(q, grid))
    inside = grid <= 0.1
    expected = float(torch.trapezoid(q[inside], grid[inside]))
    observed = float((t < 0.1).double().mean())
    assert expected > 1.1 * 0.09 / 0.98  # the fast start of this path gets more samples than uniform draws give
    assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / t.numel()) + 2e-3  # + table error


def test_speed_sampling_is_uniform_on_a_constant_speed_path_and_auto_weights_only_ko_paths() -> None:
    sampler = SpeedImportanceTime()
    t, w = sampler.weighted_times(CondOTPath(), 10_000, torch.Generator().manual_seed(1), torch.device("cpu"), 0.0)
    u = torch.rand(10_000, generator=torch.Generator().manual_seed(1)).double()
    assert torch.allclose(t.double(), u, atol=1e-6)  # the same uniform numbers, t = u
    assert torch.allclose(w, torch.ones_like(w), atol=1e-6)
    auto = make_time_sampler("auto")
    assert isinstance(auto, AutoTime)
    assert isinstance(auto.for_path(CondOTPath()), UniformTime)
    assert isinstance(auto.for_path(CosinePath()), UniformTime)
    chosen = auto.for_path(_ko_like_path())
    assert isinstance(chosen, CondOTWeightedTime) and chosen.share == 0.5 and str(chosen) == "cond_ot_snr(0.5)"


def test_the_default_loss_on_analytic_paths_is_the_uniform_one_bit_for_bit() -> None:
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(0)
    auto = FlowMatching(TimeMLP(2, hidden=16, depth=1))
    torch.manual_seed(0)
    uniform = FlowMatching(TimeMLP(2, hidden=16, depth=1), time_sampler="uniform")
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(auto.loss(x, g1), uniform.loss(x, g2))
