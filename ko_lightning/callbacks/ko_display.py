"""Rank-0 display of KO refreshes: a rich table in the console and ``ko_schedule.png`` (lambda and the schedules).

Pure output, no collectives: :class:`~ko_lightning.callbacks.KOScheduleCallback` calls it on rank 0 alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ko_lightning.kinetic import RefreshReport, SeparationFunction, SeparationSums
from ko_lightning.paths import CondOTPath, GaussianPath

__all__ = ["print_refresh_table", "publish_refresh", "save_schedule_picture"]


def print_refresh_table(report: RefreshReport) -> None:
    """Print one refresh as a small rich table."""
    from rich.console import Console
    from rich.table import Table

    title = f"KO refresh at step {report.step} ({report.estimator} estimator)"
    table = Table(title=title, show_header=True)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    if not report.installed:
        table.add_row("installed", f"no: {report.reason}")
    rows = [
        ("Phi", report.phi),
        ("KE_min", report.ke_min),
        ("KE new path", report.ke_new),
        ("KE previous path", report.ke_old),
        ("KE Cond-OT", report.ke_cond_ot),
        ("gamma floor", report.gamma_floor),
        ("max |alpha new - old|", report.max_delta_alpha),
        ("max |sigma new - old|", report.max_delta_sigma),
    ]
    for name, value in rows:
        if not math.isnan(value):
            table.add_row(name, f"{value:.5g}")
    for phase, seconds in report.seconds.items():
        table.add_row(f"seconds: {phase}", f"{seconds:.3f}")
    Console().print(table)


def save_schedule_picture(
    run_dir: str,
    step: int,
    separation: SeparationFunction,
    old_schedule: tuple[Tensor, Tensor, Tensor] | None,
    new_path: GaussianPath,
    sums: SeparationSums,
    sigma_min: float,
) -> str:
    """Write ``<run_dir>/ko_schedule.png``: lambda(theta), its estimate and bounds; alpha_t, sigma_t old/new/Cond-OT.

    Pure file output, safe to call on one rank (the caller resolves ``run_dir`` on every rank beforehand).

    Returns:
        The path of the written picture.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(run_dir, exist_ok=True)
    fig, (ax_l, ax_p) = plt.subplots(1, 2, figsize=(10, 4))
    theta = torch.linspace(1e-3, math.pi / 2 - 1e-3, 400, dtype=torch.float64)
    ax_l.plot(theta, separation.at_theta(theta).cpu(), label="lambda (smoothed, projected)")
    ax_l.plot(sums.theta.cpu(), sums.lam.cpu(), ".", ms=3, label="estimate at grid points")
    ax_l.plot(theta, torch.sin(theta) ** 2, "--", lw=0.8, label="Gaussian bound s^2/(1+s^2)")
    ax_l.set_xlabel("theta = atan(SNR)")
    ax_l.set_ylabel("lambda")
    ax_l.legend(fontsize=7)
    t = torch.linspace(0.0, 1.0, 401)
    cond_ot = CondOTPath(sigma_min)(t)
    device = next(iter(new_path.buffers()), torch.empty(0)).device
    new = new_path(t.to(device))
    ax_p.plot(t, cond_ot.alpha, color="0.6", lw=1, label="Cond-OT alpha / sigma")
    ax_p.plot(t, cond_ot.sigma, color="0.6", lw=1)
    if old_schedule is not None:
        ax_p.plot(old_schedule[0], old_schedule[1], "--", color="tab:blue", lw=1, label="previous alpha / sigma")
        ax_p.plot(old_schedule[0], old_schedule[2], "--", color="tab:orange", lw=1)
    ax_p.plot(t, new.alpha.cpu(), color="tab:blue", label="KO alpha")
    ax_p.plot(t, new.sigma.cpu(), color="tab:orange", label="KO sigma")
    ax_p.set_xlabel("t (0 noise, 1 data)")
    ax_p.legend(fontsize=7)
    fig.suptitle(f"KO schedule after step {step}")
    fig.tight_layout()
    out = os.path.join(run_dir, "ko_schedule.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def publish_refresh(
    loggers: Sequence[Logger],
    report: RefreshReport,
    picture_dir: str | None,
    separation: SeparationFunction | None,
    old_schedule: tuple[Tensor, Tensor, Tensor] | None,
    new_path: GaussianPath,
    sums: SeparationSums,
    sigma_min: float,
) -> None:
    """Log the refresh's ``ko/*`` metrics, print its table and (with a ``picture_dir``) draw ``ko_schedule.png``.

    A picture that cannot be written is a warning: it is not worth stopping a run for.
    """
    for logger in loggers:
        logger.log_metrics(report.metrics(), step=report.step)
    print_refresh_table(report)
    if picture_dir is None or separation is None:
        return
    try:
        save_schedule_picture(picture_dir, report.step, separation, old_schedule, new_path, sums, sigma_min)
    except Exception as err:  # noqa: BLE001 - any failure to draw or write
        rank_zero_warn(
            f"KOScheduleCallback: could not write ko_schedule.png into {picture_dir}: {type(err).__name__}: {err}",
            category=RuntimeWarning,
        )
