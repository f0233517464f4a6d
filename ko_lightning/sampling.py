"""ODE sampling of a velocity field through torchdiffeq, with an exact count of function evaluations.

Every solve is guarded so that it ends, and ends with an error rather than a silent NaN:

- adaptive methods stop after ``SolverSpec.max_num_steps`` step attempts (default
  :data:`DEFAULT_MAX_NUM_STEPS`) with a :class:`SolverError` that names the method, the tolerances and the time
  reached (a stiff or noisy field would otherwise shrink the step for ever);
- a step size that underflows (``t + dt == t``, which is how a NaN velocity ends an adaptive solve) is a
  :class:`SolverError` that says whether the velocity had gone non-finite or the field is too stiff there;
- a final state (or trajectory) with NaN or inf is a :class:`SolverError` naming the time where non-finite
  values were first seen. To keep the solve as fast as a bare ``odeint``, the right-hand side is checked only at
  evaluations 1, 2, 4, 8, ... (a device-side flag, no synchronization) and the result once at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint

__all__ = [
    "ADAPTIVE_METHODS",
    "DEFAULT_MAX_NUM_STEPS",
    "FIXED_STEP_METHODS",
    "SampleResult",
    "SolverError",
    "SolverSpec",
    "integrate",
]

#: fixed-step methods and the number of velocity evaluations each step costs.
FIXED_STEP_METHODS: dict[str, int] = {"euler": 1, "midpoint": 2, "heun": 2, "heun3": 3, "rk4": 4}
#: adaptive methods (error-controlled by ``atol``/``rtol``).
ADAPTIVE_METHODS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
#: step attempts (accepted or rejected) an adaptive solve may take before it gives up. A smooth flow-matching
#: field needs tens to a few hundred steps at atol = rtol = 1e-5; 10,000 steps of dopri5 cost 60,000 evaluations.
DEFAULT_MAX_NUM_STEPS = 10_000
_DEFAULT_TOL = 1e-5
_TORCHDIFFEQ_NAME = {"heun": "heun2"}

VelocityFn = Callable[[Tensor, Tensor], Tensor]


class SolverError(RuntimeError):
    """An ODE solve that could not produce a finite result.

    Raised when an adaptive method exhausts its step budget (``max_num_steps``), when its step size underflows,
    or when the solve's result holds NaN or inf. The message names the method, its knobs and the time reached.

    Attributes:
        method: the solver's method.
        t: the time reached, or where non-finite values were first seen (None when unknown).
    """

    def __init__(self, message: str, method: str, t: float | None = None) -> None:
        super().__init__(message)
        self.method = method
        self.t = t


@dataclass(frozen=True)
class SolverSpec:
    """One ODE solver setting: a fixed-step method with ``steps``, or an adaptive one with ``atol``/``rtol``.

    Args:
        method: one of ``FIXED_STEP_METHODS`` or ``ADAPTIVE_METHODS``.
        steps: number of steps (fixed-step methods only).
        atol: absolute tolerance (adaptive methods only; default 1e-5).
        rtol: relative tolerance (adaptive methods only; default 1e-5).
        max_num_steps: step attempts an adaptive solve may take before it stops with a :class:`SolverError`
            (adaptive methods only; default :data:`DEFAULT_MAX_NUM_STEPS`).

    Raises:
        ValueError: naming the argument, for an unknown method or a knob that does not belong to the method.
    """

    method: str = "euler"
    steps: int | None = None
    atol: float | None = None
    rtol: float | None = None
    max_num_steps: int | None = None

    def __post_init__(self) -> None:
        if self.method in FIXED_STEP_METHODS:
            if self.atol is not None or self.rtol is not None:
                raise ValueError(f"atol/rtol apply to adaptive methods only; method={self.method!r} takes steps")
            if self.max_num_steps is not None:
                raise ValueError(
                    f"max_num_steps applies to adaptive methods only; method={self.method!r} takes exactly steps"
                )
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
                if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                    raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
            budget = self.max_num_steps
            if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
                raise ValueError(f"max_num_steps must be an integer >= 1, got {budget!r}")
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

    @property
    def tolerances(self) -> tuple[float, float]:
        """``(atol, rtol)`` of an adaptive method with the defaults filled in."""
        atol = _DEFAULT_TOL if self.atol is None else float(self.atol)
        rtol = _DEFAULT_TOL if self.rtol is None else float(self.rtol)
        return atol, rtol

    @property
    def step_budget(self) -> int:
        """``max_num_steps`` with the default filled in."""
        return DEFAULT_MAX_NUM_STEPS if self.max_num_steps is None else int(self.max_num_steps)

    def describe(self) -> str:
        """The method and its knobs, for messages: ``"dopri5 (atol=1e-05, rtol=1e-05)"``, ``"euler (steps=10)"``."""
        if self.adaptive:
            atol, rtol = self.tolerances
            return f"{self.method} (atol={atol:g}, rtol={rtol:g}, max_num_steps={self.step_budget})"
        return f"{self.method} (steps={self.steps})"


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


# ---------------------------------------------------------------------------------------------------- guarded solve
def _all_finite(values: Tensor | Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor (no device sync): every entry of every tensor is finite."""
    if torch.is_tensor(values):
        return torch.isfinite(values).all()
    flags = [torch.isfinite(v).all() for v in values]
    return torch.stack(flags).all()


