"""What a trained flow-matching model answers: its velocity and x1-prediction, samples (with classifier-free
guidance, on other time grids or on another path), log-likelihoods and bits per dimension.

:class:`FlowInference` is the inference half of :class:`~ko_lightning.module.FlowMatching` (the training half is
the Lightning glue in ``module.py``). It hands the work to :class:`~ko_lightning.model_flow.ModelFlow` and needs no
Lightning; a class using it provides ``net``, ``path``, ``param``, ``t_eps``, ``data_shape``, ``device`` and
``conditioning``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ko_lightning.conditioning import Conditioning
from ko_lightning.guidance import GuidedVelocity, check_guidance
from ko_lightning.likelihood import BitsPerDimResult, LogProbResult, PixelMap, resolve_pixel_map
from ko_lightning.model_flow import ModelFlow, initial_noise
from ko_lightning.parametrizations import OutputParametrization
from ko_lightning.paths import GaussianPath, PathCoefficients, SampleGrid, ScaleTimeVelocity
from ko_lightning.sampling import SampleResult
from ko_lightning.time_grids import TimeGridKind, path_time_grid

__all__ = ["FlowInference"]

#: how far inside ``(0, 1)`` a velocity carried to another path is evaluated: the scale-time map divides by
#: ``alpha`` and ``sigma``, which vanish at the ends (docs/math.md §5.1).
_TRANSFER_MARGIN = 1e-5


class FlowInference:
    """Sampling and likelihoods of a model ``net`` on a Gaussian path (mixin; see the module docstring)."""

    if TYPE_CHECKING:  # provided by the class that uses the mixin (FlowMatching, an nn.Module)
        net: nn.Module
        param: OutputParametrization
        t_eps: float
        data_shape: tuple[int, ...] | None
        conditioning: Conditioning
        training: bool
        pixel_map: PixelMap | None

        @property
        def path(self) -> GaussianPath: ...

        @property
        def device(self) -> torch.device: ...

        def train(self, mode: bool = True) -> Any: ...

        def eval(self) -> Any: ...

    # ------------------------------------------------------------------ the network as a velocity
    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """Model velocity ``v_theta(x, t)`` in fp32, whatever the parametrization (``t`` checked to lie in [0, 1]);
        ``cond``: the condition of each sample of a conditional model (None: "no condition")."""
        cond = self._checked_cond(cond, x.shape[0])
        return self._solver_velocity(x, t, validate=True, cond=cond)

    def _solver_velocity(self, x: Tensor, t: Tensor, validate: bool = False, cond: Tensor | None = None) -> Tensor:
        """:meth:`velocity` for the ODE solvers, which keep ``t`` in [0, 1]: by default no range check (a sync)."""
        c = self.path.at(t, x, validate)
        return self._output_to_velocity(self.param.net_output(self.net, x, t, c, cond), x, c)

    def _output_to_velocity(self, out: Tensor, x_t: Tensor, c: PathCoefficients) -> Tensor:
        return self.param.to_velocity(out, x_t, c)

    def predict_x1(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """Model estimate of ``E[x1 | x_t = x]`` (``E[x1 | x_t = x, cond]`` with a condition) in fp32 (used by the
        separation-function estimator)."""
        cond = self._checked_cond(cond, x.shape[0])
        c = self.path.at(t, x)
        return self.param.to_x1(self.param.net_output(self.net, x, t, c, cond), x, c)

    def _checked_cond(self, cond: Any, batch_size: int) -> Tensor | None:
        return None if cond is None else self.conditioning.check(cond, batch_size, "cond", allow_null=True)

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Run the network in eval mode (dropout off), restoring the previous mode afterwards."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def _flow(
        self, cond: Tensor | None = None, guidance_scale: float = 1.0, path: GaussianPath | None = None
    ) -> ModelFlow:
        """This model's flow over its trained range ``[t_eps, 1 - t_eps]``, as the ODE solvers see it: guided towards
        ``cond`` (:class:`~ko_lightning.guidance.GuidedVelocity`) and carried to ``path`` when given."""
        null = None
        if cond is not None:
            cond = cond.to(self.device)  # once, not in every solver step
            if guidance_scale not in (0.0, 1.0):
                null = self.conditioning.null(cond.shape[0], self.device)
        guided = GuidedVelocity(self._conditional_velocity, cond, guidance_scale, null)
        velocity: Any = guided
        if path is not None and path is not self.path:
            transfer = ScaleTimeVelocity(guided, self.path, path.to(self.device))

            def velocity(x: Tensor, t: Tensor) -> Tensor:
                return transfer(x, t.clamp(_TRANSFER_MARGIN, 1.0 - _TRANSFER_MARGIN))

        return ModelFlow(
            velocity,
            self.path if path is None else path,
            self.param,
            self.t_eps,
            self.data_shape,
            self.device,
            calls_per_evaluation=guided.calls_per_evaluation,
        )

    def _conditional_velocity(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        return self._solver_velocity(x, t, cond=cond)

    # ------------------------------------------------------------------ sampling and likelihoods
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
        cond: Tensor | int | None = None,
        guidance_scale: float | None = None,
        time_grid: Any = None,
        path: GaussianPath | None = None,
    ) -> SampleResult:
        """Samples: solve ``dx/dt = v_theta(x, t)`` from ``x0 ~ N(0, I)`` at ``t_eps`` to ``1 - t_eps``, in eval mode.

        The solver arguments, their defaults and errors are those of :meth:`ko_lightning.model_flow.ModelFlow.sample`
        (``grid="angle"``, the default on a solved KO path, steps equally in the path's angle; ``time_grid`` gives
        the times of a fixed-step method, e.g. from :meth:`time_grid`). Besides:

        Args:
            cond: conditional models: one condition per sample (labels ``(n,)``, one int for all, or floats
                ``(n, cond_dim)``); None samples the unconditional model.
            guidance_scale: classifier-free guidance ``v = v_uncond + w (v_cond - v_uncond)`` (docs/math.md §7);
                default 1 (the conditional model, one network call per step); 0 is the unconditional model; any
                other ``w`` costs two calls per step, counted in ``nfe``.
            path: sample on another Gaussian path through the scale-time transformation (docs/math.md §5.1): the
                same ODE in other coordinates, so only the discretization changes. Evaluated inside
                ``[1e-5, 1 - 1e-5]``, where the map is finite.

        Raises:
            ValueError: naming ``cond`` or ``guidance_scale`` (a scale for an unconditional model or without
                ``cond``), or as ``ModelFlow.sample`` says.
        """
        noise = initial_noise(num_samples, x0, self.data_shape, generator)  # checks num_samples / x0 (one place)
        checked, scale = check_guidance(self.conditioning, cond, guidance_scale, noise.shape[0])
        if path is not None and not isinstance(path, GaussianPath):
            raise TypeError(f"path must be a ko_lightning.paths.GaussianPath, got {type(path).__name__}")
        with self.eval_mode():
            return self._flow(checked, scale, path).sample(
                None, noise, method, steps, atol, rtol, None, time_points, max_num_steps, grid, time_grid
            )

    def time_grid(self, steps: int, kind: TimeGridKind = "angle") -> tuple[float, ...]:
        """``steps + 1`` times over the trained range for ``sample(time_grid=...)``: ``"angle"`` (equal steps in this
        model's path angle, a few-step grid) or ``"uniform"`` (:func:`~ko_lightning.time_grids.path_time_grid`)."""
        return path_time_grid(self.path, steps, self.t_eps, 1.0 - self.t_eps, kind)

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
        cond: Tensor | int | None = None,
    ) -> LogProbResult:
        """Log-density of data ``x`` under the flow :meth:`sample` draws from (given ``cond``: the conditional model's
        density ``log p(x | cond)``), in eval mode. Arguments and errors:
        :meth:`ko_lightning.model_flow.ModelFlow.log_prob`."""
        checked, _ = check_guidance(self.conditioning, cond, None, x.shape[0])
        with self.eval_mode():
            return self._flow(checked).log_prob(
                x, method, steps, atol, rtol, divergence, generator, progress, max_num_steps
            )

    def bpd(
        self,
        x: Tensor,
        method: str = "dopri5",
        steps: int | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        divergence: str = "auto",
        num_bins: int | None = None,
        data_range: tuple[float, float] | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        max_num_steps: int | None = None,
        cond: Tensor | int | None = None,
        pixel_map: PixelMap | None = None,
    ) -> BitsPerDimResult:
        """Bits per dimension of integer pixels ``x`` in the data's own units (given ``cond``: of the conditional
        model), in eval mode (docs/math.md §8).

        ``x`` holds the pixels as the data set stores them: uint8 ``0..255`` for images, ``0..16`` for the digits.
        They are dequantized with the data's own normalization: ``pixel_map``, else the one recorded from the data
        module at fit time (:attr:`pixel_map`, saved in checkpoints), else 8-bit data on ``[-1, 1]``. ``num_bins``
        / ``data_range`` override it (``y = lo + (hi - lo)(x + w) / num_bins``). Other arguments and errors:
        :meth:`ko_lightning.model_flow.ModelFlow.bpd`.

        Raises:
            ValueError: naming ``pixel_map`` when it is given together with ``num_bins`` / ``data_range``; naming
                ``x`` for pixels outside ``[0, levels - 1]`` or not integer.
        """
        if pixel_map is not None and (num_bins is not None or data_range is not None):
            raise ValueError("give either pixel_map or num_bins / data_range, not both")
        used = resolve_pixel_map(num_bins, data_range, pixel_map if pixel_map is not None else self.pixel_map)
        checked, _ = check_guidance(self.conditioning, cond, None, x.shape[0])
        with self.eval_mode():
            return self._flow(checked).bpd(
                x, method, steps, atol, rtol, divergence, used, generator, progress, max_num_steps
            )

    def to_pixels(self, samples: Tensor) -> Tensor:
        """Model-space samples (what :meth:`sample` returns) -> integer pixels in the data's units (int64), through
        :attr:`pixel_map`: ``round(y scale + offset)`` clipped to ``[0, levels - 1]``.

        Raises:
            ValueError: when no pixel map is known (the model was not fitted with a data module that has
                ``pixel_map()``, e.g. 2D data): map samples back with the data module's ``denormalize``.
        """
        if self.pixel_map is None:
            raise ValueError(
                "this model has no pixel_map (it was not fitted on pixel data, or its checkpoint predates pixel maps): "
                "set model.pixel_map = datamodule.pixel_map(), or use the data module's denormalize"
            )
        return self.pixel_map.to_pixels(samples)
