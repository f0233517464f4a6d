"""Training-time densities: which times ``t`` the flow-matching loss sees (docs/math.md §1.4).

A time sampler is a callable ``sampler(batch_size, generator) -> u`` with ``u`` in ``[0, 1]``, shape
``(batch_size,)``; ``FlowMatching`` maps it onto its trained range, ``t = t_eps + (1 - 2 t_eps) u``. The density of
``u`` decides how much of the training signal each noise level gets; the minimizer of the loss (the marginal
velocity) does not depend on it, so any density with full support trains the same model in the limit.

- ``"uniform"`` (the default): ``u ~ U[0, 1]``.
- ``"logit_normal"`` or ``"logit_normal(m, s)"``: ``u = sigmoid(m + s z)``, ``z ~ N(0, 1)`` (Esser et al. 2024,
  Stable Diffusion 3; ``m = 0, s = 1`` by default), with density
  ``p(u) = exp(-(logit(u) - m)^2 / (2 s^2)) / (s sqrt(2 pi) u (1 - u))``.
- any callable ``(batch_size, generator) -> u``, checked for its shape and range on each call.
- ``"speed"``: the *uniform* objective, drawn by importance sampling: ``t`` from the density
  ``q(t) ∝ mix + (1 - mix) s(t) / mean(s)`` with ``s(t) = sqrt(alpha'^2 + sigma'^2)`` the path's conditional speed
  (the RMS of the regression target for normalized data), each sample's loss weighted by ``1 / q(t)``. Same
  objective as ``"uniform"``, lower variance where the path turns fast; on a constant-speed path (Cond-OT, cosine)
  it is ``"uniform"``.
- ``"auto"`` (the default): ``"speed"`` on a solved KO path (its ``sample_grid`` is ``"angle"``), ``"uniform"``
  on every other path (docs/math.md §1.4).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AutoTime",
    "LogitNormalTime",
    "SpeedImportanceTime",
    "TimeSampler",
    "TimeSamplerSpec",
    "UniformTime",
    "make_time_sampler",
    "time_sampler_name",
]

#: what ``FlowMatching(time_sampler=...)`` accepts: a name or a callable ``(batch_size, generator) -> u``.
TimeSamplerSpec = str | Callable[[int, torch.Generator | None], Tensor]

_SPEED = re.compile(r"^speed(?:\(\s*([-+0-9.eE]+)\s*\))?$")
_LOGIT_NORMAL = re.compile(r"^logit_normal(?:\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*\))?$")


def _device(generator: torch.Generator | None, device: torch.device | str | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


@dataclass(frozen=True)
class UniformTime:
    """``u ~ U[0, 1]``: the flow-matching default."""

    def __call__(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        return torch.rand(batch_size, device=_device(generator, device), generator=generator)

    def __str__(self) -> str:
        return "uniform"


@dataclass(frozen=True)
class LogitNormalTime:
    """``u = sigmoid(mean + std z)``, ``z ~ N(0, 1)``: more training signal at intermediate noise levels.

    Args:
        mean: the location ``m`` of ``logit(u)``.
        std: the scale ``s > 0`` of ``logit(u)``.
    """

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(
                f"time_sampler logit_normal needs a finite mean and std > 0, got ({self.mean}, {self.std})"
            )

    def __call__(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        z = torch.randn(batch_size, device=_device(generator, device), generator=generator)
        return torch.sigmoid(self.mean + self.std * z)

    def density(self, u: Tensor) -> Tensor:
        """The density ``p(u)`` on ``(0, 1)`` (module docstring)."""
        u = u.double()
        logit = torch.log(u) - torch.log1p(-u)
        norm = self.std * math.sqrt(2.0 * math.pi) * u * (1.0 - u)
        return torch.exp(-((logit - self.mean) ** 2) / (2.0 * self.std**2)) / norm

    def __str__(self) -> str:
        return f"logit_normal({self.mean:g}, {self.std:g})"


@dataclass(frozen=True)
class _CheckedCallable:
    """A user's sampler, with its output checked: shape ``(batch_size,)``, floating point, within ``[0, 1]``."""

    fn: Callable[[int, torch.Generator | None], Tensor]

    def __call__(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        u = self.fn(batch_size, generator)
        name = time_sampler_name(self.fn)
        if not torch.is_tensor(u) or not u.is_floating_point() or tuple(u.shape) != (batch_size,):
            got = f"{u.dtype} {tuple(u.shape)}" if torch.is_tensor(u) else type(u).__name__
            raise ValueError(f"time_sampler {name} must return a float tensor of shape ({batch_size},), got {got}")
        if not bool(((u >= 0) & (u <= 1)).all()):
            raise ValueError(
                f"time_sampler {name} returned values outside [0, 1] (min {float(u.min()):g}, max {float(u.max()):g})"
            )
        return u if device is None else u.to(device)

    def __str__(self) -> str:
        return time_sampler_name(self.fn)


class SpeedImportanceTime:
    """Importance sampling of the uniform objective by the path's conditional speed (module docstring).

    The density is piecewise constant on ``n_cells`` equal cells of ``[t_eps, 1 - t_eps]``, so the inverse CDF is
    exact and ``weight = 1 / q(t)`` is exactly the inverse of the density ``t`` was drawn from: the weighted loss is
    an unbiased estimate of the uniform one, with weights at most ``1 / mix``. One uniform number per sample is
    drawn, as ``"uniform"`` draws it. The table is rebuilt when the path object changes (a KO refresh).

    Args:
        mix: the uniform share of the density, in ``(0, 1]`` (bounds the weights by ``1 / mix``).
        n_cells: cells of the density table.
    """

    def __init__(self, mix: float = 0.5, n_cells: int = 2048) -> None:
        if not 0 < mix <= 1:
            raise ValueError(f"time_sampler speed needs mix in (0, 1], got {mix!r}")
        self.mix, self.n_cells = float(mix), int(n_cells)
        self._cache: tuple[Any, float, torch.device, Tensor, Tensor] | None = None

    def _table(self, path: Any, t_eps: float, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(cdf, density)`` on ``device``: the CDF at the ``n_cells + 1`` cell edges and each cell's density,
        normalized to mean 1 over the cells (so it is ``q`` on ``u = (t - t_eps) / (1 - 2 t_eps)``). Built once per
        path object (a KO refresh installs a new one), range and device: a training step only looks it up."""
        cached = self._cache
        if cached is None or cached[0] is not path or cached[1] != t_eps or cached[2] != device:
            buffer = next(path.buffers(), None)  # evaluate where the path's table lives
            at = torch.linspace(t_eps, 1.0 - t_eps, 2 * self.n_cells + 1, dtype=torch.float32)[1::2]  # cell midpoints
            c = path(at.to(buffer.device if buffer is not None else "cpu"))
            speed = (c.d_alpha.double() ** 2 + c.d_sigma.double() ** 2).sqrt().cpu()
            density = self.mix + (1.0 - self.mix) * speed / speed.mean()
            density = density / density.mean()
            cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(density, 0) / self.n_cells])
            cdf = cdf / cdf[-1]
            cached = self._cache = (path, t_eps, device, cdf.to(device), density.to(device))
        return cached[3], cached[4]

    def weighted_times(
        self, path: Any, batch_size: int, generator: torch.Generator | None, device: torch.device, t_eps: float
    ) -> tuple[Tensor, Tensor]:
        """Times in ``[t_eps, 1 - t_eps]`` and their loss weights ``1 / q(t)`` (``q`` normalized on that range)."""
        u = torch.rand(batch_size, device=_device(generator, device), generator=generator).double()
        cdf, density = self._table(path, t_eps, u.device)
        cell = torch.searchsorted(cdf, u, right=True).clamp(1, self.n_cells) - 1
        frac = ((u - cdf[cell]) / (cdf[cell + 1] - cdf[cell])).clamp(0.0, 1.0)
        t = t_eps + (1.0 - 2.0 * t_eps) * (cell + frac) / self.n_cells
        return t.float(), (1.0 / density[cell]).float()

    def __str__(self) -> str:
        return "speed" if self.mix == 0.5 else f"speed({self.mix:g})"


@dataclass(frozen=True)
class AutoTime:
    """``"speed"`` on a solved KO path (``path.sample_grid == "angle"``), ``"uniform"`` on any other path."""

    speed: SpeedImportanceTime = field(default_factory=SpeedImportanceTime)

    def for_path(self, path: Any) -> UniformTime | SpeedImportanceTime:
        """The sampler this path gets."""
        return self.speed if getattr(path, "sample_grid", "time") == "angle" else UniformTime()

    def __str__(self) -> str:
        return "auto"


def time_sampler_name(sampler: Any) -> str:
    """How hyperparameters record a sampler: its name (``"uniform"``, ``"logit_normal(0, 1)"``) or, for a plain
    callable, ``"callable:<module>.<qualname>"`` (which cannot be rebuilt from the name)."""
    if isinstance(sampler, (UniformTime, LogitNormalTime, _CheckedCallable, SpeedImportanceTime, AutoTime)):
        return str(sampler)
    module = getattr(sampler, "__module__", None) or type(sampler).__module__
    qualname = getattr(sampler, "__qualname__", None) or type(sampler).__qualname__
    return f"callable:{module}.{qualname}"


#: a checked time sampler, as :func:`make_time_sampler` returns it.
TimeSampler = UniformTime | LogitNormalTime | _CheckedCallable | SpeedImportanceTime | AutoTime


def make_time_sampler(spec: Any) -> TimeSampler:
    """The sampler for ``FlowMatching(time_sampler=spec)`` (module docstring).

    Raises:
        ValueError: naming ``time_sampler`` for an unknown name (listing the valid ones) or bad parameters.
    """
    if isinstance(spec, (UniformTime, LogitNormalTime, _CheckedCallable, SpeedImportanceTime, AutoTime)):
        return spec
    if isinstance(spec, str):
        name = spec.strip()
        if name == "uniform":
            return UniformTime()
        if name == "auto":
            return AutoTime()
        speed = _SPEED.match(name)
        if speed:
            return SpeedImportanceTime() if speed.group(1) is None else SpeedImportanceTime(float(speed.group(1)))
        match = _LOGIT_NORMAL.match(name)
        if match:
            mean, std = (0.0, 1.0) if match.group(1) is None else (float(match.group(1)), float(match.group(2)))
            return LogitNormalTime(mean, std)
        raise ValueError(
            f"time_sampler={spec!r} is not a known sampler: use 'auto', 'uniform', 'speed', 'speed(mix)', "
            "'logit_normal', 'logit_normal(m, s)' or a callable (batch_size, generator) -> u in [0, 1]"
            + (" (pass the callable again: a saved name cannot rebuild it)" if name.startswith("callable:") else "")
        )
    if callable(spec):
        return _CheckedCallable(spec)
    raise ValueError(
        f"time_sampler must be a name or a callable (batch_size, generator) -> u, got {type(spec).__name__}"
    )
