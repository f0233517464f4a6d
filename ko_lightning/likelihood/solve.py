"""Log-likelihood of a flow by the instantaneous change of variables, integrated by the guarded ODE core.

Convention (docs/math.md §1): t = 0 is noise ``N(0, I)``, t = 1 is data, ``dx/dt = v(x, t)``. Along a trajectory of the
flow the log-density obeys ``d/dt log p_t(x_t) = -div v(x_t, t)``, so for a data point ``x1``

    log p_1(x1) = log N(x0; 0, I) - ∫_0^1 div v(x_t, t) dt,

where ``x_t`` solves the ODE backwards from ``x_1 = x1`` to ``x_0``. The solver integrates the augmented state
``(x, l)`` with ``dl/dt = -div v(x, t)`` from ``l = 0``; the final ``l`` equals ``log p_end(x_end) - log p_start(x)``.

The divergence is exact or Hutchinson's estimate (:mod:`ko_lightning.likelihood.trace`). Hutchinson probes are
drawn once per sample at the start of a solve and reused at every step, so the integrand is a smooth function of t
(adaptive solvers keep small NFEs) and ``∫ eps^T J_t eps dt`` is an unbiased estimate of ``∫ tr J_t dt``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ko_lightning.likelihood.progress import progress_bar
from ko_lightning.likelihood.results import LogProbResult
from ko_lightning.likelihood.trace import (
    PROBES,
    DivergenceMethod,
    ProbeKind,
    VelocityFn,
    check_data,
    check_velocity_output,
    divergence_terms,
    draw_probes,
    resolve_divergence,
)
from ko_lightning.ode import SolverSpec, solve_ode

__all__ = ["log_prob", "sample_with_log_prob", "standard_normal_log_prob"]

_LOG_2PI = math.log(2.0 * math.pi)


def default_solver() -> SolverSpec:
    """dopri5 with ``atol = rtol = 1e-5``, the likelihood's default."""
    return SolverSpec("dopri5", atol=1e-5, rtol=1e-5)


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """``log N(x; 0, I) = -(D log(2 pi) + ||x||^2) / 2`` per sample, summed over all dims but the first."""
    flat = x.reshape(x.shape[0], -1)
    return -0.5 * (flat.shape[1] * _LOG_2PI + flat.pow(2).sum(dim=1))


def _working_dtype(x: Tensor) -> torch.dtype:
    # fp32 throughout; float64 input stays float64 (useful for tight numerical checks).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------- the solve