class _GuardedRHS:
    """Wraps ``func(t, y)`` for torchdiffeq: counts evaluations and, at evaluations 1, 2, 4, 8, ..., records on
    the device whether the input state and the output were finite (no synchronization on the fast path)."""

    def __init__(self, func: Callable[[Tensor, Any], Any]) -> None:
        self.func = func
        self.nfe = 0
        self.checks: list[tuple[Tensor, Tensor]] = []  # (t, all finite) at the sparse checkpoints
        self.last_output: Any = None
        self.last_t: Tensor | None = None

    def __call__(self, t: Tensor, y: Any) -> Any:
        self.nfe += 1
        out = self.func(t, y)
        self.last_output, self.last_t = out, t
        if self.nfe & (self.nfe - 1) == 0:  # a power of two: log2(NFE) cheap reductions per solve
            state = [y] if torch.is_tensor(y) else list(y)
            result = [out] if torch.is_tensor(out) else list(out)
            self.checks.append((t.detach().clone(), _all_finite([*state, *result])))
        return out

    def first_non_finite(self) -> tuple[float | None, float | None]:
        """``(last t seen finite, first t seen non-finite)`` among the sparse checks (syncs; for error paths)."""
        last_ok: float | None = None
        for t, ok in self.checks:
            if not bool(ok):
                return last_ok, float(t)
            last_ok = float(t)
        return last_ok, None


class _AdaptiveGuard(_GuardedRHS):
    """:class:`_GuardedRHS` with torchdiffeq's ``callback_step`` (called before every adaptive step attempt):
    enforces the step budget and turns a step-size underflow into a :class:`SolverError` that says why."""

    def __init__(self, func: Callable[[Tensor, Any], Any], solver: SolverSpec, context: str,
                 span: tuple[float, float]) -> None:
        super().__init__(func)
        self.solver = solver
        self.context = context
        self.span = span
        self.steps = 0

    def callback_step(self, t0: Tensor, y0: Any, dt: Tensor) -> None:
        self.steps += 1
        t_now, step = float(t0), float(dt)
        where = f"at t = {t_now:.6g} of [{self.span[0]:g}, {self.span[1]:g}]"
        if self.steps > self.solver.step_budget:
            raise SolverError(
                f"{self.context}{self.solver.describe()} stopped after {self.solver.step_budget} step attempts "
                f"(max_num_steps) {where} without reaching the end: the velocity field is too stiff or noisy for "
                "these tolerances. Loosen atol/rtol, raise max_num_steps, or use a fixed-step method.",
                self.solver.method, t_now,
            )
        if not (step > 0 and abs(t_now) + step != abs(t_now)):
            if self.last_output is not None and not bool(_all_finite(self.last_output)):
                t_bad = float(self.last_t) if self.last_t is not None else t_now
                raise SolverError(
                    f"{self.context}the velocity returned NaN or inf at t = {t_bad:.6g} of [{self.span[0]:g}, "
                    f"{self.span[1]:g}] (in the step from t = {t_now:.6g}) under {self.solver.describe()}; the "
                    "adaptive step size collapsed to 0",
                    self.solver.method, t_bad,
                )
            raise SolverError(
                f"{self.context}{self.solver.describe()}: the step size underflowed (dt = {step:.3g}) {where}: "
                "the velocity field is singular or too stiff there for these tolerances",
                self.solver.method, t_now,
            )


def _prefix(context: str | None) -> str:
    return "" if not context else f"{context}: "


