"""The data separation function ``lambda(s)`` stored on a grid of polar angles ``theta = atan(s)`` (docs/math.md §3)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ko_lightning.paths.hermite import cubic_hermite, pchip_slopes

__all__ = ["SeparationFunction", "default_theta_grid"]

HALF_PI = 0.5 * math.pi


def default_theta_grid(n: int = 128, power: float = 2.0) -> Tensor:
    """A grid of ``n`` angles strictly inside ``(0, pi/2)``, denser near 0.

    ``theta_k = (pi/2) (k / (n + 1))^power`` for ``k = 1..n`` (float64). With the defaults the first angle is
    about ``1e-4`` and the last is ``pi/2 - 0.024`` (SNR about 41). Near 0 ``lambda ~ kappa s^2`` changes on the
    scale of the data's covariance, which needs the density there.

    Args:
        n: number of angles, ``>= 2``.
        power: grading exponent, ``>= 1`` (1 is uniform).

    Example:
        >>> default_theta_grid(4)
        tensor([0.0628, 0.2513, 0.5655, 1.0053], dtype=torch.float64)
    """
    if int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if not float(power) >= 1.0:
        raise ValueError(f"power must be >= 1, got {power!r}")
    u = torch.arange(1, int(n) + 1, dtype=torch.float64) / (int(n) + 1)
    return HALF_PI * u ** float(power)


def check_theta_grid(theta: Tensor, name: str = "theta") -> Tensor:
    """Validate a theta grid (1D, >= 2 points, finite, strictly increasing, inside (0, pi/2)); return float64."""
    theta = torch.as_tensor(theta).detach()
    if theta.ndim != 1 or theta.numel() < 2:
        raise ValueError(f"{name} must be a 1D grid with at least 2 points, got shape {tuple(theta.shape)}")
    theta = theta.to(torch.float64)
    if not bool(torch.isfinite(theta).all()):
        raise ValueError(f"{name} has non-finite values")
    if not bool((theta[1:] > theta[:-1]).all()):
        raise ValueError(f"{name} must be strictly increasing")
    if not (float(theta[0]) > 0.0 and float(theta[-1]) < HALF_PI):
        raise ValueError(f"{name} must lie strictly inside (0, pi/2), got [{float(theta[0])}, {float(theta[-1])}]")
    return theta


def _whittaker(y: Tensor, w: Tensor, mu: float) -> Tensor:
    """Penalized least squares ``argmin_z sum_k w_k (z_k - y_k)^2 + mu sum_k (z_{k+1} - 2 z_k + z_{k-1})^2``."""
    n = y.numel()
    if mu <= 0 or n < 3:
        return y.clone()
    d2 = torch.zeros(n - 2, n, dtype=y.dtype, device=y.device)
    k = torch.arange(n - 2, device=y.device)
    d2[k, k], d2[k, k + 1], d2[k, k + 2] = 1.0, -2.0, 1.0
    a = torch.diag(w) + mu * d2.T @ d2
    return torch.linalg.solve(a, w * y)


class SeparationFunction(nn.Module):
    """The data separation function ``lambda(s) = (1/d) E||E[x1 | x_t]||^2`` on a grid of angles ``theta = atan s``.

    Internally everything is expressed through

        ``gamma(theta) = 1 - (1 - lambda(tan theta)) / cos^2 theta``,

    because the bounds ``s^2 / (1 + s^2) <= lambda(s) <= 1`` (docs/math.md §3) are exactly ``0 <= gamma <= 1``.
    Construction:

    1. raw values ``lam`` (with per-grid-point sample ``counts``) are kept for :meth:`merge` and checkpoints;
    2. ``gamma`` at the nodes is computed, clipped to ``[0, 1]`` (this is the projection onto the bounds: values
       of ``lam`` inside ``[0, 1]`` but below ``sin^2 theta``, e.g. Monte-Carlo noise on Gaussian-like data, are
       raised silently), optionally smoothed by a count-weighted Whittaker smoother of strength ``smoothing``
       (second differences in grid index), and clipped again;
    3. between nodes ``gamma`` is the shape-preserving PCHIP interpolant (it never leaves the range of its two
       nodes, so the bounds hold everywhere); below the first node ``gamma = gamma_1 (theta / theta_1)^2`` (the
       small-SNR law ``lambda ~ kappa s^2``, and ``lambda(0) = 0`` as for any centred data set; with
       ``zero_at_origin=False`` it is constant instead, for idealized functions such as ``lambda = 1``); above
       the last node ``gamma`` is constant, so ``lambda -> 1`` as ``theta -> pi/2``.

    Then ``lambda(theta) = 1 - (1 - gamma(theta)) cos^2 theta``.

    State (``state_dict``): the grid ``theta``, raw ``lam``, ``counts`` and ``smoothing``; the node values of
    ``gamma`` are recomputed on load, and a state of another grid length loads too.

    Args:
        theta: strictly increasing angles inside ``(0, pi/2)``, shape ``(G,)``, ``G >= 2``.
        lam: estimates of ``lambda(tan theta)``, shape ``(G,)``, finite and in ``[0, 1]``.
        counts: number of samples behind each estimate (weights for :meth:`merge` and smoothing), ``> 0``;
            default all ones.
        smoothing: Whittaker smoothing strength ``>= 0`` (0: none).
        zero_at_origin: impose ``lambda(0) = 0`` (centred data); ``False`` only for idealized functions.

    Raises:
        ValueError: naming ``theta``, ``lam``, ``counts`` or ``smoothing`` when they are malformed (non-finite,
            wrong shape, ``lam`` outside ``[0, 1]``, grid not strictly increasing or not inside ``(0, pi/2)``).

    Example:
        >>> lam = SeparationFunction.gaussian()
        >>> round(float(lam.at_snr(torch.tensor(1.0))), 12)  # s^2 / (1 + s^2)
        0.5
    """

    theta: Tensor
    lam_raw: Tensor
    counts: Tensor
    smoothing: Tensor
    zero_at_origin: Tensor
    gamma_nodes: Tensor
    gamma_slopes: Tensor

    def __init__(
        self,
        theta: Tensor,
        lam: Tensor,
        counts: Tensor | None = None,
        smoothing: float = 0.0,
        zero_at_origin: bool = True,
    ) -> None:
        super().__init__()
        theta64 = check_theta_grid(theta, "theta")
        lam64, counts64, smooth = self._check_values(theta64, lam, counts, smoothing)
        self.register_buffer("theta", theta64)
        self.register_buffer("lam_raw", lam64)
        self.register_buffer("counts", counts64)
        self.register_buffer("smoothing", torch.tensor(smooth, dtype=torch.float64))
        self.register_buffer("zero_at_origin", torch.tensor(bool(zero_at_origin)))
        self.register_buffer("gamma_nodes", torch.zeros_like(theta64), persistent=False)
        self.register_buffer("gamma_slopes", torch.zeros_like(theta64), persistent=False)
        self._refresh()

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _check_values(
        theta: Tensor, lam: Tensor, counts: Tensor | None, smoothing: float
    ) -> tuple[Tensor, Tensor, float]:
        lam = torch.as_tensor(lam).detach().to(device=theta.device, dtype=torch.float64)
        if lam.shape != theta.shape:
            raise ValueError(f"lam must have the grid's shape {tuple(theta.shape)}, got {tuple(lam.shape)}")
        if not bool(torch.isfinite(lam).all()):
            raise ValueError(f"lam has {int((~torch.isfinite(lam)).sum())} non-finite value(s) (NaN or inf)")
        if bool(((lam < 0) | (lam > 1)).any()):
            bad = lam[(lam < 0) | (lam > 1)]
            raise ValueError(f"lam must lie in [0, 1]; {bad.numel()} value(s) do not, e.g. {float(bad[0])!r}")
        if counts is None:
            counts = torch.ones_like(theta)
        counts = torch.as_tensor(counts).detach().to(device=theta.device, dtype=torch.float64)
        if counts.shape != theta.shape:
            raise ValueError(f"counts must have the grid's shape {tuple(theta.shape)}, got {tuple(counts.shape)}")
        if not bool(torch.isfinite(counts).all()) or not bool((counts > 0).all()):
            raise ValueError("counts must be finite and > 0 at every grid point")
        if not (math.isfinite(float(smoothing)) and float(smoothing) >= 0):
            raise ValueError(f"smoothing must be a finite number >= 0, got {smoothing!r}")
        return lam, counts, float(smoothing)

    def _refresh(self) -> None:
        """Recompute the node values and PCHIP slopes of gamma from the raw state."""
        cos2 = torch.cos(self.theta) ** 2
        gamma = (1.0 - (1.0 - self.lam_raw) / cos2).clamp(0.0, 1.0)
        weights = self.counts / self.counts.mean()
        gamma = _whittaker(gamma, weights, float(self.smoothing)).clamp(0.0, 1.0)
        self.gamma_nodes = gamma
        self.gamma_slopes = pchip_slopes(self.theta, gamma)

    @classmethod
    def gaussian(cls, theta: Tensor | None = None) -> SeparationFunction:
        """``lambda(s) = s^2 / (1 + s^2)`` (``gamma = 0``): the separation function of ``x1 ~ N(0, I)``."""
        theta = default_theta_grid() if theta is None else check_theta_grid(theta)
        return cls(theta, torch.sin(theta) ** 2)

    @classmethod
    def constant_one(cls, theta: Tensor | None = None) -> SeparationFunction:
        """``lambda = 1`` (``gamma = 1``): perfectly separated data; its kinetic-optimal path is Cond-OT."""
        theta = default_theta_grid() if theta is None else check_theta_grid(theta)
        return cls(theta, torch.ones_like(theta), zero_at_origin=False)

    # ------------------------------------------------------------------ evaluation
    def gamma(self, theta: Tensor) -> Tensor:
        """``gamma(theta) = 1 - (1 - lambda(tan theta)) / cos^2 theta`` in ``[0, 1]`` (float64, on theta's device).

        Args:
            theta: angles in ``[0, pi/2]``, any shape.
        """
        theta = torch.as_tensor(theta)
        out_device = theta.device
        th = theta.to(device=self.theta.device, dtype=torch.float64)  # differentiable in theta (used by tests)
        nodes = self.theta.double()
        g = self.gamma_nodes.double()
        inner = cubic_hermite(nodes, g, self.gamma_slopes.double(), th, clamp=True)
        small = g[0] * (th / nodes[0]) ** 2 if bool(self.zero_at_origin) else g[0].expand_as(th)
        out = torch.where(th < nodes[0], small, torch.where(th > nodes[-1], g[-1].expand_as(th), inner))
        return out.clamp(0.0, 1.0).to(out_device)

    def gamma_array(self, theta: np.ndarray) -> np.ndarray:
        """:meth:`gamma` in numpy float64 (single-threaded; fast for the solver's small grids)."""
        th = np.asarray(theta, dtype=np.float64)
        nodes = self.theta.detach().double().cpu().numpy()
        g = self.gamma_nodes.detach().double().cpu().numpy()
        m = self.gamma_slopes.detach().double().cpu().numpy()
        inner = cubic_hermite(nodes, g, m, th, clamp=True)
        small = g[0] * (th / nodes[0]) ** 2 if bool(self.zero_at_origin) else np.full_like(th, g[0])
        out = np.where(th < nodes[0], small, np.where(th > nodes[-1], g[-1], inner))
        return np.clip(out, 0.0, 1.0)

    def at_theta(self, theta: Tensor) -> Tensor:
        """``lambda(tan theta) = 1 - (1 - gamma(theta)) cos^2 theta`` (float64)."""
        theta = torch.as_tensor(theta, dtype=torch.float64)
        return 1.0 - (1.0 - self.gamma(theta)) * torch.cos(theta) ** 2

    def at_snr(self, snr: Tensor) -> Tensor:
        """``lambda(s)`` at signal-to-noise ratios ``s >= 0`` (``inf`` allowed; float64)."""
        snr = torch.as_tensor(snr, dtype=torch.float64)
        if bool((snr < 0).any()) or bool(torch.isnan(snr).any()):
            raise ValueError("snr must be >= 0 (and not NaN)")
        return self.at_theta(torch.atan(snr))

    def forward(self, snr: Tensor) -> Tensor:
        """Same as :meth:`at_snr`."""
        return self.at_snr(snr)

    def lam_nodes(self) -> Tensor:
        """``lambda`` at the grid nodes after projection and smoothing (float64)."""
        return 1.0 - (1.0 - self.gamma_nodes) * torch.cos(self.theta) ** 2

    def memorization_integral(self) -> float:
        """``int_0^inf (1 - lambda(s)) ds = int_0^{pi/2} (1 - gamma(theta)) dtheta`` (paper Thm 4.1: ``<= 3n/sqrt d``).

        The substitution ``s = tan theta`` turns ``ds`` into ``dtheta / cos^2 theta``; evaluated by the trapezoid
        rule on 8193 points.
        """
        th = torch.linspace(0.0, HALF_PI, 8193, dtype=torch.float64, device=self.theta.device)
        return float(torch.trapezoid(1.0 - self.gamma(th), th))

    # ------------------------------------------------------------------ combination and state
    def merge(self, other: SeparationFunction) -> SeparationFunction:
        """Combine two estimates on the same grid, weighting each grid point by the samples behind it.

        ``lam = (c_a lam_a + c_b lam_b) / (c_a + c_b)`` on the raw values, ``counts = c_a + c_b``; the smoothing
        of ``self`` is kept.

        Raises:
            ValueError: naming ``other`` if it is not a SeparationFunction on the same grid.
        """
        if not isinstance(other, SeparationFunction):
            raise ValueError(f"other must be a SeparationFunction, got {type(other).__name__}")
        o_theta = other.theta.to(device=self.theta.device, dtype=torch.float64)
        if o_theta.shape != self.theta.shape or not torch.allclose(o_theta, self.theta, rtol=1e-12, atol=1e-15):
            raise ValueError("other must be on the same theta grid as self")
        c_a, c_b = self.counts, other.counts.to(self.counts)
        lam = (c_a * self.lam_raw + c_b * other.lam_raw.to(self.lam_raw)) / (c_a + c_b)
        return SeparationFunction(
            self.theta, lam.clamp(0.0, 1.0), c_a + c_b, float(self.smoothing), bool(self.zero_at_origin)
        )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A saved estimate may live on another grid length: resize the buffers, load, then validate and refresh.
        for name in ("theta", "lam_raw", "counts"):
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(incoming, device=self.theta.device, dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        theta = check_theta_grid(self.theta, "theta (loaded)")
        self._check_values(theta, self.lam_raw, self.counts, float(self.smoothing))
        self._refresh()

    def extra_repr(self) -> str:
        return f"n={self.theta.numel()}, smoothing={float(self.smoothing):.3g}"
