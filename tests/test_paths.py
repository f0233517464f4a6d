"""Gaussian paths: boundary values, derivatives, SNR inverse, tabulation, conversions, scale-time transform."""

from __future__ import annotations

import math

import pytest
import torch

from kinetic_helpers import ELEMENTARY_REL, PATH_COEFF_REL, U32, U64, hermite_table_rounding
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


#: Absolute fp32 error of the analytic paths' coefficients on [0, 1] (values <= 1, slopes <= pi / 2 x 2): VP's
#: exp of an argument up to 5 amplifies its 4 roundings 5x (~24u with the exp's own); the others are a few
#: roundings and at most one elementary function (sin / cos / pow: ELEMENTARY_REL). Allow 32u.
ANALYTIC_ERR = 32 * U32


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
    # fp32 coefficients <= 1 within PATH_COEFF_REL; the float64 expectation rounded to fp32 adds u
    torch.testing.assert_close(c.alpha, torch.tensor([a0, a1]), atol=PATH_COEFF_REL + U32, rtol=0)
    torch.testing.assert_close(c.sigma, torch.tensor([s0, s1]), atol=PATH_COEFF_REL + U32, rtol=0)


@pytest.mark.parametrize("name", list(ANALYTIC))
def test_derivatives_match_central_differences(name: str) -> None:
    path = ANALYTIC[name]()
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    c = path.coefficients(t)
    plus, minus = path.coefficients(t + h), path.coefficients(t - h)
    plus2, minus2 = path.coefficients(t + 2 * h), path.coefficients(t - 2 * h)
    for value, slope in (("alpha", "d_alpha"), ("sigma", "d_sigma")):
        fd = (getattr(plus, value) - getattr(minus, value)) / (2 * h)
        fd2 = (getattr(plus2, value) - getattr(minus2, value)) / (4 * h)
        # float64: the central difference's truncation (h^2 f''' / 6) is a third of its change from step 2h;
        # rounding: coefficients within 128 u64 (as PATH_COEFF_REL in fp32) over 2h, and the derivative's own
        tol = (fd2 - fd).abs() + 128 * U64 * (getattr(plus, value).abs() + getattr(minus, value).abs()) / (2 * h)
        tol = tol + 128 * U64 * getattr(c, slope).abs()
        assert bool(((getattr(c, slope) - fd).abs() <= tol).all()), slope


@pytest.mark.parametrize("name", list(ANALYTIC))
def test_snr_inverse_round_trip(name: str) -> None:
    path = ANALYTIC[name]()
    t = torch.linspace(0.01, 0.99, 99)
    c = path(t)
    # The fp32 SNR is off by <= 2 PATH_COEFF_REL + u relatively, i.e. by that over d log(snr) / dt in time; the
    # inverse's own fp32 evaluation (a few roundings and one elementary function of t <= 1) adds <= 8u.
    exact = path.coefficients(t.double())
    d_log_snr = (exact.d_alpha / exact.alpha - exact.d_sigma / exact.sigma).abs()
    tol = (2 * PATH_COEFF_REL + U32) / d_log_snr + 8 * U32
    err = (path.snr_inverse(c.alpha / c.sigma).double() - t.double()).abs()
    assert bool((err <= tol).all()), float((err / tol).max())


def test_default_bisection_snr_inverse_matches_closed_form() -> None:
    t = torch.linspace(0.01, 0.99, 50)
    cos = CosinePath()
    tab = TabulatedPath.from_path(cos, n=513)
    # Bisection stops where fp32 can no longer order alpha and snr sigma: their rounding (the table's, its
    # fp32 node values from CosinePath within ELEMENTARY_REL + 2u, the product and the comparison) over the
    # slope |alpha' - snr sigma'| = (pi / 2) / sigma; plus the fp32 SNR's own rounding (sin, cos, division)
    # moved to time the same way, and the last midpoint's (u).
    exact = cos.coefficients(t.double())
    snr = exact.alpha / exact.sigma
    table = hermite_table_rounding(tab, t, node_err=ELEMENTARY_REL + 2 * U32, slope_err=2 * ELEMENTARY_REL)
    value_err = table["alpha"] + snr * table["sigma"] + 2 * U32 * exact.alpha
    snr_err = (2 * (ELEMENTARY_REL + 2 * U32) + U32) * snr * exact.sigma
    tol = (value_err + snr_err) / (exact.d_alpha - snr * exact.d_sigma).abs() + U32
    err = (GaussianPath.snr_inverse(tab, cos(t).snr).double() - t.double()).abs()
    assert bool((err <= tol).all()), float((err / tol).max())


