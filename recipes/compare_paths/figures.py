"""The pictures of a comparison: ``samples.png`` (samples per solver and path) and ``schedules.png`` (lambda(theta),
``alpha_t`` and ``sigma_t`` of every path, including the final KO one)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ko_lightning.data import DigitsDataModule, Toy2DDataModule
from ko_lightning.kinetic import SeparationFunction
from ko_lightning.paths import GaussianPath
from recipes.compare_paths.config import CompareConfig
from recipes.compare_paths.evaluate import PathResult, digits_display

__all__ = ["save_samples_figure", "save_schedules_figure"]

_MOSAIC = 6  # digits panels show a 6 x 6 mosaic


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported only when drawing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _digits_mosaic(dm: DigitsDataModule, x: Tensor, dequantized: bool) -> Tensor:
    """Up to 36 samples as one 60 x 60 image in [0, 1], a thin frame between the digits."""
    count = _MOSAIC * _MOSAIC
    img = digits_display(dm, x[:count], dequantized)[:, 0]
    if img.shape[0] < count:
        img = torch.cat([img, torch.zeros(count - img.shape[0], 8, 8)])
    img = torch.nn.functional.pad(img, (1, 1, 1, 1), value=0.15)
    return img.reshape(_MOSAIC, _MOSAIC, 10, 10).permute(0, 2, 1, 3).reshape(10 * _MOSAIC, 10 * _MOSAIC)


def save_samples_figure(
    config: CompareConfig,
    dm: Toy2DDataModule | DigitsDataModule,
    rows: list[PathResult],
    samples: dict[str, dict[str, Tensor]],
    out: Path,
) -> Path:
    """Draw one row per path, one panel per solver and a data panel; returns the file written."""
    plt = _pyplot()
    solvers = config.eval.solver_names()
    n_rows, n_cols = len(rows), len(solvers) + 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.3 * n_rows), squeeze=False)
    ref = dm.train_tensor() if config.is_digits else dm.test_tensor()
    for i, row in enumerate(rows):
        panels: list[tuple[str, Tensor, dict[str, float] | None]] = [
            (s, samples[row.name][s], row.solvers[s]) for s in solvers
        ]
        panels.append(("data", ref, None))
        for j, (solver, x, metrics) in enumerate(panels):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if isinstance(dm, DigitsDataModule):
                shift = solver != "data" and config.train.dequantize
                ax.imshow(_digits_mosaic(dm, x, shift).numpy(), cmap="gray_r", vmin=0, vmax=1)
            else:
                pts = dm.denormalize(x[: config.eval.n_plot])
                ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=0.3, alpha=0.5, lw=0)
                ax.set_xlim(-2.6, 2.6)
                ax.set_ylim(-2.6, 2.6)
                ax.set_aspect("equal")
            if metrics is not None:
                key = "fid" if config.is_digits else "sw2"
                ax.set_title(f"{solver} (NFE {int(metrics['nfe'])})\n{key} {metrics[key]:.3g}", fontsize=7)
            else:
                ax.set_title("data (train)" if config.is_digits else "data (test)", fontsize=7)
            if j == 0:
                ax.set_ylabel(row.label, fontsize=9)
    fig.suptitle(f"{config.data_name}: samples per solver ({config.train.max_steps} training steps)", fontsize=10)
    fig.tight_layout()
    path = out / "samples.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_schedules_figure(
    config: CompareConfig,
    rows: list[PathResult],
    paths: dict[str, GaussianPath],
    lam: SeparationFunction,
    ko_lam: SeparationFunction | None,
    out: Path,
) -> Path:
    """Draw lambda(theta) of the data (and of the KO callback), ``alpha_t`` and ``sigma_t`` of every row's final
    path; returns the file written."""
    plt = _pyplot()
    fig, (ax_l, ax_a, ax_s) = plt.subplots(1, 3, figsize=(14, 4))
    theta = torch.linspace(1e-3, math.pi / 2 - 1e-3, 400, dtype=torch.float64)
    ax_l.plot(theta, lam.at_theta(theta).cpu(), label="lambda of the training data (KE column)")
    if ko_lam is not None:
        ax_l.plot(theta, ko_lam.at_theta(theta).cpu(), "--", label="lambda of the KO callback (last refresh)")
    ax_l.plot(theta, torch.sin(theta) ** 2, ":", color="0.5", label="Gaussian data: s^2 / (1 + s^2)")
    ax_l.set_xlabel("theta = atan(SNR)")
    ax_l.set_ylabel("lambda")
    ax_l.legend(fontsize=7)
    ax_l.set_title("data separation function")
    for row in rows:
        path = paths[row.name]
        t = torch.linspace(0.0, 1.0 - row.t_eps, 401)
        device = next(iter(path.buffers()), torch.empty(0)).device
        c = path(t.to(device))
        label = row.label + (" (final)" if row.name == "ko" else "")
        ax_a.plot(t, c.alpha.cpu(), label=label)
        ax_s.plot(t, c.sigma.cpu(), label=label)
    for ax, name in ((ax_a, "alpha_t"), (ax_s, "sigma_t")):
        ax.set_xlabel("t (0 noise, 1 data)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path_png = out / "schedules.png"
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    return path_png
