"""A trained model's flow as the ODE solvers see it: the velocity, the trained time range (checked against the path
and the parametrization), the solver from its knobs and the initial noise; then sampling and likelihoods.

:class:`ModelFlow` is what ``FlowMatching.sample``, ``log_prob`` and ``bpd`` delegate to; it needs no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import Tensor

from ko_lightning.angular_grid import AngleGrid
from ko_lightning.likelihood import BitsPerDimResult, LogProbResult, PixelMap, bits_per_dim, log_prob
from ko_lightning.likelihood.trace import DivergenceMethod
from ko_lightning.ode import ADAPTIVE_METHODS, SolverSpec
from ko_lightning.parametrizations import OutputParametrization
from ko_lightning.paths import SAMPLE_GRIDS, GaussianPath, SampleGrid
from ko_lightning.sampling import SampleResult, integrate
from ko_lightning.time_grids import check_time_grid

__all__ = ["DEFAULT_FIXED_STEPS", "ModelFlow", "check_noise", "initial_noise", "solve_range", "solver_spec"]

#: steps of a fixed-step method when no knob is given.
DEFAULT_FIXED_STEPS = 100


def solver_spec(
    method: str, steps: int | None, atol: float | None, rtol: float | None, max_num_steps: int | None = None
) -> SolverSpec:
    """The solver for these knobs, one knob per mode; a fixed-step method without any takes
    :data:`DEFAULT_FIXED_STEPS` steps. :class:`~ko_lightning.ode.SolverSpec` rejects a knob of the other mode."""
    if steps is None and atol is None and rtol is None and max_num_steps is None and (method not in ADAPTIVE_METHODS):
        steps = DEFAULT_FIXED_STEPS
    return SolverSpec(method=method, steps=steps, atol=atol, rtol=rtol, max_num_steps=max_num_steps)


def solve_range(
    path: GaussianPath, parametrization: OutputParametrization, t_eps: float, device: torch.device, context: str
) -> tuple[float, float]:
    """``(t_eps, 1 - t_eps)``, the interval sampling and likelihoods integrate over, once it is checked.

    The solve covers exactly the trained range: the network never saw times outside it, and a parametrization's
    conversion to a velocity can be singular at an end (``eps`` divides by ``alpha_t``, 0 at t = 0; ``x1`` by
    ``sigma_t``, 0 at t = 1 when ``sigma_min = 0``; VP's ``sigma'_t`` diverges at t = 1). The prior ``N(0, I)`` is
    placed at ``t_eps``, an approximation of ``p_{t_eps}`` of the same order as stopping at ``1 - t_eps``. Checked:
    the path's coefficients are finite at both ends, and the parametrization's conversion is defined there
    (:meth:`~ko_lightning.parametrizations.OutputParametrization.undefined_end`). Inside the range paths are smooth
    with ``alpha, sigma > 0``.

    Args:
        path: the model's path.
        parametrization: the model's parametrization.
        t_eps: the trained range is ``[t_eps, 1 - t_eps]``.
        device: where to evaluate the path.
        context: how errors name the model (its parametrization, path and range).

    Raises:
        ValueError: naming the model, the end, the problem and the remedy (``t_eps > 0``).
    """
    lo, hi = t_eps, 1.0 - t_eps
    c = path(torch.tensor([lo, hi], dtype=torch.float32, device=device))
    alpha, sigma, d_alpha, d_sigma = torch.stack([c.alpha, c.sigma, c.d_alpha, c.d_sigma]).cpu().tolist()
    problems = []
    for k, t in enumerate((lo, hi)):
        values = {"alpha": alpha[k], "sigma": sigma[k], "alpha'": d_alpha[k], "sigma'": d_sigma[k]}
        bad = [name for name, v in values.items() if not math.isfinite(v)]
        if bad:
            problems.append(f"{', '.join(bad)} not finite at t = {t:g}")
    singular = parametrization.undefined_end((alpha[0], alpha[1]), (sigma[0], sigma[1]), (lo, hi))
    if singular is not None:
        problems.append(singular)
    if problems:
        raise ValueError(
            f"{context}: the velocity is undefined at an end of the range [t_eps, 1 - t_eps] = "
            f"[{lo:g}, {hi:g}] that sampling and likelihoods integrate over: "
            + "; ".join(problems)
            + ". Train (and sample) with t_eps > 0, e.g. t_eps=1e-3, so that the range avoids the singular end."
        )
    return lo, hi


def check_noise(x0: Any, data_shape: tuple[int, ...] | None) -> None:
    """``x0`` must be a finite floating point tensor of shape ``(B, *data_shape)`` with ``B >= 1``.

    Raises:
        TypeError: when ``x0`` is not a floating point tensor.
        ValueError: naming the shape or the number of non-finite values.
    """
    if not torch.is_tensor(x0):
        raise TypeError(f"x0 must be a tensor of initial noise, got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be floating point noise, got dtype {x0.dtype}")
    if x0.ndim < 1 or x0.shape[0] == 0 or x0.numel() == 0:
        raise ValueError(f"x0 must hold at least one sample, got shape {tuple(x0.shape)}")
    if data_shape is not None and tuple(x0.shape[1:]) != data_shape:
        raise ValueError(f"x0 has samples of shape {tuple(x0.shape[1:])}, expected data_shape {data_shape}")
    bad = int((~torch.isfinite(x0)).sum())
    if bad:
        raise ValueError(f"x0 contains {bad} non-finite value(s) (NaN or Inf)")


def initial_noise(
    num_samples: int | None,
    x0: Tensor | None,
    data_shape: tuple[int, ...] | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The initial noise of a sample: ``x0`` after :func:`check_noise`, or ``num_samples`` draws of ``N(0, I)`` of
    shape ``data_shape`` from ``generator`` (on its device; the CPU without one).

    Raises:
        ValueError: unless exactly one of ``num_samples`` and ``x0`` is given, for a ``num_samples`` that is not a
            positive integer, or an unknown ``data_shape``; as :func:`check_noise` for a bad ``x0``.
    """
    if (num_samples is None) == (x0 is None):
        raise ValueError("give exactly one of num_samples or x0")
    if x0 is not None:
        check_noise(x0, data_shape)
        return x0
    if data_shape is None:
        raise ValueError("data_shape is unknown (the model has seen no batch): pass x0 or set data_shape")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    return torch.randn(
        (num_samples, *data_shape), generator=generator, device=generator.device if generator is not None else "cpu"
    )


