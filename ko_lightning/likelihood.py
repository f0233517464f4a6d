"""Log-likelihood and bits/dim of a flow by the instantaneous change of variables, through torchdiffeq.

Convention (docs/math.md §1): t = 0 is noise ``N(0, I)``, t = 1 is data, ``dx/dt = v(x, t)``. Along a trajectory of the
flow the log-density obeys ``d/dt log p_t(x_t) = -div v(x_t, t)``, so for a data point ``x1``

    log p_1(x1) = log N(x0; 0, I) - ∫_0^1 div v(x_t, t) dt,

where ``x_t`` solves the ODE backwards from ``x_1 = x1`` to ``x_0``. The solver integrates the augmented state
``(x, l)`` with ``dl/dt = -div v(x, t)`` from ``l = 0``; the final ``l`` equals ``log p_end(x_end) - log p_start(x)``.

The divergence is the trace of the Jacobian over *all* ``D = prod(x.shape[1:])`` dimensions (for images every
channel and pixel: ``div v = sum_{c,h,w} d v_{chw} / d x_{chw}``), computed

- exactly, with ``D`` backward passes (one per dimension; cost ``D`` x a backward per function evaluation), or
- by Hutchinson's estimator ``eps^T (dv/dx) eps`` with ``E[eps eps^T] = I`` (one backward per probe). The probes are
  drawn once per sample at the start of a solve and reused at every step, so the integrand is a smooth function
  of t (adaptive solvers keep small NFEs) and ``∫ eps^T J_t eps dt`` is an unbiased estimate of ``∫ tr J_t dt``.

The velocity must treat the samples of a batch independently (no batch statistics: run networks in eval mode),
because the per-dimension derivatives are taken of the batch sum.

Example:
    >>> import torch
    >>> from ko_lightning.likelihood import log_prob
    >>> res = log_prob(lambda x, t: -x, torch.zeros(4, 2))  # x_t = x_0 e^{-t}: p_1 = N(0, e^{-2} I)
    >>> round(float(res.log_prob[0]), 4)  # log N(0; 0, e^{-2} I) = -log(2 pi) + 2
    0.1621
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch import Tensor

from ko_lightning.sampling import SolverSpec, _odeint_guarded, _raise_if_non_finite

__all__ = [
    "EXACT_DIVERGENCE_MAX_DIM",
    "BitsPerDimResult",
    "EvaluationResult",
    "LogProbResult",
    "bits_per_dim",
    "bpd_from_log_prob",
    "dequantize",
    "divergence",
    "evaluate_log_prob",
    "log_prob",
    "sample_with_log_prob",
    "standard_normal_log_prob",
]

VelocityFn = Callable[[Tensor, Tensor], Tensor]
DivergenceMethod = Literal["exact", "hutchinson", "auto"]
ProbeKind = Literal["rademacher", "gaussian"]
DequantizeMethod = Literal["uniform", "center"]

#: ``divergence="auto"`` uses the exact trace up to this many dimensions per sample, Hutchinson above.
#: At D = 32 the exact trace costs 32 backward passes per function evaluation, about the price of a modest
#: number of probes, and removes all estimator noise; above it the cost grows linearly while Hutchinson stays at one.
EXACT_DIVERGENCE_MAX_DIM = 32

_DIVERGENCES = ("exact", "hutchinson", "auto")
_PROBES = ("rademacher", "gaussian")
_DEQUANTIZE = ("uniform", "center")
_LOG_2PI = math.log(2.0 * math.pi)


def _default_solver() -> SolverSpec:
    return SolverSpec("dopri5", atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LogProbResult:
    """Log-likelihood of data points under a flow, with both ends of their trajectories.

    Attributes:
        log_prob: ``log p(x_data)`` in nats, shape ``(B,)`` (for Hutchinson, the mean over the probes).
        x_data: the data end of the trajectories (the input of :func:`log_prob`, the samples of
            :func:`sample_with_log_prob`).
        x_noise: the noise end (the latent of :func:`log_prob`, the input of :func:`sample_with_log_prob`).
        prior_log_prob: ``log N(x_noise; 0, I)``, shape ``(B,)``.
        divergence_integral: ``∫ div v(x_t, t) dt`` over the solve's time interval (taken in increasing t),
            shape ``(B,)``; ``log_prob = prior_log_prob - divergence_integral``.
        nfe: number of velocity evaluations (each also costs the divergence's backward passes).
        estimator: ``"exact"`` or ``"hutchinson"`` (what ``"auto"`` resolved to).
        std_error: standard error of ``log_prob`` due to the divergence estimator, shape ``(B,)``: zeros for
            ``"exact"``; for Hutchinson with ``num_probes >= 2`` the sample standard deviation over the probes
            divided by ``sqrt(num_probes)``; None for Hutchinson with a single probe (one draw carries no estimate
            of its own spread; the standard error of a mean over many samples, as in :func:`evaluate_log_prob`,
            still includes the probe noise because probes are independent across samples).
        probes: the Hutchinson probes, shape ``(num_probes, B, *x.shape[1:])``; None for ``"exact"``.
    """

    log_prob: Tensor
    x_data: Tensor
    x_noise: Tensor
    prior_log_prob: Tensor
    divergence_integral: Tensor
    nfe: int
    estimator: str
    std_error: Tensor | None = None
    probes: Tensor | None = None


@dataclass(frozen=True)
class BitsPerDimResult:
    """Bits per dimension of integer-valued (e.g. 8-bit image) data under a flow, with dequantization.

    Attributes:
        bpd: bits per dimension, shape ``(B,)``: ``-(log p(y) + log_det) / (D ln 2)``.
        log_prob_discrete: ``log p(y) + log_det`` in nats, shape ``(B,)``: with uniform dequantization an unbiased
            estimate of a lower bound on ``log P(x_int)``.
        log_det: ``D log((hi - lo) / num_bins)``, the log-Jacobian of ``x_int + w -> y`` (a number).
        num_dims: ``D``, the number of dimensions per sample.
        std_error: the Hutchinson standard error of ``bpd`` (same rules as ``LogProbResult.std_error``).
        likelihood: the continuous result for the dequantized, rescaled data ``y`` (``likelihood.x_data``).
    """

    bpd: Tensor
    log_prob_discrete: Tensor
    log_det: float
    num_dims: int
    std_error: Tensor | None
    likelihood: LogProbResult


@dataclass(frozen=True)
class EvaluationResult:
    """Log-likelihood over a data set: means, standard errors over samples, and the per-sample values.

    Attributes:
        mean_log_prob: mean ``log p`` per sample in nats (the discrete bound when dequantizing).
        log_prob_std_error: ``std(log p) / sqrt(N)`` (ddof = 1; NaN for ``N < 2``). It includes the Hutchinson and
            dequantization noise, which are independent across samples.
        mean_bpd: mean bits per dimension, ``-mean_log_prob / (D ln 2)``.
        bpd_std_error: standard error of ``mean_bpd``.
        num_samples: ``N``.
        num_dims: ``D``.
        nfe: total velocity evaluations over all batches.
        log_probs: the per-sample values (CPU, float64), shape ``(N,)``.
    """

    mean_log_prob: float
    log_prob_std_error: float
    mean_bpd: float
    bpd_std_error: float
    num_samples: int
    num_dims: int
    nfe: int
    log_probs: Tensor


# ---------------------------------------------------------------------------------------------------- helpers
def standard_normal_log_prob(x: Tensor) -> Tensor:
    """``log N(x; 0, I) = -(D log(2 pi) + ||x||^2) / 2`` per sample, summed over all dims but the first."""
    flat = x.reshape(x.shape[0], -1)
    return -0.5 * (flat.shape[1] * _LOG_2PI + flat.pow(2).sum(dim=1))


def _working_dtype(x: Tensor) -> torch.dtype:
    # fp32 throughout; float64 input stays float64 (useful for tight numerical checks).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_data(x: Any, name: str) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, ...), got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (B, ...) with at least one data dimension, got {tuple(x.shape)}")
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")


def _resolve_divergence(divergence: str, num_dims: int) -> str:
    if divergence not in _DIVERGENCES:
        raise ValueError(f"divergence must be one of {_DIVERGENCES}, got {divergence!r}")
    if divergence == "auto":
        return "exact" if num_dims <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
    return divergence


def _draw_probes(kind: str, num_probes: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """``num_probes`` probes per sample, shape ``(num_probes, *like.shape)``, with ``E[eps eps^T] = I``."""
    shape = (num_probes, *like.shape)
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    device = generator.device if generator is not None else like.device
    if kind == "rademacher":
        eps = torch.randint(0, 2, shape, generator=generator, device=device).to(like.dtype).mul_(2).sub_(1)
    else:
        eps = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return eps.to(like.device)


def _divergence_terms(
    f: Tensor, x: Tensor, estimator: str, probes: Tensor | None, create_graph: bool
) -> Tensor:
    """Divergence of ``f(x)`` per sample and per probe, shape ``(B, K)`` (``K = 1`` for the exact trace).

    ``f`` must have been computed from ``x`` with autograd recording, sample by sample.
    """
    batch = x.shape[0]
    if not f.requires_grad:
        raise RuntimeError(
            "the velocity output does not depend on x through autograd: the divergence needs gradients "
            "(does the velocity run under torch.no_grad() or detach its input?)"
        )
    if estimator == "exact":
        f_flat = f.reshape(batch, -1)
        num_dims = f_flat.shape[1]
        div = torch.zeros(batch, dtype=f.dtype, device=f.device)
        for i in range(num_dims):
            # d f_i / d x_i for every sample at once: the samples are independent, so the gradient of the batch
            # sum of f[:, i] holds each sample's own row. x and f are flattened the same way (row-major over
            # C, H, W), so column i of both is the same coordinate: the trace covers all D dims.
            (grad,) = torch.autograd.grad(
                f_flat[:, i].sum(), x, retain_graph=create_graph or i < num_dims - 1,
                create_graph=create_graph, allow_unused=True,
            )
            if grad is not None:
                div = div + grad.reshape(batch, -1)[:, i]
        return div.unsqueeze(1)
    assert probes is not None
    terms = []
    num_probes = probes.shape[0]
    for k in range(num_probes):
        eps = probes[k]
        # vector-Jacobian product eps^T J, then (eps^T J) eps = eps^T J eps.
        (vjp,) = torch.autograd.grad(
            f, x, grad_outputs=eps, retain_graph=create_graph or k < num_probes - 1,
            create_graph=create_graph, allow_unused=True,
        )
        if vjp is None:
            terms.append(torch.zeros(batch, dtype=f.dtype, device=f.device))
        else:
            terms.append((vjp * eps).reshape(batch, -1).sum(dim=1))
    return torch.stack(terms, dim=1)


def divergence(
    velocity: VelocityFn,
    x: Tensor,
    t: Tensor,
    estimator: Literal["exact", "hutchinson"] = "exact",
    probes: Tensor | None = None,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """Velocity and its divergence ``div v(x, t) = tr(dv/dx) = sum_j d v_j / d x_j`` over all dims of a sample.

    Args:
        velocity: ``velocity(x, t)`` with ``t`` of shape ``(B,)``, returning a tensor shaped like ``x``.
        x: points, shape ``(B, ...)`` (images ``(B, C, H, W)`` are traced over all ``C*H*W`` dims).
        t: times, shape ``(B,)``.
        estimator: ``"exact"`` (D backward passes) or ``"hutchinson"`` (``mean_k eps_k^T J eps_k``).
        probes: Hutchinson probes, shape ``(K, *x.shape)``; required for ``"hutchinson"``.
        create_graph: keep the graph so that the divergence can be differentiated.

    Returns:
        ``(v, div)``: the velocity (shape of ``x``) and the divergence, shape ``(B,)``.

    Example:
        >>> v, div = divergence(lambda x, t: 3 * x, torch.randn(2, 3, 4, 4), torch.zeros(2))
        >>> div.tolist()
        [144.0, 144.0]
    """
    _check_data(x, "x")
    if estimator not in ("exact", "hutchinson"):
        raise ValueError(f"estimator must be 'exact' or 'hutchinson', got {estimator!r}")
    if estimator == "hutchinson":
        if probes is None or probes.shape[1:] != x.shape:
            raise ValueError(f"probes must have shape (K, *x.shape) = (K, {', '.join(map(str, x.shape))}) "
                             f"for estimator='hutchinson', got {None if probes is None else tuple(probes.shape)}")
    with torch.enable_grad():
        x_in = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        f = velocity(x_in, t)
        _check_velocity_output(f, x_in)
        div = _divergence_terms(f, x_in, estimator, probes, create_graph).mean(dim=1)
    if not create_graph:
        f, div = f.detach(), div.detach()
    return f, div


def _check_velocity_output(f: Any, x: Tensor) -> None:
    if not torch.is_tensor(f) or f.shape != x.shape:
        got = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
        raise ValueError(f"velocity(x, t) must return a tensor shaped like x {tuple(x.shape)}, got {got}")


@contextmanager
def _progress_bar(
    enabled: bool, description: str, total: float | None, counted: bool
) -> Iterator[Callable[..., None]]:
    """Yield ``update(completed, **fields)``; a rich progress bar when enabled, a no-op otherwise.

    ``counted``: show "done/total" (batches) rather than a percentage (fraction of the time interval).
    """
    if not enabled:
        yield lambda completed, **fields: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("[progress.description]{task.description}"), BarColumn()]
    columns.append(MofNCompleteColumn() if counted else TextColumn("{task.percentage:>5.1f}%"))
    columns += [TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=total, info="")

        def update(completed: float, **fields: Any) -> None:
            info = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            bar.update(task, completed=completed, info=info)

        yield update


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
    if probe not in _PROBES:
        raise ValueError(f"probe must be one of {_PROBES}, got {probe!r}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
    if create_graph is not None and not isinstance(create_graph, bool):
        raise ValueError(f"create_graph must be True, False or None, got {create_graph!r}")
    if create_graph is None:
        # Gradients flow when the caller asks for them by passing an input that requires grad.
        create_graph = torch.is_grad_enabled() and x.requires_grad
    batch = x.shape[0]
    num_dims = x[0].numel()
    estimator = _resolve_divergence(divergence, num_dims)
    x = x.to(_working_dtype(x))
    if not create_graph:
        x = x.detach()
    probes = _draw_probes(probe, num_probes, x, generator) if estimator == "hutchinson" else None
    num_terms = 1 if probes is None else num_probes
    t_lo, t_hi = min(t_start, t_end), max(t_start, t_end)
    span = t_hi - t_lo
    nfe = 0

    with _progress_bar(progress, "log-likelihood ODE", 1.0, counted=False) as update:

        def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            nonlocal nfe
            nfe += 1
            x_t = state[0]
            # An adaptive solver's first-step heuristic may probe a time past the interval's end; the velocity
            # (e.g. a path with a singular end) need not be defined there, and that value only sizes the step.
            t_clamped = t.clamp(t_lo, t_hi)
            tt = t_clamped.to(x_t.dtype).expand(batch)
            with torch.enable_grad():
                x_in = x_t if (create_graph and x_t.requires_grad) else x_t.detach().requires_grad_(True)
                f = velocity(x_in, tt)
                _check_velocity_output(f, x_in)
                f = f.to(x_in.dtype)
                div = _divergence_terms(f, x_in, estimator, probes, create_graph)
            if not create_graph:
                f, div = f.detach(), div.detach()
            if progress:  # float() syncs with the device: only when a bar is shown
                update(abs(float(t_clamped) - t_start) / span, nfe=nfe)
            return f, -div

        state0 = (x, torch.zeros(batch, num_terms, dtype=x.dtype, device=x.device))
        times = torch.tensor([t_start, t_end], dtype=x.dtype, device=x.device)
        # Likelihoods are computed in full precision whatever autocast is active around the call.
        grad_mode = torch.enable_grad() if create_graph else torch.no_grad()
        with grad_mode, torch.autocast(device_type=x.device.type, enabled=False):
            # Step budget, readable failures and sparse finiteness checks: see ko_lightning.sampling.
            (xs, ls), guard = _odeint_guarded(rhs, state0, times, solver, context)
        nfe = guard.nfe
        # One sync: a NaN latent or log-determinant is an error naming where it started, never a result.
        _raise_if_non_finite((xs[-1], ls[-1]), guard, solver, (t_start, t_end), context, "the log-likelihood")
        update(1.0, nfe=nfe)
    return xs[-1], ls[-1], nfe, estimator, probes


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
    _check_data(x, name)
    if not x.is_floating_point():
        hint = ("; for integer images (e.g. uint8 pixels) use bits_per_dim, which dequantizes them"
                if data_end == "start" else "")
        raise TypeError(f"{name} must be a floating point tensor in the model's data space, got dtype {x.dtype}{hint}")
    t_start, t_end = _check_times(t_start, t_end, data_end)
    solver = _default_solver() if solver is None else solver
    return _solve_augmented(
        velocity, x, t_start, t_end, solver, divergence, probe, num_probes, generator, create_graph, progress,
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
        velocity, x, "x", "start", solver, divergence, probe, num_probes, generator, create_graph, t_start, t_end,
        progress, context,
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
        velocity, x0, "x0", "end", solver, divergence, probe, num_probes, generator, create_graph, t_start, t_end,
        progress, context,
    )
    x_noise = x0.to(x_data.dtype)
    return _finish(x_data, x_noise, change, nfe, estimator, probes, data_first=False)


# ---------------------------------------------------------------------------------------------------- bits/dim
def bpd_from_log_prob(
    log_prob: Tensor,
    num_dims: int,
    num_bins: int | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> Tensor:
    """Bits per dimension from a log-density in nats.

    Continuous data (``num_bins=None``): ``bpd = -log p(y) / (D ln 2)``.

    Discrete data with ``num_bins`` levels mapped affinely onto ``data_range = (lo, hi)`` by
    ``y = lo + (hi - lo) (x_int + w) / num_bins`` (``w`` the dequantization offset): the density of
    ``u = (x_int + w) / num_bins`` is ``p(y) ((hi - lo))^D`` and a cell has volume ``num_bins^-D``, so

        bpd = -(log p(y) + D log((hi - lo) / num_bins)) / (D ln 2)

    (for 8-bit data on ``[-1, 1]``: ``-log p(y) / (D ln 2) + 7``).

    Args:
        log_prob: ``log p(y)`` in nats, any shape.
        num_dims: ``D``, dimensions per sample.
        num_bins: number of discrete levels, or None for continuous data.
        data_range: ``(lo, hi)``, the model's data interval.
    """
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
    log_det = 0.0 if num_bins is None else _dequantization_log_det(num_dims, num_bins, data_range)
    return -(log_prob + log_det) / (num_dims * math.log(2.0))


def _check_bins_and_range(num_bins: int, data_range: tuple[float, float]) -> tuple[float, float]:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a pair (lo, hi) of numbers, got {data_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"data_range must be finite with hi > lo, got {data_range!r}")
    return lo, hi


def _dequantization_log_det(num_dims: int, num_bins: int, data_range: tuple[float, float]) -> float:
    lo, hi = _check_bins_and_range(num_bins, data_range)
    return num_dims * math.log((hi - lo) / num_bins)


def _check_discrete(x: Any, num_bins: int, name: str = "x") -> Tensor:
    """Validate integer-valued data in ``[0, num_bins - 1]``; return it as float."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor of integer values (e.g. uint8 images), got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} must be uint8 (or an integer-valued integer/float tensor), got dtype {x.dtype}")
    _check_data(x, name)
    xf = x.double()
    if x.is_floating_point():
        if not bool(torch.isfinite(xf).all()):
            raise ValueError(f"{name} contains non-finite values; expected integers in [0, {num_bins - 1}]")
        frac = (xf - xf.round()).abs()
        if bool((frac > 0).any()):
            example = float(xf.flatten()[int(frac.flatten().argmax())])
            raise ValueError(
                f"{name} must hold integer values in [0, {num_bins - 1}] (uint8 or integer-valued float), got "
                f"non-integer values such as {example!r}; for data already scaled to a continuous range use "
                "log_prob and bpd_from_log_prob"
            )
    lo, hi = float(xf.min()), float(xf.max())
    if lo < 0 or hi > num_bins - 1:
        raise ValueError(f"{name} must lie in [0, {num_bins - 1}] (num_bins = {num_bins}), got values in "
                         f"[{lo:g}, {hi:g}]")
    return x


