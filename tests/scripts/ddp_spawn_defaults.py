"""A two-process ``ddp_spawn`` fit with every default of the callbacks on: KO refresh with its picture, a CSV
logger, the end-of-fit sample report and checkpoints. (Lightning's ``EMAWeightAveraging`` cannot be pickled for
``ddp_spawn`` at all, a limitation of Lightning 2.6 itself; EMA under DDP is covered by the recipe launches.)

Usage: ``python ddp_spawn_defaults.py OUT_DIR``. Writes ``OUT_DIR/result.json`` with what the main process saw.
"""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from ko_lightning import FlowMatching, KOScheduleCallback
from ko_lightning.callbacks import SampleReport
from ko_lightning.data import Toy2DDataModule
from ko_lightning.nets import TimeMLP


class DestroyProcessGroup(L.Callback):
    """Destroys the process group when a spawned rank finishes. Not a ko_lightning fix: plain Lightning ddp_spawn
    with a one-layer model aborted at interpreter exit in 3 of 6 runs here under ATEN_CPU_CAPABILITY=default
    ("terminate called without an active exception" in gloo's teardown), and in 0 of 8 with this callback."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(out_dir: str) -> None:
    dm = Toy2DDataModule("checkerboard", n_train=4096, n_val=256, n_test=256, batch_size=128, seed=0)
    model = FlowMatching(TimeMLP(dim=2, hidden=32, depth=2), train_seed=0)
    # every other setting at its default; periodic refreshes forced (the default skips them once lambda is precise)
    # so that the refresh collectives run in the middle of training too
    ko = KOScheduleCallback(every_n_steps=10, warmup_steps=10, target_standard_error=None)
    logger = CSVLogger(out_dir, name="spawn")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=25,
        default_root_dir=out_dir,
        logger=logger,
        callbacks=[ko, SampleReport(num_samples=500), DestroyProcessGroup()],
        val_check_interval=10,
        limit_val_batches=1,
        enable_progress_bar=False,
    )
    trainer.fit(model, dm)
    # ddp_spawn returns the trained weights to the main process, not the callbacks' state: read the files that the
    # spawned rank 0 wrote (the main process's own logger would pick a new version directory).
    runs = os.path.join(out_dir, "spawn")
    files = {version: sorted(os.listdir(os.path.join(runs, version))) for version in sorted(os.listdir(runs))}
    result = {"global_step": trainer.global_step, "files": files, "path": type(model.path).__name__}
    with open(os.path.join(out_dir, "result.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1])
