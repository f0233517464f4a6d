"""ODE sampling: accuracy order of each method on a flow known in closed form, exact NFE, knob errors."""

from __future__ import annotations

import math

import pytest
import torch

from ko_lightning.paths import CondOTPath, CosinePath, GaussianPath
from ko_lightning.sampling import SolverSpec, integrate

# Evaluations per step of each fixed-step method, from the methods' Butcher tableaux.
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "heun3": 3, "rk4": 4}
ORDER = {"euler": 1, "midpoint": 2, "heun": 2, "heun3": 3, "rk4": 4}


def gaussian_flow(path: GaussianPath, mean: float, var: float):
    """Marginal velocity for x1 ~ N(mean, var I) and its exact flow map.

    x_t ~ N(a m, k_t^2) with k_t^2 = a^2 var + s^2; the flow is x_t = a_t m + k_t x0, so
    u_t(x) = a' m + (k'/k)(x - a m).
    """

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = path.coefficients(t.to(torch.float64))
        a, s, da, ds = (v.reshape(-1, *([1] * (x.ndim - 1))) for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma))
        k2 = a * a * var + s * s
        return da * mean + (a * da * var + s * ds) / k2 * (x - a * mean)

    def flow(x0: torch.Tensor, t: float) -> torch.Tensor:
        c = path.coefficients(torch.tensor(t, dtype=torch.float64))
        return c.alpha * mean + torch.sqrt(c.alpha**2 * var + c.sigma**2) * x0

    return velocity, flow


@pytest.mark.parametrize("method", list(ORDER))
def test_fixed_step_methods_converge_at_their_order_with_exact_nfe(method: str) -> None:
    velocity, flow = gaussian_flow(CosinePath(), mean=1.5, var=0.25)
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = flow(x0, 1.0)
    errors = []
    for steps in (16, 32):
        result = integrate(velocity, x0, SolverSpec(method, steps=steps))
        assert result.nfe == steps * EVALS_PER_STEP[method]
        errors.append((result.samples - exact).abs().max().item())
    observed_order = math.log2(errors[0] / errors[1])
    # The next error term, C' h^(p+1), shifts the observed order by ~(C' / C) h / ln 2 with h = 1/16: 0.35
    # allows |C' / C| < 3.9. float64 rounding (~1e-14) is far below the errors (>= 1e-9 at 32 RK4 steps).
    assert abs(observed_order - ORDER[method]) < 0.35, (method, errors, observed_order)


def test_adaptive_method_meets_tolerance_and_counts_nfe() -> None:
    velocity, flow = gaussian_flow(CondOTPath(sigma_min=0.01), mean=-0.5, var=2.0)
    x0 = torch.randn(32, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls = 0

    def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return velocity(x, t)

    result = integrate(counted, x0, SolverSpec("dopri5", atol=1e-8, rtol=1e-8))
    assert result.nfe == calls > 6
    # Step control aims at an error proportional to the tolerance (~tol^(5/6)): for any exponent >= 1/2 the solve's
    # error is <= 0.46 of its change from a 10x looser solve, which bounds it (float64 rounding ~1e-14 besides).
    loose = integrate(velocity, x0, SolverSpec("dopri5", atol=1e-7, rtol=1e-7))
    tol = (result.samples - loose.samples).abs().max().item() + 1e-12
    assert (result.samples - flow(x0, 1.0)).abs().max().item() < tol


def test_reverse_integration_returns_to_the_start() -> None:
    velocity, flow = gaussian_flow(CosinePath(), mean=0.3, var=0.5)
    x0 = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x1 = integrate(velocity, x0, SolverSpec("rk4", steps=50)).samples
    back = integrate(velocity, x1, SolverSpec("rk4", steps=50), t_start=1.0, t_end=0.0)
    # RK4's error at 50 steps is ~1/15 of its change from 25 steps, which bounds it: the backward solve's own,
    # and the forward one's carried back by the backward flow (measured by starting from the 25-step end points)
    x1_coarse = integrate(velocity, x0, SolverSpec("rk4", steps=25)).samples
    back_coarse = integrate(velocity, x1, SolverSpec("rk4", steps=25), t_start=1.0, t_end=0.0)
    carried = integrate(velocity, x1_coarse, SolverSpec("rk4", steps=50), t_start=1.0, t_end=0.0)
    tol = (back.samples - back_coarse.samples).abs().max() + (back.samples - carried.samples).abs().max() + 1e-12
    torch.testing.assert_close(back.samples, x0, atol=float(tol), rtol=0)


def test_trajectory_at_requested_time_points() -> None:
    velocity, flow = gaussian_flow(CondOTPath(), mean=1.0, var=0.2)
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    times = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    result = integrate(velocity, x0, SolverSpec("rk4", steps=40), time_points=times)
    assert result.trajectory is not None and result.trajectory.shape == (4, 8, 2)
    # RK4 at 40 steps: within its change from 20 steps (~15x its error), float64 rounding ~1e-14
    coarse = integrate(velocity, x0, SolverSpec("rk4", steps=20), time_points=times).trajectory
    for k, t in enumerate(times.tolist()):
        tol = float((result.trajectory[k] - coarse[k]).abs().max()) + 1e-12
        torch.testing.assert_close(result.trajectory[k], flow(x0, t), atol=tol, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "euler"}, "give steps"),
        ({"method": "euler", "steps": 10, "atol": 1e-3}, "atol/rtol apply to adaptive"),
        ({"method": "dopri5", "steps": 10}, "steps applies to fixed-step"),
        ({"method": "rk45", "steps": 10}, "unknown method='rk45'"),
        ({"method": "rk4", "steps": 0}, "steps must be an integer >= 1"),
        ({"method": "dopri5", "rtol": -1.0}, "rtol must be > 0"),
    ],
)
def test_solver_knob_errors_name_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SolverSpec(**kwargs)


def test_adaptive_solver_never_evaluates_outside_the_span() -> None:
    seen: list[float] = []

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.extend(t.tolist())
        return torch.sin(5 * x) + t[:, None]

    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(5))
    for tol in (1e-3, 1e-6):
        integrate(velocity, x0, SolverSpec("dopri5", atol=tol, rtol=tol))
    assert min(seen) >= 0.0 and max(seen) <= 1.0
