"""Gaussian paths: boundary values, derivatives, SNR inverse, tabulation, conversions, scale-time transform."""

from __future__ import annotations

import math

import pytest
import torch

from ko_lightning.paths import (
    CondOTPath,
    CosinePath,
    GaussianPath,
    LinearVPPath,
    PolynomialPath,
    ScaleTimeVelocity,
    TabulatedPath,
    VPPath,
)
from ko_lightning.paths.serialization import path_from_state, path_to_state

ANALYTIC = {
    "condot": lambda: CondOTPath(),
    "condot_smin": lambda: CondOTPath(sigma_min=0.05),
    "vp": lambda: VPPath(),
    "vp_flat": lambda: VPPath(beta_min=1.0, beta_max=1.0),
    "cosine": lambda: CosinePath(),
    "poly2": lambda: PolynomialPath(2.0),
    "poly_half": lambda: PolynomialPath(0.7),
    "linear_vp": lambda: LinearVPPath(),
}


def _expected_ends(name: str, path: GaussianPath) -> tuple[tuple[float, float], tuple[float, float]]:
    """(alpha_0, sigma_0), (alpha_1, sigma_1) from each path's definition, written out independently."""
    if name.startswith("vp"):
        bmin, bmax = path.beta_min, path.beta_max  # type: ignore[attr-defined]
        a0 = math.exp(-0.5 * (bmin + 0.5 * (bmax - bmin)))
        return (a0, math.sqrt(1 - a0 * a0)), (1.0, 0.0)
    sigma_1 = 0.05 if name == "condot_smin" else 0.0
    return (0.0, 1.0), (1.0, sigma_1)


