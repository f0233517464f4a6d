"""The closed-form KO solver: analytic cases, Theorem 3.1, regularization, diagnostics, bad input."""

from __future__ import annotations

import math
import time

import pytest
import torch

from kinetic_helpers import U32, hermite_table_rounding, ke_fp32_tol, max_gamma_slope, two_point_separation
from ko_lightning.kinetic import (
    DEFAULT_GAMMA_FLOOR,
    DEFAULT_GAMMA_FLOORS,
    SeparationFunction,
    default_theta_grid,
    kinetic_energy,
    solve_ko,
)
from ko_lightning.paths import CondOTPath, TabulatedPath

# One intra-op thread (tests/conftest.py): the test machine's two cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("sigma_min", "v"), [(0.0, 1.0), (0.01, 1.0), (0.2, 1.0), (0.1, 2.5)])
def test_separated_data_gives_cond_ot(sigma_min: float, v: float) -> None:
    one = SeparationFunction.constant_one()
    sol = solve_ko(one, sigma_min=sigma_min, second_moment=v)
    exact = v + (1 - sigma_min) ** 2  # Cond-OT: alpha' = 1 (times v in data units), sigma' = -(1 - sigma_min)
    # The solver is float64 closed forms (a few hundred operations on O(1) numbers): rounding ~1e-14.
    assert sol.ke_min == pytest.approx(exact, abs=1e-10)
    assert sol.ke == pytest.approx(exact, abs=1e-10) and sol.ke_price == pytest.approx(0.0, abs=1e-12)
    assert sol.phi == pytest.approx(math.atan2(math.sqrt(v), sigma_min), abs=1e-12)
    # The table interpolates Cond-OT's linear coefficients exactly (cubic Hermite, exact node slopes), so only
    # fp32 rounding is left: the table's evaluation (hermite_table_rounding; between nodes its derivative
    # carries the rounding of the node values over the node spacing, u / h) and the reference's own, CondOTPath
    # in fp32: sigma = 1 - k t (2u), sigma' = -k (u), alpha = t and alpha' = 1 exact.
    ref_err = {"alpha": 0.0, "sigma": 2 * U32, "d_alpha": 0.0, "d_sigma": U32}
    for t in (torch.linspace(0, 1, 1001), sol.path.t_grid):  # between nodes, and at the nodes
        got, ref = sol.path(t), CondOTPath(sigma_min)(t)
        table_err = hermite_table_rounding(sol.path, t)
        for name in ("alpha", "sigma", "d_alpha", "d_sigma"):
            err = (getattr(got, name) - getattr(ref, name)).double().abs()
            assert bool((err <= table_err[name] + ref_err[name]).all()), name
    assert kinetic_energy(sol.path, one, second_moment=v) == pytest.approx(exact, abs=ke_fp32_tol(sol.path, one, v))


