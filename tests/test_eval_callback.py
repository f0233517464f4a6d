"""EvalCallback (docs/scale.md §4): the sample split and seeds as pure functions, the logged FID against
compute_fid_kid on the same samples, the EMA weights being the ones sampled, the grid image's pixels, and one
two-process DDP run (this file run as a script) with the defaults and a logger.

Offline and CPU-only: the digits classifier is the feature extractor (trained once into a temporary cache).
"""

from __future__ import annotations

import copy
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from launching import launch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor

from ko_lightning import FlowMatching
from ko_lightning.callbacks import EvalCallback
from ko_lightning.callbacks.eval_samples import (
    NOISE_BLOCK,
    eval_labels,
    eval_noise,
    rank_share,
    reference_images,
)
from ko_lightning.data import DigitsDataModule
from ko_lightning.metrics import load_digits_classifier
from ko_lightning.metrics.fid import compute_fid_kid, to_uint8_images
from ko_lightning.metrics.images import display_images, tile_images
from ko_lightning.nets import UNet
from ko_lightning.seeding import derive_seed

DDP_TIMEOUT_S = 240


def _net() -> UNet:
    return UNet(base_channels=8, channel_mults=[1], num_res_blocks=1, attention_resolutions=[], groups=4)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits classifier, trained once for this module (1-7 s), outside the user's cache."""
    root = tmp_path_factory.mktemp("eval_cache")
    load_digits_classifier(cache_dir=root)
    return root


# ------------------------------------------------------------------------------------------ pure functions
@pytest.mark.parametrize("num_samples", [2, 10, 257, 700])
def test_the_split_across_ranks_gives_the_set_one_rank_draws(num_samples: int) -> None:
    shape = (1, 2, 2)
    whole = eval_noise(0, num_samples, shape, seed=5, step=30)
    labels = eval_labels(0, num_samples, 10, "uniform", seed=5, step=30)
    for world in (1, 2, 3, 4):
        shares = [rank_share(num_samples, world, r) for r in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == num_samples
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:], strict=False))  # contiguous, in rank order
        sizes = [stop - start for start, stop in shares]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == num_samples
        assert torch.equal(torch.cat([eval_noise(a, b, shape, 5, 30) for a, b in shares]), whole)
        assert torch.equal(torch.cat([eval_labels(a, b, 10, "uniform", 5, 30) for a, b in shares]), labels)
    # Block 0 is a plain draw from its derived seed; another step or seed draws other noise.
    first = torch.randn((NOISE_BLOCK, *shape), generator=torch.Generator().manual_seed(derive_seed(5, 30, 0, 0)))
    assert torch.equal(whole, first[:num_samples]) if num_samples <= NOISE_BLOCK else torch.equal(whole[:256], first)
    assert not torch.equal(eval_noise(0, num_samples, shape, 5, 31), whole)
    start = num_samples // 3
    balanced = eval_labels(start, num_samples, 10, "balanced", 5, 30)
    assert balanced.tolist() == [i % 10 for i in range(start, num_samples)]


