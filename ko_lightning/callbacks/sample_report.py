"""End-of-fit report: samples at several step counts, a picture and a metrics table in the run directory."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from typing_extensions import override

from ko_lightning.batches import batch_data
from ko_lightning.callbacks.protocol_check import require_protocol
from ko_lightning.callbacks.report_table import write_report_table
from ko_lightning.callbacks.run_dir import resolve_run_dir
from ko_lightning.metrics.distances import mmd_rbf, sliced_wasserstein
from ko_lightning.protocols import SamplingModule

__all__ = ["SampleReport"]


def _reference_samples(trainer: L.Trainer, n: int) -> Tensor | None:
    datamodule = getattr(trainer, "datamodule", None)  # set by Trainer.fit (None without a datamodule)
    if datamodule is None:
        return None
    try:
        loader = datamodule.test_dataloader()
    except Exception:  # noqa: BLE001 - a datamodule without a test split falls back to validation
        loader = datamodule.val_dataloader()
    chunks, count = [], 0
    for index, batch in enumerate(loader):
        x = batch_data(batch, f"SampleReport: reference batch {index}")
        chunks.append(x)
        count += x.shape[0]
        if count >= n:
            break
    return torch.cat(chunks)[:n].float() if chunks else None


class SampleReport(L.Callback):
    """After fit (weight averaging already applied), sample with Euler at several step counts and report.

    Writes ``samples.png`` (samples per step count beside reference data) and ``metrics.md`` (per step count:
    NFE, sliced Wasserstein-2 and MMD^2 (Gaussian kernels of widths 0.05, 0.1, 0.2, 0.5 in normalized units)
    against held-out data for 2D data, sampling time) into the run directory (the first logger's directory,
    ``trainer.log_dir``), and prints the table on rank 0. Without a logger it only prints the table. Sampling runs
    on rank 0 alone; the directory is resolved in ``setup`` on every rank, so no collective is left to rank 0.

    Args:
        num_samples: samples per setting.
        euler_steps: Euler step counts to report.
        seed: seed of the initial noise (the same noise for every setting).
    """

    def __init__(self, num_samples: int = 4000, euler_steps: Sequence[int] = (2, 8, 32, 100), seed: int = 0) -> None:
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples}")
        if not euler_steps or any(int(s) < 1 for s in euler_steps):
            raise ValueError(f"euler_steps must be positive integers, got {euler_steps!r}")
        self.num_samples = int(num_samples)
        self.euler_steps = tuple(int(s) for s in euler_steps)
        self.seed = int(seed)
        self.rows: list[dict[str, Any]] = []
        self._run_dir: str | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_protocol(pl_module, SamplingModule, type(self).__name__)
        # Every rank runs setup: resolve the directory here, since trainer.log_dir is a collective that would hang
        # if called from rank 0 alone (on_fit_end below).
        self._run_dir = resolve_run_dir(trainer)

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = cast(SamplingModule, pl_module)  # checked in setup
        if module.data_shape is None:
            raise RuntimeError("SampleReport: the module has no data_shape (it saw no training batch)")
        run_dir = self._run_dir
        if run_dir is not None:
            os.makedirs(run_dir, exist_ok=True)
        reference = _reference_samples(trainer, self.num_samples)
        gen = torch.Generator().manual_seed(self.seed)
        x0 = torch.randn((self.num_samples, *module.data_shape), generator=gen)
        samples: dict[int, Tensor] = {}
        self.rows = []
        for steps in self.euler_steps:
            start = time.perf_counter()
            result = module.sample(x0=x0, method="euler", steps=steps)
            elapsed = time.perf_counter() - start
            x = result.samples.cpu()
            samples[steps] = x
            row: dict[str, Any] = {"solver": f"euler {steps}", "nfe": result.nfe, "seconds": elapsed}
            if reference is not None and x.ndim == 2 and x.shape[1] <= 3:
                gen_metric = torch.Generator().manual_seed(self.seed + 1)
                row["sliced_w2"] = float(sliced_wasserstein(x, reference, generator=gen_metric))
                sub = min(2000, x.shape[0], reference.shape[0])
                row["mmd2"] = float(mmd_rbf(x[:sub], reference[:sub], bandwidths=(0.05, 0.1, 0.2, 0.5)))
            self.rows.append(row)
        val_loss = trainer.callback_metrics.get("val/loss")
        self._write_table(run_dir, None if val_loss is None else float(val_loss), trainer.global_step)
        if run_dir is not None:
            self._write_picture(run_dir, trainer, samples, reference)

    def _write_table(self, run_dir: str | None, val_loss: float | None, step: int) -> None:
        preamble = [] if val_loss is None else [f"Final validation loss: {val_loss:.4f}"]
        write_report_table(self.rows, f"Samples after {step} training steps", preamble, run_dir, "metrics.md")

    def _write_picture(
        self, run_dir: str, trainer: L.Trainer, samples: dict[int, Tensor], reference: Tensor | None
    ) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        datamodule = getattr(trainer, "datamodule", None)
        panels = [(f"Euler {k} steps", v) for k, v in samples.items()]
        if reference is not None:
            panels.append(("held-out data", reference))
        first = panels[0][1]
        extent = None
        if first.ndim == 2 and first.shape[1] == 2:
            shown = reference if reference is not None else first
            if datamodule is not None and hasattr(datamodule, "denormalize"):
                shown = datamodule.denormalize(shown)
            lo, hi = float(shown.min()), float(shown.max())
            pad = 0.15 * (hi - lo)
            extent = [[lo - pad, hi + pad], [lo - pad, hi + pad]]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
        for ax, (title, x) in zip(axes[0], panels, strict=True):
            if first.ndim == 2 and first.shape[1] == 2:
                if datamodule is not None and hasattr(datamodule, "denormalize"):
                    x = datamodule.denormalize(x)
                ax.hist2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=100, range=extent, cmap="magma")
                ax.set_aspect("equal")
            else:
                ax.imshow(_image_grid(x[:64], datamodule), cmap="gray" if x.shape[1] == 1 else None)
            ax.set_title(title)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(os.path.join(run_dir, "samples.png"), dpi=90)
        plt.close(fig)


def _image_grid(x: Tensor, datamodule: Any) -> Any:
    """Tile image samples ``(N, C, H, W)`` into one array in [0, 1] for display."""
    if datamodule is not None and hasattr(datamodule, "to_display"):
        x = datamodule.to_display(x)
    else:
        x = (x.clamp(-1, 1) + 1) / 2
    if x.ndim == 2:  # flattened square images
        side = int(math.isqrt(x.shape[1]))
        x = x.reshape(-1, 1, side, side)
    n, c, h, w = x.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = x[i]
    grid = grid.clamp(0, 1).permute(1, 2, 0)
    return (grid[..., 0] if c == 1 else grid).numpy()
