"""ODE sampling of a velocity field through torchdiffeq, with an exact count of function evaluations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torchdiffeq import odeint

__all__ = ["ADAPTIVE_METHODS", "FIXED_STEP_METHODS", "SampleResult", "SolverSpec", "integrate"]

#: fixed-step methods and the number of velocity evaluations each step costs.
FIXED_STEP_METHODS: dict[str, int] = {"euler": 1, "midpoint": 2, "heun": 2, "heun3": 3, "rk4": 4}
#: adaptive methods (error-controlled by ``atol``/``rtol``).
ADAPTIVE_METHODS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
_TORCHDIFFEQ_NAME = {"heun": "heun2"}

VelocityFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class SolverSpec:
    """One ODE solver setting: a fixed-step method with ``steps``, or an adaptive one with ``atol``/``rtol``.

    Args:
        method: one of ``FIXED_STEP_METHODS`` or ``ADAPTIVE_METHODS``.
        steps: number of steps (fixed-step methods only).
        atol: absolute tolerance (adaptive methods only; default 1e-5).
        rtol: relative tolerance (adaptive methods only; default 1e-5).

    Raises:
        ValueError: naming the argument, for an unknown method or a knob that does not belong to the method.
    """

    method: str = "euler"
    steps: int | None = None
    atol: float | None = None
    rtol: float | None = None

    def __post_init__(self) -> None:
        if self.method in FIXED_STEP_METHODS:
            if self.atol is not None or self.rtol is not None:
                raise ValueError(f"atol/rtol apply to adaptive methods only; method={self.method!r} takes steps")
            if self.steps is None:
                raise ValueError(f"method={self.method!r} is fixed-step: give steps (an integer >= 1)")
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
                raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        elif self.method in ADAPTIVE_METHODS:
            if self.steps is not None:
                raise ValueError(
                    f"steps applies to fixed-step methods only; method={self.method!r} is adaptive: give atol/rtol"
                )
            for name in ("atol", "rtol"):
                value = getattr(self, name)
                if value is not None and not value > 0:
                    raise ValueError(f"{name} must be > 0, got {value!r}")
        else:
            valid = ", ".join([*FIXED_STEP_METHODS, *ADAPTIVE_METHODS])
            raise ValueError(f"unknown method={self.method!r}; valid methods: {valid}")

    @property
    def adaptive(self) -> bool:
        """True for error-controlled methods."""
        return self.method in ADAPTIVE_METHODS

    @property
    def expected_nfe(self) -> int | None:
        """Exact NFE of a fixed-step solve (``steps`` x evaluations per step); None for adaptive methods."""
        return None if self.adaptive else self.steps * FIXED_STEP_METHODS[self.method]  # type: ignore[operator]


@dataclass(frozen=True)
class SampleResult:
    """Result of an ODE solve.

    Attributes:
        samples: the state at the final time.
        nfe: number of velocity evaluations the solve made.
        trajectory: states at ``time_points`` (shape ``(T, *samples.shape)``) when requested, else None.
        time_points: the times of ``trajectory``.
    """

    samples: Tensor
    nfe: int
    trajectory: Tensor | None = None
    time_points: Tensor | None = None


def integrate(
    velocity: VelocityFn,
    x0: Tensor,
    solver: SolverSpec,
    t_start: float = 0.0,
    t_end: float = 1.0,
    time_points: Tensor | None = None,
) -> SampleResult:
    """Solve ``dx/dt = velocity(x, t)`` from ``t_start`` to ``t_end`` (either direction).

    Fixed-step methods take ``solver.steps`` equal steps; adaptive methods control the local error with
    ``atol``/``rtol``. ``velocity`` receives ``t`` broadcast to shape ``(B,)``.

    Args:
        velocity: callable ``velocity(x, t)`` with ``x`` of shape ``(B, ...)`` and ``t`` of shape ``(B,)``.
        x0: initial state at ``t_start``.
        solver: the method and its one knob.
        t_start: initial time.
        t_end: final time.
        time_points: optional increasing/decreasing times from ``t_start`` to ``t_end`` at which to return the
            trajectory (fixed-step methods still step on their own uniform grid).

    Returns:
        ``SampleResult`` with the final state and the exact NFE.

    Example:
        >>> res = integrate(lambda x, t: -x, torch.ones(4, 2), SolverSpec("rk4", steps=10))
        >>> res.nfe
        40
    """
    if not torch.is_tensor(x0) or x0.ndim < 1:
        raise ValueError("x0 must be a tensor of shape (B, ...)")
    nfe = 0
    batch = x0.shape[0]

    t_low, t_high = min(t_start, t_end), max(t_start, t_end)

    def rhs(t: Tensor, x: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        # Adaptive Runge-Kutta stages may probe a hair beyond the span; paths are only defined on [0, 1].
        return velocity(x, t.to(x.dtype).clamp(t_low, t_high).expand(batch))

    time_dtype = x0.dtype if x0.dtype == torch.float64 else torch.float32
    if time_points is None:
        times = torch.tensor([t_start, t_end], dtype=time_dtype, device=x0.device)
    else:
        times = time_points.to(device=x0.device, dtype=time_dtype)
    method = _TORCHDIFFEQ_NAME.get(solver.method, solver.method)
    if solver.adaptive:
        atol = 1e-5 if solver.atol is None else solver.atol
        rtol = 1e-5 if solver.rtol is None else solver.rtol
        # step_t makes the solver step exactly onto the end time instead of stepping past it and interpolating.
        path = odeint(rhs, x0, times, method=method, atol=atol, rtol=rtol, options={"step_t": times[-1:]})
    else:
        steps = int(solver.steps)  # type: ignore[arg-type]

        def uniform_grid(func: object, y0: Tensor, t: Tensor) -> Tensor:
            return torch.linspace(float(t[0]), float(t[-1]), steps + 1, device=t.device, dtype=t.dtype)

        path = odeint(rhs, x0, times, method=method, options={"grid_constructor": uniform_grid})
    return SampleResult(
        samples=path[-1],
        nfe=nfe,
        trajectory=path if time_points is not None else None,
        time_points=times if time_points is not None else None,
    )
