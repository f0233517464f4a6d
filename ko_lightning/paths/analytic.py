"""Closed-form Gaussian paths: Cond-OT, VP (DDPM), cosine, polynomial and linear-VP schedules."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ko_lightning.paths.base import GaussianPath, PathCoefficients

__all__ = ["CondOTPath", "CosinePath", "LinearVPPath", "PolynomialPath", "VPPath"]


def _real(name: str, value: object) -> float:
    """``value`` as a finite float, or an error naming the constructor argument ``name``."""
    scalar_tensor = torch.is_tensor(value) and value.numel() == 1
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or scalar_tensor):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number!r}")
    return number


class CondOTPath(GaussianPath):
    """Conditional optimal-transport path (Lipman et al. 2023).

    ``alpha_t = t``, ``sigma_t = 1 - (1 - sigma_min) t``; SNR inverse ``t = s / (1 + (1 - sigma_min) s)``.

    Args:
        sigma_min: noise left at t = 1, in ``[0, 1)``.

    Raises:
        ValueError: naming ``sigma_min`` when it is not finite or outside ``[0, 1)``.

    Example:
        >>> CondOTPath(sigma_min=0.01)(torch.tensor(1.0)).sigma
        tensor(0.0100)
    """

    def __init__(self, sigma_min: float = 0.0) -> None:
        super().__init__()
        value = _real("sigma_min", sigma_min)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"sigma_min must lie in [0, 1), got {sigma_min!r}")
        self.sigma_min = value

    def coefficients(self, t: Tensor) -> PathCoefficients:
        k = 1.0 - self.sigma_min
        return PathCoefficients(t, 1.0 - k * t, torch.ones_like(t), torch.full_like(t, -k))

    def _snr_inverse(self, snr: Tensor) -> Tensor:
        snr = snr.float()
        return snr / (1.0 + (1.0 - self.sigma_min) * snr)

    def extra_repr(self) -> str:
        return f"sigma_min={self.sigma_min}"


class VPPath(GaussianPath):
    """Variance-preserving path of DDPM / score SDEs written in flow-matching time (noise at t = 0).

    With DDPM time ``tau = 1 - t`` and ``T(tau) = beta_min tau + (beta_max - beta_min) tau^2 / 2``:
    ``alpha_t = exp(-T(1 - t) / 2)``, ``sigma_t = sqrt(1 - alpha_t^2)``,
    ``alpha'_t = alpha_t beta(1 - t) / 2`` with ``beta(tau) = beta_min + (beta_max - beta_min) tau``,
    ``sigma'_t = -alpha_t alpha'_t / sigma_t``.

    The path does not reach pure noise: ``alpha_0 = exp(-(beta_min + beta_max) / 4)`` (about 0.0066 for the
    defaults), and ``sigma'_t`` diverges at t = 1 where ``sigma_1 = 0``; train with ``t`` clipped below 1.

    Args:
        beta_min: noise rate at the data end, finite and > 0.
        beta_max: noise rate at the noise end, finite and >= beta_min, with ``beta_min + beta_max <= 300``.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        super().__init__()
        low, high = _real("beta_min", beta_min), _real("beta_max", beta_max)
        if not low > 0:
            raise ValueError(f"beta_min must be > 0, got {beta_min!r}")
        if not high >= low:
            raise ValueError(f"beta_max must be >= beta_min = {low}, got {beta_max!r}")
        # alpha_0 = exp(-(beta_min + beta_max) / 4) must stay a normal fp32 number: beyond ~350 it underflows
        # and the path's t = 0 end loses its meaning (sigma' = -alpha alpha' / sigma is then 0 * inf).
        if low + high > 300.0:
            raise ValueError(
                f"beta_min + beta_max must be <= 300 (alpha_0 = exp(-(beta_min + beta_max) / 4) "
                f"underflows fp32 beyond), got beta_min={beta_min!r}, beta_max={beta_max!r}"
            )
        self.beta_min = low
        self.beta_max = high
        self.sigma_min = 0.0

    def _integrated_rate(self, tau: Tensor) -> Tensor:
        return self.beta_min * tau + 0.5 * (self.beta_max - self.beta_min) * tau**2

    def coefficients(self, t: Tensor) -> PathCoefficients:
        tau = 1.0 - t
        big_t = self._integrated_rate(tau)
        alpha = torch.exp(-0.5 * big_t)
        sigma = torch.sqrt(-torch.expm1(-big_t))  # sqrt(1 - alpha^2), accurate near t = 1
        rate = self.beta_min + (self.beta_max - self.beta_min) * tau
        d_alpha = 0.5 * rate * alpha
        d_sigma = -alpha * d_alpha / sigma
        return PathCoefficients(alpha, sigma, d_alpha, d_sigma)

    def _snr_inverse(self, snr: Tensor) -> Tensor:
        # alpha^2 = s^2 / (1 + s^2)  =>  T = log(1 + 1/s^2); solve the quadratic T(tau) = T for tau >= 0.
        snr = snr.double()
        big_t = torch.log1p(snr.pow(-2))
        a = 0.5 * (self.beta_max - self.beta_min)
        if a == 0:
            tau = big_t / self.beta_min
        else:
            tau = 2 * big_t / (self.beta_min + torch.sqrt(self.beta_min**2 + 4 * a * big_t))
        return (1.0 - tau).float()

    def extra_repr(self) -> str:
        return f"beta_min={self.beta_min}, beta_max={self.beta_max}"