@pytest.mark.parametrize("name", ["condot", "condot_smin", "cosine", "poly2"])
def test_tabulated_with_derivatives_reproduces_path(name: str) -> None:
    """Hermite interpolation with exact node slopes, 257 nodes: the truncation error (values h^4 / 384, slopes
    (sqrt(3) / 216) h^3 times max|d^4 y / dt^4| <= (pi / 2)^4) is negligible; fp32 rounding of the node values,
    amplified by 1 / h in the slopes, dominates (hermite_table_rounding), plus the reference's own rounding."""
    path = ANALYTIC[name]()
    tab = TabulatedPath.from_path(path, n=257)
    t = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    a, b = path(t), tab(t)
    h, quartic = 1 / 256, (math.pi / 2) ** 4
    table = hermite_table_rounding(tab, t, node_err=ANALYTIC_ERR, slope_err=ANALYTIC_ERR)
    for field, truncation in (
        ("alpha", h**4 / 384 * quartic),
        ("sigma", h**4 / 384 * quartic),
        ("d_alpha", math.sqrt(3) / 216 * h**3 * quartic),
        ("d_sigma", math.sqrt(3) / 216 * h**3 * quartic),
    ):
        tol = table[field] + ANALYTIC_ERR + truncation
        err = (getattr(b, field) - getattr(a, field)).double().abs()
        assert bool((err <= tol).all()), (field, float((err / tol).max()))


@pytest.mark.parametrize("name", list(ANALYTIC))
def test_tabulated_from_values_only_reproduces_path(name: str) -> None:
    """PCHIP slopes from values alone on [0.05, 0.9]: within the interpolation error (estimated against a 4x
    finer table: |coarse - truth| <= 4/3 |coarse - fine| for any order >= 1; allow 2) and fp32 rounding."""
    path = ANALYTIC[name]()

    def table(n: int) -> TabulatedPath:
        grid = torch.linspace(0, 1, n, dtype=torch.float64)
        c = path(grid.float())
        return TabulatedPath(grid, c.alpha, c.sigma)

    tab, fine = table(513), table(4 * 512 + 1)
    t = torch.linspace(0.05, 0.9, 777)
    a, b, f = path(t), tab(t), fine(t)
    # fp32 node values within ANALYTIC_ERR; a PCHIP slope is a weighted harmonic mean of two secants, which
    # moves by at most 2x each secant's error (2 ANALYTIC_ERR / h + its rounding)
    h = 1 / 512
    for value, slope in (("alpha", "d_alpha"), ("sigma", "d_sigma")):
        max_slope = float(getattr(tab, f"{slope}_grid").abs().max())
        pchip_err = 4 * (2 * ANALYTIC_ERR / h + 2 * U32 * max_slope)
        rounding = hermite_table_rounding(tab, t, node_err=ANALYTIC_ERR, slope_err=pchip_err)
        for field, ref_err in ((value, ANALYTIC_ERR), (slope, ANALYTIC_ERR)):
            tol = 2 * (getattr(b, field) - getattr(f, field)).double().abs() + rounding[field] + ref_err
            err = (getattr(b, field) - getattr(a, field)).double().abs()
            assert bool((err <= tol).all()), (field, float((err / tol).max()))


def test_tabulated_derivative_is_derivative_of_its_own_values() -> None:
    # A coarse irregular grid: the interpolant's derivative must still be exactly d/dt of its values.
    grid = torch.tensor([0.0, 0.07, 0.2, 0.45, 0.5, 0.8, 1.0])
    c = CosinePath()(grid)
    tab = TabulatedPath(grid, c.alpha, c.sigma)
    t = torch.linspace(0.01, 0.99, 300, dtype=torch.float64)
    h = 1e-3
    fd = (tab(t + h).alpha.double() - tab(t - h).alpha.double()) / (2 * h)
    # The central difference is the mean of the cubic's derivative over [t - h, t + h]: within h / 2 max|p''|
    # of it (p'' jumps at nodes, so no h^2 law there); the fp32 values' rounding over 2h, and the derivative's
    fine = torch.linspace(0.0, 1.0, 20001, dtype=torch.float64)
    curvature = float((tab(fine).d_alpha.double().diff() / fine.diff()).abs().max())
    e_plus, e_minus, e_mid = (hermite_table_rounding(tab, x) for x in (t + h, t - h, t))
    tol = h / 2 * curvature + (e_plus["alpha"] + e_minus["alpha"]) / (2 * h) + e_mid["d_alpha"]
    tol = tol + 2 * U32 * (1 + t) / (2 * h) * tab(t).d_alpha.double().abs()  # t +- h rounded to fp32: the step
    assert bool(((tab(t).d_alpha.double() - fd).abs() <= tol).all())


