"""Where the callbacks write their files, resolved safely under DDP.

``trainer.log_dir`` is a collective: Lightning broadcasts the directory from rank 0, so a call made on rank 0 alone
waits for ever for the other ranks. The callbacks therefore resolve their directory once, in ``setup`` (which
every rank runs), and later use the stored value on rank 0.
"""

from __future__ import annotations

import lightning as L

__all__ = ["resolve_run_dir"]


def resolve_run_dir(trainer: L.Trainer) -> str | None:
    """The run directory of the trainer's first logger, or None when the trainer has no logger.

    Must be called on every rank at the same point (it broadcasts). Without a logger nothing is written: the
    pictures and reports are part of logging, and the trainer's ``default_root_dir`` is the working directory
    unless the user set it, which is no place to drop files unasked.

    Args:
        trainer: the trainer, with its strategy set up (call from a callback's ``setup``).

    Returns:
        The directory (``logger.log_dir`` for CSV/TensorBoard loggers, ``logger.save_dir`` otherwise), or None.
    """
    if not trainer.loggers:
        return None
    return trainer.log_dir
