"""End-of-fit report: samples at several step counts, a picture and a metrics table in the run directory."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
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
from ko_lightning.metrics.images import display_images, display_tiles
from ko_lightning.protocols import SamplingModule

__all__ = ["SampleReport", "plan_report"]


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


def plan_report(
    num_samples: int, euler_steps: tuple[int, ...], per_step: float, budget: float, min_samples: int = 16
) -> tuple[int, tuple[int, ...]]:
    """Shrink a report of ``num_samples x euler_steps`` to cost at most ``budget`` seconds.

    The cost is modelled as linear in the samples: ``cost(n, S) = per_step x (n / num_samples) x sum(S)``, where
    ``per_step`` is one Euler step on all ``num_samples``. First ``n = floor(num_samples x budget / cost(N, S))``
    (at least ``min(min_samples, num_samples)``); then, while still over, the largest step count is dropped (the
    smallest always stays).

    Args:
        num_samples: the configured sample count ``N``.
        euler_steps: the configured Euler step counts ``S``.
        per_step: seconds of one Euler step on ``num_samples`` samples.
        budget: seconds the report may take.
        min_samples: the sample count never shrinks below this (or ``num_samples`` if smaller).

    Returns:
        ``(n, steps)``: the sample count and the step counts (in their order) to report.
    """

    def cost(n: int, steps: Sequence[int]) -> float:
        return per_step * n / num_samples * sum(steps)

    if cost(num_samples, euler_steps) <= budget:
        return num_samples, euler_steps
    n = max(min(min_samples, num_samples), int(num_samples * budget / cost(num_samples, euler_steps)))
    kept = sorted(euler_steps)
    while len(kept) > 1 and cost(n, kept) > budget:
        kept.pop()
    return n, tuple(s for s in euler_steps if s in kept)


@contextlib.contextmanager
def _progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over ``total`` Euler steps; yields ``advance(k)`` (a console without a terminal gets
    no live bar, only the table printed after)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"))
    with Progress(*columns, TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda k: bar.advance(task, k)


class SampleReport(L.Callback):
    """After fit (weight averaging already applied), sample with Euler at several step counts and report.

    Writes ``samples.png`` (samples per step count beside reference data) and ``metrics.md`` (per step count:
    NFE, sliced Wasserstein-2 and MMD^2 (Gaussian kernels of widths 0.05, 0.1, 0.2, 0.5 in normalized units)
    against held-out data for 2D data, sampling time) into the run directory (the first logger's directory,
    ``trainer.log_dir``), and prints the table on rank 0. Without a logger it only prints the table. Sampling runs
    on rank 0 alone; the directory is resolved in ``setup`` on every rank, so no collective is left to rank 0.

    The report's cost follows the run: it costs ``num_samples x sum(euler_steps)`` sample-steps, and one Euler step
    on all ``num_samples`` is timed first (``c`` seconds). When ``c x sum(euler_steps)`` exceeds the budget
    ``max(min_seconds, time_budget x T_train)`` (``T_train``: this fit's training wall time), the sample count
    shrinks in proportion (to at least 16) and then the largest step counts are dropped (the smallest always
    stays); what was cut is printed. A progress bar shows the step counts as they finish. From the command line
    the report is ``--report.*``: ``--report.num_samples 64``, ``--report.euler_steps '[4, 16]'``,
    ``--report.time_budget null`` (no cap), or ``--report null`` (no report).

    Args:
        num_samples: samples per setting (before the budget).
        euler_steps: Euler step counts to report (before the budget).
        seed: seed of the initial noise (the same noise for every setting).
        time_budget: the report may take this multiple of the training time (None: no cap, always the full report).
        min_seconds: the budget is never below this many seconds (short runs keep a useful report).
    """

    def __init__(
        self,
        num_samples: int = 4000,
        euler_steps: Sequence[int] = (2, 8, 32, 100),
        seed: int = 0,
        time_budget: float | None = 1.0,
        min_seconds: float = 30.0,
    ) -> None:
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples}")
        if not euler_steps or any(int(s) < 1 for s in euler_steps):
            raise ValueError(f"euler_steps must be positive integers, got {euler_steps!r}")
        if time_budget is not None and not time_budget > 0:
            raise ValueError(f"time_budget must be > 0 or None, got {time_budget!r}")
        if not min_seconds >= 0:
            raise ValueError(f"min_seconds must be >= 0, got {min_seconds!r}")
        self.num_samples = int(num_samples)
        self.euler_steps = tuple(int(s) for s in euler_steps)
        self.seed = int(seed)
        self.time_budget, self.min_seconds = time_budget, float(min_seconds)
        self.rows: list[dict[str, Any]] = []
        self._run_dir: str | None = None
        self._train_start: float | None = None
        self.train_seconds: float | None = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_start = time.perf_counter()

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train_start is not None:
            self.train_seconds = time.perf_counter() - self._train_start

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
        gen = torch.Generator().manual_seed(self.seed)
        x0 = torch.randn((self.num_samples, *module.data_shape), generator=gen)
        num_samples, euler_steps = self._within_budget(module, x0)
        x0 = x0[:num_samples]
        reference = _reference_samples(trainer, num_samples)
        samples: dict[int, Tensor] = {}
        self.rows = []
        with _progress(sum(euler_steps), f"SampleReport: {num_samples} samples") as advance:
            for steps in euler_steps:
                start = time.perf_counter()
                result = module.sample(x0=x0, method="euler", steps=steps)
                elapsed = time.perf_counter() - start
                advance(steps)
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

    def _within_budget(self, module: SamplingModule, x0: Tensor) -> tuple[int, tuple[int, ...]]:
        """The sample count and step counts that fit the budget (class docstring), printing what was cut."""
        if self.time_budget is None or self.train_seconds is None:
            return self.num_samples, self.euler_steps
        budget = max(self.min_seconds, self.time_budget * self.train_seconds)
        start = time.perf_counter()
        module.sample(x0=x0, method="euler", steps=1)  # one Euler step on every sample: c seconds
        per_step = time.perf_counter() - start
        num_samples, euler_steps = plan_report(self.num_samples, self.euler_steps, per_step, budget)
        if (num_samples, euler_steps) != (self.num_samples, self.euler_steps):
            print(
                f"SampleReport: the full report ({self.num_samples} samples x Euler {list(self.euler_steps)}, about "
                f"{per_step * sum(self.euler_steps):.0f} s) exceeds its budget of {budget:.0f} s (time_budget="
                f"{self.time_budget} x {self.train_seconds:.0f} s of training, at least min_seconds="
                f"{self.min_seconds:.0f}); reporting {num_samples} samples x Euler {list(euler_steps)}. Set "
                "--report.num_samples / --report.euler_steps, or --report.time_budget null for the full report."
            )
        return num_samples, euler_steps

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
                tiles = display_tiles(display_images(x[:64], datamodule, (-1.0, 1.0)))
                ax.imshow(tiles, cmap="gray" if tiles.ndim == 2 else None)
            ax.set_title(title)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(os.path.join(run_dir, "samples.png"), dpi=90)
        plt.close(fig)