def _solve_augmented(
    velocity: VelocityFn,
    x: Tensor,
    t_start: float,
    t_end: float,
    solver: SolverSpec,
    divergence: str,
    probe: str,
    num_probes: int,
    generator: torch.Generator | None,
    create_graph: bool | None,
    progress: bool,
    context: str | None = None,
) -> tuple[Tensor, Tensor, int, str, Tensor | None]:
    """Integrate ``(x, l)`` with ``dl/dt = -div v`` from ``t_start`` to ``t_end``.

    Returns ``(x_end, change, nfe, estimator, probes)`` with ``change = l(t_end)`` of shape ``(B, K)``, i.e.
    ``log p_end(x_end) - log p_start(x)`` per probe.
    """
    if not isinstance(solver, SolverSpec):
        raise TypeError(f"solver must be a ko_lightning.sampling.SolverSpec, got {type(solver).__name__}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
    if create_graph is not None and not isinstance(create_graph, bool):
        raise ValueError(f"create_graph must be True, False or None, got {create_graph!r}")
    if create_graph is None:
        # Gradients flow when the caller asks for them by passing an input that requires grad.
        create_graph = torch.is_grad_enabled() and x.requires_grad
    batch = x.shape[0]
    num_dims = x[0].numel()
    estimator = resolve_divergence(divergence, num_dims)
    x = x.to(_working_dtype(x))
    if not create_graph:
        x = x.detach()
    probes = draw_probes(probe, num_probes, x, generator) if estimator == "hutchinson" else None
    num_terms = 1 if probes is None else num_probes
    span = abs(t_end - t_start)

    with progress_bar(progress, "log-likelihood ODE", 1.0, counted=False) as update:
        calls = 0  # for the progress bar only; solve_ode counts the NFE

        def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            nonlocal calls
            x_t = state[0]
            # solve_ode hands over t clamped to the interval (an adaptive solver's first-step heuristic may probe
            # past its end, where the velocity, e.g. of a path with a singular end, need not be defined).
            tt = t.to(x_t.dtype).expand(batch)
            with torch.enable_grad():
                x_in = x_t if (create_graph and x_t.requires_grad) else x_t.detach().requires_grad_(True)
                f = velocity(x_in, tt)
                check_velocity_output(f, x_in)
                f = f.to(x_in.dtype)
                div = divergence_terms(f, x_in, estimator, probes, create_graph)
            if not create_graph:
                f, div = f.detach(), div.detach()
            if progress:  # float() syncs with the device: only when a bar is shown
                calls += 1
                update(abs(float(t) - t_start) / span, nfe=calls)
            return f, -div

        state0 = (x, torch.zeros(batch, num_terms, dtype=x.dtype, device=x.device))
        times = torch.tensor([t_start, t_end], dtype=x.dtype, device=x.device)
        # Likelihoods are computed in full precision whatever autocast is active around the call.
        grad_mode = torch.enable_grad() if create_graph else torch.no_grad()
        with grad_mode, torch.autocast(device_type=x.device.type, enabled=False):
            # A NaN latent or log-determinant is an error naming where it started, never a result.
            solution = solve_ode(
                rhs, state0, times, solver, context, what="the log-likelihood", check="end", span=(t_start, t_end)
            )
        xs, ls = solution.states
        update(1.0, nfe=solution.nfe)
    return xs[-1], ls[-1], solution.nfe, estimator, probes


def _check_times(t_start: float, t_end: float, data_end: str) -> tuple[float, float]:
    t_start, t_end = float(t_start), float(t_end)
    for name, value in (("t_start", t_start), ("t_end", t_end)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    if data_end == "start" and not t_start > t_end:
        raise ValueError(f"log_prob integrates from data to noise: need t_start > t_end, got {t_start} and {t_end}")
    if data_end == "end" and not t_end > t_start:
        raise ValueError(f"sampling integrates from noise to data: need t_end > t_start, got {t_start} and {t_end}")
    return t_start, t_end


def _checked_solve(
    velocity: VelocityFn,
    x: Tensor,
    name: str,
    data_end: str,
    solver: SolverSpec | None,
    divergence: str,
    probe: str,
    num_probes: int,
    generator: torch.Generator | None,
    create_graph: bool | None,
    t_start: float,
    t_end: float,
    progress: bool,
    context: str | None = None,
) -> tuple[Tensor, Tensor, int, str, Tensor | None]:
    """The argument handling shared by :func:`log_prob` and :func:`sample_with_log_prob`, then the solve.

    Checks the input ``x`` (named ``name`` in errors) and the times (``data_end``: ``"start"`` for the backward
    solve of :func:`log_prob`, ``"end"`` for sampling), defaults the solver, and returns :func:`_solve_augmented`'s
    ``(x_end, change, nfe, estimator, probes)``.
    """
    check_data(x, name)
    if not x.is_floating_point():
        hint = (
            "; for integer images (e.g. uint8 pixels) use bits_per_dim, which dequantizes them"
            if data_end == "start"
            else ""
        )
        raise TypeError(f"{name} must be a floating point tensor in the model's data space, got dtype {x.dtype}{hint}")
    t_start, t_end = _check_times(t_start, t_end, data_end)
    solver = default_solver() if solver is None else solver
    return _solve_augmented(
        velocity,
        x,
        t_start,
        t_end,
        solver,
        divergence,
        probe,
        num_probes,
        generator,
        create_graph,
        progress,
        context,
    )


def _finish(
    x_data: Tensor, x_noise: Tensor, change: Tensor, nfe: int, estimator: str, probes: Tensor | None, data_first: bool
) -> LogProbResult:
    prior = standard_normal_log_prob(x_noise)
    # change = log p_end(x_end) - log p_start(x_start) per probe; the data end is start (log_prob) or end (sampling).
    per_probe = prior.unsqueeze(1) - change if data_first else prior.unsqueeze(1) + change
    lp = per_probe.mean(dim=1)
    if estimator == "exact":
        std_error: Tensor | None = torch.zeros_like(lp)
    elif per_probe.shape[1] >= 2:
        std_error = per_probe.std(dim=1) / math.sqrt(per_probe.shape[1])
    else:
        std_error = None
    return LogProbResult(
        log_prob=lp,
        x_data=x_data,
        x_noise=x_noise,
        prior_log_prob=prior,
        divergence_integral=prior - lp,
        nfe=nfe,
        estimator=estimator,
        std_error=std_error,
        probes=probes,
    )


# ---------------------------------------------------------------------------------------------------- public API
def log_prob(
    velocity: VelocityFn,
    x: Tensor,
    solver: SolverSpec | None = None,
    divergence: DivergenceMethod = "auto",
    probe: ProbeKind = "rademacher",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    create_graph: bool | None = None,
    t_start: float = 1.0,
    t_end: float = 0.0,
    progress: bool = False,
    context: str | None = None,
) -> LogProbResult:
    """Log-density of data points under the flow ``dx/dt = v(x, t)`` with an ``N(0, I)`` prior at ``t_end``.

    Solves backwards from ``x_{t_start} = x`` to ``t_end`` the augmented ODE ``(dx/dt, dl/dt) = (v, -div v)``:

        log p_{t_start}(x) = log N(x_{t_end}; 0, I) - ∫_{t_end}^{t_start} div v(x_t, t) dt.

    With the defaults (``t_start = 1``, ``t_end = 0``) this is ``log p_1(x)``, the model's density of data. Paths
    whose velocity is singular at t = 1 (VP, linear-VP) need ``t_start = 1 - eps``; the result is then the density
    of ``p_{t_start}``. The prior is always ``N(0, I)`` at ``t_end``, exact for ``t_end = 0`` on every path with
    ``(alpha_0, sigma_0) = (0, 1)``.

    Args:
        velocity: ``velocity(x, t)`` with ``t`` of shape ``(B,)`` (e.g. ``FlowMatching.velocity`` in eval mode);
            samples must be processed independently.
        x: data, shape ``(B, ...)`` (any shape: vectors or images ``(B, C, H, W)``), on the velocity's device.
            Computed in fp32 (float64 input stays float64), with autocast disabled.
        solver: ODE solver (default dopri5 with ``atol = rtol = 1e-5``). Fixed-step solvers make exactly
            ``solver.expected_nfe`` evaluations.
        divergence: ``"exact"``, ``"hutchinson"``, or ``"auto"`` (exact if ``D <= EXACT_DIVERGENCE_MAX_DIM = 32``).
        probe: Hutchinson probe distribution, ``"rademacher"`` (±1, lower variance) or ``"gaussian"``.
        num_probes: Hutchinson probes per sample, each fixed for the whole solve; ``>= 2`` gives
            ``std_error`` (each probe costs a backward pass per evaluation).
        generator: random generator for the probes (reproducible estimates).
        create_graph: True to let gradients flow to ``x`` and the velocity's parameters (the solve is then
            differentiated directly; memory grows with the number of steps); False to compute without a graph;
            None (default) means True exactly when grad mode is on and ``x.requires_grad``.
        t_start: time of the data (start of the backward solve), in ``(t_end, 1]``.
        t_end: time of the ``N(0, I)`` prior, in ``[0, t_start)``.
        progress: show a progress bar over the integration time (rich).
        context: a description of the model, put at the front of error messages (e.g. its parametrization and
            path).

    Returns:
        ``LogProbResult`` with ``log_prob`` of shape ``(B,)`` in nats, the latent ``x_noise``, ``nfe`` and, for
        Hutchinson, the probes and (with ``num_probes >= 2``) a per-sample standard error.

    Raises:
        ValueError: naming the argument, for a bad ``divergence``, ``probe``, ``num_probes``, time or shape.
        TypeError: for integer ``x`` (8-bit images go through :func:`bits_per_dim`).
        ko_lightning.sampling.SolverError: when the latent or the log-density comes out NaN or inf (naming the
            time where non-finite values were first seen), or an adaptive solve exhausts ``solver.max_num_steps``
            or its step size underflows.

    Example:
        >>> res = log_prob(lambda x, t: torch.zeros_like(x) + 0 * x, torch.zeros(2, 3))
        >>> torch.allclose(res.log_prob, torch.full((2,), -1.5 * math.log(2 * math.pi)))
        True
    """
    x_noise, change, nfe, estimator, probes = _checked_solve(
        velocity,
        x,
        "x",
        "start",
        solver,
        divergence,
        probe,
        num_probes,
        generator,
        create_graph,
        t_start,
        t_end,
        progress,
        context,
    )
    return _finish(x, x_noise, change, nfe, estimator, probes, data_first=True)


def sample_with_log_prob(
    velocity: VelocityFn,
    x0: Tensor,
    solver: SolverSpec | None = None,
    divergence: DivergenceMethod = "auto",
    probe: ProbeKind = "rademacher",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    create_graph: bool | None = None,
    t_start: float = 0.0,
    t_end: float = 1.0,
    progress: bool = False,
    context: str | None = None,
) -> LogProbResult:
    """Push noise forward to data and track the density of the samples with the same augmented ODE.

        log p_{t_end}(x_{t_end}) = log N(x0; 0, I) - ∫_{t_start}^{t_end} div v(x_t, t) dt.

    This is the forward counterpart of :func:`log_prob` (arguments as there, with the time order reversed):
    ``log_prob(velocity, res.x_data).log_prob`` agrees with ``res.log_prob`` up to solver error.

    Returns:
        ``LogProbResult`` whose ``x_data`` holds the samples and ``log_prob`` their log-density.

    Example:
        >>> res = sample_with_log_prob(lambda x, t: x, torch.zeros(1, 2), SolverSpec("rk4", steps=10))
        >>> round(float(res.log_prob[0]), 4)  # N(0, e^2 I) at 0: -log(2 pi) - 2
        -3.8379
    """
    x_data, change, nfe, estimator, probes = _checked_solve(
        velocity,
        x0,
        "x0",
        "end",
        solver,
        divergence,
        probe,
        num_probes,
        generator,
        create_graph,
        t_start,
        t_end,
        progress,
        context,
    )
    x_noise = x0.to(x_data.dtype)
    return _finish(x_data, x_noise, change, nfe, estimator, probes, data_first=False)
