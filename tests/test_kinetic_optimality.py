"""The KO path beats the standard paths and a brute-force minimization of the discretized kinetic energy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import optimize
from sklearn.datasets import load_digits

from kinetic_helpers import two_point_separation
from ko_lightning.kinetic import (
    SeparationFunction,
    default_theta_grid,
    estimate_separation_from_data,
    kinetic_energy,
    solve_ko,
)
from ko_lightning.paths import CondOTPath, CosinePath, LinearVPPath, PolynomialPath, VPPath

# One intra-op thread (tests/conftest.py): the test machine's two cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def _digits() -> SeparationFunction:
    x = torch.from_numpy(load_digits().data).float()  # 1797 x 64, normalized inside (ko-math §2)
    return estimate_separation_from_data(
        x, default_theta_grid(48), n_queries=384, generator=torch.Generator().manual_seed(0), smoothing=1.0
    )


LAMBDAS = {
    "two-point d=1": lambda: two_point_separation(1),
    "two-point d=16": lambda: two_point_separation(16),
    "digits": _digits,
}


@pytest.fixture(scope="module", params=list(LAMBDAS))
def lam(request) -> SeparationFunction:
    return LAMBDAS[request.param]()


def test_ko_beats_the_standard_paths(lam: SeparationFunction) -> None:
    sol = solve_ko(lam)
    others = {
        "cond-ot": kinetic_energy(CondOTPath(), lam),
        "cosine": kinetic_energy(CosinePath(), lam),
        "poly2": kinetic_energy(PolynomialPath(2.0), lam),
        "poly0.7": kinetic_energy(PolynomialPath(0.7), lam),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # both diverge at t = 1 (log); DDPM-style cutoff
        others["vp"] = kinetic_energy(VPPath(), lam, t_max=1 - 1e-5)
        others["linear-vp"] = kinetic_energy(LinearVPPath(), lam, t_max=1 - 1e-5)
    # The margins are >= 0.09: far above the fp32 rounding of these quadratures (ke_fp32_tol, <= 4e-3 for the
    # diverging VP paths, ~1e-4 for the others), so no tolerance is needed.
    for name, ke in others.items():
        assert sol.ke <= ke, name
    assert sol.ke_min < others["cond-ot"] - 1e-3  # a real improvement, not a tie (10x the rounding above)


# ---------------------------------------------------------------------------------------------------- brute force
def _polyline_ke(
    a: torch.Tensor, s: torch.Tensor, t: torch.Tensor, lam: SeparationFunction, order: int = 4
) -> torch.Tensor:
    """Exact KE (up to ``order``-point Gauss-Legendre per piece) of the piecewise-linear path through (a_k, s_k).

    Written in the Cartesian form alpha'^2 + sigma'^2 - (1 - gamma(theta)) (sigma alpha' - alpha sigma')^2 / r^2,
    independent of the solver. A polyline is an admissible path, so its KE can never go below the true minimum.
    """
    gl_x, gl_w = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(order))
    gl_x, gl_w = 0.5 * (gl_x + 1), 0.5 * gl_w
    dt = t[1:] - t[:-1]
    va, vs = (a[1:] - a[:-1]) / dt, (s[1:] - s[:-1]) / dt
    pa = a[:-1, None] + (a[1:] - a[:-1])[:, None] * gl_x[None]
    ps = s[:-1, None] + (s[1:] - s[:-1])[:, None] * gl_x[None]
    cross = ps * va[:, None] - pa * vs[:, None]
    gamma = lam.gamma(torch.atan2(pa, ps))
    dens = va[:, None] ** 2 + vs[:, None] ** 2 - (1 - gamma) * cross**2 / (pa**2 + ps**2)
    return ((dens * gl_w[None]).sum(1) * dt).sum()


def _brute_force(lam: SeparationFunction, a0: np.ndarray, s0: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """The minimized polyline KE and its quadrature error (estimated by 8- against 4-point Gauss-Legendre)."""
    n = len(t) - 2
    tt = torch.from_numpy(t)
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)

    def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
        zt = torch.from_numpy(z).requires_grad_(True)
        a = torch.cat([zero, zt[:n], one])
        s = torch.cat([one, zt[n:], zero])
        ke = _polyline_ke(a, s, tt, lam)
        ke.backward()
        return ke.item(), zt.grad.numpy().copy()

    z0 = np.concatenate([a0[1:-1], s0[1:-1]])
    res = optimize.minimize(
        objective, z0, jac=True, method="L-BFGS-B", bounds=[(0.0, 1.5)] * (2 * n),
        options={"maxiter": 150, "ftol": 1e-14, "gtol": 1e-10},
    )  # fmt: skip
    z = torch.from_numpy(res.x)
    a, s = torch.cat([zero, z[:n], one]), torch.cat([one, z[n:], zero])
    return float(res.fun), abs(float(_polyline_ke(a, s, tt, lam, order=8)) - float(res.fun))


def test_ko_beats_brute_force_minimization(lam: SeparationFunction) -> None:
    sol = solve_ko(lam)
    t = np.linspace(0.0, 1.0, 60) ** 2  # 60 nodes, graded towards t = 0 where the KO path bends

    def ko_polyline(nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
        """The KO path sampled at ``nodes`` (ends exact), its polyline KE and that KE's quadrature error."""
        c = sol.path(torch.from_numpy(nodes).float())
        a, s = c.alpha.double().numpy(), c.sigma.double().numpy()
        a[0], s[0], a[-1], s[-1] = 0.0, 1.0, 1.0, 0.0
        args = [torch.from_numpy(v) for v in (a, s, nodes)]
        ke4, ke8 = float(_polyline_ke(*args, lam)), float(_polyline_ke(*args, lam, order=8))
        return a, s, ke4, abs(ke8 - ke4)

    from_cond_ot, err_cond_ot = _brute_force(lam, t.copy(), 1.0 - t, t)
    a_ko, s_ko, ko_poly, err_ko_poly = ko_polyline(t)
    from_ko, err_ko = _brute_force(lam, a_ko, s_ko, t)
    cond_ot = kinetic_energy(CondOTPath(), lam)
    # Tolerances: the polylines' Gauss-Legendre errors (8 against 4 points); float64 otherwise (~1e-15).
    quadrature = max(err_cond_ot, err_ko) + 1e-12
    # The optimizer really optimizes (by 10x the fp32 rounding of kinetic_energy, ke_fp32_tol ~1e-4), and no
    # admissible path beats the closed-form minimum ...
    assert from_cond_ot < cond_ot - 1e-3
    assert min(from_cond_ot, from_ko) >= sol.ke_min - quadrature
    # ... so the returned (regularized) KO path is within its reported price of anything the optimizer finds.
    assert sol.ke <= min(from_cond_ot, from_ko) + sol.ke_price + quadrature
    # The KO path sampled on the 60 nodes is a polyline too: it only loses the resolution of the bend near 0,
    # an excess over the smooth path's KE estimated against 4x more nodes (|coarse - limit| <= 4/3 |coarse -
    # fine| for any order >= 1; allow 2).
    *_, ko_fine, err_fine = ko_polyline(np.linspace(0.0, 1.0, 240) ** 2)
    excess = 2 * abs(ko_poly - ko_fine) + err_ko_poly + 2 * err_fine
    assert sol.ke_min - err_ko_poly <= ko_poly <= sol.ke + excess
    assert from_ko <= ko_poly  # the optimizer starts there and never returns a worse point
