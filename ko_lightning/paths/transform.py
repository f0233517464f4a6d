"""Scale-time transformation: reuse a velocity model trained on one Gaussian path on another (docs/math.md §5)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ko_lightning.paths.base import GaussianPath, broadcast_time, check_unit_interval

__all__ = ["ScaleTimeVelocity"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]


class ScaleTimeVelocity(nn.Module):
    """Velocity of path B computed from a velocity model of path A, without retraining.

    Both paths carry the same information under the independent coupling. For a time ``r`` on path B let
    ``t_r = snr_A^{-1}(snr_B(r))`` and ``c_r = sigma_B(r) / sigma_A(t_r) = alpha_B(r) / alpha_A(t_r)``. Then
    ``u_B(x, r) = (c'_r / c_r) x + c_r t'_r u_A(x / c_r, t_r)`` with
    ``t'_r = (d log snr_B / dr) / (d log snr_A / dt)`` and
    ``c'_r / c_r = sigma_B'/sigma_B - t'_r sigma_A'/sigma_A`` (the alpha form is used where alpha > sigma,
    which keeps both ends finite).

    The map is singular where either path has a zero coefficient with an infinite log-SNR derivative
    (t = 0 or t = 1 exactly): evaluate on ``(0, 1)``.

    Args:
        velocity: a callable ``velocity(x, t)`` giving path A's velocity, ``t`` of shape ``(B,)``.
        path_a: the path ``velocity`` was trained on.
        path_b: the path to produce velocities for.

    Example:
        >>> from ko_lightning.paths import CondOTPath, CosinePath
        >>> v_cos = ScaleTimeVelocity(lambda x, t: -x, CondOTPath(), CosinePath())
        >>> v_cos(torch.zeros(2, 3), torch.full((2,), 0.5)).shape
        torch.Size([2, 3])
    """

    def __init__(self, velocity: VelocityFn, path_a: GaussianPath, path_b: GaussianPath) -> None:
        super().__init__()
        self.velocity = velocity
        self.path_a = path_a
        self.path_b = path_b

    def time_and_scale(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``t_r``, ``t'_r``, ``c_r`` and ``c'_r / c_r`` for times ``r`` of any shape (fp32)."""
        check_unit_interval(r, "r")
        b = self.path_b(r.float())
        t = self.path_a.snr_inverse(b.snr).clamp(0.0, 1.0)
        a = self.path_a(t)
        dlog_snr_b = b.d_alpha / b.alpha - b.d_sigma / b.sigma
        dlog_snr_a = a.d_alpha / a.alpha - a.d_sigma / a.sigma
        dt = dlog_snr_b / dlog_snr_a
        use_alpha = b.alpha > b.sigma
        c = torch.where(use_alpha, b.alpha / a.alpha, b.sigma / a.sigma)
        dlog_c = torch.where(
            use_alpha,
            b.d_alpha / b.alpha - dt * a.d_alpha / a.alpha,
            b.d_sigma / b.sigma - dt * a.d_sigma / a.sigma,
        )
        return t, dt, c, dlog_c

    def forward(self, x: Tensor, r: Tensor) -> Tensor:
        """Path-B velocity at ``x`` (shape ``(B, ...)``) and times ``r`` (shape ``(B,)`` or scalar)."""
        r = r.reshape(-1).expand(x.shape[0]) if r.numel() == 1 else r
        t, dt, c, dlog_c = self.time_and_scale(r)
        cb, dtb, dlog_cb = (broadcast_time(v, x) for v in (c, dt, dlog_c))
        u_a = self.velocity((x.float() / cb).to(x.dtype), t)
        return dlog_cb * x.float() + cb * dtb * u_a.float()
