"""The KO path beats the standard paths and a brute-force minimization of the discretized kinetic energy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from kinetic_helpers import two_point_separation
from scipy import optimize
from sklearn.datasets import load_digits

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
    for name, ke in others.items():
        assert sol.ke <= ke, name
    assert sol.ke_min < others["cond-ot"] - 1e-3  # a real improvement, not a tie


# ---------------------------------------------------------------------------------------------------- brute force
_GL_X, _GL_W = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(4))
_GL_X, _GL_W = 0.5 * (_GL_X + 1), 0.5 * _GL_W


def _polyline_ke(a: torch.Tensor, s: torch.Tensor, t: torch.Tensor, lam: SeparationFunction) -> torch.Tensor:
    """Exact KE (up to 4-point Gauss-Legendre per piece) of the piecewise-linear path through (a_k, s_k) at t_k.

    Written in the Cartesian form alpha'^2 + sigma'^2 - (1 - gamma(theta)) (sigma alpha' - alpha sigma')^2 / r^2,
    independent of the solver. A polyline is an admissible path, so its KE can never go below the true minimum.
    """
    dt = t[1:] - t[:-1]
    va, vs = (a[1:] - a[:-1]) / dt, (s[1:] - s[:-1]) / dt
    pa = a[:-1, None] + (a[1:] - a[:-1])[:, None] * _GL_X[None]
    ps = s[:-1, None] + (s[1:] - s[:-1])[:, None] * _GL_X[None]
    cross = ps * va[:, None] - pa * vs[:, None]
    gamma = lam.gamma(torch.atan2(pa, ps))
    dens = va[:, None] ** 2 + vs[:, None] ** 2 - (1 - gamma) * cross**2 / (pa**2 + ps**2)
    return ((dens * _GL_W[None]).sum(1) * dt).sum()


def _brute_force(lam: SeparationFunction, a0: np.ndarray, s0: np.ndarray, t: np.ndarray) -> float:
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
    return float(res.fun)


def test_ko_beats_brute_force_minimization(lam: SeparationFunction) -> None:
    sol = solve_ko(lam)
    t = np.linspace(0.0, 1.0, 60) ** 2  # 60 nodes, graded towards t = 0 where the KO path bends
    from_cond_ot = _brute_force(lam, t.copy(), 1.0 - t, t)
    c = sol.path(torch.from_numpy(t).float())
    a_ko, s_ko = c.alpha.double().numpy(), c.sigma.double().numpy()
    a_ko[0], s_ko[0], a_ko[-1], s_ko[-1] = 0.0, 1.0, 1.0, 0.0
    from_ko = _brute_force(lam, a_ko, s_ko, t)
    ko_polyline = float(_polyline_ke(*(torch.from_numpy(v) for v in (a_ko, s_ko, t)), lam))
    cond_ot = kinetic_energy(CondOTPath(), lam)
    # The optimizer really optimizes, and no admissible path beats the closed-form minimum ...
    assert from_cond_ot < cond_ot - 1e-3
    assert min(from_cond_ot, from_ko) >= sol.ke_min - 1e-4
    # ... so the returned (regularized) KO path is within its reported price of anything the optimizer finds.
    assert sol.ke <= min(from_cond_ot, from_ko) + sol.ke_price + 1e-4
    # The KO path sampled on the 60 nodes is a polyline too (it only loses the resolution of the bend near 0).
    assert sol.ke_min - 1e-4 <= ko_polyline <= sol.ke + 0.01
    assert from_ko <= ko_polyline
