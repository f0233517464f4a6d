"""Jobs run by every rank of one ``torchrun --nproc_per_node 2`` launch (gloo on the CPU).

Usage: ``torchrun --standalone --nproc_per_node 2 ddp_torchrun_jobs.py OUT_DIR JOB [JOB ...]`` where a job is

- ``config:PATH``: ``ko-lightning fit --config PATH`` through the CLI's own entry function, every default on;
- ``fail:solve``: a KO refresh whose solve raises on rank 0 (the other rank must not wait for ever);
- ``fail:estimate``: a KO refresh whose estimate raises on rank 1 only.

Each rank writes ``OUT_DIR/rank<r>.json``: per job, whether it finished, the error it raised, the global step, and a
digest of the installed path's buffers (equal digests on both ranks mean bit-identical paths).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

import lightning as L
import torch

from ko_lightning import FlowMatching, KOScheduleCallback
from ko_lightning.callbacks import RefreshOutcome
from ko_lightning.cli import run_cli
from ko_lightning.data import Toy2DDataModule
from ko_lightning.nets import TimeMLP


class FailingKO(KOScheduleCallback):
    """Raises inside the refresh's rank-local work: in the solve on rank 0, or in the estimate on rank 1."""

    def __init__(self, where: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.where = where
        self.rank = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.rank = trainer.global_rank

    def _solve(self, sums: Any, old_path: Any) -> RefreshOutcome:
        if self.where == "solve" and self.refresh_count >= 1:
            raise ZeroDivisionError("planted failure in the solve")
        return super()._solve(sums, old_path)

    def local_sums(self, pl_module: Any, estimator: str, refresh_index: int, rank: int, world_size: int) -> Any:
        if self.where == "estimate" and refresh_index >= 1 and self.rank == 1:
            raise MemoryError("planted failure in the estimate on rank 1")
        return super().local_sums(pl_module, estimator, refresh_index, rank, world_size)


def path_digest(model: FlowMatching) -> str:
    digest = hashlib.sha256()
    for tensor in model.path.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def failing_fit(where: str, out_dir: str) -> tuple[L.Trainer, FlowMatching]:
    dm = Toy2DDataModule("checkerboard", n_train=2048, n_val=256, n_test=256, batch_size=128, seed=0)
    model = FlowMatching(TimeMLP(dim=2, hidden=32, depth=2), train_seed=0)
    ko = FailingKO(where, every_n_steps=3, warmup_steps=3, n_queries=64, n_theta=16, max_data=512)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=8,
        default_root_dir=out_dir,
        logger=L.pytorch.loggers.CSVLogger(out_dir, name=f"fail_{where}"),
        callbacks=[ko],
        enable_progress_bar=False,
        limit_val_batches=1,
    )
    trainer.fit(model, dm)
    return trainer, model


def main(out_dir: str, jobs: list[str]) -> None:
    rank = int(os.environ["RANK"])
    records = []
    for job in jobs:
        kind, _, arg = job.partition(":")
        record: dict[str, Any] = {"job": job, "finished": False, "error": None}
        try:
            if kind == "config":
                cli = run_cli(["fit", "--config", arg])
                trainer, model = cli.trainer, cli.model
            else:
                trainer, model = failing_fit(arg, out_dir)
            record.update(
                finished=True,
                global_step=trainer.global_step,
                path=path_digest(model),
                refreshes=[
                    r.step for cb in trainer.callbacks if isinstance(cb, KOScheduleCallback) for r in cb.reports
                ],
            )
        except Exception as err:  # noqa: BLE001 - recorded for the test to check
            record["error"] = f"{type(err).__name__}: {err}"
        records.append(record)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(records, fh, indent=1)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
