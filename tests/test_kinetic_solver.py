"""The closed-form KO solver: analytic cases, Theorem 3.1, regularization, diagnostics, bad input."""

from __future__ import annotations

import math
import time

import pytest
import torch
from kinetic_helpers import two_point_separation

from ko_lightning.kinetic import (
    DEFAULT_GAMMA_FLOORS,
    SeparationFunction,
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
    assert sol.ke_min == pytest.approx(exact, abs=1e-10)
    assert sol.ke == pytest.approx(exact, abs=1e-10) and sol.ke_price == pytest.approx(0.0, abs=1e-12)
    assert sol.phi == pytest.approx(math.atan2(math.sqrt(v), sigma_min), abs=1e-12)
    t = torch.linspace(0, 1, 1001)
    got, ref = sol.path(t), CondOTPath(sigma_min)(t)
    for name in ("alpha", "sigma"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=1e-6)
    # Between nodes the Hermite derivative carries the fp32 rounding of the node values over the node spacing
    # (about 6e-8 / 2e-3); at the nodes it is the solver's exact derivative.
    for name in ("d_alpha", "d_sigma"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=1e-4)
    nodes = sol.path.t_grid
    got, ref = sol.path(nodes), CondOTPath(sigma_min)(nodes)
    for name in ("alpha", "sigma", "d_alpha", "d_sigma"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=1e-6)
    assert kinetic_energy(sol.path, one, second_moment=v) == pytest.approx(exact, abs=1e-5)


@pytest.mark.parametrize(("sigma_min", "v"), [(0.0, 1.0), (0.05, 1.0), (0.0, 3.0)])
def test_gaussian_data(sigma_min: float, v: float) -> None:
    gauss = SeparationFunction.gaussian()
    sol = solve_ko(gauss, sigma_min=sigma_min, second_moment=v)
    r1 = math.hypot(math.sqrt(v), sigma_min)
    assert sol.phi == pytest.approx(0.0, abs=1e-6)
    assert sol.ke_min == pytest.approx((r1 - 1) ** 2, abs=1e-12)
    # gamma = 0 everywhere: the floored cone has Phi_eps = sqrt(eps) theta1 and the segment's radius dips to at
    # most cos(Phi_eps / 2) below the straight radial interpolation between 1 and r1.
    theta1 = math.atan2(math.sqrt(v), sigma_min)
    assert sol.phi_regularized == pytest.approx(math.sqrt(sol.gamma_floor) * theta1, rel=1e-9)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    c = sol.path(t.float())
    r = torch.sqrt(v * c.alpha.double() ** 2 + c.sigma.double() ** 2)
    chord = 1 + (r1 - 1) * t  # upper envelope of |P(t)|
    dip = 1 - math.cos(sol.phi_regularized / 2)
    assert float((r - chord).max()) < 1e-6
    assert float((chord - r).max()) < dip * max(1.0, r1) + 1e-6
    if sigma_min == 0 and v == 1:  # the marginal stays standard normal: alpha^2 + sigma^2 ~ 1
        assert float((r**2 - 1).abs().max()) < 2 * dip + 1e-6
    assert sol.ke == pytest.approx(kinetic_energy(sol.path, gauss, second_moment=v), abs=1e-6)


def test_theorem_3_1(lam_two_point) -> None:
    """sigma_min = 0: r_t = sqrt(1 - b t + b t^2), theta'_t = sqrt((b - b^2/4) / gamma(theta_t)) / (1 - b t + b t^2)."""
    lam = lam_two_point
    for floor in (1e-3, None):
        sol = solve_ko(lam, gamma_floor=floor)
        eps = sol.gamma_floor
        b = 2 * (1 - math.cos(sol.phi_regularized))  # the KE of the floored problem
        t_nodes = sol.path.t_grid.double()
        for where, t, tol_r, tol_th in (
            ("nodes", t_nodes, 1e-6, 1e-5),
            ("midpoints", 0.5 * (t_nodes[1:] + t_nodes[:-1]), 1e-6, 1e-2),
        ):
            c = sol.path(t.float())
            t = t.float().double()
            a, s, da, ds = (x.double() for x in (c.alpha, c.sigma, c.d_alpha, c.d_sigma))
            r = torch.sqrt(a * a + s * s)
            q = 1 - b * t + b * t * t
            theta_dot = (s * da - a * ds) / r**2
            gamma = lam.gamma(torch.atan2(a, s)).clamp_min(eps)  # the solver's floored gamma
            predicted = torch.sqrt((b - b * b / 4) / gamma) / q
            assert float((r - q.sqrt()).abs().max()) < tol_r, where
            assert float(((theta_dot - predicted) / predicted).abs().max()) < tol_th, where
    # With a vanishing floor, the floored problem's b tends to the true minimum KE_min.
    tiny = solve_ko(lam, gamma_floor=1e-8)
    assert 2 * (1 - math.cos(tiny.phi_regularized)) == pytest.approx(tiny.ke_min, abs=1e-5)


@pytest.mark.parametrize("d", [1, 4, 64])
def test_regularization_price_and_consistency(d: int) -> None:
    lam = two_point_separation(d)
    sol = solve_ko(lam)
    assert sol.ke >= sol.ke_min - 1e-12
    assert sol.ke_price <= 0.005 * sol.ke_min + 1e-10
    # the automatic floor is the largest acceptable one in the list
    k = DEFAULT_GAMMA_FLOORS.index(sol.gamma_floor)
    if k > 0:
        larger = solve_ko(lam, gamma_floor=DEFAULT_GAMMA_FLOORS[k - 1])
        assert larger.ke_price > 0.005 * larger.ke_min
    # the returned table's KE (independent quadrature of the interpolated path) is the reported one
    assert kinetic_energy(sol.path, lam) == pytest.approx(sol.ke, abs=1e-5)
    # end points, finite bounded derivatives (theta' <= phi' / sqrt(eps), phi' <= |D| / r_min)
    c = sol.path(torch.tensor([0.0, 1.0]))
    assert c.alpha.tolist() == [0.0, 1.0] and c.sigma.tolist() == [1.0, 0.0]
    bound = 2.0 / math.sqrt(sol.gamma_floor) + 2.0
    assert 0 < sol.max_abs_d_alpha < bound and 0 < sol.max_abs_d_sigma < bound
    assert float(sol.path.d_alpha_grid.abs().max()) == pytest.approx(sol.max_abs_d_alpha, rel=1e-6)
    # smaller floors cost less and converge to KE_min
    prices = [solve_ko(lam, gamma_floor=f).ke_price for f in (1e-2, 1e-4, 1e-6)]
    assert prices[0] >= prices[1] >= prices[2] and prices[2] < 1e-4


def test_table_state_dict_and_speed(lam_two_point) -> None:
    sol = solve_ko(lam_two_point, sigma_min=0.01)
    assert sol.path.t_grid.numel() == 512 and sol.path.t_grid.dtype == torch.float32
    assert sol.path.sigma_min == pytest.approx(0.01)
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
        ({"floors": (0.1, 2.0)}, "floors"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        solve_ko(SeparationFunction.constant_one(), **kwargs)


def test_lam_must_be_a_separation_function() -> None:
    with pytest.raises(ValueError, match="lam"):
        solve_ko(torch.ones(10))  # type: ignore[arg-type]
