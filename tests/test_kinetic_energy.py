"""Kinetic energy of Gaussian paths: analytic values, independent quadrature, and the Monte-Carlo KE identity."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy import integrate

from ko_lightning.kinetic import (
    SeparationFunction,
    default_theta_grid,
    kinetic_energy,
    kinetic_energy_density,
    separation_sums_from_data,
)
from ko_lightning.paths import CondOTPath, CosinePath, LinearVPPath, PolynomialPath, TabulatedPath, VPPath


# One intra-op thread (tests/conftest.py): the test machine's two cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


# Analytic schedules in float64 for the independent check: t -> (alpha, sigma, alpha', sigma').
def _cond_ot(t: float, sigma_min: float = 0.0) -> tuple[float, float, float, float]:
    return t, 1 - (1 - sigma_min) * t, 1.0, -(1 - sigma_min)


def _cosine(t: float) -> tuple[float, float, float, float]:
    h = 0.5 * math.pi
    return math.sin(h * t), math.cos(h * t), h * math.cos(h * t), -h * math.sin(h * t)


def _poly(t: float, n: float = 2.0) -> tuple[float, float, float, float]:
    return t**n, 1 - t**n, n * t ** (n - 1), -n * t ** (n - 1)


def _vp(t: float, b0: float = 0.1, b1: float = 20.0) -> tuple[float, float, float, float]:
    tau = 1 - t
    big = b0 * tau + 0.5 * (b1 - b0) * tau**2
    a = math.exp(-0.5 * big)
    s = math.sqrt(-math.expm1(-big))
    da = 0.5 * (b0 + (b1 - b0) * tau) * a
    return a, s, da, -a * da / s


def _cartesian_ke(schedule, lam: SeparationFunction, t_max: float = 1.0, v: float = 1.0) -> float:
    """int alpha'^2 + sigma'^2 - (1 - lambda(s)) sigma^2 s'^2 in the data-unit form (alpha -> sqrt(v) alpha)."""

    def f(t: float) -> float:
        a, s, da, ds = schedule(t)
        a, da = math.sqrt(v) * a, math.sqrt(v) * da
        if s == 0:
            return da**2 + ds**2
        snr = a / s
        d_snr = (da * s - a * ds) / s**2
        lam_s = float(lam.at_snr(torch.tensor(snr, dtype=torch.float64)))
        return da**2 + ds**2 - (1 - lam_s) * s**2 * d_snr**2

    value, abserr = integrate.quad(f, 0.0, t_max, limit=1000, epsabs=1e-7, epsrel=1e-7)
    assert abserr < 1e-5
    return value


@pytest.mark.parametrize("sigma_min", [0.0, 0.01, 0.3])
def test_cond_ot_separated_data_is_analytic(sigma_min: float) -> None:
    one = SeparationFunction.constant_one()
    ke = kinetic_energy(CondOTPath(sigma_min), one)
    assert ke == pytest.approx(1 + (1 - sigma_min) ** 2, abs=1e-6)
    # data units: alpha -> sqrt(v) alpha, so alpha'^2 picks up v
    assert kinetic_energy(CondOTPath(sigma_min), one, second_moment=2.5) == pytest.approx(
        2.5 + (1 - sigma_min) ** 2, abs=1e-6
    )


def test_analytic_values_for_separated_and_gaussian_data() -> None:
    one, gauss = SeparationFunction.constant_one(), SeparationFunction.gaussian()
    assert kinetic_energy(CosinePath(), one) == pytest.approx(math.pi**2 / 4, abs=1e-6)
    for n in (2.0, 3.0):
        assert kinetic_energy(PolynomialPath(n), one) == pytest.approx(2 * n * n / (2 * n - 1), abs=1e-5)
    # Gaussian data: KE = int r'^2; variance-preserving paths (r = 1) cost nothing, even with singular sigma'.
    for path in (CosinePath(), VPPath(), LinearVPPath()):
        assert kinetic_energy(path, gauss) == pytest.approx(0.0, abs=1e-6)
    # Cond-OT: r^2 = t^2 + (1 - t)^2, r' = (2t - 1) / r.
    exact, _ = integrate.quad(lambda t: (2 * t - 1) ** 2 / (t * t + (1 - t) ** 2), 0, 1, epsabs=1e-12)
    assert kinetic_energy(CondOTPath(), gauss) == pytest.approx(exact, abs=1e-6)


