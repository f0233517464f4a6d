"""The pieces of one comparison row: data module, network, starting path and the :class:`FlowMatching` module.

Every row is built from the same seed, so the networks start from identical weights and see the same data; only
the path differs (docs/math.md §6), or for ``cond_ot_logit_normal`` the density of the training times.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import lightning as L
import torch
from torch import nn

from ko_lightning.data import DigitsDataModule, Toy2DDataModule
from ko_lightning.module import FlowMatching
from ko_lightning.nets import TimeMLP, UNet
from ko_lightning.paths import CondOTPath, CosinePath, GaussianPath, VPPath
from ko_lightning.seeding import derive_seed
from recipes.compare_paths.config import PATH_NAMES, CompareConfig

__all__ = ["DequantizedDigits", "build_datamodule", "build_model", "build_net", "build_path"]

# Stream key of the dequantization noise in derive_seed, apart from the other seeded streams of a run.
_DEQUANTIZATION_STREAM = 17


class DequantizedDigits(DigitsDataModule):
    """Digits whose *training* batches are dequantized: ``x + u / scale``, ``u ~ U[0, 1)``.

    The noise of step ``k`` comes from a generator seeded by ``(seed, k)``, so every path of a comparison sees the
    same dequantization noise at the same step (like ``FlowMatching(train_seed=...)`` for its own noise).
    """

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Add ``u / scale`` to a training batch; validation and test batches pass unchanged."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training or not torch.is_tensor(batch):
            return batch
        _, scale = self._stats()
        gen = torch.Generator().manual_seed(derive_seed(self.seed, trainer.global_step, _DEQUANTIZATION_STREAM))
        u = torch.rand(batch.shape, generator=gen).to(batch.device, batch.dtype)
        return batch + u / float(scale)


def build_datamodule(config: CompareConfig) -> Toy2DDataModule | DigitsDataModule:
    """The data module of ``config`` (seeded by ``config.seed``), set up."""
    args = {k: v for k, v in config.data.items() if k != "name"}
    dm: Toy2DDataModule | DigitsDataModule
    if config.is_digits:
        cls = DequantizedDigits if config.train.dequantize else DigitsDataModule
        dm = cls(batch_size=config.train.batch_size, seed=config.seed, flatten=config.net["kind"] == "mlp", **args)
    else:
        dm = Toy2DDataModule(config.data_name, batch_size=config.train.batch_size, seed=config.seed, **args)
    dm.setup("fit")
    return dm


def build_net(config: CompareConfig, data_shape: tuple[int, ...]) -> nn.Module:
    """A fresh network (call after seeding, so every path starts from the same weights)."""
    args = {k: v for k, v in config.net.items() if k != "kind"}
    if config.net["kind"] == "mlp":
        return TimeMLP(dim=int(math.prod(data_shape)), **args)
    return UNet(**args)


def build_path(name: str) -> GaussianPath:
    """The starting path of a row (KO starts on Cond-OT; its callback installs the KO path before step 1)."""
    if name in ("cond_ot", "cond_ot_angle", "cond_ot_logit_normal", "ko", "ko_paper"):
        return CondOTPath()
    if name == "cosine":
        return CosinePath()
    if name == "vp":
        return VPPath()
    raise ValueError(f"unknown path {name!r}; valid paths: {', '.join(PATH_NAMES)}")


def build_model(config: CompareConfig, name: str, data_shape: tuple[int, ...]) -> FlowMatching:
    """Seed, build the net and wrap it in :class:`FlowMatching` for path ``name`` (with the row's time density,
    :meth:`CompareConfig.time_sampler_of`)."""
    L.seed_everything(config.seed, verbose=False)  # identical initial weights for every path
    net = build_net(config, data_shape)
    scheduler = None
    if config.train.lr_schedule == "cosine":
        scheduler = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=config.train.max_steps)
    return FlowMatching(
        net,
        build_path(name),
        parametrization=config.parametrization,
        loss_weighting=config.loss_weighting,
        optimizer=functools.partial(torch.optim.Adam, lr=config.train.lr),
        lr_scheduler=scheduler,
        t_eps=config.t_eps_of(name),
        data_shape=data_shape,
        time_sampler=config.time_sampler_of(name),
        train_seed=config.seed,
    )
