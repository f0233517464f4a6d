"""The collectives of a distributed FID/KID: gather samples, agree on failure, share rank 0's numbers.

Every function here is a no-op without an initialized process group of more than one process, and a collective
with one: call it on every rank. NCCL moves CUDA tensors only, gloo CPU tensors; :func:`comm_device` picks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_samples", "any_rank", "broadcast_numbers", "comm_device", "distributed_active"]

_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32)
_MAX_DIMS = 8  # the metadata exchange has a fixed size: (dtype index, ndim, up to 8 sizes)


def distributed_active() -> bool:
    """Whether a process group of more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    """The device of tensors passed to collectives: NCCL only moves CUDA tensors; gloo (and others) use the CPU."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on some rank (so all ranks raise together instead of hanging).

    An all-reduce with ``MAX`` of ``int(flag)``; without a process group, ``flag`` itself.
    """
    if not distributed_active():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_samples(samples: Tensor) -> Tensor:
    """Concatenate ``samples`` from all ranks (rank 0's first), identically on every rank.

    Ranks may hold different numbers of samples (first axis); the trailing shape and dtype must agree. Without an
    initialized process group, or with one process, ``samples`` is returned unchanged. Works with NCCL (CUDA
    tensors) and gloo (CPU). Must be called on every rank: it is a collective.

    Args:
        samples: this rank's tensor ``(n_rank, ...)`` (at most 7 trailing dimensions).

    Returns:
        ``(sum of n_rank, ...)`` on the device and dtype of ``samples``.

    Raises:
        ValueError: on every rank, if the ranks disagree on trailing shape or dtype.

    Example:
        >>> all_gather_samples(torch.zeros(3, 1, 8, 8)).shape  # one process: unchanged
        torch.Size([3, 1, 8, 8])
    """
    if not distributed_active():
        return samples
    if samples.ndim < 1 or samples.ndim > _MAX_DIMS or samples.dtype not in _DTYPES:
        raise ValueError(f"samples must have 1 to {_MAX_DIMS} dims and a dtype in {_DTYPES}, got {samples.dtype}")
    device = comm_device()
    world = dist.get_world_size()
    # Exchange (dtype, ndim, shape) first so that unequal sizes are padded and mismatches raise on all ranks.
    meta = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
    meta[0], meta[1] = _DTYPES.index(samples.dtype), samples.ndim
    meta[2 : 2 + samples.ndim] = torch.tensor(samples.shape)
    metas = [torch.empty_like(meta, device=device) for _ in range(world)]
    dist.all_gather(metas, meta.to(device))
    metas_cpu = [m.cpu() for m in metas]
    if any(not torch.equal(m[:2], meta[:2]) or not torch.equal(m[3:], meta[3:]) for m in metas_cpu):
        shapes = [tuple(int(v) for v in m[2 : 2 + int(m[1])]) for m in metas_cpu]
        dtypes = [str(_DTYPES[int(m[0])]) for m in metas_cpu]
        raise ValueError(f"ranks disagree on sample shape/dtype: shapes {shapes}, dtypes {dtypes}")
    counts = [int(m[2]) for m in metas_cpu]
    padded = torch.zeros((max(counts), *samples.shape[1:]), dtype=samples.dtype, device=device)
    padded[: samples.shape[0]] = samples.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)]).to(samples.device)


def broadcast_numbers(values: list[float]) -> list[float]:
    """Rank 0's numbers on every rank, so logged metrics are bit-identical even if GPU kernels differ slightly.

    The values travel as float64, so finite floats (and NaN) arrive unchanged.
    """
    if not distributed_active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.broadcast(t, src=0)
    return [float(v) for v in t.cpu()]
