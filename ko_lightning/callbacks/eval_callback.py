"""In-training evaluation: every N steps, sample with the EMA weights on all ranks, FID/KID, a sample grid, the cost."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from ko_lightning.callbacks.eval_samples import (
    LabelMode,
    averaged_weights,
    eval_labels,
    eval_noise,
    rank_share,
    reference_images,
)
from ko_lightning.callbacks.protocol_check import require_protocol
from ko_lightning.callbacks.report_table import write_report_table
from ko_lightning.callbacks.run_dir import resolve_run_dir
from ko_lightning.conditioning import Conditioning
from ko_lightning.metrics.digits_features import DIGITS_EXTRACTOR_NAME
from ko_lightning.metrics.distributed import all_gather_samples
from ko_lightning.metrics.fid import FidKidResult, compute_fid_kid
from ko_lightning.metrics.images import display_images, tile_images, to_uint8_images
from ko_lightning.protocols import SamplingModule

__all__ = ["EvalCallback"]

_SPLITS = ("train", "val", "test")


class EvalCallback(L.Callback):
    """Every ``every_n_steps`` training steps: sample, score with FID/KID, log the numbers, a grid and the cost.

    What one evaluation does (docs/scale.md §4), on every rank alike (no rank-0-only collective):

    1. ``num_samples`` samples are split across the ``W`` ranks (:func:`~.eval_samples.rank_share`); sample ``i``
       starts from noise seeded by ``(seed, step, i)`` (:func:`~.eval_samples.eval_noise`), so the gathered set does
       not depend on ``W``. Class-conditional models get labels ``i mod K`` (``labels="balanced"``) or uniform
       draws, sampled at ``guidance_scale``.
    2. With a Lightning ``WeightAveraging``/``EMAWeightAveraging`` callback, the averaged weights are swapped into
       the module for the sampling and swapped back after (:func:`~.eval_samples.averaged_weights`); list this
       callback *after* the EMA callback, or the average misses the current step's update.
    3. :func:`~ko_lightning.metrics.fid.compute_fid_kid` with ``gather_across_ranks=True``: FID/KID of all
       ``num_samples`` (8-bit images, ``datamodule.to_display``) against the reference, rank 0's numbers on all ranks.
    4. Logged to every logger at the step: ``eval/fid``, ``eval/kid_mean``, ``eval/kid_std``, ``eval/num_samples``,
       ``eval/seconds`` (this evaluation's wall time), ``eval/time_fraction`` (evaluation time / training wall time
       so far); also put in ``trainer.callback_metrics`` (e.g. for ``ModelCheckpoint(monitor="eval/fid")``).
    5. The first ``grid_size`` samples as a grid (:func:`~ko_lightning.metrics.images.tile_images`):
       ``add_image("eval/samples")`` on a TensorBoard logger, else ``eval_step{N}.png`` in the run directory, also
       passed to any logger with ``log_image``. At the end of fit ``eval.md`` in the run directory lists every
       evaluation and its cost.

    Args:
        every_n_steps: evaluate when ``global_step`` is a multiple of this (after the optimizer step).
        num_samples: samples per evaluation, all ranks together.
        method: ODE solver of ``model.sample`` (e.g. ``"euler"``, ``"heun"``, ``"dopri5"``).
        steps: its step count (None: the solver's default).
        batch_size: samples per ``model.sample`` call on one rank.
        guidance_scale: classifier-free guidance of class-conditional models (None: 1, the conditional model).
        labels: ``"balanced"`` or ``"uniform"`` class labels.
        reference: ``"train"``, ``"val"`` or ``"test"`` (that split of the datamodule, through ``to_display``), a
            tensor of reference images (uint8, or float in ``[0, 1]``), or None to use the cached statistics of
            ``reference_name`` (:mod:`~ko_lightning.metrics.fid_cache`).
        reference_name: cache name of the reference statistics (computed once, then reused).
        max_reference: use at most this many reference images of a split (None: all).
        feature_extractor: ``"digits-classifier"`` or ``"inception-v3-compat"``.
        feature_layer, weights_path, weights_sha256, cache_dir, kid_subsets, cuda: passed to ``compute_fid_kid``.
        kid: also compute KID.
        kid_subset_size: KID subset size (None: ``min(1000, num_samples, reference size)``).
        value_range: ``(lo, hi)`` of model-space samples, used only when the datamodule has no ``to_display``.
        grid_size: samples in the logged grid (0: none).
        seed: base seed of the noise and labels.

    Raises:
        ValueError: naming the argument (at construction), or at setup for a model that is not image-shaped or has
            float conditions, or a split the datamodule lacks.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 10000,
        method: str = "euler",
        steps: int | None = 32,
        batch_size: int = 500,
        guidance_scale: float | None = None,
        labels: LabelMode = "balanced",
        reference: str | Tensor | None = "test",
        reference_name: str | None = None,
        max_reference: int | None = None,
        feature_extractor: str = DIGITS_EXTRACTOR_NAME,
        feature_layer: str | None = None,
        weights_path: str | Path | None = None,
        weights_sha256: str | None = None,
        cache_dir: str | Path | None = None,
        kid: bool = True,
        kid_subset_size: int | None = None,
        kid_subsets: int = 100,
        value_range: tuple[float, float] = (-1.0, 1.0),
        grid_size: int = 64,
        seed: int = 0,
        cuda: bool | None = None,
    ) -> None:
        for name, value, low in (
            ("every_n_steps", every_n_steps, 1),
            ("num_samples", num_samples, 2),
            ("batch_size", batch_size, 1),
            ("grid_size", grid_size, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if labels not in ("balanced", "uniform"):
            raise ValueError(f"labels must be 'balanced' or 'uniform', got {labels!r}")
        if isinstance(reference, str) and reference not in _SPLITS:
            raise ValueError(f"reference must be one of {_SPLITS}, a tensor of images or None, got {reference!r}")
        if reference is None and reference_name is None:
            raise ValueError("reference=None needs a reference_name (cached reference statistics)")
        self.every_n_steps, self.num_samples, self.batch_size = every_n_steps, num_samples, batch_size
        self.method, self.steps, self.guidance_scale, self.labels = method, steps, guidance_scale, labels
        self.reference, self.max_reference, self.grid_size, self.seed = reference, max_reference, grid_size, seed
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.kid, self.kid_subset_size = kid, kid_subset_size
        self.fid_kwargs: dict[str, Any] = dict(
            feature_extractor=feature_extractor,
            feature_layer=feature_layer,
            weights_path=weights_path,
            weights_sha256=weights_sha256,
            cache_dir=cache_dir,
            reference_name=reference_name,
            kid_subsets=kid_subsets,
            cuda=cuda,
        )
        self.rows: list[dict[str, Any]] = []
        self.last_result: FidKidResult | None = None
        self.last_grid: Tensor | None = None
        self._run_dir: str | None = None
        self._reference: Tensor | None = None
        self._train_start = 0.0
        self._eval_seconds = 0.0
        self._last_step = -1

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_protocol(pl_module, SamplingModule, type(self).__name__)
        conditioning = getattr(pl_module, "conditioning", None)
        if isinstance(conditioning, Conditioning) and conditioning.cond_dim is not None:
            raise ValueError(
                "EvalCallback draws class labels; a model with float conditions (cond_dim) is not supported"
            )
        self._run_dir = resolve_run_dir(trainer)  # every rank: trainer.log_dir is a collective
        averaging = [i for i, c in enumerate(trainer.callbacks) if isinstance(c, WeightAveraging)]  # type: ignore[attr-defined]
        if averaging and trainer.callbacks.index(self) < averaging[0]:  # type: ignore[attr-defined]
            rank_zero_warn(
                "EvalCallback is listed before the weight-averaging callback: it samples the average of the "
                "previous step; list it after"
            )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_start, self._eval_seconds = time.perf_counter(), 0.0
        if isinstance(self.reference, str):
            datamodule = getattr(trainer, "datamodule", None)
            self._reference = reference_images(datamodule, self.reference, self.value_range, self.max_reference)
        elif isinstance(self.reference, Tensor):
            self._reference = to_uint8_images(self.reference, "reference")

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:  # once per step (accumulation)
            self._last_step = step
            self.evaluate(trainer, pl_module)

    def sample_share(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Tensor:
        """This rank's samples (model space, on the CPU), from the weights currently in ``pl_module``."""
        module = cast(Any, pl_module)
        if module.data_shape is None or len(module.data_shape) != 3:
            raise ValueError(
                f"EvalCallback needs image samples (C, H, W); the model's data_shape is {module.data_shape}"
            )
        start, stop = rank_share(self.num_samples, trainer.world_size, trainer.global_rank)
        conditioning = getattr(module, "conditioning", None)
        classes = conditioning.num_classes if isinstance(conditioning, Conditioning) else None
        out = []
        for lo in range(start, stop, self.batch_size):
            hi = min(stop, lo + self.batch_size)
            x0 = eval_noise(lo, hi, tuple(module.data_shape), self.seed, step).to(pl_module.device)
            kwargs: dict[str, Any] = {}
            if classes is not None:
                kwargs["cond"] = eval_labels(lo, hi, classes, self.labels, self.seed, step).to(pl_module.device)
                kwargs["guidance_scale"] = self.guidance_scale
            with torch.no_grad():
                out.append(module.sample(x0=x0, method=self.method, steps=self.steps, **kwargs).samples.cpu())
        return torch.cat(out) if out else torch.empty((0, *module.data_shape))

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> FidKidResult:
        """One evaluation at the current step (all ranks must call it); logs and returns the metrics."""
        step, start_time = trainer.global_step, time.perf_counter()
        with averaged_weights(trainer, pl_module) as averaged:
            samples = self.sample_share(trainer, pl_module, step)
        datamodule = getattr(trainer, "datamodule", None)
        images = display_images(samples, datamodule, self.value_range)
        kid_size = self.kid_subset_size or min(
            1000, self.num_samples, *(() if self._reference is None else (self._reference.shape[0],))
        )
        try:  # compute_fid_kid raises on every rank together (invalid samples on one rank, a failure on one)
            result = compute_fid_kid(
                images,
                self._reference,
                value_range=(0.0, 1.0),
                kid=self.kid,
                kid_subset_size=kid_size,
                gather_across_ranks=True,
                **self.fid_kwargs,
            )
        except (ValueError, RuntimeError) as exc:
            raise RuntimeError(f"EvalCallback at step {step}: {exc}") from exc
        grid = self._gather_grid(trainer, images) if self.grid_size else None
        seconds = time.perf_counter() - start_time
        self._eval_seconds += seconds
        fraction = self._eval_seconds / max(time.perf_counter() - self._train_start, 1e-9)
        metrics = {f"eval/{k}": v for k, v in result.metrics().items()}
        metrics.update(
            {"eval/num_samples": float(result.n_generated), "eval/seconds": seconds, "eval/time_fraction": fraction}
        )
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)  # loggers write on rank 0 only
        self.last_result, self.last_grid = result, grid
        self.rows.append({"step": step, **{k[5:]: v for k, v in metrics.items()}, "ema": averaged})
        if grid is not None:
            self._log_grid(trainer, grid, step)
        return result

    def _gather_grid(self, trainer: L.Trainer, images: Tensor) -> Tensor:
        """The grid of the first ``grid_size`` samples: each rank sends its rows among them (a collective)."""
        start, _ = rank_share(self.num_samples, trainer.world_size, trainer.global_rank)
        mine = images[: max(0, self.grid_size - start)]
        local = to_uint8_images(mine, "samples") if mine.shape[0] else torch.empty(mine.shape, dtype=torch.uint8)
        return tile_images(all_gather_samples(local))

    @rank_zero_only
    def _log_grid(self, trainer: L.Trainer, grid: Tensor, step: int) -> None:
        """The grid to TensorBoard when active, else a PNG in the run directory (and to loggers with ``log_image``)."""
        tensorboard = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        for logger in tensorboard:
            logger.experiment.add_image("eval/samples", grid, global_step=step)
        if tensorboard or self._run_dir is None:
            return
        from PIL import Image

        os.makedirs(self._run_dir, exist_ok=True)
        path = os.path.join(self._run_dir, f"eval_step{step}.png")
        array = grid.permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)
        for other in trainer.loggers:
            if hasattr(other, "log_image"):  # e.g. WandbLogger
                other.log_image(key="eval/samples", images=[path], step=step)

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.rows:
            return
        if self._run_dir is not None:
            os.makedirs(self._run_dir, exist_ok=True)
        total = sum(float(r["seconds"]) for r in self.rows)
        preamble = [
            f"{len(self.rows)} evaluation(s) of {self.num_samples} samples ({self.method}, steps={self.steps}) over "
            f"{trainer.world_size} rank(s): {total:.1f} s in all, {total / len(self.rows):.2f} s each, "
            f"{100 * self.rows[-1]['time_fraction']:.1f}% of the training wall time"
        ]
        write_report_table(self.rows, "In-training evaluation", preamble, self._run_dir, "eval.md")
