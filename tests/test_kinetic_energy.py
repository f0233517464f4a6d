"""Kinetic energy of Gaussian paths: analytic values, independent quadrature, and the Monte-Carlo KE identity."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy import integrate

from kinetic_helpers import PATH_COEFF_REL, U32, U64, gamma, ke_fp32_tol, max_gamma_slope
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


def _cartesian_density(schedule, lam: SeparationFunction, v: float = 1.0):
    """t -> alpha'^2 + sigma'^2 - (1 - lambda(s)) sigma^2 s'^2 in the data-unit form (alpha -> sqrt(v) alpha)."""

    def f(t: float) -> float:
        a, s, da, ds = schedule(t)
        a, da = math.sqrt(v) * a, math.sqrt(v) * da
        if s == 0:
            return da**2 + ds**2
        snr = a / s
        d_snr = (da * s - a * ds) / s**2
        lam_s = float(lam.at_snr(torch.tensor(snr, dtype=torch.float64)))
        return da**2 + ds**2 - (1 - lam_s) * s**2 * d_snr**2

    return f


def _cartesian_ke(schedule, lam: SeparationFunction, t_max: float = 1.0, v: float = 1.0) -> tuple[float, float]:
    """The integral of :func:`_cartesian_density` by adaptive quadrature (float64) and its error estimate."""
    value, abserr = integrate.quad(
        _cartesian_density(schedule, lam, v), 0.0, t_max, limit=1000, epsabs=1e-7, epsrel=1e-7
    )
    assert abserr < 1e-5
    return value, abserr


@pytest.mark.parametrize("sigma_min", [0.0, 0.01, 0.3])
def test_cond_ot_separated_data_is_analytic(sigma_min: float) -> None:
    one = SeparationFunction.constant_one()
    # Constant density alpha'^2 + sigma'^2 (gamma = 1): Gauss-Legendre is exact; alpha' = 1 is exact in fp32 and
    # sigma' = -(1 - sigma_min) is rounded once (2u relative on its square); the float64 sum over < 1000
    # nodes adds gamma_1000 (u64).
    ke = kinetic_energy(CondOTPath(sigma_min), one)
    exact = 1 + (1 - sigma_min) ** 2
    assert ke == pytest.approx(exact, abs=2 * U32 * (1 - sigma_min) ** 2 + gamma(1000, U64) * exact)
    # data units: alpha -> sqrt(v) alpha, so alpha'^2 picks up v
    exact = 2.5 + (1 - sigma_min) ** 2
    assert kinetic_energy(CondOTPath(sigma_min), one, second_moment=2.5) == pytest.approx(
        exact, abs=2 * U32 * (1 - sigma_min) ** 2 + gamma(1000, U64) * exact
    )


