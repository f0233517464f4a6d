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
- ``"cond_ot_snr"`` or ``"cond_ot_snr(share)"``: Cond-OT's weighting of noise levels on any path (docs/math.md
  §1.5): the objective ``(1 - share) L_path + share L_ot`` where ``L_ot`` weights each signal-to-noise ratio as
  Cond-OT's uniform-time training does, drawn by importance sampling with bounded weights (``share = 1`` by
  default). On Cond-OT it is ``"uniform"``.
- ``"auto"`` (the default): ``"cond_ot_snr(0.5)"`` on a solved KO path (its ``sample_grid`` is ``"angle"``),
  ``"uniform"`` on every other path.
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
    "CondOTWeightedTime",
    "LogitNormalTime",
    "SpeedImportanceTime",
    "TabulatedImportanceTime",
    "TimeSampler",
    "TimeSamplerSpec",
    "UniformTime",
    "make_time_sampler",
    "time_sampler_name",
]

#: what ``FlowMatching(time_sampler=...)`` accepts: a name or a callable ``(batch_size, generator) -> u``.
TimeSamplerSpec = str | Callable[[int, torch.Generator | None], Tensor]

_SPEED = re.compile(r"^speed(?:\(\s*([-+0-9.eE]+)\s*\))?$")
_COND_OT_SNR = re.compile(r"^cond_ot_snr(?:\(\s*([-+0-9.eE]+)\s*\))?$")
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


