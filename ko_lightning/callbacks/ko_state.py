"""What a :class:`~ko_lightning.callbacks.KOScheduleCallback` saves in checkpoints, and how it is restored."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from ko_lightning.kinetic import DataNormalization, SeparationFunction

__all__ = ["callback_state", "restore_callback_state"]


def callback_state(cb: Any) -> dict[str, Any]:
    """A ``KOScheduleCallback``'s state: the refresh count and step, the separation function, the data
    normalization, the precision of the estimate and the settings (plain tensors and numbers)."""
    return {
        "refresh_count": cb.refresh_count,
        "last_refresh_step": cb.last_refresh_step,
        "separation": None if cb.separation is None else cb.separation.state_dict(),
        "normalization": None if cb.normalization is None else cb.normalization.state_dict(),
        "settings": cb.settings(),
        "precision": cb.precision.state_dict(),
    }


def restore_callback_state(cb: Any, state: dict[str, Any]) -> None:
    """Restore :func:`callback_state` into the ``KOScheduleCallback`` ``cb`` (older checkpoints without a
    precision load too); settings that differ from the checkpoint's are reported, not overridden."""
    cb.refresh_count = int(state["refresh_count"])
    cb.last_refresh_step = int(state["last_refresh_step"])
    if state.get("separation") is not None:
        separation = SeparationFunction.constant_one(cb.theta)
        separation.load_state_dict(state["separation"])
        cb.separation = separation
    cb.precision.load_state_dict(state.get("precision") or {})
    if state.get("normalization") is not None:
        cb.normalization = DataNormalization.from_state_dict(state["normalization"])
    now = cb.settings()
    changed = {k: (v, now.get(k)) for k, v in state.get("settings", {}).items() if now.get(k) != v}
    if changed:
        rank_zero_info(f"KOScheduleCallback: settings differ from the checkpoint's (saved, now): {changed}")
