"""A ModelCheckpoint that always leaves ``last.ckpt`` at the end of a fit, whatever the save cadence."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

__all__ = ["LastCheckpoint"]


class LastCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` with ``save_last=True`` that also saves ``last.ckpt``
    when training ends at a step no checkpoint was saved at.

    Lightning's own ``on_train_end`` saves ``last.ckpt`` only when no checkpoint was saved during the fit at all, so
    a run of 1500 steps saving every 1000 ended with a ``last.ckpt`` of step 1000, and a run shorter than the
    validation interval had none. Resume with ``ko-lightning fit --ckpt_path last`` or
    ``--ckpt_path <run>/checkpoints/last.ckpt``. Every argument is ModelCheckpoint's; ``save_last`` None (or not
    given) means True.
    """

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("save_last") is None:  # the command line passes ModelCheckpoint's default None explicitly
            kwargs["save_last"] = True
        super().__init__(**kwargs)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # every rank runs this (saving is collective under DDP); nothing new to save when the last step was saved
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