class TabulatedImportanceTime:
    """An objective ``E_t [c(t) loss(t)]`` (``t`` uniform on ``[t_eps, 1 - t_eps]``, ``c`` with mean 1) drawn by
    importance sampling from a proposal ``q`` built on the path: ``t ~ q``, each loss weighted by ``c(t) / q(t)``.

    ``c`` and ``q`` are piecewise constant on ``n_cells`` equal cells, so the inverse CDF is exact and the weight is
    exactly ``c / q`` for the density ``t`` was drawn from: the weighted loss is an unbiased estimate of the objective.
    One uniform number per sample is drawn, as ``"uniform"`` draws it. The table is rebuilt when the path object
    changes (a KO refresh). Subclasses give ``(c, q)`` at the cell midpoints from the path's coefficients.

    Args:
        n_cells: cells of the density table.
    """

    def __init__(self, n_cells: int = 2048) -> None:
        self.n_cells = int(n_cells)
        self._cache: tuple[Any, float, torch.device, Tensor, Tensor] | None = None

    def _target_and_proposal(self, coefficients: Any) -> tuple[Tensor, Tensor]:
        """``(c, q)`` at the cell midpoints, float64 on the CPU, each with mean 1 over the cells."""
        raise NotImplementedError

    def _table(self, path: Any, t_eps: float, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(cdf, weight)`` on ``device``: the proposal's CDF at the ``n_cells + 1`` cell edges and each cell's loss
        weight ``c / q``. Built once per path object, range and device: a training step only looks it up."""
        cached = self._cache
        if cached is None or cached[0] is not path or cached[1] != t_eps or cached[2] != device:
            buffer = next(path.buffers(), None)  # evaluate where the path's table lives
            at = torch.linspace(t_eps, 1.0 - t_eps, 2 * self.n_cells + 1, dtype=torch.float32)[1::2]  # cell midpoints
            target, proposal = self._target_and_proposal(path(at.to(buffer.device if buffer is not None else "cpu")))
            cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(proposal, 0) / self.n_cells])
            cdf = cdf / cdf[-1]
            cached = self._cache = (path, t_eps, device, cdf.to(device), (target / proposal).to(device))
        return cached[3], cached[4]

    def weighted_times(
        self, path: Any, batch_size: int, generator: torch.Generator | None, device: torch.device, t_eps: float
    ) -> tuple[Tensor, Tensor]:
        """Times in ``[t_eps, 1 - t_eps]`` and their loss weights ``c(t) / q(t)``."""
        u = torch.rand(batch_size, device=_device(generator, device), generator=generator).double()
        cdf, weight = self._table(path, t_eps, u.device)
        cell = torch.searchsorted(cdf, u, right=True).clamp(1, self.n_cells) - 1
        frac = ((u - cdf[cell]) / (cdf[cell + 1] - cdf[cell])).clamp(0.0, 1.0)
        t = t_eps + (1.0 - 2.0 * t_eps) * (cell + frac) / self.n_cells
        return t.float(), weight[cell].float()


def _speed_proposal(coefficients: Any, mix: float) -> Tensor:
    """``mix + (1 - mix) s(t) / mean(s)``, ``s = sqrt(alpha'^2 + sigma'^2)``, normalized to mean 1."""
    speed = (coefficients.d_alpha.double() ** 2 + coefficients.d_sigma.double() ** 2).sqrt().cpu()
    density = mix + (1.0 - mix) * speed / speed.mean()
    return density / density.mean()


class SpeedImportanceTime(TabulatedImportanceTime):
    """Importance sampling of the uniform objective by the path's conditional speed (module docstring): ``c = 1``,
    ``q ∝ mix + (1 - mix) s(t) / mean(s)``, so the weights are at most ``1 / mix``.

    Args:
        mix: the uniform share of the density, in ``(0, 1]`` (bounds the weights by ``1 / mix``).
        n_cells: cells of the density table.
    """

    def __init__(self, mix: float = 0.5, n_cells: int = 2048) -> None:
        if not 0 < mix <= 1:
            raise ValueError(f"time_sampler speed needs mix in (0, 1], got {mix!r}")
        super().__init__(n_cells)
        self.mix = float(mix)

    def _target_and_proposal(self, coefficients: Any) -> tuple[Tensor, Tensor]:
        proposal = _speed_proposal(coefficients, self.mix)
        return torch.ones_like(proposal), proposal

    def __str__(self) -> str:
        return "speed" if self.mix == 0.5 else f"speed({self.mix:g})"


class CondOTWeightedTime(TabulatedImportanceTime):
    """Cond-OT's weighting of noise levels on any path (docs/math.md §1.5): the objective
    ``(1 - share) L_path + share L_ot``, drawn by importance sampling.

    ``L_path`` is the path's own uniform-time velocity loss. ``L_ot`` is the same network's loss with the weight per
    signal-to-noise ratio ``s = alpha / sigma`` that Cond-OT training gives it: both losses are
    ``beta^2 E||x1_hat - x1||^2`` (``beta = sigma s'``), and Cond-OT draws ``u ~ U[0, 1]`` with ``s = u / (1 - u)``,
    so ``L_ot = ∫ ds E||x1_hat - x1||^2 = ∫ w(t) L_path(t) dt`` with ``w(t) = 1 / (alpha' sigma - alpha sigma')``.
    The proposal mixes the speed proposal (share ``1 - share``) with the density of Cond-OT's own draw mapped onto
    this path, ``du/dt = (alpha' sigma - alpha sigma') / (alpha + sigma)^2``; at ``share = 1`` each loss is weighted by
    ``(beta_ot / beta_path)^2 = (alpha + sigma)^2 / (alpha' sigma - alpha sigma')^2``, which is 1 on Cond-OT: the
    network sees the noise levels and target sizes of Cond-OT training, on this path's coordinates.

    Args:
        share: the share of ``L_ot`` in the objective, in ``[0, 1]``.
        speed_mix: the uniform share of the speed proposal (:class:`SpeedImportanceTime`).
        n_cells: cells of the density table.
    """

    def __init__(self, share: float = 1.0, speed_mix: float = 0.5, n_cells: int = 2048) -> None:
        if not 0 <= share <= 1:
            raise ValueError(f"time_sampler cond_ot_snr needs a share in [0, 1], got {share!r}")
        super().__init__(n_cells)
        self.share, self.speed_mix = float(share), float(speed_mix)

    def _target_and_proposal(self, coefficients: Any) -> tuple[Tensor, Tensor]:
        alpha, sigma = coefficients.alpha.double().cpu(), coefficients.sigma.double().cpu()
        d_alpha, d_sigma = coefficients.d_alpha.double().cpu(), coefficients.d_sigma.double().cpu()
        snr_rate = d_alpha * sigma - alpha * d_sigma  # sigma^2 s' > 0 on a path whose SNR increases
        if not bool((snr_rate > 0).all()):
            raise ValueError("time_sampler cond_ot_snr needs a path whose signal-to-noise ratio increases in t")
        ot_weight = 1.0 / snr_rate
        ot_draw = snr_rate / (alpha + sigma) ** 2
        target = (1.0 - self.share) + self.share * ot_weight / ot_weight.mean()
        proposal = (1.0 - self.share) * _speed_proposal(coefficients, self.speed_mix) + self.share * (
            ot_draw / ot_draw.mean()
        )
        return target, proposal

    def __str__(self) -> str:
        return "cond_ot_snr" if self.share == 1.0 else f"cond_ot_snr({self.share:g})"


@dataclass(frozen=True)
class AutoTime:
    """``"cond_ot_snr(0.5)"`` on a solved KO path (``path.sample_grid == "angle"``), ``"uniform"`` on any other path.

    Why (docs/math.md §1.5, recipes/RESULTS.md): the KO path's own loss spends the training budget on noise levels
    differently from Cond-OT; alone it lost at 8-64 Euler steps on the digits and the 12-d mixture, and Cond-OT's
    weighting alone lost on the spiral. Half of each won or tied at every step count on all the sets measured.
    """

    ko: CondOTWeightedTime = field(default_factory=lambda: CondOTWeightedTime(0.5))

    def for_path(self, path: Any) -> UniformTime | CondOTWeightedTime:
        """The sampler this path gets."""
        return self.ko if getattr(path, "sample_grid", "time") == "angle" else UniformTime()

    def __str__(self) -> str:
        return "auto"


def time_sampler_name(sampler: Any) -> str:
    """How hyperparameters record a sampler: its name (``"uniform"``, ``"logit_normal(0, 1)"``) or, for a plain
    callable, ``"callable:<module>.<qualname>"`` (which cannot be rebuilt from the name)."""
    if isinstance(sampler, (UniformTime, LogitNormalTime, _CheckedCallable, TabulatedImportanceTime, AutoTime)):
        return str(sampler)
    module = getattr(sampler, "__module__", None) or type(sampler).__module__
    qualname = getattr(sampler, "__qualname__", None) or type(sampler).__qualname__
    return f"callable:{module}.{qualname}"


#: a checked time sampler, as :func:`make_time_sampler` returns it.
TimeSampler = UniformTime | LogitNormalTime | _CheckedCallable | SpeedImportanceTime | CondOTWeightedTime | AutoTime


def make_time_sampler(spec: Any) -> TimeSampler:
    """The sampler for ``FlowMatching(time_sampler=spec)`` (module docstring).

    Raises:
        ValueError: naming ``time_sampler`` for an unknown name (listing the valid ones) or bad parameters.
    """
    if isinstance(
        spec, (UniformTime, LogitNormalTime, _CheckedCallable, SpeedImportanceTime, CondOTWeightedTime, AutoTime)
    ):
        return spec
    if isinstance(spec, str):
        name = spec.strip()
        if name == "uniform":
            return UniformTime()
        if name == "auto":
            return AutoTime()
        ot_snr = _COND_OT_SNR.match(name)
        if ot_snr:
            return CondOTWeightedTime() if ot_snr.group(1) is None else CondOTWeightedTime(float(ot_snr.group(1)))
        speed = _SPEED.match(name)
        if speed:
            return SpeedImportanceTime() if speed.group(1) is None else SpeedImportanceTime(float(speed.group(1)))
        match = _LOGIT_NORMAL.match(name)
        if match:
            mean, std = (0.0, 1.0) if match.group(1) is None else (float(match.group(1)), float(match.group(2)))
            return LogitNormalTime(mean, std)
        raise ValueError(
            f"time_sampler={spec!r} is not a known sampler: use 'auto', 'uniform', 'speed', 'speed(mix)', "
            "'cond_ot_snr', 'cond_ot_snr(share)', 'logit_normal', 'logit_normal(m, s)' or a callable "
            "(batch_size, generator) -> u in [0, 1]"
            + (" (pass the callable again: a saved name cannot rebuild it)" if name.startswith("callable:") else "")
        )
    if callable(spec):
        return _CheckedCallable(spec)
    raise ValueError(
        f"time_sampler must be a name or a callable (batch_size, generator) -> u, got {type(spec).__name__}"
    )
