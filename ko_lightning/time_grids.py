"""Time grids for fixed-step sampling: checking a user's grid, and grids derived from a path (docs/math.md §5.4)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from ko_lightning.paths import GaussianPath

__all__ = ["TIME_GRID_KINDS", "TimeGridKind", "check_time_grid", "path_time_grid"]

TimeGridKind = Literal["uniform", "angle"]
#: the grids :func:`path_time_grid` builds.
TIME_GRID_KINDS: tuple[str, ...] = ("uniform", "angle")

#: how far (fp32 resolution) a grid's ends may sit from the ends of the solve; they are then snapped onto them.
_SLACK = 1e-6


def check_time_grid(time_grid: Any, t_start: float, t_end: float) -> tuple[float, ...]:
    """A fixed-step time grid, checked: 1D, finite, strictly increasing, from ``t_start`` to ``t_end`` (the model's
    trained range ``[t_eps, 1 - t_eps]``), at least one step; its ends are snapped onto the range's ends.

    Raises:
        TypeError: naming ``time_grid`` when it is not a sequence of numbers.
        ValueError: naming ``time_grid`` and what is wrong with it.
    """
    try:
        grid = torch.as_tensor(time_grid, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"time_grid must be a 1D tensor or sequence of times, got {type(time_grid).__name__}") from None
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"time_grid must be 1D with at least 2 times (one step), got shape {tuple(grid.shape)}")
    if not bool(torch.isfinite(grid).all()):
        raise ValueError(f"time_grid must be finite, got {grid.tolist()}")
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(f"time_grid must be strictly increasing, got {grid.tolist()}")
    if abs(float(grid[0]) - t_start) > _SLACK or abs(float(grid[-1]) - t_end) > _SLACK:
        raise ValueError(
            f"time_grid must run from t_eps = {t_start:g} to 1 - t_eps = {t_end:g} (the model's trained range), "
            f"got [{float(grid[0]):g}, {float(grid[-1]):g}]"
        )
    values = grid.tolist()
    values[0], values[-1] = t_start, t_end
    return tuple(values)


def path_time_grid(
    path: GaussianPath, steps: int, t_start: float = 0.0, t_end: float = 1.0, kind: TimeGridKind = "angle"
) -> tuple[float, ...]:
    """``steps + 1`` times from ``t_start`` to ``t_end`` for a fixed-step method on ``path``.

    - ``"uniform"``: equal steps in ``t``.
    - ``"angle"``: equal steps in the path's angle ``theta_t = atan(alpha_t / sigma_t)``,
      ``t_k = snr^{-1}(tan(theta_0 + k (theta_N - theta_0) / N))``. On Cond-OT this is
      ``t_k = sin(theta_k) / (sin(theta_k) + cos(theta_k))``. Unlike ``sample(grid="angle")`` (docs/math.md §5.3)
      it steps the ODE in ``x`` and ``t``, so it applies to any fixed-step method and any parametrization.

    Raises:
        ValueError: naming ``steps`` or ``kind``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if kind not in TIME_GRID_KINDS:
        raise ValueError(f"kind must be one of {TIME_GRID_KINDS}, got {kind!r}")
    if kind == "uniform":
        return tuple(torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64).tolist())
    c = path(torch.tensor([t_start, t_end], dtype=torch.float32))
    theta = torch.atan2(c.alpha.double(), c.sigma.double())
    angles = torch.linspace(float(theta[0]), float(theta[1]), steps + 1, dtype=torch.float64)
    snr = torch.tan(angles[1:-1]).float()
    inner = path.snr_inverse(snr).double().tolist()
    grid = [t_start, *inner, t_end]
    # fp32 inversion can tie neighbouring times on a very fine grid; keep the grid strictly increasing
    for k in range(1, len(grid) - 1):
        grid[k] = min(max(grid[k], math.nextafter(grid[k - 1], math.inf)), t_end)
    return tuple(grid)