@pytest.mark.parametrize(("sigma_min", "v"), [(0.0, 1.0), (0.05, 1.0), (0.0, 3.0)])
def test_gaussian_data(sigma_min: float, v: float) -> None:
    gauss = SeparationFunction.gaussian()
    sol = solve_ko(gauss, sigma_min=sigma_min, second_moment=v)
    r1 = math.hypot(math.sqrt(v), sigma_min)
    # gamma = 0 up to float64 rounding (a few u64), so Phi = int sqrt(gamma) <= (pi / 2) sqrt(4 u64) ~ 3e-8
    assert sol.phi == pytest.approx(0.0, abs=1e-6)
    assert sol.ke_min == pytest.approx((r1 - 1) ** 2, abs=1e-12)  # then 1 + r1^2 - 2 r1 cos(Phi): ~1e-15
    # gamma = 0 everywhere: the floored cone has Phi_eps = sqrt(eps) theta1 and the segment's radius dips to at
    # most cos(Phi_eps / 2) below the straight radial interpolation between 1 and r1.
    theta1 = math.atan2(math.sqrt(v), sigma_min)
    assert sol.phi_regularized == pytest.approx(math.sqrt(sol.gamma_floor) * theta1, rel=1e-9)  # float64
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    c = sol.path(t.float())
    a, s = c.alpha.double(), c.sigma.double()
    r = torch.sqrt(v * a**2 + s**2)
    chord = 1 + (r1 - 1) * t  # upper envelope of |P(t)|
    dip = 1 - math.cos(sol.phi_regularized / 2)
    # fp32 rounding of r: the table's values (hermite_table_rounding; its cubic truncation, ~h^4, is ~1e-12),
    # and the fp32 time (|dt| <= u t, |dr/dt| <= sqrt(v) max|alpha'| + max|sigma'|).
    table_err = hermite_table_rounding(sol.path, t)
    r_err = (v * a.abs() * table_err["alpha"] + s.abs() * table_err["sigma"]) / r
    r_err = r_err + U32 * (math.sqrt(v) * sol.max_abs_d_alpha + sol.max_abs_d_sigma)
    assert float((r - chord - r_err).max()) < 0
    assert float((chord - r - r_err).max()) < dip * max(1.0, r1)
    if sigma_min == 0 and v == 1:  # the marginal stays standard normal: alpha^2 + sigma^2 ~ 1
        assert float(((r**2 - 1).abs() - 2 * r * r_err).max()) < 2 * dip
    # float64 closed form against the quadrature of the fp32 table (ke_fp32_tol)
    tol = ke_fp32_tol(sol.path, gauss, v)
    assert sol.ke == pytest.approx(kinetic_energy(sol.path, gauss, second_moment=v), abs=tol)


