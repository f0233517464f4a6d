"""Kinetic energy of a velocity field along its trajectories vs the analytic KE of its path."""

from __future__ import annotations

import pytest
import torch

from kinetic_helpers import gamma, ke_fp32_tol
from ko_lightning.kinetic import SeparationFunction, kinetic_energy
from ko_lightning.metrics.model_energy import model_kinetic_energy
from ko_lightning.paths import CondOTPath, CosinePath, GaussianPath
from ko_lightning.sampling import SolverSpec


def _standard_normal_marginal_velocity(path: GaussianPath):
    """x1 ~ N(0, I): x_t ~ N(0, k_t^2 I), k_t^2 = alpha^2 + sigma^2, u_t(x) = (k'/k) x."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = path.at(t, x)
        return (c.alpha * c.d_alpha + c.sigma * c.d_sigma) / (c.alpha**2 + c.sigma**2) * x

    return velocity


@pytest.mark.parametrize("path", [CondOTPath(), CondOTPath(0.1), CosinePath()], ids=["condot", "condot_smin", "cos"])
def test_trajectory_energy_matches_the_lambda_formula_for_gaussian_data(path: GaussianPath) -> None:
    x0 = torch.randn(3000, 4, generator=torch.Generator().manual_seed(0))
    velocity = _standard_normal_marginal_velocity(path)
    measured = model_kinetic_energy(velocity, x0, SolverSpec("rk4", steps=200))
    analytic = kinetic_energy(path, SeparationFunction.gaussian())
    assert measured.nfe == 800
    # 4 Monte-Carlo standard errors; RK4's truncation (fourth order: the error at 200 steps is ~1/15 of the
    # change from 100 steps, which is allowed in full); the fp32 energy, a sum of ~1000 positive stage
    # contributions per trajectory (gamma_1000 relative); and kinetic_energy's fp32 rounding (ke_fp32_tol).
    coarse = model_kinetic_energy(velocity, x0, SolverSpec("rk4", steps=100))
    tol = 4 * measured.standard_error + abs(measured.mean - coarse.mean) + gamma(1000) * abs(measured.mean)
    tol += ke_fp32_tol(path, SeparationFunction.gaussian())
    assert abs(measured.mean - analytic) <= tol, (measured.mean, analytic, tol)


def test_needs_at_least_two_trajectories() -> None:
    with pytest.raises(ValueError, match="x0"):
        model_kinetic_energy(lambda x, t: x, torch.zeros(1, 2))
