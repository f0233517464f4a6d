"""One refresh of the Kinetic-Optimal path from pooled estimator sums, without Lightning.

A refresh turns the separation sums of all ranks into a new path: check that the raw estimate of ``lambda`` is
plausible, smooth it into a :class:`SeparationFunction` (docs/math.md §3.8), optionally merge it with the previous
one, solve the KO path in closed form (docs/math.md §4) and measure the kinetic energy (docs/math.md §2) of the
previous, the new and the Cond-OT path under the new ``lambda``. The result is a :class:`RefreshOutcome`: plain
tensors and numbers that can be broadcast between processes, from which every process builds the same path.
:class:`ko_lightning.callbacks.KOScheduleCallback` adds the Lightning hooks, the collectives and the reporting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from ko_lightning.kinetic.energy import kinetic_energy
from ko_lightning.kinetic.estimators import SeparationSums
from ko_lightning.kinetic.separation import SeparationFunction
from ko_lightning.kinetic.solver import solve_ko
from ko_lightning.paths.analytic import CondOTPath
from ko_lightning.paths.base import GaussianPath
from ko_lightning.paths.tabulated import TabulatedPath

__all__ = [
    "PathTable",
    "RefreshNumbers",
    "RefreshOutcome",
    "RefreshReport",
    "dense_schedule",
    "implausible_estimate",
    "schedule_change",
    "solve_refresh",
]

#: Monte-Carlo noise may take the raw estimate out of ``[0, 1]`` by this many standard errors before it is refused.
PLAUSIBLE_STANDARD_ERRORS = 6.0

#: The previous path's kinetic energy is integrated up to this time: a path tabulated or defined only on
#: ``[0, 1)`` (e.g. with ``sigma_1 = 0``) may have an integrable singularity at ``t = 1``.
_KE_OLD_T_MAX = 1.0 - 1e-5


class PathTable(NamedTuple):
    """The node table of a :class:`TabulatedPath`: ``(t, alpha, sigma, alpha', sigma')``, each ``(N,)``.

    Plain tensors, so that it pickles and broadcasts between processes; every process rebuilds the same path
    from it with :meth:`to_path` (bit-identical buffers).
    """

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor

    @classmethod
    def of(cls, path: TabulatedPath) -> PathTable:
        """A copy of ``path``'s table."""
        return cls(
            path.t_grid.clone(),
            path.alpha_grid.clone(),
            path.sigma_grid.clone(),
            path.d_alpha_grid.clone(),
            path.d_sigma_grid.clone(),
        )

    def to_path(self) -> TabulatedPath:
        """The KO :class:`TabulatedPath` with this table (its derivatives as the node slopes), sampled on the
        angle grid by default (docs/math.md §5.3)."""
        return TabulatedPath(self.t, self.alpha, self.sigma, self.d_alpha, self.d_sigma, sample_grid="angle")


@dataclass(frozen=True)
class RefreshNumbers:
    """The solution's numbers (per dimension, in data units; :class:`RefreshReport` explains each)."""

    phi: float
    ke_min: float
    ke_new: float
    ke_old: float
    ke_cond_ot: float
    gamma_floor: float


