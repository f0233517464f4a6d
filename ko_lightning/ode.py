"""The guarded ODE solve that sampling and the likelihood share: one call to torchdiffeq's ``odeint``.

:func:`solve_ode` integrates ``dy/dt = func(t, y)`` (``y`` a tensor or a tuple of tensors) over the times handed
to it, and every solve is guarded so that it ends, and ends with an error rather than a silent NaN:

- the right-hand side sees ``t`` clamped to the span of the solve: adaptive Runge-Kutta stages and the first-step
  heuristic may probe a hair past an end, where a path (e.g. one with a singular end) need not be defined;
- fixed-step methods take ``SolverSpec.steps`` uniform steps; adaptive methods step exactly onto the end time
  (``step_t``, never past it and back) and stop after ``SolverSpec.max_num_steps`` step attempts (default
  :data:`DEFAULT_MAX_NUM_STEPS`) with a :class:`SolverError` that names the method, the tolerances and the time
  reached (a stiff or noisy field would otherwise shrink the step for ever);
- a step size that underflows (``t + dt == t``, which is how a NaN velocity ends an adaptive solve) is a
  :class:`SolverError` that says whether the right-hand side had gone non-finite or the field is too stiff there;
- a result with NaN or inf is a :class:`SolverError` naming the time where non-finite values were first seen. To
  keep the solve as fast as a bare ``odeint``, the right-hand side is checked only at evaluations 1, 2, 4, 8, ...
  (a device-side flag, no synchronization) and the result once at the end.

The number of right-hand side evaluations is counted exactly (:attr:`ODESolution.nfe`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torchdiffeq import odeint

__all__ = [
    "ADAPTIVE_METHODS",
    "DEFAULT_MAX_NUM_STEPS",
    "FIXED_STEP_METHODS",
    "ODESolution",
    "SolverError",
    "SolverSpec",
    "solve_ode",
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

RHS = Callable[[Tensor, Any], Any]


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
        grid: the times a fixed-step method steps through, from the start of the solve to its end (``steps`` is
            then ``len(grid) - 1``); None: ``steps`` equal steps.

    Raises:
        ValueError: naming the argument, for an unknown method or a knob that does not belong to the method.
    """

    method: str = "euler"
    steps: int | None = None
    atol: float | None = None
    rtol: float | None = None
    max_num_steps: int | None = None
    grid: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.grid is not None:
            if self.method not in FIXED_STEP_METHODS:
                raise ValueError(f"a time grid applies to fixed-step methods only; method={self.method!r} is adaptive")
            if len(self.grid) < 2:
                raise ValueError(f"a time grid needs at least 2 times, got {len(self.grid)}")
            if self.steps is not None and self.steps != len(self.grid) - 1:
                raise ValueError(f"steps={self.steps} disagrees with a time grid of {len(self.grid) - 1} steps")
            object.__setattr__(self, "steps", len(self.grid) - 1)
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
class ODESolution:
    """What :func:`solve_ode` returns.

    Attributes:
        states: the solution at every time handed to the solve, as ``odeint`` returns it: a tensor of shape
            ``(T, *y0.shape)``, or a tuple of such tensors for a tuple state.
        nfe: the exact number of right-hand side evaluations.
    """

    states: Any
    nfe: int