def test_pchip_is_monotone_on_monotone_data() -> None:
    grid = torch.tensor([0.0, 0.1, 0.15, 0.5, 0.9, 1.0])
    alpha = torch.tensor([0.0, 0.5, 0.52, 0.53, 0.99, 1.0])  # steep then flat: a naive cubic overshoots
    sigma = 1 - alpha
    tab = TabulatedPath(grid, alpha, sigma)
    t = torch.linspace(0, 1, 2001)
    c = tab(t)
    # monotone in exact arithmetic; fp32 evaluation may move each value and slope by its rounding bound
    e = hermite_table_rounding(tab, t)
    assert bool((c.alpha[1:].double() >= c.alpha[:-1].double() - e["alpha"][1:] - e["alpha"][:-1]).all())
    assert bool((c.d_alpha.double() >= -e["d_alpha"]).all())


def test_tabulated_state_dict_round_trip_with_other_grid_length() -> None:
    source = TabulatedPath.from_path(CosinePath(), n=129)
    target = TabulatedPath.from_path(CondOTPath(), n=5)
    target.load_state_dict(source.state_dict())
    t = torch.rand(100)
    torch.testing.assert_close(target(t).alpha, source(t).alpha, atol=0, rtol=0)  # the same table: bitwise
    rebuilt = path_from_state(path_to_state(source))
    torch.testing.assert_close(rebuilt(t).d_sigma, source(t).d_sigma, atol=0, rtol=0)
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
    # The identities hold for any coefficient values, and sample() and the conversions use the same fp32
    # coefficients: only the arithmetic rounds. First order: x_t and the target carry 2u of their two terms;
    # each conversion rounds its few operations (<= 5u of each term it combines), and a division by a
    # combination of coefficients (beta, sigma' - alpha' sigma / alpha) also carries that combination's 3u.
    c = path.at(t, x1)
    a, sg, da, ds = (v.double().abs() for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma))
    ax0, ax1, axt, av = x0.double().abs(), x1.double().abs(), s.x_t.double().abs(), s.target.double().abs()
    e_xt, e_v = 2 * U32 * (a * ax1 + sg * ax0), 2 * U32 * (da * ax1 + ds * ax0)
    beta, beta_terms = c.beta.double().abs(), da + ds * a / sg
    gam = (c.d_sigma - c.d_alpha * c.sigma / c.alpha).double().abs()  # the eps-velocity coefficient
    gam_terms = ds + da * sg / a
    tol = {
        "velocity_from_x1": 5 * U32 * (ds / sg * axt + beta_terms * ax1) + ds / sg * e_xt + e_v,
        "velocity_from_eps": 5 * U32 * (da / a * axt + gam_terms * ax0) + da / a * e_xt + e_v,
        "x1_from_velocity": (4 * U32 * (av + ds / sg * axt) + e_v + ds / sg * e_xt + 3 * U32 * beta_terms * ax1) / beta,
        "eps_from_velocity": (4 * U32 * (av + da / a * axt) + e_v + da / a * e_xt + 3 * U32 * gam_terms * ax0) / gam,
        "x1_from_eps": (3 * U32 * (axt + sg * ax0) + e_xt) / a,
        "eps_from_x1": (3 * U32 * (axt + a * ax1) + e_xt) / sg,
    }
    for name, got, expected in (
        ("velocity_from_x1", path.velocity_from_x1(s.x_t, x1, t), s.target),
        ("velocity_from_eps", path.velocity_from_eps(s.x_t, x0, t), s.target),
        ("x1_from_velocity", path.x1_from_velocity(s.x_t, s.target, t), x1),
        ("eps_from_velocity", path.eps_from_velocity(s.x_t, s.target, t), x0),
        ("x1_from_eps", path.x1_from_eps(s.x_t, x0, t), x1),
        ("eps_from_x1", path.eps_from_x1(s.x_t, x1, t), x0),
    ):
        err = (got.double() - expected.double()).abs()
        assert bool((err <= tol[name]).all()), (name, float((err / tol[name]).max()))


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
    expected = beta**2 * (x1_hat - x1).pow(2)
    # First order, as in test_conversions_recover_the_conditional_target: the difference beta (x1_hat - x1) is
    # off by delta (x_t's and the target's 2u, the conversion's 5u of its terms, the subtraction's u); its
    # square by 2 |diff| delta; the written-out beta by 3u of its terms, and (x1_hat - x1)^2 by 3u.
    a, sg, da, ds = (v.double().abs() for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma))
    ax0, ax1, ax1h = x0.double().abs(), x1.double().abs(), x1_hat.double().abs()
    e_xt, e_v = 2 * U32 * (a * ax1 + sg * ax0), 2 * U32 * (da * ax1 + ds * ax0)
    beta_terms = da + ds * a / sg
    diff = expected.double().sqrt()
    delta = 5 * U32 * (ds / sg * s.x_t.double().abs() + beta_terms * ax1h) + ds / sg * e_xt + e_v + U32 * diff
    tol = 2 * diff * delta + delta**2 + expected.double() * (6 * U32 * beta_terms / beta.double().abs() + 3 * U32)
    assert bool(((velocity_loss.double() - expected.double()).abs() <= tol).all())