@dataclass
class RefreshReport:
    """What one refresh did (logged under ``ko/`` and shown as a table on rank 0).

    Attributes:
        step: global step of the refresh (0 for the initialization before the first step).
        estimator: which estimator produced lambda.
        installed: whether the new path was installed (False: the previous path was kept, see ``reason``).
        reason: why a path was not installed.
        phi: cone angle ``Phi`` of the new solution.
        ke_min: exact minimum kinetic energy under the new lambda.
        ke_new: kinetic energy of the installed (regularized) path under the new lambda.
        ke_old: kinetic energy of the previous path under the new lambda.
        ke_cond_ot: kinetic energy of Cond-OT (same sigma_min) under the new lambda, for reference.
        gamma_floor: the regularization floor used.
        max_delta_alpha: ``max_t |alpha_new - alpha_old|``.
        max_delta_sigma: ``max_t |sigma_new - sigma_old|``.
        seconds: wall time per phase (estimate, all_reduce, solve, install) and in total.
    """

    step: int
    estimator: str
    installed: bool = False
    reason: str = ""
    phi: float = math.nan
    ke_min: float = math.nan
    ke_new: float = math.nan
    ke_old: float = math.nan
    ke_cond_ot: float = math.nan
    gamma_floor: float = math.nan
    max_delta_alpha: float = math.nan
    max_delta_sigma: float = math.nan
    seconds: dict[str, float] = field(default_factory=dict)

    def record(self, numbers: RefreshNumbers) -> None:
        """Copy a solution's numbers into the report."""
        self.phi, self.ke_min, self.ke_new = numbers.phi, numbers.ke_min, numbers.ke_new
        self.ke_old, self.ke_cond_ot, self.gamma_floor = numbers.ke_old, numbers.ke_cond_ot, numbers.gamma_floor

    def metrics(self) -> dict[str, float]:
        """Scalars for the loggers."""
        out = {
            "ko/phi": self.phi,
            "ko/ke_min": self.ke_min,
            "ko/ke_new": self.ke_new,
            "ko/ke_old": self.ke_old,
            "ko/ke_cond_ot": self.ke_cond_ot,
            "ko/gamma_floor": self.gamma_floor,
            "ko/max_delta_alpha": self.max_delta_alpha,
            "ko/max_delta_sigma": self.max_delta_sigma,
            "ko/installed": float(self.installed),
        }
        out.update({f"ko/seconds_{k}": v for k, v in self.seconds.items()})
        return out

    def record_times(self, start: float, estimated: float, reduced: float, solved: float, installed: float) -> None:
        """Fill :attr:`seconds` from the ``time.perf_counter()`` marks taken between the phases of a refresh."""
        self.seconds = {
            "estimate": estimated - start,
            "all_reduce": reduced - estimated,
            "solve": solved - reduced,
            "install": installed - solved,
            "total": installed - start,
        }


@dataclass
class RefreshOutcome:
    """What one solve produced (rank 0 broadcasts it): a new path, a reason to keep the previous one, or an error.

    Attributes:
        table: the new path's node table (None when nothing is installed).
        separation: the separation function the path was solved from.
        numbers: the solution's numbers (None when nothing is installed).
        old_schedule: ``(t, alpha, sigma)`` of the previous path on a dense grid, for the picture.
        reason: why the previous path is kept (an implausible estimate; training goes on).
        error: an unexpected failure of the solve (the caller raises it on every process).
    """

    table: PathTable | None = None
    separation: SeparationFunction | None = None
    numbers: RefreshNumbers | None = None
    old_schedule: tuple[Tensor, Tensor, Tensor] | None = None
    reason: str = ""
    error: str = ""

    @property
    def installed(self) -> bool:
        """True when the outcome carries a new path."""
        return self.table is not None and not self.error


def implausible_estimate(sums: SeparationSums) -> str:
    """Why the raw estimate of ``lambda`` in ``sums`` cannot be used, or ``""`` when it can.

    ``lambda`` lies in ``[0, 1]`` (docs/math.md §3.3); the raw estimate may leave it by Monte-Carlo noise, so it is
    refused only where it is not finite or lies more than :data:`PLAUSIBLE_STANDARD_ERRORS` standard errors
    (plus ``1e-6`` for rounding) outside: that means a broken estimate, not noise.
    """
    raw = sums.lam
    if not bool(torch.isfinite(raw).all()):
        return f"lambda estimate has {int((~torch.isfinite(raw)).sum())} non-finite values"
    slack = PLAUSIBLE_STANDARD_ERRORS * sums.standard_error + 1e-6
    if bool(((raw < -slack) | (raw > 1 + slack)).any()):
        return "lambda estimate leaves [0, 1] beyond its Monte-Carlo error"
    return ""


