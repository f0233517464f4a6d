"""Sample-based distances between distributions, for low-dimensional data (2D toys)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["mmd_rbf", "sliced_wasserstein"]


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be (N, D) and (M, D) with the same D, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("x and y need at least 2 samples each")
    for name, samples in (("x", x), ("y", y)):  # a NaN sample would make the distance a silent NaN
        bad = int((~torch.isfinite(samples)).any(dim=1).sum())
        if bad:
            raise ValueError(f"{name} has {bad} sample(s) with NaN or infinite coordinates")
    return x.double(), y.double()


def sliced_wasserstein(
    x: Tensor, y: Tensor, n_projections: int = 256, p: int = 2, generator: torch.Generator | None = None
) -> Tensor:
    """Sliced p-Wasserstein distance ``(E_w W_p^p(w.x, w.y))^(1/p)`` over random unit directions ``w``.

    Each 1D distance compares quantiles: both projected samples are sorted and, when the sizes differ, read at the
    same ``n = max(N, M)`` quantile levels ``(i + 0.5) / n``.

    Args:
        x: samples, shape ``(N, D)``.
        y: samples, shape ``(M, D)``.
        n_projections: number of random directions.
        p: order of the distance (>= 1).
        generator: random generator for the directions.
    """
    x, y = _check_pair(x, y)
    if n_projections < 1 or p < 1:
        raise ValueError(f"n_projections and p must be >= 1, got {n_projections} and {p}")
    w = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64).to(x.device)
    w = w / w.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ w, dim=0)
    py, _ = torch.sort(y @ w, dim=0)
    n = max(px.shape[0], py.shape[0])
    levels = (torch.arange(n, dtype=torch.float64, device=x.device) + 0.5) / n
    qx = px[(levels * px.shape[0]).long().clamp_max(px.shape[0] - 1)]
    qy = py[(levels * py.shape[0]).long().clamp_max(py.shape[0] - 1)]
    return (qx - qy).abs().pow(p).mean().pow(1.0 / p).float()


def mmd_rbf(x: Tensor, y: Tensor, bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0)) -> Tensor:
    """Unbiased squared maximum mean discrepancy with a sum of Gaussian kernels.

    ``MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y)`` with ``k(a, b) = sum_h exp(-||a - b||^2 / (2 h^2))``; the
    same-set terms leave out the diagonal, so the estimate is unbiased and can be slightly negative.

    Args:
        x: samples, shape ``(N, D)``.
        y: samples, shape ``(M, D)``.
        bandwidths: kernel widths ``h`` (in the data's units).
    """
    x, y = _check_pair(x, y)

    def kernel_sum(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2.0 * h * h)) for h in bandwidths)  # type: ignore[return-value]

    n, m = x.shape[0], y.shape[0]
    kxx = kernel_sum(x, x)
    kyy = kernel_sum(y, y)
    kxy = kernel_sum(x, y)
    k_diag = float(len(bandwidths))
    term_x = (kxx.sum() - n * k_diag) / (n * (n - 1))
    term_y = (kyy.sum() - m * k_diag) / (m * (m - 1))
    return (term_x + term_y - 2.0 * kxy.mean()).float()
