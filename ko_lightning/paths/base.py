"""The Gaussian path protocol shared by every schedule.

A Gaussian path interpolates noise and data, ``x_t = alpha_t x1 + sigma_t x0`` with ``x0 ~ N(0, I)``, from
``(alpha_0, sigma_0) = (0, 1)`` (noise, t = 0) to ``(alpha_1, sigma_1) = (1, sigma_min)`` (data, t = 1).
Everything a trainer or sampler needs follows from ``alpha_t``, ``sigma_t`` and their time derivatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "SAMPLE_GRIDS",
    "GaussianPath",
    "SampleGrid",
    "PathCoefficients",
    "PathSample",
    "broadcast_time",
    "check_unit_interval",
]


@dataclass(frozen=True)
class PathCoefficients:
    """Schedule values at some times ``t`` (all fp32, shaped like ``t``).

    Attributes:
        alpha: data coefficient ``alpha_t``.
        sigma: noise coefficient ``sigma_t``.
        d_alpha: ``d alpha_t / dt``.
        d_sigma: ``d sigma_t / dt``.
    """

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio ``s_t = alpha_t / sigma_t``."""
        return self.alpha / self.sigma

    @property
    def beta(self) -> Tensor:
        """``beta_t = sigma_t * d/dt (alpha_t / sigma_t) = alpha' - sigma' alpha / sigma`` (docs/math.md §1)."""
        return self.d_alpha - self.d_sigma * self.alpha / self.sigma

    # Conversions between parametrizations at these coefficients (shaped to broadcast against x_t); fp32.
    def velocity_from_x1(self, x_t: Tensor, x1_hat: Tensor) -> Tensor:
        """``u = (sigma'/sigma) x_t + beta_t x1_hat`` with ``beta_t = alpha' - sigma' alpha / sigma``."""
        return (self.d_sigma / self.sigma) * x_t.float() + self.beta * x1_hat.float()

    def x1_from_velocity(self, x_t: Tensor, velocity: Tensor) -> Tensor:
        """Inverse of :meth:`velocity_from_x1`: ``x1 = (u - (sigma'/sigma) x_t) / beta_t``."""
        return (velocity.float() - (self.d_sigma / self.sigma) * x_t.float()) / self.beta

    def velocity_from_eps(self, x_t: Tensor, eps_hat: Tensor) -> Tensor:
        """``u = (alpha'/alpha) x_t + (sigma' - alpha' sigma / alpha) eps_hat`` (singular where alpha = 0)."""
        return (self.d_alpha / self.alpha) * x_t.float() + (
            self.d_sigma - self.d_alpha * self.sigma / self.alpha
        ) * eps_hat.float()

    def eps_from_velocity(self, x_t: Tensor, velocity: Tensor) -> Tensor:
        """Inverse of :meth:`velocity_from_eps`."""
        return (velocity.float() - (self.d_alpha / self.alpha) * x_t.float()) / (
            self.d_sigma - self.d_alpha * self.sigma / self.alpha
        )

    def x1_from_eps(self, x_t: Tensor, eps_hat: Tensor) -> Tensor:
        """``x1 = (x_t - sigma_t eps) / alpha_t``."""
        return (x_t.float() - self.sigma * eps_hat.float()) / self.alpha

    def eps_from_x1(self, x_t: Tensor, x1_hat: Tensor) -> Tensor:
        """``eps = (x_t - alpha_t x1) / sigma_t``."""
        return (x_t.float() - self.alpha * x1_hat.float()) / self.sigma


@dataclass(frozen=True)
class PathSample:
    """A draw from the conditional path and its regression target.

    Attributes:
        x_t: ``alpha_t x1 + sigma_t x0``.
        target: conditional velocity ``u_t(x_t | x1) = alpha'_t x1 + sigma'_t x0``.
        t: the times, shape ``(B,)``.
        coefficients: the schedule at ``t``, broadcast to the data's rank.
    """

    x_t: Tensor
    target: Tensor
    t: Tensor
    coefficients: PathCoefficients


def check_unit_interval(t: Tensor, name: str = "t") -> None:
    """Raise ``ValueError`` naming ``name`` if any entry of ``t`` is NaN or outside ``[0, 1]``."""
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    bad = ~((t >= 0) & (t <= 1))  # NaN compares False, so it is caught here too
    if bool(bad.any()):
        first = t[bad].flatten()[0].item()
        raise ValueError(f"{name} must lie in [0, 1]; {int(bad.sum())} value(s) do not, e.g. {first!r}")


def broadcast_time(t: Tensor, like: Tensor, name: str = "t") -> Tensor:
    """Reshape per-sample ``t`` of shape ``(B,)`` (or a scalar) to ``(B, 1, ..., 1)`` matching ``like``.

    Args:
        t: times, shape ``()``, ``(1,)`` or ``(B,)`` with ``B = like.shape[0]``.
        like: a batch of data, shape ``(B, ...)``.
        name: argument name used in error messages.
    """
    if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
        t = t.reshape(1).expand(like.shape[0])
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"{name} must have shape (B,) with B = {like.shape[0]} (the batch size), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


SampleGrid = Literal["time", "angle"]
#: the grids :meth:`ko_lightning.FlowMatching.sample` steps on.
SAMPLE_GRIDS: tuple[SampleGrid, ...] = ("time", "angle")


