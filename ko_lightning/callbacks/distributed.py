"""Collectives of the KO refresh, through the trainer's strategy (the reductions are no-ops on one process).

Each function is a collective: every rank must call it at the same point, or the others wait for ever.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar, cast

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from ko_lightning.kinetic import RefreshOutcome, SeparationSums
from ko_lightning.kinetic.collectives import TorchDistributed, ranks_failed_error

__all__ = [
    "PendingSums",
    "all_reduce_sums",
    "broadcast_from_rank_zero",
    "compute_on_every_rank",
    "data_parallel_reduce",
    "raise_if_any_rank_failed",
    "reduce_sum",
]

Result = TypeVar("Result")

_SUM_FIELDS = tuple(f.name for f in dataclasses.fields(SeparationSums) if f.name != "theta")


def reduce_sum(trainer: L.Trainer, tensor: Tensor) -> Tensor:
    """All-reduce a float64 CPU tensor by sum through the strategy (moved to the root device for NCCL).

    Returns:
        The sum over ranks, float64 on the CPU (``tensor`` itself on one process).
    """
    if trainer.world_size == 1:
        return tensor
    device = trainer.strategy.root_device
    reduced = trainer.strategy.reduce(tensor.to(device), reduce_op="sum")
    return reduced.to("cpu", torch.float64)


def data_parallel_reduce() -> TorchDistributed | None:
    """The collectives of the default process group for the sharded data estimator (docs/scale.md §2), or
    ``None`` on one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributed()
    return None


@dataclasses.dataclass(frozen=True)
class PendingSums:
    """A rank's separation sums whose collective part has not run yet (the sharded data estimator, docs/scale.md
    §2): prepared under :func:`compute_on_every_rank`, so that a failure on any rank is known to all before any
    rank enters the estimator's collectives, then completed by :func:`all_reduce_sums` on every rank.

    Attributes:
        collective: computes the rank's sums; a collective, called once on every rank.
        local: sums already computed on this rank alone (the model estimator's), added to the result; or None.
    """

    collective: Callable[[], SeparationSums]
    local: SeparationSums | None = None

    def resolve(self) -> SeparationSums:
        """Run the collective part (on every rank at once) and add the local sums."""
        sums = self.collective()
        return sums if self.local is None else sums + self.local


def all_reduce_sums(trainer: L.Trainer, sums: SeparationSums | PendingSums) -> SeparationSums:
    """Sum every field of ``sums`` over the ranks in one all-reduce (the theta grid is the same everywhere).

    The fields are additive (docs/math.md §3.6), so the result is the sums over the union of the ranks' queries.
    :class:`PendingSums` are resolved first (their collectives run on every rank here).
    """
    if isinstance(sums, PendingSums):
        sums = sums.resolve()
    if trainer.world_size == 1:
        return sums
    present = [name for name in _SUM_FIELDS if getattr(sums, name) is not None]
    stacked = torch.stack([getattr(sums, name).double() for name in present])
    reduced = reduce_sum(trainer, stacked)
    return SeparationSums(sums.theta, **{name: reduced[i] for i, name in enumerate(present)})


def raise_if_any_rank_failed(trainer: L.Trainer, local_error: Exception | None, what: str) -> None:
    """Raise on every rank when ``what`` failed on any rank (``local_error`` is this rank's error or None).

    A rank that raised alone would leave the others waiting in the next collective; the failure flags are
    therefore summed over the ranks first, and every rank raises together.

    Raises:
        RuntimeError: ``"<what> failed on <k> of <n> rank(s)"``, with this rank's error (as the cause) where it
            has one.
    """
    failed = int(reduce_sum(trainer, torch.tensor([float(local_error is not None)], dtype=torch.float64)))
    if not failed:
        return
    raise ranks_failed_error(what, failed, trainer.world_size, local_error)


def compute_on_every_rank(trainer: L.Trainer, compute: Callable[[], Result], what: str) -> Result:
    """Run ``compute`` on every rank; when it fails on any rank, every rank raises (see
    :func:`raise_if_any_rank_failed`, whose ``RuntimeError`` this raises)."""
    result: Result | None = None
    local_error: Exception | None = None
    try:
        result = compute()
    except Exception as err:  # noqa: BLE001 - made known to every rank, then re-raised
        local_error = err
    raise_if_any_rank_failed(trainer, local_error, what)
    return cast(Result, result)


def broadcast_from_rank_zero(trainer: L.Trainer, solve: Callable[[], RefreshOutcome], what: str) -> RefreshOutcome:
    """Run ``solve`` on rank 0 alone and broadcast its outcome, so every rank installs the same path.

    An exception in ``solve`` is broadcast too (as the outcome's ``error``) before anything is raised, so that no
    rank waits for ever in the broadcast; then every rank raises.

    Raises:
        RuntimeError: on every rank, ``"<what> failed on rank 0: <error>"`` (on rank 0 with the error as cause).
    """
    outcome, error = RefreshOutcome(), None
    if trainer.is_global_zero:
        try:
            outcome = solve()
        except Exception as err:  # noqa: BLE001 - broadcast first, so that no rank waits for ever
            error = err
            outcome = RefreshOutcome(error=f"{type(err).__name__}: {err}")
    outcome = trainer.strategy.broadcast(outcome, src=0)
    if outcome.error:
        raise RuntimeError(f"{what} failed on rank 0: {outcome.error}") from error
    return outcome
