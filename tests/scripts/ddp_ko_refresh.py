"""Two-process CPU DDP run of KOScheduleCallback; each rank records what every refresh installed.

Run as ``python ddp_ko_refresh.py OUT_DIR [conditional]`` (Lightning starts the second rank itself). Each rank holds
its shard of the data; rank 0 also computes, before each refresh, the sums a single process gets over the union of
both shards with the union of both ranks' query shares (docs/scale.md §2). With
``conditional``: a class-conditional model on labelled eight Gaussians (condition dropout, the conditional lambda).
"""

from __future__ import annotations

import sys

import lightning as L
import torch

from ko_lightning import FlowMatching, KOScheduleCallback
from ko_lightning.callbacks.ko_data import _model_sums
from ko_lightning.data import Toy2DDataModule
from ko_lightning.kinetic import separation_sums_from_queries
from ko_lightning.kinetic.estimators import draw_queries
from ko_lightning.nets import TimeMLP
from ko_lightning.seeding import derive_seed


class RecordingKO(KOScheduleCallback):
    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir

    def union_sums(self, trainer, pl_module, est: str, k: int):  # noqa: ANN001, ANN201
        """Every rank: gather the shards. Rank 0: one process's sums over the union of the two shards with the union
        of the ranks' queries (the data estimator, docs/scale.md §2), plus each rank's model sums."""
        shards = [None, None]
        torch.distributed.all_gather_object(shards, (self._data, self._conditions))
        if not trainer.is_global_zero:
            return None
        share = -(-self.n_queries // 2)
        index, noise, total, offset = [], [], None, 0
        for r, (x, c) in enumerate(shards):  # the queries as local_separation_sums draws them on rank r
            seed = derive_seed(self.seed, k, r)
            gen = torch.Generator().manual_seed(seed)
            i, e = draw_queries(x.shape[0], share, tuple(x.shape[1:]), gen)
            index.append(i + offset)
            noise.append(e)
            offset += x.shape[0]
            if est != "data":
                pick = torch.randperm(x.shape[0], generator=gen)[:share]
                m = _model_sums(pl_module, x[pick], self.theta, self.normalization, seed, self.batch_size, c, pick)
                total = m if total is None else total + m
        cond = None if shards[0][1] is None else torch.cat([c for _, c in shards])
        data_sums = separation_sums_from_queries(
            torch.cat([x for x, _ in shards]), self.theta, torch.cat(index), torch.cat(noise), self.normalization,
            data_chunk=self.data_chunk, device=pl_module.device, labels=cond,
        )  # fmt: skip
        return data_sums if total is None else data_sums + total

    def refresh(self, trainer, pl_module, estimator=None):  # noqa: ANN001, ANN201
        est = estimator or self.estimator
        k = self.refresh_count
        union = self.union_sums(trainer, pl_module, est, k)
        report = super().refresh(trainer, pl_module, estimator)
        path = pl_module.path
        record = {
            "step": trainer.global_step,
            "estimator": est,
            "installed": report.installed,
            "table": [
                b.detach().cpu().clone()
                for b in (path.t_grid, path.alpha_grid, path.sigma_grid, path.d_alpha_grid, path.d_sigma_grid)
            ],
            "lam_raw": self.separation.lam_raw.detach().cpu().clone(),
            "union_lam": None if union is None else union.lam.clamp(0, 1).cpu(),
        }
        torch.save(record, f"{self.out_dir}/rank{trainer.global_rank}_refresh{k}.pt")
        return report


def main(out_dir: str, conditional: bool = False) -> None:
    L.seed_everything(0)
    name = "eight_gaussians" if conditional else "checkerboard"
    dm = Toy2DDataModule(name, n_train=4096, n_val=256, n_test=256, batch_size=256, seed=0, labels=conditional)
    if conditional:
        net = TimeMLP(dim=2, hidden=32, depth=2, num_classes=8)
        model = FlowMatching(net, cond_dropout=0.2, train_seed=0)
    else:
        model = FlowMatching(TimeMLP(dim=2, hidden=32, depth=2), parametrization="polar_v", train_seed=0)
    ko = RecordingKO(
        out_dir,
        every_n_steps=6,
        warmup_steps=6,
        estimator="data+model",
        n_queries=64,
        n_theta=16,
        max_data=1024,
        batch_size=64,
        plot=False,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=13,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[ko],
    )
    trainer.fit(model, dm)
    # gloo's teardown at interpreter exit aborts a rank now and then under ATEN_CPU_CAPABILITY=default (seen with
    # plain Lightning too); destroying the process group first gives a clean exit.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], conditional=sys.argv[2:] == ["conditional"])
