"""A Gaussian path given by a table of alpha_t and sigma_t on a time grid (used for data-dependent schedules)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ko_lightning.paths.base import GaussianPath, PathCoefficients

__all__ = ["TabulatedPath", "pchip_slopes"]

_TABLE = ("t_grid", "alpha_grid", "sigma_grid", "d_alpha_grid", "d_sigma_grid")


def pchip_slopes(x: Tensor, y: Tensor) -> Tensor:
    """Shape-preserving (monotone) node slopes of Fritsch and Carlson / Fritsch and Butland.

    Interior slope: 0 where the neighbouring secants change sign, else the weighted harmonic mean
    ``(w1 + w2) / (w1 / d_{k-1} + w2 / d_k)`` with ``w1 = 2 h_k + h_{k-1}``, ``w2 = h_k + 2 h_{k-1}``.
    End slopes: the one-sided three-point formula, limited so the end intervals stay monotone.

    Args:
        x: strictly increasing nodes, shape ``(N,)``, ``N >= 2``.
        y: values, shape ``(N,)``.
    """
    h = x[1:] - x[:-1]
    d = (y[1:] - y[:-1]) / h
    if x.numel() == 2:
        return torch.stack([d[0], d[0]])
    m = torch.zeros_like(y)
    w1 = 2 * h[1:] + h[:-1]
    w2 = h[1:] + 2 * h[:-1]
    same_sign = d[:-1] * d[1:] > 0
    safe_prev = torch.where(same_sign, d[:-1], torch.ones_like(d[:-1]))
    safe_next = torch.where(same_sign, d[1:], torch.ones_like(d[1:]))
    harmonic = (w1 + w2) / (w1 / safe_prev + w2 / safe_next)
    m[1:-1] = torch.where(same_sign, harmonic, torch.zeros_like(harmonic))

    def end_slope(h0: Tensor, h1: Tensor, d0: Tensor, d1: Tensor) -> Tensor:
        s = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
        if torch.sign(s) != torch.sign(d0):
            return torch.zeros_like(s)
        if torch.sign(d0) != torch.sign(d1) and s.abs() > 3 * d0.abs():
            return 3 * d0
        return s

    m[0] = end_slope(h[0], h[1], d[0], d[1])
    m[-1] = end_slope(h[-1], h[-2], d[-1], d[-2])
    return m


class TabulatedPath(GaussianPath):
    """Gaussian path interpolated from a table, with derivatives consistent with its values.

    Between nodes ``t_k < t < t_{k+1}`` (``h = t_{k+1} - t_k``, ``u = (t - t_k) / h``) each coefficient is the
    cubic Hermite polynomial ``p = H00(u) y_k + h H10(u) m_k + H01(u) y_{k+1} + h H11(u) m_{k+1}`` and its time
    derivative is ``dp/dt`` of the same cubic, so values and derivatives are exactly consistent and C^1.
    Node slopes ``m`` are the given derivatives (e.g. from a solver) or, when omitted, shape-preserving PCHIP
    slopes computed from the values.

    The table lives in buffers: it is saved in ``state_dict``, moves with ``.to(device)``, and a state dict with a
    grid of another length loads too (the buffers are resized).

    Args:
        t: strictly increasing grid from 0 to 1, shape ``(N,)``, ``N >= 2``.
        alpha: ``alpha_t`` on the grid (``alpha_0 = 0`` is not enforced; paths like VP do not reach it).
        sigma: ``sigma_t`` on the grid, ``>= 0``.
        d_alpha: optional ``d alpha / dt`` on the grid.
        d_sigma: optional ``d sigma / dt`` on the grid.

    Example:
        >>> from ko_lightning.paths import CondOTPath
        >>> tab = TabulatedPath.from_path(CondOTPath(), n=65)
        >>> float(tab(torch.tensor(0.3)).alpha)  # doctest: +ELLIPSIS
        0.3...
    """

    t_grid: Tensor
    alpha_grid: Tensor
    sigma_grid: Tensor
    d_alpha_grid: Tensor
    d_sigma_grid: Tensor

    def __init__(
        self,
        t: Tensor,
        alpha: Tensor,
        sigma: Tensor,
        d_alpha: Tensor | None = None,
        d_sigma: Tensor | None = None,
    ) -> None:
        super().__init__()
        for name in _TABLE:
            self.register_buffer(name, torch.zeros(2))
        self.set_table(t, alpha, sigma, d_alpha, d_sigma)

    @classmethod
    def from_path(cls, path: GaussianPath, n: int = 257, t: Tensor | None = None) -> TabulatedPath:
        """Tabulate another path's values and derivatives on ``t`` (default: ``n`` uniform points on [0, 1])."""
        if t is None:
            if n < 2:
                raise ValueError(f"n must be >= 2, got {n}")
            t = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
        c = path(t.float())
        return cls(t, c.alpha, c.sigma, c.d_alpha, c.d_sigma)

    @property
    def sigma_min(self) -> float:  # type: ignore[override]
        return float(self.sigma_grid[-1])

    def set_table(
        self,
        t: Tensor,
        alpha: Tensor,
        sigma: Tensor,
        d_alpha: Tensor | None = None,
        d_sigma: Tensor | None = None,
    ) -> None:
        """Validate and install a new table (in place when the grid length is unchanged).

        Raises:
            ValueError: naming the offending argument for wrong shapes, non-finite values, a grid that is not
                strictly increasing from 0 to 1, or negative sigma.
        """
        t = torch.as_tensor(t)
        values = {"alpha": torch.as_tensor(alpha), "sigma": torch.as_tensor(sigma)}
        if t.ndim != 1 or t.numel() < 2:
            raise ValueError(f"t must be a 1D grid with at least 2 points, got shape {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"t must be a real tensor of times, got dtype {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"t has {int((~torch.isfinite(t)).sum())} non-finite value(s); the grid must be finite")
        if not bool((t[1:] > t[:-1]).all()):
            k = int(torch.nonzero(t[1:] <= t[:-1])[0])
            raise ValueError(f"t must be strictly increasing, but t[{k + 1}] = {float(t[k + 1])!r} <= "
                             f"t[{k}] = {float(t[k])!r}")
        if abs(float(t[0])) > 1e-7 or abs(float(t[-1]) - 1.0) > 1e-7:
            raise ValueError(f"t must run from 0 to 1, got [{float(t[0])}, {float(t[-1])}]")
        for name, given in (("d_alpha", d_alpha), ("d_sigma", d_sigma)):
            if given is not None:
                values[name] = torch.as_tensor(given)
        for name, v in values.items():
            if v.dtype == torch.bool or v.is_complex():
                raise TypeError(f"{name} must be a real tensor, got dtype {v.dtype}")
            if v.shape != t.shape:
                raise ValueError(f"{name} must have the grid's shape {tuple(t.shape)}, got {tuple(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name} has {int((~torch.isfinite(v)).sum())} non-finite value(s)")
        if bool((values["sigma"] < 0).any()):
            raise ValueError("sigma must be >= 0 on the whole grid")
        t64 = t.double()
        for name in ("alpha", "sigma"):
            key = "d_" + name
            if key not in values:
                values[key] = pchip_slopes(t64, values[name].double())
        new = {
            "t_grid": t64,
            "alpha_grid": values["alpha"],
            "sigma_grid": values["sigma"],
            "d_alpha_grid": values["d_alpha"],
            "d_sigma_grid": values["d_sigma"],
        }
        device = self.t_grid.device
        for name, value in new.items():
            value = value.detach().to(device=device, dtype=torch.float32)
            buffer = getattr(self, name)
            if buffer.shape == value.shape:
                buffer.copy_(value)  # keeps the tensor object, so DDP's buffer references stay valid
            else:
                setattr(self, name, value.clone())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A saved schedule may have another grid length than the one this object was built with.
        for name in _TABLE:
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(incoming, device=self.t_grid.device, dtype=torch.float32))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def coefficients(self, t: Tensor) -> PathCoefficients:
        grid = self.t_grid
        idx = torch.searchsorted(grid, t.contiguous(), right=True) - 1
        idx = idx.clamp(0, grid.numel() - 2)
        t0 = grid[idx]
        h = grid[idx + 1] - t0
        u = (t - t0) / h
        u2, u3 = u * u, u * u * u
        h00, h10, h01, h11 = 2 * u3 - 3 * u2 + 1, u3 - 2 * u2 + u, -2 * u3 + 3 * u2, u3 - u2
        g01, g10, g11 = 6 * u - 6 * u2, 3 * u2 - 4 * u + 1, 3 * u2 - 2 * u  # d/du of the basis (H00' = -H01')

        def hermite(y: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
            y0, y1, m0, m1 = y[idx], y[idx + 1], m[idx], m[idx + 1]
            value = h00 * y0 + h10 * h * m0 + h01 * y1 + h11 * h * m1
            slope = g01 * (y1 - y0) / h + g10 * m0 + g11 * m1
            return value, slope

        alpha, d_alpha = hermite(self.alpha_grid, self.d_alpha_grid)
        sigma, d_sigma = hermite(self.sigma_grid, self.d_sigma_grid)
        return PathCoefficients(alpha, sigma, d_alpha, d_sigma)

    def extra_repr(self) -> str:
        return f"n={self.t_grid.numel()}, sigma_min={self.sigma_min:.4g}"