@pytest.mark.parametrize(
    ("path", "schedule", "t_max"),
    [
        (CondOTPath(), _cond_ot, 1.0),
        (CondOTPath(0.05), lambda t: _cond_ot(t, 0.05), 1.0),
        (CosinePath(), _cosine, 1.0),
        (PolynomialPath(2.0), _poly, 1.0),
        (VPPath(), _vp, 1 - 1e-5),
    ],
)
def test_quadrature_matches_independent_integration(path, schedule, t_max, lam_two_point) -> None:
    for v in (1.0, 2.0):
        ours = kinetic_energy(path, lam_two_point, second_moment=v, t_max=t_max)
        ref = _cartesian_ke(schedule, lam_two_point, t_max, v)
        assert ours == pytest.approx(ref, abs=1e-4)


def test_tabulated_path_and_warning_for_divergent_energy(lam_two_point) -> None:
    tab = TabulatedPath.from_path(CosinePath(), n=129)
    assert kinetic_energy(tab, lam_two_point) == pytest.approx(kinetic_energy(CosinePath(), lam_two_point), abs=1e-4)
    # VP ends at sigma ~ sqrt(1 - t): with gamma(pi/2) = 1 the energy diverges like log; we warn.
    with pytest.warns(RuntimeWarning, match="t_max"):
        kinetic_energy(VPPath(), lam_two_point)
    with pytest.warns(RuntimeWarning, match="t_max"):
        kinetic_energy(LinearVPPath(), SeparationFunction.constant_one())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kinetic_energy(VPPath(), lam_two_point, t_max=1 - 1e-5)
        kinetic_energy(CondOTPath(), lam_two_point)


def test_bad_arguments_are_named() -> None:
    one = SeparationFunction.constant_one()
    with pytest.raises(ValueError, match="t_max"):
        kinetic_energy(CondOTPath(), one, t_max=1.5)
    with pytest.raises(ValueError, match="t_min"):
        kinetic_energy(CondOTPath(), one, t_min=-0.1)
    with pytest.raises(ValueError, match="second_moment"):
        kinetic_energy(CondOTPath(), one, second_moment=0.0)
    with pytest.raises(ValueError, match="lam"):
        kinetic_energy(CondOTPath(), 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="path"):
        kinetic_energy(lambda t: t, one)  # type: ignore[arg-type]


def test_monte_carlo_ke_identity_with_exact_marginal_velocity() -> None:
    """(1/d) E||u_t(x_t)||^2 with the exact marginal velocity of a finite set equals the lambda formula."""
    g = torch.Generator().manual_seed(7)
    n, d = 5, 3
    raw = torch.randn(n, d, generator=g, dtype=torch.float64)
    data = 1.6 * (raw - raw.mean(0))  # centred, per-dimension second moment v != 1
    v = float((data**2).sum() / (n * d))
    sums = separation_sums_from_data(
        data.float(), default_theta_grid(96), n_queries=10000, generator=torch.Generator().manual_seed(1)
    )
    lam = sums.to_function()
    path = CosinePath()
    m = 40000
    for t in (0.15, 0.4, 0.7, 0.9):
        c = path(torch.tensor(t))
        a, s, da, ds = (float(x) for x in (c.alpha, c.sigma, c.d_alpha, c.d_sigma))
        # Monte-Carlo error of lambda at this SNR (nearest grid node), propagated through v sigma^2 s'^2.
        theta = math.atan(math.sqrt(v) * a / s)
        se_lam = float(sums.standard_error[(sums.theta - theta).abs().argmin()])
        sensitivity = v * s * s * ((da * s - a * ds) / s**2) ** 2
        idx = torch.randint(n, (m,), generator=g)
        x_t = a * data[idx] + s * torch.randn(m, d, generator=g, dtype=torch.float64)
        logits = -((x_t[:, None, :] - a * data[None]) ** 2).sum(-1) / (2 * s * s)
        post = torch.softmax(logits, 1) @ data  # exact E[x1 | x_t] (float64)
        beta = da - ds * a / s
        u = (ds / s) * x_t + beta * post
        sq = (u**2).sum(1) / d
        mc, se = float(sq.mean()), float(sq.std() / math.sqrt(m))
        formula = float(kinetic_energy_density(path, lam, torch.tensor([t]), second_moment=v))
        tol = 4 * math.hypot(se, sensitivity * se_lam) + 1e-3
        assert abs(mc - formula) < tol, (t, mc, formula, se, se_lam)