def dequantize(
    x: Tensor,
    method: DequantizeMethod = "uniform",
    num_bins: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Map integer data to the model's continuous range: ``y = lo + (hi - lo) (x_int + w) / num_bins``.

    ``method="uniform"``: ``w ~ U[0, 1)`` per dimension (the standard variational bound);
    ``method="center"``: ``w = 1/2`` (deterministic cell centres; a midpoint approximation, not a bound).

    Args:
        x: integer data, uint8 or an integer-valued tensor in ``[0, num_bins - 1]``.
        method: ``"uniform"`` or ``"center"``.
        num_bins: number of levels (256 for 8-bit images).
        data_range: ``(lo, hi)``, the interval the model was trained on.
        generator: random generator for ``w``.

    Returns:
        ``y`` in fp32, shaped like ``x``, on ``x``'s device.
    """
    lo, hi = _check_bins_and_range(num_bins, data_range)
    if method not in _DEQUANTIZE:
        raise ValueError(f"dequantize must be one of {_DEQUANTIZE}, got {method!r}")
    x = _check_discrete(x, num_bins)
    xf = x.to(torch.float32)
    if method == "uniform":
        device = generator.device if generator is not None else x.device
        w = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)
    else:
        w = torch.full_like(xf, 0.5)
    return lo + (hi - lo) * (xf + w) / num_bins


def bits_per_dim(
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
    dequantize: DequantizeMethod = "uniform",
    num_bins: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    context: str | None = None,
) -> BitsPerDimResult:
    """Bits per dimension of integer data (8-bit images) under a flow, with dequantization.

    With ``u = (x_int + w) / num_bins``, ``w ~ U[0, 1)^D``, and ``y = lo + (hi - lo) u`` the model's input,
    the probability of the discrete data is the mass of its cell, ``P(x_int) = num_bins^-D E_w[p_u(u)]`` with
    ``p_u(u) = p(y) (hi - lo)^D``. Jensen's inequality gives the standard dequantized bound

        -log2 P(x_int) / D  <=  -(E_w log p(y) + D log((hi - lo) / num_bins)) / (D ln 2),

    which this function estimates with one draw of ``w`` per sample (``+ 7`` bits for 8-bit data on ``[-1, 1]``).
    ``dequantize="center"`` uses ``w = 1/2`` instead (deterministic, not a bound).

    Args:
        velocity, solver, divergence, probe, num_probes, create_graph, t_start, t_end, progress, context: as in
            :func:`log_prob`.
        x: integer data: a uint8 tensor, or an integer-valued tensor in ``[0, num_bins - 1]``, shape ``(B, ...)``.
        generator: random generator for the dequantization noise (drawn first) and then the probes.
        dequantize: ``"uniform"`` (the bound) or ``"center"``.
        num_bins: number of levels (256 for 8-bit data).
        data_range: ``(lo, hi)``, the interval the model was trained on (default ``[-1, 1]``).

    Returns:
        ``BitsPerDimResult`` with ``bpd`` of shape ``(B,)``.

    Raises:
        ValueError: naming ``x`` for a wrong dtype, non-integer values or values outside ``[0, num_bins - 1]``;
            naming ``dequantize``, ``num_bins`` or ``data_range`` for bad settings.

    Example:
        >>> img = torch.randint(0, 256, (2, 1, 2, 2), dtype=torch.uint8)
        >>> bits_per_dim(lambda x, t: 0 * x, img, SolverSpec("euler", steps=1)).bpd.shape
        torch.Size([2])
    """
    y = _dequantize(x, dequantize, num_bins, data_range, generator)
    num_dims = y[0].numel()
    result = log_prob(
        velocity, y, solver=solver, divergence=divergence, probe=probe, num_probes=num_probes, generator=generator,
        create_graph=create_graph, t_start=t_start, t_end=t_end, progress=progress, context=context,
    )
    log_det = _dequantization_log_det(num_dims, num_bins, data_range)
    scale = 1.0 / (num_dims * math.log(2.0))
    return BitsPerDimResult(
        bpd=-(result.log_prob + log_det) * scale,
        log_prob_discrete=result.log_prob + log_det,
        log_det=log_det,
        num_dims=num_dims,
        std_error=None if result.std_error is None else result.std_error * scale,
        likelihood=result,
    )


_dequantize = dequantize  # bits_per_dim's argument of the same name shadows the function


# ---------------------------------------------------------------------------------------------------- data sets
def evaluate_log_prob(
    velocity: VelocityFn,
    dataloader: Iterable[Any],
    solver: SolverSpec | None = None,
    divergence: DivergenceMethod = "auto",
    probe: ProbeKind = "rademacher",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    t_start: float = 1.0,
    t_end: float = 0.0,
    dequantize: DequantizeMethod | None = None,
    num_bins: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Mean log-likelihood and bits/dim over a data set, with standard errors over samples.

    Each batch (a tensor, or a tuple/list whose first item is the data) goes through :func:`log_prob` (continuous
    data, ``dequantize=None``: ``bpd = -log p / (D ln 2)``) or :func:`bits_per_dim` (integer data, with
    ``dequantize="uniform"`` or ``"center"``; ``log p`` is then the discrete bound
    ``log p(y) + D log((hi - lo) / num_bins)``). Runs without gradients.

    Args:
        velocity: ``velocity(x, t)``; a network should be in eval mode.
        dataloader: any iterable of batches (a ``torch.utils.data.DataLoader``).
        solver, divergence, probe, num_probes, generator, t_start, t_end: as in :func:`log_prob`.
        dequantize: None for continuous data, or the dequantization of integer data.
        num_bins, data_range: as in :func:`bits_per_dim` (used only when dequantizing).
        device: move each batch there first (default: leave it where the loader put it).
        max_batches: stop after this many batches.
        progress: show a rich progress bar over batches with the running mean bits/dim.

    Returns:
        ``EvaluationResult`` with means, standard errors ``std / sqrt(N)`` and per-sample log-likelihoods.

    Example:
        >>> loader = [torch.zeros(4, 2), torch.zeros(4, 2)]
        >>> res = evaluate_log_prob(lambda x, t: -x, loader)
        >>> res.num_samples, round(res.mean_log_prob, 3)
        (8, 0.162)
    """
    if dequantize is not None and dequantize not in _DEQUANTIZE:
        raise ValueError(f"dequantize must be None or one of {_DEQUANTIZE}, got {dequantize!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    try:
        total: int | None = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    values: list[Tensor] = []
    num_dims: int | None = None
    nfe = 0
    running_sum, running_count = 0.0, 0
    with _progress_bar(progress, "log-likelihood", total, counted=True) as update:
        for index, batch in enumerate(dataloader):
            if max_batches is not None and index >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not torch.is_tensor(x):
                raise TypeError(f"dataloader batch {index}: expected a tensor (or a tuple/list starting with one), "
                                f"got {type(x).__name__}")
            if device is not None:
                x = x.to(device)
            dims = x[0].numel() if x.ndim >= 2 else 0
            if num_dims is not None and dims != num_dims:
                raise ValueError(f"dataloader batch {index}: {dims} dims per sample, earlier batches had {num_dims}")
            if dequantize is None:
                res = log_prob(velocity, x, solver=solver, divergence=divergence, probe=probe,
                               num_probes=num_probes, generator=generator, create_graph=False,
                               t_start=t_start, t_end=t_end)
                lp, nfe_batch = res.log_prob, res.nfe
            else:
                bres = bits_per_dim(velocity, x, solver=solver, divergence=divergence, probe=probe,
                                    num_probes=num_probes, generator=generator, create_graph=False,
                                    t_start=t_start, t_end=t_end, dequantize=dequantize, num_bins=num_bins,
                                    data_range=data_range)
                lp, nfe_batch = bres.log_prob_discrete, bres.likelihood.nfe
            num_dims = dims
            nfe += nfe_batch
            values.append(lp.detach().to("cpu", torch.float64))
            running_sum += float(values[-1].sum())
            running_count += values[-1].numel()
            update(index + 1, bpd=-running_sum / running_count / (num_dims * math.log(2.0)), n=running_count)
    if not values or num_dims is None:
        raise ValueError("dataloader yielded no batches")
    log_probs = torch.cat(values)
    n = log_probs.numel()
    mean = float(log_probs.mean())
    se = float(log_probs.std() / math.sqrt(n)) if n >= 2 else float("nan")
    scale = 1.0 / (num_dims * math.log(2.0))
    return EvaluationResult(
        mean_log_prob=mean,
        log_prob_std_error=se,
        mean_bpd=-mean * scale,
        bpd_std_error=se * scale,
        num_samples=n,
        num_dims=num_dims,
        nfe=nfe,
        log_probs=log_probs,
    )