@dataclass(frozen=True)
class ModelFlow:
    """A model's flow ``dx/dt = v(x, t)`` over its trained range ``[t_eps, 1 - t_eps]``.

    The prior ``N(0, I)`` sits at ``t_eps`` and the data at ``1 - t_eps`` (:func:`solve_range`): sampling and
    likelihoods describe one model. The caller puts the network in eval mode.

    Attributes:
        velocity: the model velocity ``v(x, t)``, fp32; ``t`` stays inside ``[0, 1]`` (no range check needed).
        path: the model's path.
        parametrization: the model's parametrization.
        t_eps: the trained range is ``[t_eps, 1 - t_eps]``.
        data_shape: the shape of one sample, or None if unknown.
        device: where the model lives.
        model_name: how errors name the model, with its parametrization, path and range (:attr:`context`).
        calls_per_evaluation: network calls per velocity evaluation (2 under classifier-free guidance with
            ``0 != w != 1``, :mod:`ko_lightning.guidance`); a sample's ``nfe`` counts network calls.
    """

    velocity: Callable[[Tensor, Tensor], Tensor]
    path: GaussianPath
    parametrization: OutputParametrization
    t_eps: float
    data_shape: tuple[int, ...] | None
    device: torch.device
    model_name: str = "FlowMatching"
    calls_per_evaluation: int = 1

    @property
    def context(self) -> str:
        """How solver errors name the model: ``FlowMatching(parametrization=..., path=..., t_eps=...)``."""
        return (
            f"{self.model_name}(parametrization={self.parametrization.name!r}, path={self.path!r}, "
            f"t_eps={self.t_eps:g})"
        )

    def _grid(self, grid: SampleGrid | None, solver: SolverSpec, time_points: Tensor | None) -> SampleGrid:
        """The grid a sample steps on (see :meth:`sample`); raises ``ValueError`` naming ``grid``."""
        if grid is None:
            fixed = solver.method not in ADAPTIVE_METHODS and time_points is None
            return self.path.sample_grid if fixed else "time"
        if grid not in SAMPLE_GRIDS:
            raise ValueError(f"grid must be one of {SAMPLE_GRIDS} or None, got {grid!r}")
        if grid == "angle" and (solver.method in ADAPTIVE_METHODS or time_points is not None):
            raise ValueError(
                f"grid='angle' is a grid of a fixed-step method without time_points, got method={solver.method!r}"
                + ("" if time_points is None else " with time_points")
            )
        return grid

    def solve_range(self) -> tuple[float, float]:
        """``(t_eps, 1 - t_eps)`` after the checks of :func:`solve_range`."""
        return solve_range(self.path, self.parametrization, self.t_eps, self.device, self.context)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int | None = None,
        x0: Tensor | None = None,
        method: str = "euler",
        steps: int | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        generator: torch.Generator | None = None,
        time_points: Tensor | None = None,
        max_num_steps: int | None = None,
        grid: SampleGrid | None = None,
        time_grid: Any = None,
    ) -> SampleResult:
        """Samples: solve ``dx/dt = v(x, t)`` from noise ``x0 ~ N(0, I)`` at ``t_eps`` to ``1 - t_eps``, without grad.

        Args:
            num_samples: how many samples (noise drawn with ``generator``); or give ``x0``.
            x0: initial noise, shape ``(B, *data_shape)``, floating point.
            method: ODE method: fixed-step (euler, midpoint, heun, heun3, rk4) or adaptive (dopri5, ...).
            steps: number of steps of a fixed-step method (default :data:`DEFAULT_FIXED_STEPS`).
            atol: absolute tolerance of an adaptive method (default 1e-5).
            rtol: relative tolerance of an adaptive method (default 1e-5).
            generator: random generator for the initial noise.
            time_points: optional times at which to also return the trajectory: strictly increasing, starting at
                ``t_eps`` (where ``x0`` lives) and ending at or before ``1 - t_eps``. The samples are always the
                state at ``1 - t_eps``.
            max_num_steps: step attempts an adaptive method may take (default
                :data:`~ko_lightning.ode.DEFAULT_MAX_NUM_STEPS`) before it stops with an error naming the method,
                tolerances and the time reached.
            grid: where a fixed-step method steps: ``"time"`` (equal steps in ``t``) or ``"angle"`` (equal steps in
                the path's angle ``theta = atan(alpha / sigma)``, in the unit-radius frame ``x / r``;
                :class:`~ko_lightning.angular_grid.AngleGrid`, docs/math.md §5.3). None: the path's
                ``sample_grid`` (``"angle"`` for a solved KO path, ``"time"`` otherwise) for a fixed-step method
                without ``time_points``, else ``"time"``.
            time_grid: the times a fixed-step method steps through: strictly increasing, from ``t_eps`` to
                ``1 - t_eps`` (:func:`~ko_lightning.time_grids.check_time_grid`; e.g. from
                :func:`~ko_lightning.time_grids.path_time_grid`). It replaces ``steps`` and the angle grid.

        Returns:
            ``SampleResult(samples, nfe, trajectory, time_points)``; ``nfe`` is the exact number of network calls.

        Raises:
            ValueError: naming the argument (``num_samples``, ``x0``, ``time_points``, a solver knob, ``grid``), or
                when the parametrization's conversion is undefined at an end of ``[t_eps, 1 - t_eps]`` on this path.
            ko_lightning.ode.SolverError: for a non-finite result (naming the parametrization, the path and the
                time) or an adaptive solve that cannot finish.
        """
        if (num_samples is None) == (x0 is None):  # checked first: before the solver knobs and the range
            raise ValueError("give exactly one of num_samples or x0")
        t_start, t_end = self.solve_range()
        solver = self._solver(method, steps, atol, rtol, max_num_steps, grid, time_grid, t_start, t_end)
        x0 = initial_noise(num_samples, x0, self.data_shape, generator)
        if solver.grid is None and self._grid(grid, solver, time_points) == "angle":
            frame = AngleGrid(self.velocity, self.path, t_start, t_end, self.device)
            y0 = x0.to(self.device).float() / frame.radius(t_start)
            result = integrate(frame, y0, solver, t_start=0.0, t_end=1.0, context=self.context)
            result = SampleResult(samples=result.samples * frame.radius(t_end), nfe=result.nfe)
        else:
            result = integrate(
                self.velocity,
                x0.to(self.device).float(),
                solver,
                t_start=t_start,
                t_end=t_end,
                time_points=time_points,
                context=self.context,
            )
        return replace(result, nfe=result.nfe * self.calls_per_evaluation)

    def _solver(
        self,
        method: str,
        steps: int | None,
        atol: float | None,
        rtol: float | None,
        max_num_steps: int | None,
        grid: SampleGrid | None,
        time_grid: Any,
        t_start: float,
        t_end: float,
    ) -> SolverSpec:
        """The solver of a sample; with ``time_grid``, a fixed-step method on that grid (errors name the clash)."""
        if time_grid is None:
            return solver_spec(method, steps, atol, rtol, max_num_steps)
        if method in ADAPTIVE_METHODS:
            raise ValueError(f"time_grid is for fixed-step methods; method={method!r} is adaptive")
        if steps is not None or grid is not None:
            raise ValueError("time_grid replaces steps and grid: give time_grid alone")
        return SolverSpec(method=method, grid=check_time_grid(time_grid, t_start, t_end))

    def log_prob(
        self,
        x: Tensor,
        method: str = "dopri5",
        steps: int | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        divergence: str = "auto",
        generator: torch.Generator | None = None,
        progress: bool = False,
        max_num_steps: int | None = None,
    ) -> LogProbResult:
        """``log p(x) = log N(x_{t_eps}; 0, I) - int_{t_eps}^{1 - t_eps} div v(x_t, t) dt``, solved from the data at
        ``1 - t_eps`` back to ``t_eps`` (:func:`ko_lightning.likelihood.log_prob`: exact divergence up to 32
        dimensions, else Hutchinson with one fixed probe per solve). Gradients flow to ``x`` when it requires grad.

        Raises:
            ValueError: for bad arguments, or a parametrization undefined at an end of the range (as in
                :meth:`sample`).
            ko_lightning.ode.SolverError: when the result is NaN or inf (naming the parametrization, the path and
                the time), or an adaptive solve exhausts ``max_num_steps``.
        """
        t_start, t_end = self.solve_range()
        solver = solver_spec(method, steps, atol, rtol, max_num_steps)
        method_ = cast(DivergenceMethod, divergence)  # log_prob checks the name
        return log_prob(
            self.velocity,
            x.to(self.device),
            solver,
            divergence=method_,
            generator=generator,
            t_start=t_end,
            t_end=t_start,
            progress=progress,
            context=self.context,
        )

    def bpd(
        self,
        x: Tensor,
        method: str = "dopri5",
        steps: int | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        divergence: str = "auto",
        pixel_map: PixelMap | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        max_num_steps: int | None = None,
    ) -> BitsPerDimResult:
        """Bits per dimension of integer pixels ``x`` (uint8 or integer-valued, in ``[0, levels - 1]``).

        Uniform dequantization ``y = (x + w - offset) / scale`` through ``pixel_map`` (default: 8-bit data on
        ``[-1, 1]``, ``PixelMap.from_range(256)``) and its Jacobian term:
        ``bpd = -(log p(y) - D log(scale)) / (D ln 2)``, an upper bound on ``-log2 P(x) / D`` (docs/math.md §8;
        :func:`ko_lightning.likelihood.bits_per_dim`), with ``log p`` as in :meth:`log_prob`.
        """
        t_start, t_end = self.solve_range()
        solver = solver_spec(method, steps, atol, rtol, max_num_steps)
        method_ = cast(DivergenceMethod, divergence)  # bits_per_dim checks the name
        return bits_per_dim(
            self.velocity,
            x.to(self.device),
            solver,
            divergence=method_,
            generator=generator,
            t_start=t_end,
            t_end=t_start,
            progress=progress,
            context=self.context,
            pixel_map=pixel_map,
        )