def test_analytic_values_for_separated_and_gaussian_data() -> None:
    one, gauss = SeparationFunction.constant_one(), SeparationFunction.gaussian()
    # gamma = 1: the density is alpha'^2 + sigma'^2 (in float64 from the fp32 coefficients). Cosine: h^2 with
    # alpha' = h cos(h t), sigma' = -h sin(h t), each within 6u (sin/cos 4u, the product with h and h itself
    # rounded; the fp32 argument h t only shifts t, which leaves the sum h^2 unchanged): 12u relative.
    assert kinetic_energy(CosinePath(), one) == pytest.approx(math.pi**2 / 4, abs=12 * U32 * math.pi**2 / 4)
    for n in (2.0, 3.0):
        # 2 n^2 t^(2n - 2): t^(n - 1) (pow 4u), times n (u), the fp32 node t ((n - 1) u): squared, 2 (n + 4) u;
        # Gauss-Legendre with 8 points integrates the polynomial exactly.
        exact = 2 * n * n / (2 * n - 1)
        assert kinetic_energy(PolynomialPath(n), one) == pytest.approx(exact, abs=2 * (n + 4) * U32 * exact)
    # Gaussian data: KE = int r'^2; variance-preserving paths (r = 1) cost nothing, even with singular sigma'.
    # r' = (alpha alpha' + sigma sigma') / r vanishes up to the fp32 rounding of the coefficients, <= 3
    # PATH_COEFF_REL sqrt(alpha'^2 + sigma'^2) (see ke_fp32_tol): the energy is <= that squared, integrated.
    for path in (CosinePath(), VPPath(), LinearVPPath()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # int sigma'^2 diverges like log for VP paths
            speed = kinetic_energy(path, one)
        assert kinetic_energy(path, gauss) == pytest.approx(0.0, abs=(3 * PATH_COEFF_REL) ** 2 * speed)
    # Cond-OT: r^2 = t^2 + (1 - t)^2, r' = (2t - 1) / r. The fp32 nodes (shift <= u t; f varies by 2 in total)
    # and sigma = 1 - t (u relative; |df / dsigma| <= 7) move the integral by <= 9u; the reference's own error
    # estimate is added.
    exact, ref_err = integrate.quad(lambda t: (2 * t - 1) ** 2 / (t * t + (1 - t) ** 2), 0, 1, epsabs=1e-12)
    assert kinetic_energy(CondOTPath(), gauss) == pytest.approx(exact, abs=9 * U32 + ref_err)


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
        ref, ref_err = _cartesian_ke(schedule, lam_two_point, t_max, v)
        # reference error estimate + our rule's truncation (against twice its order) + fp32 path rounding
        truncation = abs(kinetic_energy(path, lam_two_point, second_moment=v, t_max=t_max, order=16) - ours)
        tol = ref_err + truncation + ke_fp32_tol(path, lam_two_point, v, t_max)
        assert ours == pytest.approx(ref, abs=tol)


def test_tabulated_path_and_warning_for_divergent_energy(lam_two_point) -> None:
    tab = TabulatedPath.from_path(CosinePath(), n=129)
    # Each within its fp32 rounding bound of the exact value. The cubic Hermite table (h = 1/128, exact node
    # slopes) adds to alpha' and sigma' its truncation (sqrt(3) / 216) h^3 max|d^4 alpha / dt^4| = (sqrt(3) / 216)
    # h^3 (pi / 2)^4 and the fp32 rounding of its node values and slopes, <= 1.5 / h x 2u + 2 x u pi / 2 (the
    # derivatives of the Hermite basis); the density, quadratic in alpha' and sigma' (<= pi / 2), moves by
    # 2 x 2 (pi / 2) times that.
    h = 1 / 128
    table = 4 * (math.pi / 2) * (math.sqrt(3) / 216 * h**3 * (math.pi / 2) ** 4 + 3 * U32 / h + math.pi * U32)
    tol = 2 * ke_fp32_tol(CosinePath(), lam_two_point) + table
    assert kinetic_energy(tab, lam_two_point) == pytest.approx(kinetic_energy(CosinePath(), lam_two_point), abs=tol)
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
        # Besides the Monte-Carlo errors: lambda is PCHIP-interpolated between grid nodes. Its interpolation
        # error, measured against a direct estimate at theta from the same queries (same seed: common random
        # numbers, so the noise cancels), moves the formula by sensitivity x that. The fp32 path coefficients
        # move the density by <= (12 + max|gamma'|) PATH_COEFF_REL (v alpha'^2 + sigma'^2) (see ke_fp32_tol:
        # |r'|, |r theta'| <= S = sqrt(v alpha'^2 + sigma'^2), theta within PATH_COEFF_REL).
        direct = separation_sums_from_data(
            data.float(),
            torch.tensor([theta, theta + 1e-3], dtype=torch.float64),
            n_queries=10000,
            generator=torch.Generator().manual_seed(1),
        ).lam[0]
        interpolation = abs(float(direct - lam.at_theta(torch.tensor([theta], dtype=torch.float64))[0]))
        rounding = (12 + max_gamma_slope(lam)) * PATH_COEFF_REL * (v * da * da + ds * ds)
        tol = 4 * math.hypot(se, sensitivity * se_lam) + sensitivity * interpolation + rounding
        assert abs(mc - formula) < tol, (t, mc, formula, se, se_lam)
