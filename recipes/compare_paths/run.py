"""Run a comparison: estimate lambda of the data, train and evaluate every path, write the results.

Every row is trained with the same seed, budget, data, noise and times per step (``FlowMatching(train_seed=seed)``:
common random numbers), so the rows differ only by the path (docs/math.md §6).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from ko_lightning.callbacks import KOScheduleCallback
from ko_lightning.data import DigitsDataModule, Toy2DDataModule
from ko_lightning.kinetic import SeparationFunction, default_theta_grid, estimate_separation_from_data
from ko_lightning.module import FlowMatching
from ko_lightning.paths import GaussianPath
from ko_lightning.progress import EpochProgressBar
from recipes.compare_paths.build import build_datamodule, build_model
from recipes.compare_paths.config import CompareConfig
from recipes.compare_paths.evaluate import PathResult, evaluate_path
from recipes.compare_paths.figures import save_samples_figure, save_schedules_figure
from recipes.compare_paths.report import hardware, ko_numbers, results_markdown, results_tables, write_json

__all__ = ["ComparisonResult", "ProgressLog", "run_comparison", "train_path"]

_LAMBDA_NOISE = 11  # offset of config.seed for the queries of the data's lambda estimate
_TRAINED_AS = {"cond_ot_angle": "cond_ot"}  # rows that sample another row's model on another grid


@dataclass
class ComparisonResult:
    """The outcome of :func:`run_comparison`.

    Attributes:
        rows: one :class:`PathResult` per path, in config order.
        out_dir: the run directory.
        markdown: the content of ``results.md``.
        tables: the markdown tables alone (what is printed).
        total_seconds: wall time of the whole comparison.
        files: name -> path of every file written.
    """

    rows: list[PathResult]
    out_dir: Path
    markdown: str
    tables: str
    total_seconds: float
    files: dict[str, Path]


class ProgressLog:
    """Prints ``[compare_paths  12.3s] message`` lines (elapsed time since creation) when verbose."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.verbose:
            print(f"[compare_paths {time.perf_counter() - self.start:7.1f}s] {message}", flush=True)


def train_path(
    config: CompareConfig, name: str, dm: Toy2DDataModule | DigitsDataModule, out: Path
) -> tuple[FlowMatching, KOScheduleCallback | None, float, int]:
    """Build and train the model of one row (with the KO callback for ``"ko"``).

    Returns:
        The trained model, the KO callback (None for the other paths), the training wall time in seconds and the
        number of optimizer steps taken.
    """
    model = build_model(config, name, tuple(dm.data_shape))
    ko_callback = KOScheduleCallback(**config.ko_settings(name)) if name in ("ko", "ko_paper") else None
    trainer = L.Trainer(
        max_steps=config.train.max_steps,
        accelerator=config.train.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=config.train.progress_bar,
        log_every_n_steps=config.train.log_every_n_steps,
        default_root_dir=str(out / "lightning" / name),
        # the package's bar: a run bounded by max_steps shows "Epoch N", not Lightning's "Epoch N/-2"
        callbacks=[c for c in (ko_callback, EpochProgressBar() if config.train.progress_bar else None) if c],
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, datamodule=dm)
    return model, ko_callback, time.perf_counter() - start, trainer.global_step


def run_comparison(config: CompareConfig, verbose: bool = True) -> ComparisonResult:
    """Train and evaluate every path of ``config``; write ``results.md``, ``results.json``, ``samples.png`` and
    ``schedules.png`` into ``config.out_dir()``.

    Args:
        config: a validated config (:func:`recipes.compare_paths.load_config`).
        verbose: print progress (per stage, with elapsed time) and the final tables.

    Returns:
        A :class:`ComparisonResult`.
    """
    log = ProgressLog(verbose)
    total_start = time.perf_counter()
    out = config.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        # Small networks on a shared CPU: one thread avoids thread hand-offs that cost more than the arithmetic.
        torch.set_num_threads(config.threads)
    try:
        dm = build_datamodule(config)
        log(
            f"data {config.data_name}: shape {tuple(dm.data_shape)}, train {dm.train_tensor().shape[0]}, "
            f"test {dm.test_tensor().shape[0]}"
        )

        start = time.perf_counter()
        lam_data = dm.train_tensor()[: config.eval.n_lambda_data]
        gen = torch.Generator().manual_seed(config.seed + _LAMBDA_NOISE)
        lam = estimate_separation_from_data(
            lam_data,
            theta=default_theta_grid(config.eval.n_theta),
            n_queries=config.eval.n_lambda_queries,
            generator=gen,
            smoothing=config.eval.lambda_smoothing,
        )
        log(f"lambda of {lam_data.shape[0]} training points estimated ({time.perf_counter() - start:.1f}s)")

        rows: list[PathResult] = []
        all_samples: dict[str, dict[str, Tensor]] = {}
        final_paths: dict[str, GaussianPath] = {}
        ko_lam: SeparationFunction | None = None
        weighting = str(config.loss_weighting)
        trained: dict[str, tuple[FlowMatching, KOScheduleCallback | None, float, int]] = {}
        for name in config.paths:
            source = _TRAINED_AS.get(name, name)  # a row sampled differently reuses its model (same seed, same run)
            if source not in trained:
                log(f"{source}: training {config.train.max_steps} steps (t_eps {config.t_eps_of(source):g})")
                trained[source] = train_path(config, source, dm, out)
            model, ko_callback, train_seconds, steps = trained[source]
            weighting = str(model.loss_weighting)
            start = time.perf_counter()
            row, samples = evaluate_path(config, name, model, dm, lam, log)
            row.train_seconds = train_seconds
            row.steps_per_second = steps / train_seconds
            row.eval_seconds = time.perf_counter() - start
            if ko_callback is not None:
                row.ko = ko_numbers(ko_callback)
                ko_lam = ko_callback.separation
            rows.append(row)
            all_samples[name] = samples
            final_paths[name] = model.path
            log(f"{name}: done (train {row.train_seconds:.1f}s, eval {row.eval_seconds:.1f}s)")

        total_seconds = time.perf_counter() - total_start
        files = {
            "samples.png": save_samples_figure(config, dm, rows, all_samples, out),
            "schedules.png": save_schedules_figure(config, rows, final_paths, lam, ko_lam, out),
        }
        tables = results_tables(config, rows)
        hardware_info = hardware(config)
        lam_points = int(lam_data.shape[0])
        markdown = results_markdown(config, rows, tables, total_seconds, lam_points, weighting, hardware_info)
        files["results.md"] = out / "results.md"
        files["results.md"].write_text(markdown)
        files["results.json"] = write_json(out / "results.json", config, rows, hardware_info, total_seconds, lam_points)
        if verbose:
            print(tables, flush=True)
            log(f"wrote {', '.join(str(p) for p in files.values())}")
        return ComparisonResult(rows, out, markdown, tables, total_seconds, files)
    finally:
        torch.set_num_threads(previous_threads)
