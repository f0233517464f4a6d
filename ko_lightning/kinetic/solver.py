"""The kinetic-optimal Gaussian path in closed form (docs/math.md §4)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ko_lightning.kinetic.separation import SeparationFunction
from ko_lightning.paths.tabulated import TabulatedPath

__all__ = ["DEFAULT_GAMMA_FLOOR", "DEFAULT_GAMMA_FLOORS", "KOSolution", "solve_ko"]

#: The default floor of ``gamma`` (docs/math.md §4.7): it bounds the turning rate by ``theta' <= phi' / sqrt(0.1)``
#: and keeps the path away from the variance-preserving shape that fails to learn near-Gaussian-looking data (the
#: sweep over 0.01, 0.03, 0.1 and 0.3 on six data sets that chose it is in docs/math.md §4.7).
DEFAULT_GAMMA_FLOOR = 0.1

#: Candidate floors for ``gamma``, largest first; :func:`solve_ko` takes the first whose KE price is acceptable.
DEFAULT_GAMMA_FLOORS: tuple[float, ...] = (
    1e-1, 5e-2, 2e-2, 1e-2, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4, 5e-5, 2e-5, 1e-5, 1e-6,
)  # fmt: skip

_ABS_PRICE_SLACK = 1e-10  # lets the floor be chosen when KE_min is ~0 (Gaussian-like data)


@dataclass(frozen=True)
class KOSolution:
    """The kinetic-optimal path and its diagnostics (all energies per dimension, in data units).

    Attributes:
        path: the regularized KO path, a :class:`TabulatedPath` with exact derivatives at its nodes (fp32).
        phi: ``Phi = int_0^{theta_1} sqrt(gamma)``, the cone angle of the end point (unregularized).
        phi_regularized: the same with the floored ``gamma``.
        ke_min: the exact minimum ``1 + r_1^2 - 2 r_1 cos(Phi)`` over all paths.
        ke: kinetic energy of the returned (regularized) path under the true ``gamma``.
        ke_price: ``ke - ke_min >= 0``, the cost of the regularization.
        gamma_floor: the floor ``epsilon`` used.
        max_abs_d_alpha: ``max_t |alpha'_t|`` over the table.
        max_abs_d_sigma: ``max_t |sigma'_t|`` over the table.
        sigma_min: ``sigma_1``.
        second_moment: ``v`` the path was solved for.
    """

    path: TabulatedPath
    phi: float
    phi_regularized: float
    ke_min: float
    ke: float
    ke_price: float
    gamma_floor: float
    max_abs_d_alpha: float
    max_abs_d_sigma: float
    sigma_min: float
    second_moment: float

    @property
    def ke_price_relative(self) -> float:
        """``ke_price / ke_min`` (``inf`` when ``ke_min = 0`` and the price is not)."""
        if self.ke_min > 0:
            return self.ke_price / self.ke_min
        return 0.0 if self.ke_price <= 0 else math.inf


def _check_args(
    lam: SeparationFunction,
    sigma_min: float,
    gamma_floor: float | None,
    second_moment: float,
    n_grid: int,
    n_theta: int,
    max_price: float,
) -> None:
    if not isinstance(lam, SeparationFunction):
        raise ValueError(f"lam must be a SeparationFunction, got {type(lam).__name__}")
    if not 0.0 <= float(sigma_min) < 1.0:
        raise ValueError(f"sigma_min must lie in [0, 1), got {sigma_min!r}")
    if gamma_floor is not None and not 0.0 < float(gamma_floor) < 1.0:
        raise ValueError(f"gamma_floor must lie in (0, 1) (or be None for automatic), got {gamma_floor!r}")
    if not (math.isfinite(float(second_moment)) and float(second_moment) > 0):
        raise ValueError(f"second_moment must be finite and > 0, got {second_moment!r}")
    if int(n_grid) != n_grid or n_grid < 3:
        raise ValueError(f"n_grid must be an integer >= 3, got {n_grid!r}")
    if int(n_theta) != n_theta or n_theta < 16:
        raise ValueError(f"n_theta must be an integer >= 16, got {n_theta!r}")
    if not (math.isfinite(float(max_price)) and float(max_price) >= 0):
        raise ValueError(f"max_price must be finite and >= 0, got {max_price!r}")


def solve_ko(
    lam: SeparationFunction,
    sigma_min: float = 0.0,
    gamma_floor: float | None = DEFAULT_GAMMA_FLOOR,
    second_moment: float = 1.0,
    n_grid: int = 512,
    n_theta: int = 4097,
    max_price: float = 0.005,
    floors: tuple[float, ...] = DEFAULT_GAMMA_FLOORS,
) -> KOSolution:
    """Kinetic-optimal Gaussian path for separation function ``lam``, in closed form (docs/math.md §4).

    In polar coordinates ``(sqrt(v) alpha, sigma) = r (sin theta, cos theta)`` the kinetic energy is
    ``int r'^2 + r^2 gamma(theta) theta'^2 dt``: a flat cone. With ``phi(theta) = int_0^theta sqrt(gamma)`` it is
    the Euclidean plane in polar coordinates ``(r, phi)``, and the optimum is the constant-speed segment

        ``P(t) = (1 - t) P_0 + t P_1``,  ``P_0 = (1, 0)``,  ``P_1 = r_1 (cos Phi, sin Phi)``,

    with ``r_1 = sqrt(v + sigma_min^2)``, ``theta_1 = atan2(sqrt(v), sigma_min)``, ``Phi = phi(theta_1)`` and
    ``KE_min = |P_1 - P_0|^2 = 1 + r_1^2 - 2 r_1 cos Phi``. Then ``r_t = |P(t)|``, ``phi_t = atan2(P_y, P_x)``,
    ``theta_t = phi^{-1}(phi_t)``, ``r' = P.P'/r``, ``phi' = (P x P')/r^2`` and ``theta' = phi' / sqrt(gamma)``.

    Regularization (docs/math.md §4 pitfalls): ``gamma`` is floored, ``gamma_eps = max(gamma, eps)``. This makes
    ``phi`` strictly increasing (invertible also where ``gamma = 0``) and bounds ``theta'`` by
    ``phi' / sqrt(eps)`` (without it ``theta_t ~ sqrt(t)`` near 0 and the flow-matching loss diverges). The
    regularized path is the straight segment of the floored cone; its energy under the true ``gamma`` is
    exactly ``|D|^2 - D_y int_0^{theta_1} (gamma_eps - gamma) / sqrt(gamma_eps) dtheta`` with ``D = P_1 - P_0``
    (angular momentum ``r^2 phi' = D_y`` is constant on the segment). With ``gamma_floor=None`` the floor is the
    largest of ``floors`` whose price ``ke - ke_min`` is at most ``max_price * ke_min`` (+1e-10); if none is,
    the smallest is used and a warning says so.

    Numerics (numpy float64, vectorized, no loop over grid points): ``gamma`` on ``n_theta`` uniform angles in
    ``[0, theta_1]`` merged with ``lam``'s own nodes; ``phi`` is the exact integral of the piecewise-linear
    interpolant of ``sqrt(gamma_eps)``. The ``n_grid`` table nodes are placed uniformly in a monitor
    ``0.4 t + 0.4 theta_t / theta_1 + 0.2 V`` (``V``: normalized variation of ``log gamma_eps``, i.e. of
    ``log theta'``) by choosing their angles; each node's time follows exactly from its ``phi`` on the segment,
    ``t = sin(phi) / (D_y cos(phi) - D_x sin(phi))``, so no numerical root finding is needed (the time is then
    rounded to float32, as the table stores it, and the angle moved to first order to match).

    Args:
        lam: separation function of the normalized data.
        sigma_min: ``sigma_1``, in ``[0, 1)``.
        gamma_floor: ``eps`` in ``(0, 1)`` (default :data:`DEFAULT_GAMMA_FLOOR`), or ``None`` to choose it by the
            KE price (below).
        second_moment: per-dimension second moment ``v`` of the (centred) data; the path is solved in the
            rescaled plane with end point ``(sqrt(v), sigma_min)`` and returned in data units (``alpha_1 = 1``).
        n_grid: nodes of the returned table (fewer only if two would share a float32 time).
        n_theta: angles of the quadrature grid.
        max_price: acceptable relative KE price of the automatic floor.
        floors: candidate floors for the automatic choice (each in ``(0, 1)``).

    Raises:
        ValueError: naming the bad argument.

    Example:
        >>> sol = solve_ko(SeparationFunction.constant_one())
        >>> round(sol.ke_min, 6), round(float(sol.path(torch.tensor(0.5)).alpha), 6)  # Cond-OT
        (2.0, 0.5)
    """
    _check_args(lam, sigma_min, gamma_floor, second_moment, n_grid, n_theta, max_price)
    candidates = (float(gamma_floor),) if gamma_floor is not None else tuple(float(f) for f in floors)
    if not candidates or not all(0.0 < f < 1.0 for f in candidates):
        raise ValueError(f"floors must be a non-empty sequence of numbers in (0, 1), got {floors!r}")
    v, sigma_min = float(second_moment), float(sigma_min)
    sv = math.sqrt(v)
    theta1 = math.atan2(sv, sigma_min)
    r1 = math.hypot(sv, sigma_min)

    # numpy float64 throughout: single-threaded, so a few thousand points cost microseconds even on a busy CPU.
    nodes = lam.theta.detach().double().cpu().numpy()
    theta = np.union1d(np.linspace(0.0, theta1, int(n_theta)), nodes[nodes < theta1])
    h = np.diff(theta)
    gamma = lam.gamma_array(theta)
    phi_total = float(np.sum(0.5 * h * (np.sqrt(gamma[1:]) + np.sqrt(gamma[:-1]))))
    ke_min = 1.0 + r1 * r1 - 2.0 * r1 * math.cos(phi_total)

    # All candidate floors at once: Phi_eps, the segment D and the exact KE of each regularized path.
    eps = np.asarray(candidates)[:, None]
    gamma_eps = np.maximum(gamma[None, :], eps)
    root = np.sqrt(gamma_eps)
    phi_eps = np.sum(0.5 * h * (root[:, 1:] + root[:, :-1]), axis=1)
    slack = (gamma_eps - gamma[None, :]) / root
    excess = np.sum(0.5 * h * (slack[:, 1:] + slack[:, :-1]), axis=1)
    d_x = r1 * np.cos(phi_eps) - 1.0
    d_y = r1 * np.sin(phi_eps)
    ke_reg = d_x**2 + d_y**2 - d_y * excess
    price = np.maximum(ke_reg - ke_min, 0.0)  # >= 0 up to rounding: ke_min is the minimum
    ok = list(price <= max_price * ke_min + _ABS_PRICE_SLACK)
    if gamma_floor is not None or any(ok):
        k = 0 if gamma_floor is not None else ok.index(True)
    else:
        k = len(candidates) - 1
        warnings.warn(
            f"no gamma floor in {candidates} has a KE price <= {max_price:.3g} x KE_min; using the smallest "
            f"({candidates[k]:g}, price {float(price[k]):.3g})",
            RuntimeWarning,
            stacklevel=2,
        )
    floor = candidates[k]
    root_k = root[k]
    phi_grid = np.concatenate([[0.0], np.cumsum(0.5 * h * (root_k[1:] + root_k[:-1]))])
    dx_k, dy_k = float(d_x[k]), float(d_y[k])

    # Times of the fine angles on the segment (exact). Nodes are uniform in a monitor mixing progress in t, in
    # theta, and in log theta' (= -log sqrt(gamma_eps) + smooth): the last grades the mesh geometrically where
    # theta_t bends from the floored linear start into its sqrt(t) regime.
    t_fine = np.sin(phi_grid) / (dy_k * np.cos(phi_grid) - dx_k * np.sin(phi_grid))
    t_fine[-1] = 1.0
    bend = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(np.log(root_k))))])
    if bend[-1] > 1e-3:
        monitor = 0.4 * t_fine + 0.4 * theta / theta1 + 0.2 * bend / bend[-1]
    else:
        monitor = 0.5 * (t_fine + theta / theta1)
    target = np.linspace(0.0, 1.0, int(n_grid))
    j = np.clip(np.searchsorted(monitor, target, side="right") - 1, 0, theta.size - 2)
    frac = np.clip((target - monitor[j]) / (monitor[j + 1] - monitor[j]), 0.0, 1.0)
    th = theta[j] + frac * h[j]
    # phi at a node: exact integral of the linear interpolant of sqrt(gamma_eps), whose value there is `rate`.
    slope = root_k[j + 1] - root_k[j]
    rate = root_k[j] + frac * slope
    phi = phi_grid[j] + h[j] * frac * (root_k[j] + 0.5 * frac * slope)
    t = np.sin(phi) / (dy_k * np.cos(phi) - dx_k * np.sin(phi))
    # The table stores t in float32: move each node to its float32 time (first order in the tiny shift), so
    # the stored values belong to the stored times.
    t32 = t.astype(np.float32).astype(np.float64)
    th = th + (dy_k / (1.0 + 2.0 * t * dx_k + t * t * (dx_k**2 + dy_k**2))) * (t32 - t) / rate
    t = t32
    p_x, p_y = 1.0 + t * dx_k, t * dy_k
    r = np.sqrt(p_x**2 + p_y**2)
    dr = (p_x * dx_k + p_y * dy_k) / r
    dth = (dy_k / r**2) / rate  # theta' = phi' / sqrt(gamma_eps), phi' = (P x D) / r^2 = D_y / r^2
    sin_t, cos_t = np.sin(th), np.cos(th)
    a_t, s_t = r * sin_t, r * cos_t
    da_t = dr * sin_t + r * cos_t * dth
    ds_t = dr * cos_t - r * sin_t * dth
    t[0], t[-1] = 0.0, 1.0
    a_t[0], s_t[0], a_t[-1], s_t[-1] = 0.0, 1.0, sv, sigma_min  # exact end points

    alpha, d_alpha = a_t / sv, da_t / sv  # back to data units
    # Nodes closer than float32 resolves would make the table's grid non-increasing: keep the last of each run
    # (rare: only for tiny floors; the end node t = 1 always stays).
    keep = np.append(t[:-1] < t[1:], True)
    table = (t[keep], alpha[keep], s_t[keep], d_alpha[keep], ds_t[keep])
    t_n, alpha_n, sigma_n, d_alpha_n, d_sigma_n = (torch.from_numpy(a) for a in table)
    path = TabulatedPath(t_n, alpha_n, sigma_n, d_alpha_n, d_sigma_n, sample_grid="angle")
    return KOSolution(
        path=path,
        phi=phi_total,
        phi_regularized=float(phi_eps[k]),
        ke_min=ke_min,
        ke=float(ke_reg[k]),
        ke_price=float(price[k]),
        gamma_floor=floor,
        max_abs_d_alpha=float(np.abs(d_alpha).max()),
        max_abs_d_sigma=float(np.abs(ds_t).max()),
        sigma_min=sigma_min,
        second_moment=v,
    )