class GaussianPath(nn.Module):
    """Base class of every Gaussian probability path ``x_t = alpha_t x1 + sigma_t x0``.

    Subclasses implement :meth:`coefficients` (values and time derivatives for a fp32 tensor ``t``) and may
    override :meth:`snr_inverse` with a closed form; the default inverts ``alpha/sigma`` by bisection.
    ``forward(t)`` validates ``t`` and always computes in fp32, also under autocast.

    Example:
        >>> from ko_lightning.paths import CondOTPath
        >>> path = CondOTPath()
        >>> c = path(torch.tensor([0.25]))
        >>> float(c.alpha), float(c.sigma)
        (0.25, 0.75)
    """

    #: sigma at t = 1; subclasses set it.
    sigma_min: float = 0.0
    #: where fixed-step sampling steps by default: ``"time"`` (equal steps in t) or ``"angle"`` (equal steps in
    #: ``theta = atan(alpha / sigma)``, docs/math.md §5.3). A solved KO path samples on ``"angle"``.
    sample_grid: SampleGrid = "time"

    def coefficients(self, t: Tensor) -> PathCoefficients:  # pragma: no cover - abstract
        """Return alpha, sigma and their derivatives at fp32 times ``t`` (already validated)."""
        raise NotImplementedError

    def forward(self, t: Tensor) -> PathCoefficients:
        """Schedule at times ``t`` of any shape, in fp32.

        Args:
            t: times in ``[0, 1]``.

        Returns:
            ``PathCoefficients`` shaped like ``t``.
        """
        check_unit_interval(t, "t")
        with torch.autocast(device_type=t.device.type, enabled=False):
            return self.coefficients(t.float())

    # ------------------------------------------------------------------ SNR
    def snr_inverse(self, snr: Tensor) -> Tensor:
        """Time ``t`` with ``alpha_t / sigma_t = snr`` (the SNR is increasing in t).

        SNRs outside the path's range (including 0 and ``inf``) clamp to the ends ``t = 0`` and ``t = 1``.
        Subclasses provide a closed form in :meth:`_snr_inverse`; the default bisects on ``[0, 1]`` to fp32
        precision.
        """
        snr = snr.float()
        t = self._snr_inverse(snr)
        t = torch.where(torch.isposinf(snr), torch.ones_like(t), t)
        t = torch.where(snr <= 0, torch.zeros_like(t), t)
        return t.clamp(0.0, 1.0)

    def _snr_inverse(self, snr: Tensor) -> Tensor:
        lo = torch.zeros_like(snr)
        hi = torch.ones_like(snr)
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            c = self.coefficients(mid)
            below = c.alpha < snr * c.sigma
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    # ------------------------------------------------------------------ sampling the path
    def sample(self, x0: Tensor, x1: Tensor, t: Tensor, validate: bool = True) -> PathSample:
        """Draw ``x_t`` and its conditional velocity target.

        ``x_t = alpha_t x1 + sigma_t x0`` and ``u_t = alpha'_t x1 + sigma'_t x0``, with ``t`` of shape ``(B,)``
        broadcast over data of any shape ``(B, ...)``; computed in fp32.

        Args:
            x0: noise, shape ``(B, ...)``.
            x1: data, same shape as ``x0``.
            t: times in ``[0, 1]``, shape ``(B,)``.
            validate: check that ``t`` lies in ``[0, 1]`` (a device sync); trainers that draw ``t`` themselves
                skip it.
        """
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        c = self.at(t, x1, validate)
        x0, x1 = x0.float(), x1.float()
        return PathSample(
            x_t=c.alpha * x1 + c.sigma * x0,
            target=c.d_alpha * x1 + c.d_sigma * x0,
            t=t,
            coefficients=c,
        )

    def at(self, t: Tensor, like: Tensor, validate: bool = True) -> PathCoefficients:
        """Coefficients at per-sample times ``t`` (shape ``(B,)``), shaped to broadcast against ``like``."""
        tb = broadcast_time(t, like)
        if validate:
            return self(tb)
        with torch.autocast(device_type=tb.device.type, enabled=False):
            return self.coefficients(tb.float())

    # ------------------------------------------------------------------ parametrization conversions
    def velocity_from_x1(self, x_t: Tensor, x1_hat: Tensor, t: Tensor) -> Tensor:
        """See :meth:`PathCoefficients.velocity_from_x1`."""
        return self.at(t, x_t).velocity_from_x1(x_t, x1_hat)

    def x1_from_velocity(self, x_t: Tensor, velocity: Tensor, t: Tensor) -> Tensor:
        """See :meth:`PathCoefficients.x1_from_velocity`."""
        return self.at(t, x_t).x1_from_velocity(x_t, velocity)

    def velocity_from_eps(self, x_t: Tensor, eps_hat: Tensor, t: Tensor) -> Tensor:
        """See :meth:`PathCoefficients.velocity_from_eps`."""
        return self.at(t, x_t).velocity_from_eps(x_t, eps_hat)

    def eps_from_velocity(self, x_t: Tensor, velocity: Tensor, t: Tensor) -> Tensor:
        """See :meth:`PathCoefficients.eps_from_velocity`."""
        return self.at(t, x_t).eps_from_velocity(x_t, velocity)

    def x1_from_eps(self, x_t: Tensor, eps_hat: Tensor, t: Tensor) -> Tensor:
        """See :meth:`PathCoefficients.x1_from_eps`."""
        return self.at(t, x_t).x1_from_eps(x_t, eps_hat)

    def eps_from_x1(self, x_t: Tensor, x1_hat: Tensor, t: Tensor) -> Tensor:
        """See :meth:`PathCoefficients.eps_from_x1`."""
        return self.at(t, x_t).eps_from_x1(x_t, x1_hat)
