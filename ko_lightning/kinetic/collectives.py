"""The collective operations of the sharded data estimator behind a small interface (docs/scale.md §2).

The estimator kernels call ``reduce.all_gather`` / ``reduce.all_reduce`` and never ``torch.distributed`` directly,
so they run and are tested without a process group (:class:`SingleProcess`, or a fake in the tests) and this layer
stays free of Lightning.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Reduce", "SingleProcess", "TorchDistributed", "raise_together", "ranks_failed_error"]

ReduceOp = Literal["sum", "max"]


class Reduce(Protocol):
    """Collectives over the ranks that each hold one shard of the data.

    Every method is a collective: every rank calls it at the same point with tensors of the same shape and dtype.

    Attributes:
        rank: this process's index in ``[0, world_size)``.
        world_size: number of processes.
    """

    rank: int
    world_size: int

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
        ...

    def all_reduce(self, tensor: Tensor, op: ReduceOp = "sum") -> Tensor:
        """``tensor`` replaced in place by its elementwise sum or maximum over the ranks; returns it."""
        ...


class SingleProcess:
    """The no-op :class:`Reduce` of one process (rank 0 of 1)."""

    rank = 0
    world_size = 1

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return [tensor]

    def all_reduce(self, tensor: Tensor, op: ReduceOp = "sum") -> Tensor:
        return tensor


class TorchDistributed:
    """:class:`Reduce` through ``torch.distributed`` (an initialized default process group, or ``group``).

    Tensors must live where the backend expects them (CPU for gloo, the rank's GPU for NCCL).

    Raises:
        RuntimeError: when ``torch.distributed`` is not initialized.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchDistributed needs an initialized torch.distributed process group")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor, group=self.group)
        return out

    def all_reduce(self, tensor: Tensor, op: ReduceOp = "sum") -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return tensor


def raise_together(
    reduce: Reduce, local_error: Exception | None, what: str, device: torch.device | str = "cpu"
) -> None:
    """Raise on every rank when ``what`` failed on any rank (a collective: one all-reduce of the failure flags).

    A rank that raised alone before a collective would leave the others waiting for ever. ``device``: where the
    flag lives for the backend (the rank's GPU under NCCL).

    Raises:
        RuntimeError: ``"<what> failed on <k> of <n> rank(s)"`` (this rank's error as the cause where it has one);
            on one process the error itself is re-raised unchanged.
    """
    if reduce.world_size == 1:
        if local_error is not None:
            raise local_error
        return
    failed = int(reduce.all_reduce(torch.tensor([float(local_error is not None)], dtype=torch.float64, device=device)))
    if not failed:
        return
    raise ranks_failed_error(what, failed, reduce.world_size, local_error)


def ranks_failed_error(what: str, failed: int, world_size: int, local_error: Exception | None) -> RuntimeError:
    """The error every rank raises together: ``"<what> failed on <k> of <n> rank(s)"``, with this rank's error
    in the message and as the cause where it has one (set as ``__cause__``)."""
    message = f"{what} failed on {failed} of {world_size} rank(s)"
    if local_error is not None:
        error = RuntimeError(f"{message}; on this rank: {type(local_error).__name__}: {local_error}")
        error.__cause__ = local_error
        return error
    return RuntimeError(f"{message} (see the error printed by that rank)")
