"""Kinetic energy of a trained model along its own sampling trajectories (compare :mod:`ko_lightning.kinetic`,
the kinetic energy of a path computed from data)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ko_lightning.sampling import SolverSpec, integrate

__all__ = ["ModelKineticEnergy", "model_kinetic_energy"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ModelKineticEnergy:
    """Per-dimension kinetic energy of a velocity field along sampled trajectories.

    Attributes:
        mean: ``E_x0 [ (1/D) int_0^1 ||v(x_t, t)||^2 dt ]`` over the trajectories.
        standard_error: Monte-Carlo standard error of ``mean`` over the initial points.
        per_sample: the integral for each trajectory, shape ``(B,)``.
        nfe: velocity evaluations of the solve.
    """

    mean: float
    standard_error: float
    per_sample: Tensor
    nfe: int


@torch.no_grad()
def model_kinetic_energy(velocity: VelocityFn, x0: Tensor, solver: SolverSpec | None = None) -> ModelKineticEnergy:
    """Kinetic energy of the flow ``dx/dt = v(x, t)`` started at noise ``x0``, integrated with the trajectory.

    Solves the augmented ODE ``d/dt (x, e) = (v(x, t), ||v(x, t)||^2 / D)`` from t = 0 to 1 with ``e_0 = 0``, so
    ``e_1 = (1/D) int_0^1 ||v||^2 dt`` is computed by the same solver, at its accuracy, as the samples. For the exact
    marginal velocity of a path this equals the path's kinetic energy ``KE = (1/D) int E||u_t(x_t)||^2 dt``
    (docs/math.md §2), which makes it comparable to :func:`ko_lightning.kinetic.kinetic_energy`.

    Args:
        velocity: ``velocity(x, t)``, ``t`` of shape ``(B,)``.
        x0: initial noise, ``(B, ...)``.
        solver: ODE solver (default dopri5 with atol = rtol = 1e-5).

    Returns:
        ``ModelKineticEnergy`` with the mean, its standard error and the per-trajectory values.
    """
    solver = SolverSpec("dopri5", atol=1e-5, rtol=1e-5) if solver is None else solver
    if x0.ndim < 1 or x0.shape[0] < 2:
        raise ValueError(f"x0 must hold at least 2 initial points, got shape {tuple(x0.shape)}")
    batch, dims = x0.shape[0], x0[0].numel()
    shape = x0.shape

    def augmented(state: Tensor, t: Tensor) -> Tensor:
        x = state[:, :dims].reshape(shape)
        v = velocity(x, t).reshape(batch, dims).to(state.dtype)
        energy_rate = (v * v).sum(1, keepdim=True) / dims
        return torch.cat([v, energy_rate], dim=1)

    start = torch.cat([x0.reshape(batch, dims).float(), torch.zeros(batch, 1, device=x0.device)], dim=1)
    result = integrate(augmented, start, solver)
    energy = result.samples[:, dims]
    return ModelKineticEnergy(
        mean=float(energy.mean()),
        standard_error=float(energy.std(unbiased=True) / batch**0.5),
        per_sample=energy.cpu(),
        nfe=result.nfe,
    )
