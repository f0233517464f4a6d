"""Fixed-step sampling on the angle grid (docs/math.md §5.3): exact on Gaussian data, the same as Euler on the
cosine path through the model's x1-prediction, and chosen by default for a solved KO path only."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from kinetic_helpers import two_point_separation
from ko_lightning import FlowMatching
from ko_lightning.kinetic import solve_ko
from ko_lightning.paths import CondOTPath, CosinePath, GaussianPath, TabulatedPath
from ko_lightning.paths.serialization import path_from_state, path_to_state

FP32 = torch.finfo(torch.float32).eps


class GaussianDataVelocity(nn.Module):
    """The exact marginal velocity of data ``N(0, I)`` on a path: ``u = (sigma'/sigma) x + beta E[x1 | x]`` with
    ``E[x1 | x_t = x] = alpha x / (alpha^2 + sigma^2)`` and ``beta = (sigma alpha' - alpha sigma') / sigma``."""

    def __init__(self, path: GaussianPath) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        c = self.path.at(t, x)
        x1_hat = c.alpha * x / (c.alpha**2 + c.sigma**2)
        return (c.d_sigma * x + (c.sigma * c.d_alpha - c.alpha * c.d_sigma) * x1_hat) / c.sigma


class SmoothVelocity(nn.Module):
    """A smooth nonlinear stand-in for a trained network (any field works for an identity between samplers)."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(x.flip(1)) * (1.0 + t[:, None]) - 0.3 * x


def test_angle_grid_is_exact_on_gaussian_data_where_the_time_grid_is_not() -> None:
    # For N(0, I) data every Gaussian path's flow maps x0 to itself (y = x / r is constant and r_1 = 1): on the angle
    # grid each Euler step computes u / r - (r'/r) y = 0 up to rounding, so two steps return x0 to a few ulps of
    # |x0| per step, while two uniform time steps on Cond-OT miss by O(1).
    path = CondOTPath()
    model = FlowMatching(GaussianDataVelocity(path), path, data_shape=(3,))
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    angle = model.sample(x0=x0, steps=2, grid="angle")
    time = model.sample(x0=x0, steps=2, grid="time")
    scale = float(x0.abs().max())
    assert angle.nfe == time.nfe == 2
    assert float((angle.samples - x0).abs().max()) <= 2 * 16 * FP32 * scale  # 2 steps, ~16 ulps each
    assert float((time.samples - x0).abs().max()) > 0.1 * scale


@pytest.mark.parametrize("steps", [2, 5, 16])
def test_angle_grid_equals_euler_on_the_cosine_path_through_x1(steps: int) -> None:
    # Independent formula: the cosine path has r = 1 and theta = pi r / 2, so its uniform time grid is the angle
    # grid. Its velocity at time r is (sigma'/sigma) x + beta x1_hat, with x1_hat the KO model's x1-prediction at the
    # same SNR and the point rescaled by sigma_KO(t) / sigma_cos(r). Both evaluate the same field in fp32; they
    # differ by rounding amplified by the conversions (|alpha'|, |sigma'| <= ~5 on this table, 1 / theta' <= ~1):
    # ~20 operations (snr_inverse included, exact to fp32) x 5 x eps per step, times the steps.
    ko = solve_ko(two_point_separation(4)).path
    assert ko.sample_grid == "angle"
    net = SmoothVelocity()
    model = FlowMatching(net, ko, data_shape=(2,))
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    got = model.sample(x0=x0, steps=steps).samples  # the KO path's default grid

    cosine = CosinePath()
    x = x0.clone()
    grid = torch.linspace(0.0, 1.0, steps + 1)
    for k in range(steps):
        r = grid[k].expand(x.shape[0])
        cb = cosine.at(r, x)
        t = ko.snr_inverse((cb.alpha / cb.sigma).reshape(-1))
        ca = ko.at(t, x)
        xa = x * ca.sigma / cb.sigma
        x1_hat = ko.x1_from_velocity(xa, net(xa, t), t)
        x = x + (grid[k + 1] - grid[k]) * cosine.velocity_from_x1(x, x1_hat, r)
    tol = steps * 20 * 5 * FP32 * float(x.abs().max())
    assert float((got - x).abs().max()) <= tol


def test_default_grid_is_the_paths_and_adaptive_solvers_keep_time() -> None:
    ko = solve_ko(two_point_separation(4)).path
    model = FlowMatching(SmoothVelocity(), ko, data_shape=(2,))
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(2))
    default = model.sample(x0=x0, steps=4).samples
    assert torch.equal(default, model.sample(x0=x0, steps=4, grid="angle").samples)
    assert not torch.allclose(default, model.sample(x0=x0, steps=4, grid="time").samples)
    assert CondOTPath().sample_grid == "time" and TabulatedPath.from_path(CondOTPath()).sample_grid == "time"
    # adaptive methods and trajectories step in time; asking for the angle grid there is an error naming it
    model.sample(x0=x0, method="dopri5", atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="grid='angle'"):
        model.sample(x0=x0, method="dopri5", grid="angle")
    with pytest.raises(ValueError, match="grid must be one of"):
        model.sample(x0=x0, steps=4, grid="arc")  # type: ignore[arg-type]


def test_the_sample_grid_survives_serialization_and_old_states_read_as_time() -> None:
    ko = solve_ko(two_point_separation(4)).path
    state = path_to_state(ko)
    assert path_from_state(state).sample_grid == "angle"
    old = {**state, "init": {}}  # a checkpoint from before the angle grid
    assert path_from_state(old).sample_grid == "time"
    with pytest.raises(ValueError, match="sample_grid"):
        TabulatedPath(ko.t_grid, ko.alpha_grid, ko.sigma_grid, sample_grid="arc")  # type: ignore[arg-type]


def test_angle_grid_refuses_a_path_that_does_not_turn() -> None:
    t = torch.linspace(0, 1, 5)
    stuck = TabulatedPath(t, torch.tensor([0.0, 0.5, 0.5, 0.75, 1.0]), torch.tensor([1.0, 0.5, 0.5, 0.25, 0.0]))
    model = FlowMatching(SmoothVelocity(), stuck, data_shape=(2,))
    with pytest.raises(ValueError, match="angle increases strictly"):
        model.sample(x0=torch.zeros(2, 2), steps=4, grid="angle")
    assert math.isfinite(float(model.sample(x0=torch.zeros(2, 2), steps=4, grid="time").samples.sum()))