class CosinePath(GaussianPath):
    """Trigonometric interpolant: ``alpha_t = sin(pi t / 2)``, ``sigma_t = cos(pi t / 2)``; ``t = 2 atan(s) / pi``."""

    def coefficients(self, t: Tensor) -> PathCoefficients:
        half_pi = 0.5 * math.pi
        a, s = torch.sin(half_pi * t), torch.cos(half_pi * t).clamp_min(0.0)  # cos(pi/2) is -4e-8 in fp32
        return PathCoefficients(a, s, half_pi * s, -half_pi * a)

    def _snr_inverse(self, snr: Tensor) -> Tensor:
        return torch.atan(snr.float()) / (0.5 * math.pi)


class PolynomialPath(GaussianPath):
    """Polynomial convex schedule: ``alpha_t = t^n``, ``sigma_t = 1 - t^n``; ``t = (s / (1 + s))^(1/n)``.

    Args:
        n: exponent, finite and > 0 (``n = 1`` is Cond-OT with ``sigma_min = 0``). With ``n < 1``,
            ``alpha'_t`` diverges at t = 0, so a model on this path needs ``t_eps > 0`` (its sampler checks).
    """

    def __init__(self, n: float = 2.0) -> None:
        super().__init__()
        value = _real("n", n)
        if not value > 0:
            raise ValueError(f"n must be > 0, got {n!r}")
        self.n = value

    def coefficients(self, t: Tensor) -> PathCoefficients:
        a = t**self.n
        d_a = self.n * t ** (self.n - 1.0) if self.n != 1.0 else torch.ones_like(t)
        return PathCoefficients(a, 1.0 - a, d_a, -d_a)

    def _snr_inverse(self, snr: Tensor) -> Tensor:
        snr = snr.float()
        return (snr / (1.0 + snr)) ** (1.0 / self.n)

    def extra_repr(self) -> str:
        return f"n={self.n}"


class LinearVPPath(GaussianPath):
    """Linear variance-preserving path: ``alpha_t = t``, ``sigma_t = sqrt(1 - t^2)``; ``t = s / sqrt(1 + s^2)``.

    ``sigma'_t = -t / sigma_t`` diverges at t = 1.
    """

    def coefficients(self, t: Tensor) -> PathCoefficients:
        s = torch.sqrt((1.0 - t) * (1.0 + t))
        return PathCoefficients(t, s, torch.ones_like(t), -t / s)

    def _snr_inverse(self, snr: Tensor) -> Tensor:
        snr = snr.float()
        return snr * torch.rsqrt(1.0 + snr**2)