def _odeint_guarded(
    func: Callable[[Tensor, Any], Any],
    y0: Any,
    times: Tensor,
    solver: SolverSpec,
    context: str | None = None,
) -> tuple[Any, _GuardedRHS]:
    """``odeint(func, y0, times)`` with the solver's method and knob, a step budget and readable failures.

    Fixed-step methods step on ``solver.steps`` uniform steps from ``times[0]`` to ``times[-1]``; adaptive methods
    step exactly onto ``times[-1]`` (never past it) and stop after ``solver.step_budget`` step attempts.

    Returns:
        ``(solution, guard)``; ``guard.nfe`` is the exact number of ``func`` evaluations and
        :func:`_raise_if_non_finite` reads its sparse checks.
    """
    prefix = _prefix(context)
    span = (float(times[0]), float(times[-1]))
    method = _TORCHDIFFEQ_NAME.get(solver.method, solver.method)
    guard: _GuardedRHS
    if solver.adaptive:
        guard = _AdaptiveGuard(func, solver, prefix, span)
        atol, rtol = solver.tolerances
        # step_t makes the solver step exactly onto the end time instead of stepping past it and interpolating
        # (the velocity, e.g. of a path with a singular end, need not be defined past the end).
        options = {"step_t": times[-1:].detach().cpu()}
        try:
            return odeint(guard, y0, times, method=method, atol=atol, rtol=rtol, options=options), guard
        except AssertionError as exc:  # torchdiffeq's own checks (e.g. a non-finite accepted state)
            last_ok, _ = guard.first_non_finite()
            raise SolverError(
                f"{prefix}{solver.describe()} failed after {guard.nfe} evaluations (last finite check at "
                f"t = {last_ok}): {str(exc)[:200]}", solver.method, last_ok,
            ) from None
    guard = _GuardedRHS(func)
    steps = int(solver.steps)  # type: ignore[arg-type]

    def uniform_grid(f: object, y: Any, t: Tensor) -> Tensor:
        return torch.linspace(float(t[0]), float(t[-1]), steps + 1, device=t.device, dtype=t.dtype)

    return odeint(guard, y0, times, method=method, options={"grid_constructor": uniform_grid}), guard


def _raise_if_non_finite(
    result: Tensor | Sequence[Tensor],
    guard: _GuardedRHS,
    solver: SolverSpec,
    span: tuple[float, float],
    context: str | None,
    what: str,
) -> None:
    """One device sync: raise :class:`SolverError` if ``result`` holds NaN or inf, naming where it started."""
    if bool(_all_finite(result)):
        return
    last_ok, first_bad = guard.first_non_finite()
    if first_bad is not None:
        where = f"first seen at t = {first_bad:.6g}"
        if last_ok is not None:
            where += f" (last seen finite at t = {last_ok:.6g})"
        t_bad: float | None = first_bad
    else:
        where = f"after t = {last_ok:.6g}" if last_ok is not None else "at an unknown time"
        t_bad = last_ok
    raise SolverError(
        f"{_prefix(context)}{what} came out non-finite (NaN or inf) from {solver.describe()} over "
        f"[{span[0]:g}, {span[1]:g}]: the velocity or the state became non-finite, {where}",
        solver.method, t_bad,
    )


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
        raise TypeError(f"time_points must be a 1D tensor (or sequence) of times, got {type(time_points).__name__}"
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
        raise ValueError(
            f"time_points must lie within the span of the solve {span}, got {float(tp[outside][0]):g}"
        )
    tp = tp.clamp(lo, hi)
    tp[0] = t_start
    requested = tp.numel()
    if requested > 1 and abs(float(tp[-1]) - t_end) <= slack:
        tp[-1] = t_end
    else:  # the solve always reaches t_end, also when the requested times stop short of it
        tp = torch.cat([tp, torch.tensor([t_end], dtype=tp.dtype)])
    if not bool(((tp[1:] - tp[:-1]) * direction > 0).all()):
        raise ValueError(f"time_points must be distinct times within the span {span} (closer than {slack:g} to "
                         f"its ends counts as the end), got {time_points!r}")
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
    t_low, t_high = min(t_start, t_end), max(t_start, t_end)

    def rhs(t: Tensor, x: Tensor) -> Tensor:
        # Adaptive Runge-Kutta stages may probe a hair beyond the span; paths are only defined on [0, 1].
        return velocity(x, t.to(x.dtype).clamp(t_low, t_high).expand(batch))

    time_dtype = x0.dtype if x0.dtype == torch.float64 else torch.float32
    times, requested = _solve_times(time_points, t_start, t_end, time_dtype, x0.device)
    path, guard = _odeint_guarded(rhs, x0, times, solver, context)
    _raise_if_non_finite(path, guard, solver, (t_start, t_end), context, "the solution")
    return SampleResult(
        samples=path[-1],
        nfe=guard.nfe,
        trajectory=path[:requested] if time_points is not None else None,
        time_points=times[:requested] if time_points is not None else None,
    )
