"""Plain helpers shared by the tests: the separation function of two-point data, and rounding-error bounds.

Imported as ``from kinetic_helpers import ...``: tests/ has no ``__init__.py``, so pytest's default ``prepend``
import mode puts this folder on ``sys.path`` (for tests/conftest.py and the test modules alike).

Tolerances of the suite are derived, not tuned on one CPU: the kernels (matmul blocking, SIMD lanes, chunking)
differ between machines and ``ATEN_CPU_CAPABILITY`` settings, so a comparison of floating-point results allows the
worst-case rounding error of the computation, in any summation order (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., ch. 3): a sum or dot product of ``n`` terms computed in any order carries an
error of at most ``gamma(n) * sum |terms|``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ko_lightning.kinetic import SeparationFunction, default_theta_grid, kinetic_energy_density
from ko_lightning.paths import GaussianPath, TabulatedPath

__all__ = [
    "ELEMENTARY_REL",
    "PATH_COEFF_REL",
    "U32",
    "U64",
    "gamma",
    "hermite_table_rounding",
    "ke_fp32_tol",
    "max_gamma_slope",
    "softmax_mean_rounding_bound",
    "two_point_lam",
    "two_point_separation",
]

#: Unit roundoff of IEEE float32 / float64 (round to nearest): one operation has relative error <= u.
U32 = 2.0**-24
U64 = 2.0**-53
#: Relative error of an fp32 elementary function (exp, log, sin, cos, tanh, ...) as computed by torch on CPU:
#: SLEEF's vectorized ``u10`` functions and the C library's scalar ones (ATEN_CPU_CAPABILITY=default) are
#: accurate to 1 ulp, i.e. a relative error below 2u; allow 2 ulp.
ELEMENTARY_REL = 4 * U32


def gamma(n: float, u: float = U32) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error bound of ``n`` accumulated roundings.

    A sum or dot product of ``n`` terms, in any order (sequential, pairwise, blocked, SIMD lanes, data chunks), is
    within ``gamma(n) * sum |terms|``, so two machines or two chunkings of it differ by at most twice that.
    ``u = U64`` for float64.
    """
    if n * u >= 1:
        raise ValueError(f"gamma({n}) is unbounded for u = {u}")
    return n * u / (1 - n * u)


def softmax_mean_rounding_bound(
    logits: Tensor, logit_err: Tensor, y: Tensor, y_err: Tensor | None = None, n_rescales: int = 0
) -> tuple[Tensor, Tensor]:
    """Exact ``softmax(logits) @ y`` and a first-order bound on the error of an fp32 evaluation of it.

    The fp32 evaluation (ko_lightning.kinetic.posterior) exponentiates fp32 logits (each within ``logit_err`` of
    the exact ones, up to a common shift per row), sums the weights and the weighted rows over the ``n`` data
    points in any order, and divides. Its error per component ``m`` is at most

    - ``sum_k pi_k r_k |y_km - post_m| / (1 - max r)``: weights with relative errors ``r_k = exp(b_k) - 1``,
      ``b_k = logit_err_k + ELEMENTARY_REL + n_rescales (ELEMENTARY_REL + 2u max|l|)`` (the exp itself and the
      rescaling of the running sums of a streamed log-sum-exp, once per data chunk);
    - ``sum_k pi_k y_err_km``: the rows ``y`` themselves rounded to fp32;
    - ``gamma_n (sum_k pi_k |y_km| + |post_m|) + u |post_m|``: the two sums of ``n`` terms and the division;
    - ``n 1e-14 (max_k |y_km| + |post_m|)``: weights below ``PRUNE_BELOW = 1e-14`` of the row's reference (and
      logits clamped at -60) are dropped.

    Args:
        logits: exact logits ``(..., n)`` (float64).
        logit_err: bound on each fp32 logit's error, broadcastable to ``logits``.
        y: exact rows ``(n, d)`` (float64).
        y_err: bound on the error of the fp32 rows, ``(n, d)``, or ``None``.
        n_rescales: data chunks of a streamed log-sum-exp (0 when the sums use a fixed reference).

    Returns:
        ``(post, post_err)``, both ``(..., d)``.
    """
    n = logits.shape[-1]
    pi = torch.softmax(logits, -1)
    post = pi @ y
    b = logit_err + ELEMENTARY_REL
    if n_rescales:
        b = b + n_rescales * (ELEMENTARY_REL + 2 * U32 * logits.abs().amax(-1, keepdim=True))
    r = torch.expm1(b).expand_as(logits)
    spread = (y.unsqueeze(-3) - post.unsqueeze(-2)).abs()  # (..., n, d): |y_km - post_m|
    err = (pi.unsqueeze(-1) * r.unsqueeze(-1) * spread).sum(-2) / (1 - r.amax(-1, keepdim=True))
    if y_err is not None:
        err = err + pi @ y_err
    err = err + gamma(n) * (pi @ y.abs() + post.abs()) + U32 * post.abs()
    err = err + n * 1e-14 * (y.abs().amax(0) + post.abs())
    return post, err