# ---------------------------------------------------------------------- scale-time transformation
def _gaussian_marginal_velocity(path: GaussianPath, mean: float, var: float):
    """Exact u_t(x) for x1 ~ N(mean, var I): x_t ~ N(a mean, a^2 var + s^2); u = a' m + k'/k (x - a m)."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = path.at(t, x)
        k2 = c.alpha**2 * var + c.sigma**2
        dk_over_k = (c.alpha * c.d_alpha * var + c.sigma * c.d_sigma) / k2
        return c.d_alpha * mean + dk_over_k * (x - c.alpha * mean)

    return velocity


@pytest.mark.parametrize(
    "path_b",
    [CosinePath(), VPPath(), PolynomialPath(3.0), TabulatedPath.from_path(CosinePath(), n=257), CondOTPath(0.02)],
    ids=["cosine", "vp", "poly3", "tabulated", "condot_smin"],
)
def test_scale_time_transform_maps_exact_velocities(path_b: GaussianPath) -> None:
    mean, var = 0.7, 0.3
    path_a = CondOTPath(sigma_min=0.01)
    v_b = ScaleTimeVelocity(_gaussian_marginal_velocity(path_a, mean, var), path_a, path_b)
    exact_b = _gaussian_marginal_velocity(path_b, mean, var)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=g) * 2
    r = 0.03 + 0.9 * torch.rand(200, generator=g)
    # First-order rounding, with eps = PATH_COEFF_REL per fp32 coefficient. Path A's time t_r comes from the
    # fp32 SNR of path B (2 eps + u relative), i.e. is off by that over d log(snr_A) / dt, which moves path A's
    # values by at most the same relative amount (|alpha'/alpha|, |sigma'/sigma| <= |d log snr / dt|) and not
    # its constant derivatives (Cond-OT). So path A's coefficients are within 3 eps + u, and the map's pieces
    # (ratios, log-derivatives and their differences, the Gaussian velocity) within 32 eps of their terms:
    #   u_B = (c'/c) x + c t' u_A(x / c, t),  c'/c = alpha_B'/alpha_B - t' alpha_A'/alpha_A (or the sigma form).
    # The reference, the same Gaussian formula on path B, is within 8 eps of its terms.
    eps = PATH_COEFF_REL
    x64 = x.double().abs()
    cb = path_b.coefficients(r.double())
    snr_b = cb.alpha / cb.sigma
    ta = (snr_b / (1 + 0.99 * snr_b)).clamp(0, 1)  # Cond-OT(0.01)'s closed-form SNR inverse, in float64
    ca = path_a.coefficients(ta)
    a_b, s_b, da_b, ds_b, a_a, s_a, da_a, ds_a = (
        v.double()[:, None].abs()
        for v in (cb.alpha, cb.sigma, cb.d_alpha, cb.d_sigma, ca.alpha, ca.sigma, ca.d_alpha, ca.d_sigma)
    )
    dt = (da_b / a_b + ds_b / s_b) / (da_a / a_a + ds_a / s_a)
    use_alpha = a_b > s_b
    c = torch.where(use_alpha, a_b / a_a, s_b / s_a)
    log_terms = torch.where(use_alpha, da_b / a_b + dt * da_a / a_a, ds_b / s_b + dt * ds_a / s_a)

    def gaussian_terms(a: torch.Tensor, s: torch.Tensor, da: torch.Tensor, ds: torch.Tensor, y: torch.Tensor):
        k2 = a * a * var + s * s
        return da * mean + (a * da * var + s * ds) / k2 * (y + a * mean)

    tol = 32 * eps * (x64 * log_terms + c * dt * gaussian_terms(a_a, s_a, da_a, ds_a, x64 / c))
    tol = tol + 8 * eps * gaussian_terms(a_b, s_b, da_b, ds_b, x64)
    err = (v_b(x, r).double() - exact_b(x, r).double()).abs()
    assert bool((err <= tol).all()), float((err / tol).max())


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
