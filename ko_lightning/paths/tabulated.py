"""A Gaussian path given by a table of alpha_t and sigma_t on a time grid (used for data-dependent schedules)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ko_lightning.paths.base import SAMPLE_GRIDS, GaussianPath, PathCoefficients, SampleGrid
from ko_lightning.paths.hermite import HermiteSegments, pchip_slopes

__all__ = ["TabulatedPath", "pchip_slopes"]

_TABLE = ("t_grid", "alpha_grid", "sigma_grid", "d_alpha_grid", "d_sigma_grid")


class TabulatedPath(GaussianPath):
    """Gaussian path interpolated from a table, with derivatives consistent with its values.

    Between nodes ``t_k < t < t_{k+1}`` (``h = t_{k+1} - t_k``, ``u = (t - t_k) / h``) each coefficient is the
    cubic Hermite polynomial ``p = H00(u) y_k + h H10(u) m_k + H01(u) y_{k+1} + h H11(u) m_{k+1}`` and its time
    derivative is ``dp/dt`` of the same cubic, so values and derivatives are exactly consistent and C^1.
    Node slopes ``m`` are the given derivatives (e.g. from a solver) or, when omitted, shape-preserving PCHIP
    slopes computed from the values (both from :mod:`ko_lightning.paths.hermite`).

    The table lives in buffers: it is saved in ``state_dict``, moves with ``.to(device)``, and a state dict with a
    grid of another length loads too (the buffers are resized).

    Args:
        t: strictly increasing grid from 0 to 1, shape ``(N,)``, ``N >= 2``.
        alpha: ``alpha_t`` on the grid (``alpha_0 = 0`` is not enforced; paths like VP do not reach it).
        sigma: ``sigma_t`` on the grid, ``>= 0``.
        d_alpha: optional ``d alpha / dt`` on the grid.
        d_sigma: optional ``d sigma / dt`` on the grid.
        sample_grid: where fixed-step sampling steps by default, ``"time"`` or ``"angle"``
            (:attr:`GaussianPath.sample_grid`; the KO solver sets ``"angle"``).

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
        sample_grid: SampleGrid = "time",
    ) -> None:
        super().__init__()
        if sample_grid not in SAMPLE_GRIDS:
            raise ValueError(f"sample_grid must be one of {SAMPLE_GRIDS}, got {sample_grid!r}")
        self.sample_grid = sample_grid
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
            raise ValueError(
                f"t must be strictly increasing, but t[{k + 1}] = {float(t[k + 1])!r} <= t[{k}] = {float(t[k])!r}"
            )
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
        # One search for both coefficients; each is the cubic Hermite spline of its table (docs/math.md §4.3).
        segments = HermiteSegments(self.t_grid, t)
        alpha, d_alpha = segments.value_and_derivative(self.alpha_grid, self.d_alpha_grid)
        sigma, d_sigma = segments.value_and_derivative(self.sigma_grid, self.d_sigma_grid)
        return PathCoefficients(alpha, sigma, d_alpha, d_sigma)

    def extra_repr(self) -> str:
        return f"n={self.t_grid.numel()}, sigma_min={self.sigma_min:.4g}"