def max_gamma_slope(lam: SeparationFunction) -> float:
    """``max |d gamma / d theta|`` on a fine grid (gamma is piecewise cubic between its nodes)."""
    theta = torch.linspace(0.0, math.pi / 2, 4001, dtype=torch.float64)
    return float((lam.gamma(theta).diff() / theta.diff()).abs().max())


#: Relative error bound of each fp32 path coefficient (alpha, sigma, alpha', sigma') of the shipped paths:
#: a few chained roundings and elementary functions (VP's exp of an argument up to 5 amplifies 4 roundings 5x,
#: and sigma' = -alpha alpha' / sigma chains three such values: ~60u); a Hermite table's fp32 evaluation costs
#: <= 59u on values and <= 101u on slopes relative to the local slope scale (hermite_table_rounding; the
#: rounding of its node values, ~u / h on slopes, integrates out over each interval in an energy).
PATH_COEFF_REL = 128 * U32


def hermite_table_rounding(
    path: TabulatedPath, t: Tensor, node_err: float | None = None, slope_err: float | None = None
) -> dict[str, Tensor]:
    """Worst-case fp32 rounding of ``path(t)`` (a TabulatedPath) against its exact cubic Hermite interpolant.

    Between nodes ``t_k < t < t_{k+1}`` (``h``, position ``w = (t - t_k) / h``), with ``M = max(|y_k|, |y_{k+1}|,
    h |m_k|, h |m_{k+1}|)`` and ``S = max(|y_{k+1} - y_k| / h, |m_k|, |m_{k+1}|)``, counting the roundings of
    TabulatedPath.coefficients (position w: 3u, i.e. 3u h |p'| <= 15u M on the value and 3u h |p''| <= 42u S on
    the slope; the basis cubics: <= 12u, 11u, 6u, 4u on the value and 20u, 12u, 9u on the slope; products and
    sums; the table's own rounding, u per node value and slope):

        value error <= 59u M,      slope error <= 3u max(|y_k|, |y_{k+1}|) / h + 101u S.

    At a node (``w = 0``) only the table's rounding is left: ``u |y_k|`` and ``u |m_k|``. A table made from fp32
    values that were already off (e.g. TabulatedPath.from_path) passes ``node_err`` / ``slope_err``, absolute
    bounds on its node values / slopes, instead: they enter as ``node_err`` on values and ``3 node_err / h +
    2 slope_err`` on slopes (and ``h slope_err`` on values).

    Returns:
        ``{"alpha", "sigma", "d_alpha", "d_sigma"}`` error bounds shaped like ``t`` (float64).
    """
    grid = path.t_grid.double()
    t32 = t.float().double()
    idx = (torch.searchsorted(grid, t32.contiguous(), right=True) - 1).clamp(0, grid.numel() - 2)
    h = grid[idx + 1] - grid[idx]
    at_node = t32 == grid[idx]
    out = {}
    for value, slope in (("alpha", "d_alpha"), ("sigma", "d_sigma")):
        y, m = getattr(path, f"{value}_grid").double(), getattr(path, f"{slope}_grid").double()
        y0, y1, m0, m1 = y[idx].abs(), y[idx + 1].abs(), m[idx].abs(), m[idx + 1].abs()
        big_m = torch.stack([y0, y1, h * m0, h * m1]).amax(0)
        big_s = torch.stack([(y[idx + 1] - y[idx]).abs() / h, m0, m1]).amax(0)
        e_y = U32 * torch.maximum(y0, y1) if node_err is None else torch.full_like(h, node_err)
        e_m = U32 * torch.maximum(m0, m1) if slope_err is None else torch.full_like(h, slope_err)
        out[value] = torch.where(at_node, e_y, 58 * U32 * big_m + e_y + h * e_m)
        out[slope] = torch.where(at_node, e_m, 3 * e_y / h + 2 * e_m + 99 * U32 * big_s)
    return out