def solve_refresh(
    sums: SeparationSums,
    old_path: GaussianPath,
    *,
    sigma_min: float,
    smoothing: float = 1.0,
    previous: SeparationFunction | None = None,
    gamma_floor: float | None = None,
    second_moment: float = 1.0,
    n_grid: int = 512,
    conditional: bool = False,
) -> RefreshOutcome:
    """Turn pooled sums into a KO path and the numbers that describe it.

    The estimate is checked (:func:`implausible_estimate`), smoothed into a separation function
    (:meth:`SeparationSums.to_function`), pooled with ``previous`` by samples per grid point when it is given
    (:meth:`SeparationFunction.merge`), and solved in closed form (:func:`solve_ko`, docs/math.md §4). The
    numbers are ``Phi``, ``KE_min``, the kinetic energy (docs/math.md §2) of the new path, of ``old_path`` and of
    Cond-OT with the same ``sigma_min``, all under the new ``lambda``, and the ``gamma`` floor used.

    Args:
        sums: the separation sums over all processes' queries.
        old_path: the path now trained on (its energy is reported; its schedule is kept for the picture).
        sigma_min: end noise ``sigma_1`` of the new path.
        smoothing: Whittaker smoothing strength of the separation function.
        previous: the previous separation function to merge with, or None.
        gamma_floor: the solver's regularization floor; None lets it choose.
        second_moment: per-dimension second moment ``v`` of the data (the energies are in data units).
        n_grid: nodes of the new path's table.
        conditional: the sums estimate a conditional model's ``lambda_cond`` (docs/math.md §3.10), which need not
            vanish at SNR 0: the smoothed function is then not pinned to 0 there.

    Returns:
        An outcome with the new path, or with a ``reason`` (an implausible estimate, or a ``ValueError`` or
        ``RuntimeError`` of the smoothing, merge or solve) and no path. Other errors propagate.
    """
    reason = implausible_estimate(sums)
    if reason:
        return RefreshOutcome(reason=reason)
    try:
        separation = sums.to_function(smoothing, zero_at_origin=not conditional)
        if previous is not None:
            separation = previous.merge(separation)
        solution = solve_ko(
            separation, sigma_min=sigma_min, gamma_floor=gamma_floor, second_moment=second_moment, n_grid=n_grid
        )
    except (ValueError, RuntimeError) as err:
        return RefreshOutcome(reason=f"{type(err).__name__}: {err}")
    numbers = RefreshNumbers(
        phi=solution.phi,
        ke_min=solution.ke_min,
        ke_new=solution.ke,
        ke_old=kinetic_energy(old_path, separation, second_moment=second_moment, t_max=_KE_OLD_T_MAX),
        ke_cond_ot=kinetic_energy(CondOTPath(sigma_min), separation, second_moment=second_moment),
        gamma_floor=solution.gamma_floor,
    )
    return RefreshOutcome(
        table=PathTable.of(solution.path), separation=separation, numbers=numbers, old_schedule=dense_schedule(old_path)
    )


def _path_device(path: GaussianPath) -> torch.device:
    buffers = list(path.buffers())
    return buffers[0].device if buffers else torch.device("cpu")


def dense_schedule(path: GaussianPath, n: int = 401) -> tuple[Tensor, Tensor, Tensor]:
    """``(t, alpha_t, sigma_t)`` of ``path`` on ``n`` uniform times in ``[0, 1]``, on the CPU."""
    t = torch.linspace(0.0, 1.0, n, device=_path_device(path))
    c = path(t)
    return t.cpu(), c.alpha.cpu(), c.sigma.cpu()


def schedule_change(old: GaussianPath, new: GaussianPath, n: int = 1001) -> tuple[float, float]:
    """``(max_t |alpha_new - alpha_old|, max_t |sigma_new - sigma_old|)`` over ``n`` uniform times in ``[0, 1]``."""
    t = torch.linspace(0.0, 1.0, n, device=new.t_grid.device if isinstance(new, TabulatedPath) else "cpu")
    a, b = old(t.to(_path_device(old))), new(t)
    return (float((a.alpha.cpu() - b.alpha.cpu()).abs().max()), float((a.sigma.cpu() - b.sigma.cpu()).abs().max()))
