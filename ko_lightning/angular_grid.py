"""Fixed-step sampling on the angle grid: equal steps in ``theta`` in the unit-radius frame (docs/math.md §5.3).

Write the path in polar form, ``(alpha_t, sigma_t) = r_t (sin theta_t, cos theta_t)`` (docs/math.md §1.1), and the
state in the unit-radius frame ``y = x / r_t``. With the angle as time, the flow ``dx/dt = u(x, t)`` becomes

    ``dy/dtheta = (u(r y, t) / r - (r' / r) y) / theta'``,   ``t = t(theta)`` (the inverse of ``theta_t``),

and since ``y = sin(theta) x1 + cos(theta) x0`` along a conditional path, this is the same ODE for every Gaussian
path: a path only changes which angles a uniform time grid visits. For data that is exactly ``N(0, I)`` (normalized
data looks like that at low SNR) ``dy/dtheta = 0``, so an Euler step in this frame makes no error on the Gaussian
part of the data. Uniform-in-``t`` Euler on a path that turns fast (the KO path near ``t = 0``) spends its first
step extrapolating the fastest turn; equal angle steps do not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ko_lightning.paths import GaussianPath, PathCoefficients

__all__ = ["AngleGrid"]


def _polar(c: PathCoefficients) -> tuple[Tensor, Tensor, Tensor]:
    """``(r, r' / r, theta')`` of coefficients ``c``: ``r' = (alpha alpha' + sigma sigma') / r``,
    ``theta' = (sigma alpha' - alpha sigma') / r^2``."""
    r2 = c.alpha**2 + c.sigma**2
    return r2.sqrt(), (c.alpha * c.d_alpha + c.sigma * c.d_sigma) / r2, (c.sigma * c.d_alpha - c.alpha * c.d_sigma) / r2


@dataclass(frozen=True)
class AngleGrid:
    """The flow of a velocity field on ``path`` over ``[t_start, t_end]``, re-timed by the angle and scaled to unit
    radius, with the normalized angle ``tau = (theta - theta_start) / (theta_end - theta_start)`` in ``[0, 1]`` as
    time. A fixed-step method with ``N`` steps in ``tau`` takes ``N`` equal angle steps.

    Attributes:
        velocity: ``u(x, t)`` on ``path`` (``t`` of shape ``(B,)``).
        path: the path ``velocity`` belongs to; its angle must increase strictly on ``[t_start, t_end]``.
        t_start: where the solve starts (the prior lives here).
        t_end: where it ends.
        device: where the path lives.
    """

    velocity: Callable[[Tensor, Tensor], Tensor]
    path: GaussianPath
    t_start: float
    t_end: float
    device: torch.device

    @cached_property
    def angles(self) -> tuple[float, float]:
        """``(theta_start, theta_end)``, after checking once that the angle increases strictly in between.

        Raises:
            ValueError: where the path does not turn (``theta' <= 0``): the angle is no time there.
        """
        t = torch.linspace(self.t_start, self.t_end, 1001, device=self.device)
        c = self.path.at(t, t, validate=False)
        if not bool((_polar(c)[2] > 0).all()):
            raise ValueError(f"the angle grid needs a path whose angle increases strictly; {self.path!r} does not")
        theta = torch.atan2(c.alpha, c.sigma).double().cpu()
        return float(theta[0]), float(theta[-1])

    def time_of(self, tau: Tensor) -> Tensor:
        """The path time ``t`` whose angle is ``theta_start + tau (theta_end - theta_start)`` (fp32)."""
        lo, hi = self.angles
        theta = lo + tau.double() * (hi - lo)
        t = self.path.snr_inverse(torch.tan(theta).float())
        return t.clamp(self.t_start, self.t_end)

    def radius(self, t: float) -> float:
        """``r_t = sqrt(alpha_t^2 + sigma_t^2)`` at one time."""
        t_tensor = torch.tensor([t], device=self.device)
        return float(_polar(self.path.at(t_tensor, t_tensor, validate=False))[0])

    def __call__(self, y: Tensor, tau: Tensor) -> Tensor:
        """``dy/dtau`` at unit-radius states ``y`` (shape ``(B, ...)``) and normalized angles ``tau`` (``(B,)``).

        The solvers pass one time broadcast to the batch (:func:`ko_lightning.sampling.integrate`), so the time
        ``t(tau)`` (a bisection over the path's SNR) is found once for the first entry and shared.
        """
        lo, hi = self.angles
        t = self.time_of(tau.reshape(-1)[:1]).expand(tau.shape)
        r, dlog_r, d_theta = _polar(self.path.at(t, y, validate=False))
        u = self.velocity((r * y.float()).to(y.dtype), t)
        return (hi - lo) * (u.float() / r - dlog_r * y.float()) / d_theta
