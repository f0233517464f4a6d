"""The command line's progress bar: Lightning's rich bar without a bogus epoch total.

A run bounded by ``max_steps`` has ``max_epochs=-1`` (unbounded), and Lightning's bar printed it as the last epoch
index ``max_epochs - 1``: "Epoch 9/-2". Here the total is shown only when there is one.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar
from typing_extensions import override

__all__ = ["EpochProgressBar", "epoch_description"]


def epoch_description(current_epoch: int, max_epochs: int | None) -> str:
    """``"Epoch 3/9"`` when ``max_epochs`` bounds the run (epochs count from 0), else ``"Epoch 3"``.

    Args:
        current_epoch: the epoch being trained (0-based).
        max_epochs: the trainer's ``max_epochs``; None or a negative value (Lightning's ``-1``) mean unbounded.
    """
    if max_epochs is None or max_epochs < 1:
        return f"Epoch {current_epoch}"
    return f"Epoch {current_epoch}/{max_epochs - 1}"


class EpochProgressBar(RichProgressBar):
    """:class:`~lightning.pytorch.callbacks.RichProgressBar` whose training description is
    :func:`epoch_description` (no "/-2" for a run bounded by ``max_steps``)."""

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        description = epoch_description(current_epoch, self.trainer.max_epochs)
        # the same padding as Lightning's: the bar does not flicker between "Epoch N" and "Validation"
        return f"{description:{len(self.validation_description)}}"
