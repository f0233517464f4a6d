"""ODE sampling of a velocity field, with an exact count of function evaluations.

:func:`integrate` validates its arguments and the requested time points, then solves through the guarded ODE core
(:func:`ko_lightning.ode.solve_ode`): a step budget for adaptive methods, readable failures, and a
:class:`SolverError` naming the time where non-finite values were first seen instead of a silent NaN.
:class:`SolverSpec`, :class:`SolverError` and the method tables live in :mod:`ko_lightning.ode` and are
re-exported here, where users import them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ko_lightning.ode import (
    ADAPTIVE_METHODS,
    DEFAULT_MAX_NUM_STEPS,
    FIXED_STEP_METHODS,
    SolverError,
    SolverSpec,
    solve_ode,
)

__all__ = [
    "ADAPTIVE_METHODS",
    "DEFAULT_MAX_NUM_STEPS",
    "FIXED_STEP_METHODS",
    "SampleResult",
    "SolverError",
    "SolverSpec",
    "integrate",
]

VelocityFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class SampleResult:
    """Result of an ODE solve.

    Attributes:
        samples: the state at the final time ``t_end``.
        nfe: number of velocity evaluations the solve made.
        trajectory: states at ``time_points`` (shape ``(T, *samples.shape)``) when requested, else None.
        time_points: the times of ``trajectory``.
    """

    samples: Tensor
    nfe: int
    trajectory: Tensor | None = None
    time_points: Tensor | None = None


def _solve_times(
    time_points: Tensor | Sequence[float] | None,
    t_start: float,
    t_end: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, int]:
    """The times handed to odeint and how many of them the caller asked for (0 without ``time_points``).

    ``time_points`` must be 1D, finite, start at ``t_start``, move strictly towards ``t_end`` and stay within
    the span; ``t_end`` is appended when they stop short of it (the solve always reaches ``t_end``).
    """
    if time_points is None:
        return torch.tensor([t_start, t_end], dtype=dtype, device=device), 0
    try:
        tp = torch.as_tensor(time_points).detach().to(torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"time_points must be a 1D tensor (or sequence) of times, got {type(time_points).__name__}"
        ) from None
    lo, hi = min(t_start, t_end), max(t_start, t_end)
    span = f"[{t_start:g}, {t_end:g}]"
    if tp.ndim != 1 or tp.numel() < 1:
        raise ValueError(f"time_points must be a non-empty 1D tensor of times, got shape {tuple(tp.shape)}")
    if not bool(torch.isfinite(tp).all()):
        raise ValueError(f"time_points must be finite, got {tp.tolist()}")
    # fp32 time points (e.g. 1e-3 stored as 0.0010000000475) are accepted to fp32 resolution, then snapped.
    slack = 1e-6
    if abs(float(tp[0]) - t_start) > slack:
        raise ValueError(
            f"time_points must start at the start of the solve, t = {t_start:g} (the noise end), got "
            f"{float(tp[0]):g}; the solve runs over {span}"
        )
    direction = 1.0 if t_end > t_start else -1.0
    steps = (tp[1:] - tp[:-1]) * direction
    if not bool((steps > 0).all()):
        order = "increasing" if direction > 0 else "decreasing"
        raise ValueError(f"time_points must be strictly {order} (the solve runs over {span}), got {tp.tolist()}")
    outside = (tp < lo - slack) | (tp > hi + slack)
    if bool(outside.any()):
        raise ValueError(f"time_points must lie within the span of the solve {span}, got {float(tp[outside][0]):g}")
    tp = tp.clamp(lo, hi)
    tp[0] = t_start
    requested = tp.numel()
    if requested > 1 and abs(float(tp[-1]) - t_end) <= slack:
        tp[-1] = t_end
    else:  # the solve always reaches t_end, also when the requested times stop short of it
        tp = torch.cat([tp, torch.tensor([t_end], dtype=tp.dtype)])
    if not bool(((tp[1:] - tp[:-1]) * direction > 0).all()):
        raise ValueError(
            f"time_points must be distinct times within the span {span} (closer than {slack:g} to "
            f"its ends counts as the end), got {time_points!r}"
        )
    return tp.to(device=device, dtype=dtype), requested


def integrate(
    velocity: VelocityFn,
    x0: Tensor,
    solver: SolverSpec,
    t_start: float = 0.0,
    t_end: float = 1.0,
    time_points: Tensor | Sequence[float] | None = None,
    context: str | None = None,
) -> SampleResult:
    """Solve ``dx/dt = velocity(x, t)`` from ``t_start`` to ``t_end`` (either direction).

    Fixed-step methods take ``solver.steps`` equal steps; adaptive methods control the local error with
    ``atol``/``rtol`` and stop after ``solver.max_num_steps`` step attempts. ``velocity`` receives ``t``
    broadcast to shape ``(B,)``.

    Args:
        velocity: callable ``velocity(x, t)`` with ``x`` of shape ``(B, ...)`` and ``t`` of shape ``(B,)``.
        x0: initial state at ``t_start``.
        solver: the method and its knobs.
        t_start: initial time.
        t_end: final time.
        time_points: optional times at which to also return the trajectory: they start at ``t_start``, move
            strictly towards ``t_end`` and stay within the span (``[0.5]``, ``[1, 0.5, 0]`` on a forward solve or
            ``[0, 0.5, 2]`` on ``[0, 1]`` are errors). The solve always runs to ``t_end``; fixed-step methods
            still step on their own uniform grid (the trajectory is interpolated between steps).
        context: a description of the model, put at the front of error messages (e.g. its parametrization and
            path).

    Returns:
        ``SampleResult`` with the state at ``t_end`` and the exact NFE.

    Raises:
        ValueError: naming ``x0``, ``t_start``/``t_end`` or ``time_points`` for bad arguments.
        SolverError: when the result holds NaN or inf (naming where non-finite values were first seen), when an
            adaptive solve exhausts ``max_num_steps``, or when its step size underflows.

    Example:
        >>> res = integrate(lambda x, t: -x, torch.ones(4, 2), SolverSpec("rk4", steps=10))
        >>> res.nfe
        40
    """
    if not torch.is_tensor(x0) or x0.ndim < 1:
        raise ValueError("x0 must be a tensor of shape (B, ...)")
    if x0.shape[0] == 0 or x0.numel() == 0:
        raise ValueError(f"x0 must hold at least one sample, got shape {tuple(x0.shape)}")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating point tensor, got dtype {x0.dtype}")
    if not isinstance(solver, SolverSpec):
        raise TypeError(f"solver must be a ko_lightning.sampling.SolverSpec, got {type(solver).__name__}")
    t_start, t_end = float(t_start), float(t_end)
    for name, value in (("t_start", t_start), ("t_end", t_end)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    if t_start == t_end:
        raise ValueError(f"t_start and t_end must differ, got {t_start!r} for both")
    batch = x0.shape[0]

    def rhs(t: Tensor, x: Tensor) -> Tensor:
        # solve_ode hands over t clamped to the span (paths are only defined on [0, 1]); broadcast it to (B,).
        return velocity(x, t.to(x.dtype).expand(batch))

    time_dtype = x0.dtype if x0.dtype == torch.float64 else torch.float32
    times, requested = _solve_times(time_points, t_start, t_end, time_dtype, x0.device)
    solution = solve_ode(rhs, x0, times, solver, context, what="the solution", span=(t_start, t_end))
    states = solution.states  # (len(times), *x0.shape): the requested times, then t_end if they stopped short
    return SampleResult(
        samples=states[-1],
        nfe=solution.nfe,
        trajectory=states[:requested] if time_points is not None else None,
        time_points=times[:requested] if time_points is not None else None,
    )
