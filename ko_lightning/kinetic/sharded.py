"""The data estimator with the data set split across ranks (docs/scale.md §2).

Each rank holds a shard of the rows and its own queries, drawn from its shard. All ranks all-gather the queries;
every rank computes, for all queries, the partial posterior sums over its own rows; the partials are combined
exactly (:func:`ko_lightning.kinetic.data_kernel.query_sums`); each rank forms the error terms of its own queries
only. The ranks' :class:`SeparationSums` then add (``torch.distributed.all_reduce``) to what one process computes
over the union of the shards with the union of the queries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ko_lightning.kinetic.collectives import Reduce, raise_together
from ko_lightning.kinetic.conditional import check_labels
from ko_lightning.kinetic.data_kernel import KernelWork, mean_sq_norm, query_sums
from ko_lightning.kinetic.normalization import DataNormalization
from ko_lightning.kinetic.posterior import data_chunk_fp32
from ko_lightning.kinetic.separation import check_theta_grid
from ko_lightning.kinetic.sums import SeparationSums

__all__ = ["sharded_separation_sums"]


def _gather_queries(yq: Tensor, eps: Tensor, reduce: Reduce) -> tuple[Tensor, Tensor, slice]:
    """All ranks' queries in rank order (padded to equal length for the gather, then unpadded) and this
    rank's slice of them."""
    counts = torch.cat(reduce.all_gather(torch.tensor([yq.shape[0]], dtype=torch.int64, device=yq.device)))
    counts_list = [int(c) for c in counts.tolist()]
    longest = max(counts_list)
    padded = torch.zeros(2, longest, yq.shape[1], dtype=yq.dtype, device=yq.device)
    padded[0, : yq.shape[0]] = yq
    padded[1, : yq.shape[0]] = eps
    gathered = reduce.all_gather(padded)
    yq_all = torch.cat([g[0, :c] for g, c in zip(gathered, counts_list, strict=True)])
    eps_all = torch.cat([g[1, :c] for g, c in zip(gathered, counts_list, strict=True)])
    start = sum(counts_list[: reduce.rank])
    return yq_all, eps_all, slice(start, start + counts_list[reduce.rank])


def _sums_over_shards(
    flat: Tensor,
    yq: Tensor,
    eps: Tensor,
    norm: DataNormalization,
    theta64: Tensor,
    query_chunk: int,
    data_chunk: int,
    reduce: Reduce,
    work: KernelWork | None,
) -> SeparationSums | None:
    """One (class's) data set split across ranks: this rank's sums, or ``None`` when no rank has a query."""
    yq_all, eps_all, own = _gather_queries(yq, eps, reduce)
    if yq_all.shape[0] == 0:  # the same on every rank: the gathered counts are
        return None
    m2 = mean_sq_norm(flat, norm, yq.device, yq.dtype, data_chunk, reduce)
    return query_sums(flat, norm, theta64, yq_all, eps_all, own, m2, query_chunk, data_chunk, reduce, work)


def sharded_separation_sums(
    data: Tensor,
    theta: Tensor,
    query_index: Tensor,
    noise: Tensor,
    normalization: DataNormalization,
    reduce: Reduce,
    query_chunk: int = 1024,
    data_chunk: int = 2048,
    device: torch.device | str | None = None,
    labels: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    work: KernelWork | None = None,
) -> SeparationSums:
    """This rank's partial sums of ``1 - lambda`` with posteriors over the union of all ranks' rows (a collective).

    Every rank passes its own shard ``data`` and its own queries (``query_index`` into its shard, and their
    ``noise``). The result, all-reduced by sum over the ranks, equals
    :func:`~ko_lightning.kinetic.estimators.separation_sums_from_queries` on one process over the concatenated
    shards (rank order) with the concatenated queries, up to rounding (docs/scale.md §2): ``m2`` is the union's
    (all-reduced), and with ``labels`` each query's posterior runs over its class's rows on every rank (the
    classes ``0 .. max label`` agreed across ranks; a rank without rows or queries of a class still takes part).

    Args:
        data: this rank's rows, ``(n_r, ...)`` (``n_r`` may be 0 when the rank has no query).
        theta: angle grid, strictly increasing inside ``(0, pi/2)``, the same on every rank.
        query_index: ``(Q_r,)`` indices into ``data`` (``Q_r`` may differ between ranks, and be 0).
        noise: ``(Q_r, ...)`` standard normal noise.
        normalization: the global statistics (the same on every rank).
        reduce: the collectives (:class:`~ko_lightning.kinetic.collectives.TorchDistributed` under DDP).
        query_chunk, data_chunk: block sizes, the same on every rank.
        device: where to compute (default ``data``'s device; under NCCL the rank's GPU).
        labels: ``(n_r,)`` non-negative integer class labels of ``data``, or ``None`` (on every rank alike).
        dtype: compute dtype, ``torch.float32`` or ``torch.float64``.
        work: if given, incremented with the kernel's work (docs/scale.md §2.1).

    Raises:
        RuntimeError: on every rank, when the arguments are bad on any rank (this rank's ``ValueError`` naming the
            bad argument as the cause).
    """
    dev = torch.device(device) if device is not None else data.device
    error: Exception | None = None
    try:
        theta64 = check_theta_grid(theta, "theta")
        n, d = data.shape[0], normalization.dim
        if data[0:1].numel() not in (0, d) or data.ndim < 2:
            raise ValueError(f"data must be (n, ...) with {d} features per row, got {tuple(data.shape)}")
        query_index = torch.as_tensor(query_index).reshape(-1)
        if query_index.dtype.is_floating_point or (query_index.numel() and not 0 <= int(query_index.min())):
            raise ValueError("query_index must hold integer indices into this rank's data")
        if query_index.numel() and int(query_index.max()) >= n:
            raise ValueError(f"query_index must lie in [0, {n})")
        if tuple(noise.shape) != (query_index.numel(), *data.shape[1:]):
            raise ValueError(f"noise must have shape {(query_index.numel(), *data.shape[1:])}, got {noise.shape}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        lab = None if labels is None else check_labels(labels, n)
    except Exception as err:  # noqa: BLE001 - made known to every rank, then re-raised
        error = err
    raise_together(reduce, error, "sharded_separation_sums: checking the arguments", dev)
    flat = data.reshape(n, d)
    qi = query_index.to(data.device)
    yq, _ = data_chunk_fp32(flat[qi], 0, qi.numel(), normalization, dev, dtype=dtype)
    eps = noise.reshape(-1, d).to(device=dev, dtype=dtype)
    if lab is None:
        parts = [_sums_over_shards(flat, yq, eps, normalization, theta64, query_chunk, data_chunk, reduce, work)]
    else:
        top = torch.tensor([int(lab.max()) + 1 if n else 0], dtype=torch.float64, device=dev)
        n_classes = int(reduce.all_reduce(top, "max"))
        q_lab = lab[query_index.cpu()]
        parts = []
        for c in range(n_classes):  # each class's posterior over its rows on every rank
            rows, mine = (lab == c).nonzero().squeeze(1), (q_lab == c).nonzero().squeeze(1)
            parts.append(
                _sums_over_shards(
                    flat[rows.to(data.device)],
                    yq[mine.to(dev)],
                    eps[mine.to(dev)],
                    normalization,
                    theta64,
                    query_chunk,
                    data_chunk,
                    reduce,
                    work,
                )
            )
    present = [p for p in parts if p is not None]
    if not present:
        raise ValueError("sharded_separation_sums: no rank has a query (give some rank a non-empty query_index)")
    total = present[0]
    for part in present[1:]:
        total = total + part
    return total