def test_theorem_3_1(lam_two_point) -> None:
    """sigma_min = 0: r_t = sqrt(1 - b t + b t^2), theta'_t = sqrt((b - b^2/4) / gamma(theta_t)) / (1 - b t + b t^2)."""
    lam = lam_two_point
    slope = max_gamma_slope(lam)

    def polar(path, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """r, theta, theta' = (sigma alpha' - alpha sigma') / r^2 and first-order bounds on their fp32 rounding."""
        c, e = path(t.float()), hermite_table_rounding(path, t)
        a, s, da, ds = (x.double() for x in (c.alpha, c.sigma, c.d_alpha, c.d_sigma))
        r = torch.sqrt(a * a + s * s)
        theta_dot = (s * da - a * ds) / r**2
        r_err = (a.abs() * e["alpha"] + s.abs() * e["sigma"]) / r
        dot_err = da.abs() * e["sigma"] + s.abs() * e["d_alpha"] + ds.abs() * e["alpha"] + a.abs() * e["d_sigma"]
        dot_err = dot_err / r**2 + 2 * theta_dot.abs() * r_err / r
        return {"r": r, "theta": torch.atan2(a, s), "theta_dot": theta_dot, "r_err": r_err, "dot_err": dot_err}

    for floor in (1e-3, None):
        sol = solve_ko(lam, gamma_floor=floor)
        # The table and the solver's angle grid are discretizations: a 4x finer solution estimates their error
        # (for any order p >= 1, |coarse - truth| <= 4/3 |coarse - fine| asymptotically; allow 2), and fp32
        # rounding of both tables is added (hermite_table_rounding, propagated to first order).
        fine = solve_ko(lam, gamma_floor=sol.gamma_floor, n_grid=4 * 512, n_theta=4 * 4096 + 1)
        eps = sol.gamma_floor
        b = 2 * (1 - math.cos(sol.phi_regularized))  # the KE of the floored problem
        t_nodes = sol.path.t_grid.double()
        for where, t in (("nodes", t_nodes), ("midpoints", 0.5 * (t_nodes[1:] + t_nodes[:-1]))):
            got, ref = polar(sol.path, t), polar(fine.path, t)
            t = t.float().double()
            q = 1 - b * t + b * t * t
            gamma = lam.gamma(got["theta"]).clamp_min(eps)  # the solver's floored gamma
            predicted = torch.sqrt((b - b * b / 4) / gamma) / q
            # gamma at the fp32 angle: theta moves by <= r_err / r, gamma by <= max|gamma'| that (0 if floored)
            floored = lam.gamma(got["theta"]) <= eps
            gamma_err = torch.where(floored, torch.zeros_like(q), slope * got["r_err"] / got["r"])
            tol_r = 2 * (got["r"] - ref["r"]).abs() + got["r_err"] + 2 * ref["r_err"]
            tol_th = 2 * (got["theta_dot"] - ref["theta_dot"]).abs() + got["dot_err"] + 2 * ref["dot_err"]
            tol_th = tol_th / predicted.abs() + 0.5 * gamma_err / gamma
            assert bool(((got["r"] - q.sqrt()).abs() <= tol_r).all()), where
            assert bool((((got["theta_dot"] - predicted) / predicted).abs() <= tol_th).all()), where
    # With a vanishing floor, the floored problem's b tends to the true minimum KE_min = 2 (1 - cos Phi): b - KE_min
    # <= 2 (Phi_eps - Phi), and Phi_eps - Phi, the solver's quadrature of sqrt(max(gamma, eps)) - sqrt(gamma) <=
    # sqrt(eps), is <= sqrt(eps) x (the angles where gamma < eps, plus a cell of its grid on either side).
    eps = 1e-8
    tiny = solve_ko(lam, gamma_floor=eps)
    theta = torch.linspace(0, math.pi / 2, 100001, dtype=torch.float64)
    below = theta[lam.gamma(theta) < eps]
    measure = (float(below.max()) if below.numel() else 0.0) + 2 * (math.pi / 2) / 4096
    assert 2 * (1 - math.cos(tiny.phi_regularized)) == pytest.approx(tiny.ke_min, abs=2 * math.sqrt(eps) * measure)


@pytest.mark.parametrize("d", [1, 4, 64])
def test_regularization_price_and_consistency(d: int) -> None:
    lam = two_point_separation(d)
    sol = solve_ko(lam, gamma_floor=None)  # the floor chosen by the KE price
    assert sol.ke >= sol.ke_min - 1e-12  # float64 rounding of O(1) energies: ~1e-15
    assert sol.ke_price <= 0.005 * sol.ke_min + 1e-10  # the documented acceptance rule, with its 1e-10 slack
    # the automatic floor is the largest acceptable one in the list
    k = DEFAULT_GAMMA_FLOORS.index(sol.gamma_floor)
    if k > 0:
        larger = solve_ko(lam, gamma_floor=DEFAULT_GAMMA_FLOORS[k - 1])
        assert larger.ke_price > 0.005 * larger.ke_min
    # the returned table's KE (independent quadrature of the interpolated path) is the reported one, up to the
    # discretizations (table, angle grid: a 4x finer solution estimates their error, |coarse - truth| <= 4/3
    # |coarse - fine| for any order >= 1; allow 2) and the fp32 rounding of both tables (ke_fp32_tol)
    fine = solve_ko(lam, gamma_floor=sol.gamma_floor, n_grid=4 * 512, n_theta=4 * 4096 + 1)
    ke_table, ke_fine = kinetic_energy(sol.path, lam), kinetic_energy(fine.path, lam)
    tol = (
        2 * (abs(ke_table - ke_fine) + abs(sol.ke - fine.ke))
        + ke_fp32_tol(sol.path, lam)
        + 2 * ke_fp32_tol(fine.path, lam)
    )
    assert ke_table == pytest.approx(sol.ke, abs=tol)
    # end points, finite bounded derivatives (theta' <= phi' / sqrt(eps), phi' <= |D| / r_min)
    c = sol.path(torch.tensor([0.0, 1.0]))
    assert c.alpha.tolist() == [0.0, 1.0] and c.sigma.tolist() == [1.0, 0.0]
    bound = 2.0 / math.sqrt(sol.gamma_floor) + 2.0
    assert 0 < sol.max_abs_d_alpha < bound and 0 < sol.max_abs_d_sigma < bound
    # the table holds the float64 derivatives rounded to fp32 (relative error <= u)
    assert float(sol.path.d_alpha_grid.abs().max()) == pytest.approx(sol.max_abs_d_alpha, rel=U32)
    # smaller floors cost less and converge to KE_min
    prices = [solve_ko(lam, gamma_floor=f).ke_price for f in (1e-2, 1e-4, 1e-6)]
    assert prices[0] >= prices[1] >= prices[2] and prices[2] < 1e-4


def test_table_state_dict_and_speed(lam_two_point) -> None:
    sol = solve_ko(lam_two_point, sigma_min=0.01)
    assert sol.path.t_grid.numel() == 512 and sol.path.t_grid.dtype == torch.float32
    assert sol.path.sigma_min == pytest.approx(0.01, rel=U32)  # sigma_1 of the fp32 table: 0.01 rounded once
    copy = TabulatedPath.from_path(CondOTPath(), n=9)
    copy.load_state_dict(sol.path.state_dict())
    t = torch.rand(100, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(copy(t).alpha, sol.path(t).alpha, rtol=0, atol=0)
    start = time.perf_counter()
    for _ in range(5):
        solve_ko(lam_two_point)
    assert (time.perf_counter() - start) / 5 < 0.1  # target 10 ms (benchmarks/); loose here on a shared CPU


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma_min": -0.1}, "sigma_min"),
        ({"sigma_min": 1.0}, "sigma_min"),
        ({"sigma_min": float("nan")}, "sigma_min"),
        ({"gamma_floor": 0.0}, "gamma_floor"),
        ({"gamma_floor": 1.0}, "gamma_floor"),
        ({"second_moment": 0.0}, "second_moment"),
        ({"second_moment": float("inf")}, "second_moment"),
        ({"n_grid": 2}, "n_grid"),
        ({"max_price": -1.0}, "max_price"),
        ({"floors": (0.1, 2.0), "gamma_floor": None}, "floors"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        solve_ko(SeparationFunction.constant_one(), **kwargs)


def test_lam_must_be_a_separation_function() -> None:
    with pytest.raises(ValueError, match="lam"):
        solve_ko(torch.ones(10))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- the default floor
def _near_gaussian_separation() -> SeparationFunction:
    """lambda near the Gaussian bound (gamma = 1e-4) up to theta ~ 1.4, then separating (gamma -> 1): thin data whose
    low-SNR posterior is the Gaussian one, where the KE-price floor picks tiny floors (docs/math.md §4.7)."""
    theta = default_theta_grid(256).double()
    gamma = 1e-4 + (1 - 1e-4) * torch.sigmoid((theta - 1.4) / 0.03)
    return SeparationFunction(theta, 1 - (1 - gamma) * torch.cos(theta) ** 2)


def _turning_rates(path: TabulatedPath) -> tuple[float, float, float]:
    """``max theta'`` at the table's nodes (its derivatives are the solver's exact ones), ``min r`` and ``theta_1``."""
    a, s, da, ds = (v.double() for v in (path.alpha_grid, path.sigma_grid, path.d_alpha_grid, path.d_sigma_grid))
    r2 = a * a + s * s
    return float(((s * da - a * ds) / r2).max()), float(r2.min().sqrt()), float(torch.atan2(a[-1], s[-1]))


def test_default_floor_bounds_the_turning_rate_of_a_near_gaussian_lambda() -> None:
    lam = _near_gaussian_separation()
    default = solve_ko(lam)
    assert default.gamma_floor == DEFAULT_GAMMA_FLOOR == 0.1
    # On the floored cone the path is a segment D = P1 - P0 with constant angular momentum r^2 phi' = D_y, and
    # theta' = phi' / sqrt(gamma_eps) <= D_y / (r_min^2 sqrt(eps)); D_y = r1 sin(Phi_eps) <= sin(theta1 sqrt(1)).
    rate, r_min, theta1 = _turning_rates(default.path)
    d_y = math.sin(default.phi_regularized)
    bound = d_y / (r_min**2 * math.sqrt(default.gamma_floor))
    assert rate <= bound * (1 + 1e-5)  # fp32 table values: relative rounding ~1e-6
    assert rate <= 2.5 * theta1  # here: at most 2.5x the cosine path's constant rate
    # The KE-price rule picks a floor at or below the Gaussian-like plateau (1e-4) and turns far faster.
    priced = solve_ko(lam, gamma_floor=None)
    assert priced.gamma_floor <= 1e-4
    assert _turning_rates(priced.path)[0] > 5 * rate


def test_default_floor_costs_kinetic_energy_that_the_solver_reports_exactly() -> None:
    # The price of the default floor is reported, not hidden: KE(floored path under the true gamma) - KE_min >= 0,
    # and an independent quadrature of the tabulated path gives the same KE (as for any floor above).
    lam = _near_gaussian_separation()
    sol = solve_ko(lam)
    assert sol.ke_price >= 0 and sol.ke >= sol.ke_min
    ke_table = kinetic_energy(sol.path, lam)
    assert ke_table == pytest.approx(sol.ke, rel=1e-3)


def test_the_velocity_loss_has_a_bounded_variance_under_the_default_floor() -> None:
    """Per-sample velocity loss of a zero network on N(0, I) data: L = ||alpha' x1 + sigma' x0||^2 / d
    = (alpha'^2 + sigma'^2) chi^2_d / d, so E[L^2] = E_t[(alpha'^2 + sigma'^2)^2] (1 + 2/d) with t ~ U[0, 1].
    alpha'^2 + sigma'^2 = r'^2 + r^2 theta'^2, bounded through theta' <= D_y / (r_min^2 sqrt(eps)) (§4.6): the
    floor bounds the loss's variance. Checked: the Monte-Carlo second moment matches the quadrature of the table
    (within 5 standard errors), and both stay under the bound; the KE-price floor's second moment is far larger."""
    from ko_lightning.objective import flow_matching_loss
    from ko_lightning.parametrizations import parametrization_from_name

    def zero(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    lam = _near_gaussian_separation()
    d, n = 4, 200_000
    gen = torch.Generator().manual_seed(0)
    second_moments = {}
    for floor in (DEFAULT_GAMMA_FLOOR, None):
        sol = solve_ko(lam, gamma_floor=floor)
        path = sol.path
        t_fine = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000
        c = path(t_fine.float())
        speed2 = c.d_alpha.double() ** 2 + c.d_sigma.double() ** 2
        exact = float((speed2**2).mean()) * (1 + 2 / d)  # midpoint rule on a fine grid
        x1, x0, t = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen), torch.rand(n, generator=gen)
        c_t = path(t)
        per_sample = (c_t.d_alpha[:, None] * x1 + c_t.d_sigma[:, None] * x0).pow(2).mean(1).double()
        # the objective's value for a zero network is the mean of these per-sample losses (fp32 sums: ~1e-6)
        loss = flow_matching_loss(zero, parametrization_from_name("velocity"), path, x0, x1, t, "velocity")
        assert float(loss) == pytest.approx(float(per_sample.mean()), rel=1e-5)
        mc, se = float(per_sample.pow(2).mean()), float(per_sample.pow(2).std() / math.sqrt(n))
        assert mc == pytest.approx(exact, abs=5 * se), floor
        second_moments[floor] = exact
        if floor is not None:
            _, r_min, _ = _turning_rates(path)
            r = torch.sqrt(path.alpha_grid.double() ** 2 + path.sigma_grid.double() ** 2)
            d_r = float(((path.alpha_grid * path.d_alpha_grid + path.sigma_grid * path.d_sigma_grid) / r).abs().max())
            theta_bound = math.sin(sol.phi_regularized) / (r_min**2 * math.sqrt(floor))
            assert float(speed2.max()) <= (d_r**2 + float(r.max()) ** 2 * theta_bound**2) * (1 + 1e-5)
    assert second_moments[None] > 10 * second_moments[DEFAULT_GAMMA_FLOOR]