@pytest.mark.parametrize("name", list(ANALYTIC))
def test_boundary_values(name: str) -> None:
    path = ANALYTIC[name]()
    c = path(torch.tensor([0.0, 1.0]))
    (a0, s0), (a1, s1) = _expected_ends(name, path)
    torch.testing.assert_close(c.alpha, torch.tensor([a0, a1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(c.sigma, torch.tensor([s0, s1]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(ANALYTIC))
def test_derivatives_match_central_differences(name: str) -> None:
    path = ANALYTIC[name]()
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    c = path.coefficients(t)
    plus, minus = path.coefficients(t + h), path.coefficients(t - h)
    fd_alpha = (plus.alpha - minus.alpha) / (2 * h)
    fd_sigma = (plus.sigma - minus.sigma) / (2 * h)
    torch.testing.assert_close(c.d_alpha, fd_alpha, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c.d_sigma, fd_sigma, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(ANALYTIC))
def test_snr_inverse_round_trip(name: str) -> None:
    path = ANALYTIC[name]()
    t = torch.linspace(0.01, 0.99, 99)
    c = path(t)
    torch.testing.assert_close(path.snr_inverse(c.alpha / c.sigma), t, atol=2e-6, rtol=0)


def test_default_bisection_snr_inverse_matches_closed_form() -> None:
    t = torch.linspace(0.01, 0.99, 50)
    cos = CosinePath()
    tab = TabulatedPath.from_path(cos, n=513)
    torch.testing.assert_close(GaussianPath.snr_inverse(tab, cos(t).snr), t, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["condot", "condot_smin", "cosine", "poly2"])
def test_tabulated_with_derivatives_reproduces_path(name: str) -> None:
    """Hermite interpolation with exact node slopes, 257 nodes: values to 2e-6; derivatives to 1e-4, where the
    truncation error (~h^3) is negligible and fp32 rounding of the values, amplified by 1/h, dominates."""
    path = ANALYTIC[name]()
    tab = TabulatedPath.from_path(path, n=257)
    t = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    a, b = path(t), tab(t)
    for field in ("alpha", "sigma"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), atol=2e-6, rtol=0)
    for field in ("d_alpha", "d_sigma"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(ANALYTIC))
def test_tabulated_from_values_only_reproduces_path(name: str) -> None:
    """PCHIP slopes from values alone, stated tolerance: values 1e-4, derivatives 2e-2 on [0.05, 0.9]."""
    path = ANALYTIC[name]()
    grid = torch.linspace(0, 1, 513, dtype=torch.float64)
    c = path(grid.float())
    tab = TabulatedPath(grid, c.alpha, c.sigma)
    t = torch.linspace(0.05, 0.9, 777)
    a, b = path(t), tab(t)
    torch.testing.assert_close(b.alpha, a.alpha, atol=1e-4, rtol=0)
    torch.testing.assert_close(b.sigma, a.sigma, atol=1e-4, rtol=0)
    torch.testing.assert_close(b.d_alpha, a.d_alpha, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(b.d_sigma, a.d_sigma, atol=2e-2, rtol=1e-2)


def test_tabulated_derivative_is_derivative_of_its_own_values() -> None:
    # A coarse irregular grid: the interpolant's derivative must still be exactly d/dt of its values.
    grid = torch.tensor([0.0, 0.07, 0.2, 0.45, 0.5, 0.8, 1.0])
    c = CosinePath()(grid)
    tab = TabulatedPath(grid, c.alpha, c.sigma)
    t = torch.linspace(0.01, 0.99, 300, dtype=torch.float64)
    h = 1e-3
    fd = (tab(t + h).alpha.double() - tab(t - h).alpha.double()) / (2 * h)
    torch.testing.assert_close(tab(t).d_alpha.double(), fd, atol=2e-3, rtol=0)


def test_pchip_is_monotone_on_monotone_data() -> None:
    grid = torch.tensor([0.0, 0.1, 0.15, 0.5, 0.9, 1.0])
    alpha = torch.tensor([0.0, 0.5, 0.52, 0.53, 0.99, 1.0])  # steep then flat: a naive cubic overshoots
    sigma = 1 - alpha
    tab = TabulatedPath(grid, alpha, sigma)
    c = tab(torch.linspace(0, 1, 2001))
    assert bool((c.alpha[1:] >= c.alpha[:-1] - 1e-7).all())
    assert bool((c.d_alpha >= -1e-6).all())


def test_tabulated_state_dict_round_trip_with_other_grid_length() -> None:
    source = TabulatedPath.from_path(CosinePath(), n=129)
    target = TabulatedPath.from_path(CondOTPath(), n=5)
    target.load_state_dict(source.state_dict())
    t = torch.rand(100)
    torch.testing.assert_close(target(t).alpha, source(t).alpha)
    rebuilt = path_from_state(path_to_state(source))
    torch.testing.assert_close(rebuilt(t).d_sigma, source(t).d_sigma)
    vp = path_from_state(path_to_state(VPPath(beta_min=0.3, beta_max=7.0)))
    assert isinstance(vp, VPPath) and (vp.beta_min, vp.beta_max) == (0.3, 7.0)


def test_path_math_is_fp32_under_bf16_autocast() -> None:
    path = TabulatedPath.from_path(CosinePath(), n=65)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = path.sample(torch.randn(4, 3), torch.randn(4, 3), torch.rand(4))
    assert s.x_t.dtype == torch.float32 and s.target.dtype == torch.float32
    assert s.coefficients.alpha.dtype == torch.float32


# ---------------------------------------------------------------------- parametrizations
@pytest.mark.parametrize("name", ["condot", "condot_smin", "vp", "cosine", "poly2", "linear_vp"])
def test_conversions_recover_the_conditional_target(name: str) -> None:
    path = ANALYTIC[name]()
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(64, 3, 4, 4, generator=g), torch.randn(64, 3, 4, 4, generator=g)
    t = 0.05 + 0.9 * torch.rand(64, generator=g)
    s = path.sample(x0, x1, t)
    torch.testing.assert_close(path.velocity_from_x1(s.x_t, x1, t), s.target, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(path.velocity_from_eps(s.x_t, x0, t), s.target, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(path.x1_from_velocity(s.x_t, s.target, t), x1, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(path.eps_from_velocity(s.x_t, s.target, t), x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(path.x1_from_eps(s.x_t, x0, t), x1, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(path.eps_from_x1(s.x_t, x1, t), x0, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["condot", "vp", "cosine", "poly2"])
def test_velocity_loss_is_beta_squared_times_x1_loss(name: str) -> None:
    path = ANALYTIC[name]()
    g = torch.Generator().manual_seed(2)
    x0, x1, x1_hat = (torch.randn(256, 5, generator=g) for _ in range(3))
    t = 0.02 + 0.96 * torch.rand(256, generator=g)
    s = path.sample(x0, x1, t)
    velocity_loss = (path.velocity_from_x1(s.x_t, x1_hat, t) - s.target).pow(2)
    c = path(t[:, None])
    beta = c.d_alpha - c.d_sigma * c.alpha / c.sigma  # written out, not the property under test
    torch.testing.assert_close(velocity_loss, beta**2 * (x1_hat - x1).pow(2), rtol=2e-4, atol=1e-5)


# ---------------------------------------------------------------------- scale-time transformation
def _gaussian_marginal_velocity(path: GaussianPath, mean: float, var: float):
    """Exact u_t(x) for x1 ~ N(mean, var I): x_t ~ N(a mean, a^2 var + s^2); u = a' m + k'/k (x - a m)."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = path.at(t, x)
        k2 = c.alpha**2 * var + c.sigma**2
        dk_over_k = (c.alpha * c.d_alpha * var + c.sigma * c.d_sigma) / k2
        return c.d_alpha * mean + dk_over_k * (x - c.alpha * mean)

    return velocity


@pytest.mark.parametrize("path_b", [CosinePath(), VPPath(), PolynomialPath(3.0), TabulatedPath.from_path(
    CosinePath(), n=257), CondOTPath(0.02)], ids=["cosine", "vp", "poly3", "tabulated", "condot_smin"])
def test_scale_time_transform_maps_exact_velocities(path_b: GaussianPath) -> None:
    mean, var = 0.7, 0.3
    path_a = CondOTPath(sigma_min=0.01)
    v_b = ScaleTimeVelocity(_gaussian_marginal_velocity(path_a, mean, var), path_a, path_b)
    exact_b = _gaussian_marginal_velocity(path_b, mean, var)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=g) * 2
    r = 0.03 + 0.9 * torch.rand(200, generator=g)
    torch.testing.assert_close(v_b(x, r), exact_b(x, r), atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_time_outside_unit_interval_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match=r"\bt\b must lie in \[0, 1\]"):
        CondOTPath()(torch.tensor([0.5, bad]))


@pytest.mark.parametrize("bad", [1.0, -0.01, 2.0])
def test_sigma_min_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError, match="sigma_min"):
        CondOTPath(sigma_min=bad)


def test_wrong_shapes_are_named() -> None:
    path = CondOTPath()
    with pytest.raises(ValueError, match="x0 and x1"):
        path.sample(torch.randn(4, 2), torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        path.sample(torch.randn(4, 2), torch.randn(4, 2), torch.rand(3))
    with pytest.raises(ValueError, match="alpha"):
        TabulatedPath(torch.linspace(0, 1, 5), torch.zeros(4), torch.ones(5))
    with pytest.raises(ValueError, match="strictly increasing"):
        TabulatedPath(torch.tensor([0.0, 0.6, 0.5, 1.0]), torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="n must be > 0"):
        PolynomialPath(0.0)
    with pytest.raises(ValueError, match="beta_max"):
        VPPath(beta_min=1.0, beta_max=0.5)


@pytest.mark.parametrize("name", list(ANALYTIC))
def test_snr_inverse_clamps_to_the_ends(name: str) -> None:
    path = ANALYTIC[name]()
    t = path.snr_inverse(torch.tensor([0.0, 1e-12, float("inf"), 1e12]))
    assert t[0] == 0.0 and t[2] == 1.0
    assert bool(torch.isfinite(t).all()) and bool(((t >= 0) & (t <= 1)).all())
    if name.startswith("vp"):  # SNRs below alpha_0 / sigma_0 are not reached: the start of the path
        assert float(path.snr_inverse(torch.tensor([1e-3]))) == 0.0