def test_image_grid_places_image_i_at_row_i_div_cols_and_column_i_mod_cols() -> None:
    images = torch.randint(0, 255, (7, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    grid = tile_images(images)  # ceil(sqrt(7)) = 3 columns, 3 rows, 1-pixel borders of 255
    assert grid.shape == (3, 3 * 5 + 1, 3 * 6 + 1) and grid.dtype == torch.uint8
    covered = torch.zeros(grid.shape[1:], dtype=torch.bool)
    for i in range(7):
        top, left = 1 + (i // 3) * 5, 1 + (i % 3) * 6
        assert torch.equal(grid[:, top : top + 4, left : left + 5], images[i])
        covered[top : top + 4, left : left + 5] = True
    assert bool((grid[:, ~covered] == 255).all())


# ------------------------------------------------------------------------------------------ in training
class _RawWeights(L.Callback):
    """Keeps a copy of the module's (raw, not averaged) weights at every training step, after EvalCallback ran."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, Tensor]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def test_logged_fid_and_grid_are_those_of_the_ema_samples(tmp_path: Path, cache_dir: Path, one_thread: None) -> None:
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=32)
    model = FlowMatching(_net(), train_seed=0)
    ema = EMAWeightAveraging(decay=0.5)
    n, steps, grid_size = 64, 4, 10
    evaluation = EvalCallback(
        every_n_steps=3, num_samples=n, steps=steps, batch_size=n, cache_dir=cache_dir, cuda=False,
        kid_subset_size=50, kid_subsets=5, grid_size=grid_size, seed=7,
    )  # fmt: skip
    raw = _RawWeights()
    trainer = L.Trainer(
        max_steps=3, logger=CSVLogger(tmp_path), callbacks=[ema, evaluation, raw], accelerator="cpu",
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, dm)
    assert [row["step"] for row in evaluation.rows] == [3] and evaluation.rows[0]["ema"] is True

    # The same noise through the EMA copy itself (what EMAWeightAveraging holds), then FID/KID separately.
    x0 = eval_noise(0, n, (1, 8, 8), seed=7, step=3)
    average = ema._average_model.module  # type: ignore[union-attr]
    samples = average.sample(x0=x0, method="euler", steps=steps).samples
    images = display_images(samples, dm, (-1.0, 1.0))
    reference = reference_images(dm, "test", (-1.0, 1.0), None)
    expected = compute_fid_kid(images, reference, cache_dir=cache_dir, kid_subset_size=50, kid_subsets=5, cuda=False)
    result = evaluation.last_result
    assert result is not None and result.n_generated == n and result.n_reference == reference.shape[0]
    # Same weights, noise and kernels in one process: the same uint8 images, so the float64 FID/KID agree to
    # round-off of the 64-dim covariance square root (relative 1e-9 leaves room for its iterative solver).
    assert result.fid == pytest.approx(expected.fid, rel=1e-9)
    assert result.kid_mean == pytest.approx(expected.kid_mean, rel=1e-9, abs=1e-12)

    # Logged at step 3, to the logger (metrics.csv) and to callback_metrics.
    run_dir = Path(trainer.log_dir)  # type: ignore[arg-type]
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("eval/fid")]
    assert len(rows) == 1 and int(rows[0]["step"]) == 3
    assert float(rows[0]["eval/fid"]) == pytest.approx(result.fid, rel=1e-12)
    assert float(rows[0]["eval/num_samples"]) == n
    assert 0 < float(rows[0]["eval/seconds"]) and 0 < float(rows[0]["eval/time_fraction"]) <= 1
    assert float(trainer.callback_metrics["eval/fid"]) == pytest.approx(result.fid, rel=1e-6)

    # The grid: the first grid_size EMA samples, pixel for pixel in the PNG; the raw weights would differ.
    grid = tile_images(to_uint8_images(images[:grid_size]))
    assert evaluation.last_grid is not None and torch.equal(evaluation.last_grid, grid)
    from PIL import Image

    png = np.asarray(Image.open(run_dir / "eval_step3.png"))
    assert png.shape == tuple(grid.shape[1:]) and np.array_equal(png, grid[0].numpy())
    raw_model = FlowMatching(_net(), data_shape=(1, 8, 8))
    raw_model.load_state_dict(raw.states[3])
    raw_samples = raw_model.sample(x0=x0, method="euler", steps=steps).samples
    assert not torch.equal(tile_images(to_uint8_images(display_images(raw_samples[:grid_size], dm, (-1, 1)))), grid)
    assert "| 3 |" in (run_dir / "eval.md").read_text()


def test_bad_arguments_are_named() -> None:
    for kwargs, match in [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"num_samples": 1}, "num_samples"),
        ({"labels": "random"}, "labels"),
        ({"reference": "holdout"}, "reference"),
        ({"reference": None}, "reference_name"),
    ]:
        with pytest.raises(ValueError, match=match):
            EvalCallback(**kwargs)


# ------------------------------------------------------------------------------------------ two processes
def test_two_ddp_ranks_gather_every_sample_and_do_not_hang(tmp_path: Path, cache_dir: Path) -> None:
    """Lightning's subprocess DDP launcher (two gloo ranks) on this file as a script: EMA, a CSV logger, the callback
    at its defaults but the size (num_samples 100, split 50/50, and 8 Euler steps)."""
    done = launch([sys.executable, __file__, str(tmp_path), str(cache_dir)], tmp_path, timeout_s=DDP_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["n_generated"] == 100 and result["steps"] == [4, 8]
    files = set(result["files"])
    assert {"eval_step4.png", "eval_step8.png", "eval.md", "metrics.csv"} <= files
    assert result["logged_num_samples"] == [100.0, 100.0]


def _ddp_main(out_dir: str, cache_dir: str) -> None:
    """The two-rank run of the test above (Lightning re-launches this script for rank 1)."""
    torch.set_num_threads(1)
    dm = DigitsDataModule(batch_size=16)
    model = FlowMatching(_net(), train_seed=0)
    evaluation = EvalCallback(every_n_steps=4, num_samples=100, steps=8, cache_dir=cache_dir, cuda=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=CSVLogger(out_dir, name="ddp"),
        callbacks=[EMAWeightAveraging(decay=0.9), evaluation], enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, dm)
    if trainer.global_rank == 0:
        run_dir = os.path.join(out_dir, "ddp", "version_0")
        with open(os.path.join(run_dir, "metrics.csv")) as fh:
            logged = [float(r["eval/num_samples"]) for r in csv.DictReader(fh) if r.get("eval/num_samples")]
        result = {
            "world_size": trainer.world_size,
            "n_generated": evaluation.last_result.n_generated if evaluation.last_result else None,
            "steps": [row["step"] for row in evaluation.rows],
            "files": sorted(os.listdir(run_dir)),
            "logged_num_samples": logged,
        }
        with open(os.path.join(out_dir, "result.json"), "w") as fh:
            json.dump(result, fh)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _ddp_main(sys.argv[1], sys.argv[2])