# ---------------------------------------------------------------------------------------------------- the guards
def _all_finite(values: Tensor | Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor (no device sync): every entry of every tensor is finite."""
    if torch.is_tensor(values):
        return torch.isfinite(values).all()
    flags = [torch.isfinite(v).all() for v in values]
    return torch.stack(flags).all()


class _GuardedRHS:
    """Wraps ``func(t, y)`` for torchdiffeq: hands it ``t`` clamped to ``[t_low, t_high]``, counts evaluations
    and, at evaluations 1, 2, 4, 8, ..., records on the device whether the input state and the output were finite
    (no synchronization on the fast path). Messages name the solver's own (unclamped) time."""

    def __init__(self, func: RHS, t_low: float, t_high: float) -> None:
        self.func = func
        self.t_low = t_low
        self.t_high = t_high
        self.nfe = 0
        self.checks: list[tuple[Tensor, Tensor]] = []  # (t, all finite) at the sparse checkpoints
        self.last_output: Any = None
        self.last_t: Tensor | None = None

    def __call__(self, t: Tensor, y: Any) -> Any:
        self.nfe += 1
        out = self.func(t.clamp(self.t_low, self.t_high), y)
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

    def __init__(self, func: RHS, solver: SolverSpec, prefix: str, span: tuple[float, float]) -> None:
        super().__init__(func, min(span), max(span))
        self.solver = solver
        self.prefix = prefix
        self.span = span
        self.steps = 0

    def callback_step(self, t0: Tensor, y0: Any, dt: Tensor) -> None:
        self.steps += 1
        t_now, step = float(t0), float(dt)
        where = f"at t = {t_now:.6g} of [{self.span[0]:g}, {self.span[1]:g}]"
        if self.steps > self.solver.step_budget:
            raise SolverError(
                f"{self.prefix}{self.solver.describe()} stopped after {self.solver.step_budget} step attempts "
                f"(max_num_steps) {where} without reaching the end: the velocity field is too stiff or noisy for "
                "these tolerances. Loosen atol/rtol, raise max_num_steps, or use a fixed-step method.",
                self.solver.method,
                t_now,
            )
        if not (step > 0 and abs(t_now) + step != abs(t_now)):
            if self.last_output is not None and not bool(_all_finite(self.last_output)):
                t_bad = float(self.last_t) if self.last_t is not None else t_now
                raise SolverError(
                    f"{self.prefix}the velocity returned NaN or inf at t = {t_bad:.6g} of [{self.span[0]:g}, "
                    f"{self.span[1]:g}] (in the step from t = {t_now:.6g}) under {self.solver.describe()}; the "
                    "adaptive step size collapsed to 0",
                    self.solver.method,
                    t_bad,
                )
            raise SolverError(
                f"{self.prefix}{self.solver.describe()}: the step size underflowed (dt = {step:.3g}) {where}: "
                "the velocity field is singular or too stiff there for these tolerances",
                self.solver.method,
                t_now,
            )


def _prefix(context: str | None) -> str:
    return "" if not context else f"{context}: "


def _odeint(func: RHS, y0: Any, times: Tensor, solver: SolverSpec, prefix: str) -> tuple[Any, _GuardedRHS]:
    """``odeint(func, y0, times)`` with the solver's method and knob; returns ``(solution, guard)``."""
    span = (float(times[0]), float(times[-1]))
    method = _TORCHDIFFEQ_NAME.get(solver.method, solver.method)
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
                f"t = {last_ok}): {str(exc)[:200]}",
                solver.method,
                last_ok,
            ) from None
    fixed = _GuardedRHS(func, min(span), max(span))
    steps = int(solver.steps)  # type: ignore[arg-type]

    def uniform_grid(f: object, y: Any, t: Tensor) -> Tensor:
        return torch.linspace(float(t[0]), float(t[-1]), steps + 1, device=t.device, dtype=t.dtype)

    def given_grid(f: object, y: Any, t: Tensor) -> Tensor:
        grid = torch.tensor(solver.grid, device=t.device, dtype=t.dtype)
        return grid if float(t[-1]) > float(t[0]) else grid.flip(0)

    constructor = uniform_grid if solver.grid is None else given_grid
    return odeint(fixed, y0, times, method=method, options={"grid_constructor": constructor}), fixed


def _raise_if_non_finite(
    result: Tensor | Sequence[Tensor],
    guard: _GuardedRHS,
    solver: SolverSpec,
    span: tuple[float, float],
    prefix: str,
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
        f"{prefix}{what} came out non-finite (NaN or inf) from {solver.describe()} over "
        f"[{span[0]:g}, {span[1]:g}]: the velocity or the state became non-finite, {where}",
        solver.method,
        t_bad,
    )


# ---------------------------------------------------------------------------------------------------- the solve
def solve_ode(
    func: RHS,
    y0: Any,
    times: Tensor,
    solver: SolverSpec,
    context: str | None = None,
    what: str = "the solution",
    check: Literal["all", "end"] = "all",
    span: tuple[float, float] | None = None,
) -> ODESolution:
    """Solve ``dy/dt = func(t, y)`` through ``times`` with a step budget, readable failures and a finiteness check.

    Fixed-step methods step on ``solver.steps`` uniform steps from ``times[0]`` to ``times[-1]`` (values at the
    other times are interpolated); adaptive methods step exactly onto ``times[-1]`` (never past it) and stop after
    ``solver.step_budget`` step attempts. ``func`` always receives ``t`` clamped to the span of ``times``.

    Args:
        func: ``func(t, y)`` with ``t`` a 0-dim tensor; returns a tensor (or tuple) shaped like ``y``.
        y0: the initial state at ``times[0]``: a tensor or a tuple of tensors.
        times: 1D, strictly monotone times; the solution is returned at each of them.
        solver: the method and its knobs.
        context: a description of the model, put at the front of error messages.
        what: what the solution is, for the non-finite message (``"the solution"``, ``"the log-likelihood"``).
        check: ``"all"`` checks every returned state for NaN or inf, ``"end"`` only the state at ``times[-1]``.
        span: the ``(start, end)`` named in the non-finite message (default: ``times[0]``, ``times[-1]``).

    Returns:
        :class:`ODESolution` with the states at ``times`` and the exact NFE.

    Raises:
        SolverError: when the checked states hold NaN or inf (naming where non-finite values were first seen),
            when an adaptive solve exhausts ``max_num_steps``, or when its step size underflows.

    Example:
        >>> sol = solve_ode(lambda t, y: -y, torch.ones(3), torch.tensor([0.0, 1.0]), SolverSpec("rk4", steps=10))
        >>> sol.nfe, round(float(sol.states[-1, 0]), 5)  # exp(-1) = 0.36788
        (40, 0.36788)
    """
    prefix = _prefix(context)
    states, guard = _odeint(func, y0, times, solver, prefix)
    if check == "end":
        checked: Tensor | Sequence[Tensor] = states[-1] if torch.is_tensor(states) else [s[-1] for s in states]
    else:
        checked = states
    if span is None:
        span = (float(times[0]), float(times[-1]))
    # One sync: a NaN sample, latent or log-determinant is an error naming where it started, never a result.
    _raise_if_non_finite(checked, guard, solver, span, prefix, what)
    return ODESolution(states=states, nfe=guard.nfe)
