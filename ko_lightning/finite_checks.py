"""The batch checks of :class:`~ko_lightning.module.FlowMatching` (``check_finite``), free of device syncs on GPUs.

``bool(torch.isfinite(x).all())`` waits for the device every training step. On an accelerator the *deferred* mode
instead keeps a small device-side record of the first bad training batch, updated without a sync:

    ``r <- where(r_0 < 0 and n > 0, (batch_idx, step, n_values, n_labels), r)``, with ``n = n_values + n_labels``,

``n_values`` the non-finite entries of the batch and ``n_labels`` its labels out of range (which are replaced by the
"no condition" label on the device, so an embedding lookup cannot fault before the check). The record is read
(one sync, agreed across ranks) every ``check_finite_every`` steps, at the end of training and before a checkpoint is
written; the error names the first bad batch and its step, as the immediate check would, plus the step it was found
at. On the CPU a sync costs nothing, so ``check_finite=True`` checks every batch immediately there; validation and test
batches are always checked immediately (their loss is synced every step anyway). docs/scale.md §4 gives the cost.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ko_lightning.batches import batch_condition, check_batch, check_finite_values
from ko_lightning.conditioning import Conditioning

__all__ = ["FiniteChecks", "FiniteMode", "finite_mode"]

FiniteMode = Literal["auto", "immediate", "deferred"]
"""``"immediate"``: check every batch as it comes (a sync); ``"deferred"``: the device-side record; ``"auto"``
(``check_finite=True``): immediate on the CPU, deferred on accelerators."""


def finite_mode(check_finite: Any) -> FiniteMode | None:
    """The mode of ``check_finite``: True is ``"auto"``, False None (no value checks), or a :data:`FiniteMode`.

    Raises:
        ValueError: naming ``check_finite`` otherwise.
    """
    if check_finite is True:
        return "auto"
    if check_finite is False:
        return None
    if check_finite in ("auto", "immediate", "deferred"):
        return check_finite
    raise ValueError(f"check_finite must be True, False, 'auto', 'immediate' or 'deferred', got {check_finite!r}")


class FiniteChecks:
    """The batch checks of one module: immediate, or deferred into a device-side record (see the module doc).

    Args:
        check_finite: ``True``/``"auto"``, ``"immediate"``, ``"deferred"``, or ``False`` (shape and dtype only).
        every_n_steps: read the deferred record every this many training steps (one sync each time).
    """

    def __init__(self, check_finite: Any = True, every_n_steps: int = 100) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"check_finite_every must be a positive integer, got {every_n_steps!r}")
        self.mode = finite_mode(check_finite)
        self.every_n_steps = every_n_steps
        self.record: Tensor | None = None  # int64 (batch_idx, step, n_values, n_labels) of the first bad batch
        self._last_checked = -1

    def _deferred(self, stage: str, device: torch.device) -> bool:
        if stage != "train" or self.mode is None or self.mode == "immediate":
            return False
        return self.mode == "deferred" or device.type != "cpu"

    def data(self, batch: Any, stage: str, batch_idx: int, step: int, data_shape: tuple[int, ...] | None) -> Tensor:
        """The checked data of ``batch`` (:func:`~ko_lightning.batches.check_batch`); deferred: recorded, no sync."""
        where = f"{stage} batch {batch_idx}"
        x = check_batch(batch, where, data_shape, check_finite=False)  # shape and dtype: no sync
        if self._deferred(stage, x.device):
            self._note(batch_idx, step, (~torch.isfinite(x)).sum(), None)
        elif self.mode is not None:
            check_finite_values(x, where)
        return x

    def cond(
        self, batch: Any, stage: str, batch_idx: int, step: int, conditioning: Conditioning, batch_size: int
    ) -> Tensor | None:
        """The checked conditions of ``batch`` (:func:`~ko_lightning.batches.batch_condition`); deferred: labels out
        of range (or non-finite float conditions) are counted into the record and labels are replaced by "no
        condition" on the device, without a sync."""
        where = f"{stage} batch {batch_idx}"
        if not conditioning.is_conditional:
            return None
        cond = batch_condition(batch, where, conditioning, batch_size, check_values=False)
        assert cond is not None
        if not self._deferred(stage, cond.device):
            if self.mode is not None:  # the values of the tensor already taken from the batch (one sync)
                conditioning.check(cond, batch_size, f"{where}: condition", allow_null=True)
            return cond
        if conditioning.num_classes is not None:
            ok = (cond >= 0) & (cond <= conditioning.num_classes)  # num_classes itself is "no condition"
            self._note(batch_idx, step, None, (~ok).sum())
            return torch.where(ok, cond, torch.full_like(cond, conditioning.num_classes))
        ok = torch.isfinite(cond).all(dim=1) | torch.isnan(cond).all(dim=1)  # a row of NaN is "no condition"
        self._note(batch_idx, step, None, (~ok).sum())
        return cond

    def _note(self, batch_idx: int, step: int, n_values: Tensor | None, n_labels: Tensor | None) -> None:
        """Fold one batch into the record on the device: kernels only, no host-device transfer."""
        count = n_values if n_values is not None else n_labels
        assert count is not None
        count = count.long()
        zero = torch.zeros_like(count)
        new = torch.stack(
            [
                torch.full_like(count, batch_idx),  # a fill kernel: the int travels as a kernel argument
                torch.full_like(count, step),
                count if n_values is not None else zero,
                count if n_labels is not None else zero,
            ]
        )
        if self.record is None or self.record.device != count.device:
            self.record = torch.full_like(new, -1)
        self.record = torch.where((self.record[0] < 0) & (count > 0), new, self.record)

    def maybe_check(self, step: int) -> None:
        """Read the deferred record if ``step`` is a multiple of ``every_n_steps`` (once per step)."""
        if self.record is not None and step % self.every_n_steps == 0 and step != self._last_checked:
            self.check(step, f"at step {step}")

    def check(self, step: int, when: str) -> None:
        """Read the deferred record (one sync; with several ranks a collective: call it on every rank) and raise if
        a bad batch was recorded on any rank.

        Raises:
            ValueError: naming the first bad training batch, its step, what was wrong, and ``when`` it was found.
        """
        if self.record is None:
            return
        from ko_lightning.metrics.distributed import any_rank

        self._last_checked = step
        batch_idx, bad_step, n_values, n_labels = (int(v) for v in self.record.tolist())
        if not any_rank(batch_idx >= 0):
            return
        if batch_idx < 0:
            raise ValueError(f"a non-finite training batch was found on another rank {when} (see its error)")
        what = (
            f"contains {n_values} non-finite value(s) (NaN or Inf)"
            if n_values
            else f"has {n_labels} condition(s) out of range or non-finite"
        )
        raise ValueError(
            f"train batch {batch_idx} (step {bad_step}) {what}; found by the deferred check_finite {when}, "
            "training stops here"
        )