def ke_fp32_tol(path: GaussianPath, lam: SeparationFunction, second_moment: float = 1.0, t_max: float = 1.0) -> float:
    """Worst-case effect of kinetic_energy's fp32 path evaluation on its value (first order).

    In the polar form ``f = r'^2 + gamma(theta) w^2`` (``w = r theta'``, ``S = sqrt(alpha'^2 + sigma'^2)`` in data
    units, ``|r'|, |w| <= S``):

    - each coefficient carries at most ``eps = PATH_COEFF_REL``, which moves ``r'`` and ``w`` by ``<= 3 eps S``
      (two products and the radius) and ``theta`` by ``<= 2 eps |alpha sigma| / r^2 + 2u / r`` (the last term: an
      absolute rounding where sigma -> 0, e.g. 1 - t^n), so
      ``|df| <= 6 eps S (|r'| + gamma |w|) + |gamma'(theta)| |d theta| w^2``;
    - the quadrature nodes are cast to fp32, a shift ``|dt| <= u``: at most ``u TV(f)``.

    Both integrated on a grid graded towards ``t_max`` (VP-like densities grow like ``1 / (1 - t)`` there).
    """
    uniform = torch.linspace(0.0, t_max, 4001, dtype=torch.float64)
    graded = t_max - t_max * torch.logspace(-12, 0, 2001, dtype=torch.float64)
    t = torch.unique(torch.cat([uniform, graded]).clamp(0.0, t_max)).clamp(max=1.0 - 2.0**-24)
    f = kinetic_energy_density(path, lam, t, second_moment)
    c = path(t.float())
    sv = math.sqrt(second_moment)
    a, s = sv * c.alpha.double(), c.sigma.double()
    da, ds = sv * c.d_alpha.double(), c.d_sigma.double()
    r = torch.sqrt(a * a + s * s)
    dr, w, speed = (a * da + s * ds) / r, (s * da - a * ds) / r, torch.sqrt(da * da + ds * ds)
    theta = torch.atan2(a, s)
    h = 1e-6
    slope = (lam.gamma((theta + h).clamp(max=math.pi / 2)) - lam.gamma((theta - h).clamp(min=0.0))).abs() / (2 * h)
    eps = PATH_COEFF_REL
    d_theta = 2 * eps * (a * s).abs() / r**2 + 2 * U32 / r
    df = 6 * eps * speed * (dr.abs() + lam.gamma(theta) * w.abs()) + slope * d_theta * w * w
    return U32 * float(f.diff().abs().sum()) + float(torch.trapezoid(df, t))


def two_point_lam(theta: np.ndarray, d: int, nodes: int = 200) -> np.ndarray:
    """lambda of {+u, -u} with ||u||^2 = d: E tanh^2(d s^2 + sqrt(d) s xi), xi ~ N(0, 1) (Gauss-Hermite).

    The quadrature error of ``nodes`` points is below ``|two_point_lam(., nodes) - two_point_lam(., 3 nodes / 4)|``
    (the rule converges monotonically here: 100, 150, 200 nodes differ by 2e-6, 4e-7).
    """
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    s = np.tan(theta)[:, None]
    return (np.tanh(d * s**2 + math.sqrt(d) * s * x[None]) ** 2 * (w / w.sum())).sum(1)


def two_point_separation(d: int) -> SeparationFunction:
    """:func:`two_point_lam` tabulated on ``default_theta_grid(256)``."""
    th = default_theta_grid(256)
    return SeparationFunction(th, torch.from_numpy(two_point_lam(th.numpy(), d)))
