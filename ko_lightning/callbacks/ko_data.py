"""What the KO callback estimates from: a bounded sample of the training set, its normalization over all ranks,
and one rank's separation sums."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ko_lightning.batches import batch_condition, batch_data
from ko_lightning.callbacks.distributed import PendingSums, data_parallel_reduce, reduce_sum
from ko_lightning.conditioning import Conditioning
from ko_lightning.kinetic import (
    DataNormalization,
    SeparationSums,
    separation_sums_from_data,
    separation_sums_from_model,
)
from ko_lightning.kinetic.conditional import check_labels
from ko_lightning.kinetic.estimators import draw_queries
from ko_lightning.kinetic.sharded import sharded_separation_sums
from ko_lightning.protocols import PathModule

__all__ = ["global_normalization", "local_separation_sums", "training_data"]


def training_data(
    trainer: L.Trainer, max_data: int, conditioning: Conditioning | None = None
) -> tuple[Tensor, Tensor | None]:
    """This rank's share of the first ``max_data`` training samples, float32 on the CPU, with their conditions.

    From a datamodule with ``train_tensor`` (and ``labels_tensor("train")`` for a conditional model): of the first
    ``n = min(max_data, N_train)`` training rows, rank ``r`` of ``w`` (``trainer.global_rank``,
    ``trainer.world_size``) takes rows ``[r m, min((r + 1) m, n))`` with ``m = ceil(n / w)`` (the last ranks fewer,
    possibly none): the shards are disjoint, in order, and their union is exactly the first ``n`` rows, so no rank
    holds more than its share (docs/scale.md §1). A single process gets the first ``n`` rows. Only the shard is read
    when the datamodule has ``train_size`` and ``train_tensor(n, start=...)`` (the data modules of
    :mod:`ko_lightning.data`); otherwise ``train_tensor(max_data)`` is cut. Without ``train_tensor``, each rank takes
    the first batches of its own training loader (tensors, ``(x, y, ...)`` tuples or ``{"x": ..., "y": ...}``
    dicts), at most ``max_data`` samples.

    Returns:
        ``(data, conditions)``; ``conditions`` is None unless ``conditioning`` is conditional (then one row per
        sample: labels, or float conditions).

    Raises:
        ValueError: when the loader yields no batch, fewer than 2 samples (over all ranks for ``train_tensor``), or
            non-finite values; for a conditional model whose batches carry no conditions.
    """
    conditioning = conditioning or Conditioning()
    datamodule = getattr(trainer, "datamodule", None)  # set by Trainer.fit (None without a datamodule)
    conds: Tensor | None = None
    labelled = bool(getattr(datamodule, "labels", False)) and hasattr(datamodule, "labels_tensor")
    if datamodule is not None and hasattr(datamodule, "train_tensor") and (labelled or not conditioning.is_conditional):
        data, start, total = _train_tensor_shard(datamodule, max_data, trainer.global_rank, trainer.world_size)
        if conditioning.is_conditional:
            conds = datamodule.labels_tensor("train")[start : start + data.shape[0]]
    else:
        data, conds = _first_batches(trainer, max_data, conditioning)
        data, total = data[:max_data], min(data.shape[0], max_data)
    data = data.float().cpu()
    if total < 2:
        raise ValueError(f"KOScheduleCallback needs at least 2 training samples, got {total}")
    if not all(bool(torch.isfinite(chunk).all()) for chunk in data.split(4096)):  # chunks: isfinite's temporaries
        raise ValueError("KOScheduleCallback: the training data contain non-finite values (NaN or Inf)")
    if conds is not None:
        where = "KOScheduleCallback: training conditions"
        conds = conditioning.check(conds[: data.shape[0]].cpu(), data.shape[0], where)
    return data, conds


def _train_tensor_shard(datamodule: Any, max_data: int, rank: int, world_size: int) -> tuple[Tensor, int, int]:
    """``(rows, start, n)``: rank ``rank``'s rows ``[start, start + len(rows))`` of the first ``n`` training rows."""
    size = getattr(datamodule, "train_size", None)
    reads_shards = isinstance(size, int) and "start" in inspect.signature(datamodule.train_tensor).parameters
    head = None if reads_shards else datamodule.train_tensor(max_data)[:max_data]
    total = min(max_data, int(size)) if head is None else head.shape[0]  # type: ignore[arg-type]
    share = -(-total // max(world_size, 1))
    start, stop = min(rank * share, total), min((rank + 1) * share, total)
    if head is not None:
        return head[start:stop], start, total
    return datamodule.train_tensor(stop - start, start=start), start, total


def _first_batches(trainer: L.Trainer, max_data: int, conditioning: Conditioning) -> tuple[Tensor, Tensor | None]:
    """Samples (and conditions, for a conditional model) from the first batches of the training loader."""
    loader = trainer.train_dataloader
    if loader is None:
        raise ValueError("KOScheduleCallback: the trainer has no training dataloader")
    chunks: list[Tensor] = []
    cond_chunks: list[Tensor] = []
    count = 0
    for index, batch in enumerate(loader):
        where = f"KOScheduleCallback: training batch {index}"
        x = batch_data(batch, where)
        chunks.append(x.detach().cpu())
        cond = batch_condition(batch, where, conditioning, x.shape[0])
        if cond is not None:
            cond_chunks.append(cond.detach().cpu())
        count += x.shape[0]
        if count >= max_data:
            break
    if not chunks:
        raise ValueError("KOScheduleCallback: the training dataloader yielded no batch")
    return torch.cat(chunks), torch.cat(cond_chunks) if cond_chunks else None


def global_normalization(trainer: L.Trainer, data: Tensor) -> DataNormalization:
    """Mean and second moment over all ranks' data (a collective: the sums are all-reduced before dividing).

    Per dimension ``mean_k = sum_i x_ik / n``; the second moment of the centred data (docs/math.md §2.4) is
    ``v = (1/d) sum_k (sum_i x_ik^2 / n - mean_k^2)``, with ``n`` the sample count over all ranks.

    Raises:
        ValueError: on every rank alike (the check follows the all-reduce), when the data are constant: the
            separation function of a single point is undefined (there is nothing to normalize by).
    """
    flat = data.reshape(data.shape[0], -1)
    d = flat.shape[1]
    stats = torch.zeros(2 * d + 1, dtype=torch.float64)
    stats[-1] = float(flat.shape[0])
    for rows in flat.split(4096):  # float64 a chunk at a time: no (n, d) float64 copy of the data
        chunk = rows.double()
        stats[:d] += chunk.sum(0)
        stats[d : 2 * d] += (chunk * chunk).sum(0)
    stats = reduce_sum(trainer, stats)
    n = stats[-1]
    mean = stats[:d] / n
    second = float((stats[d : 2 * d] / n).sum() / d)
    v = float(((stats[d : 2 * d] / n) - mean**2).sum() / d)
    # E x^2 - (E x)^2 cancels to rounding level (~1e-16 E x^2 in float64) for constant data.
    if not v > 1e-12 * max(second, 1e-300):
        raise ValueError(
            f"KOScheduleCallback: the training data are constant (per-dimension variance {v:.3g} over "
            f"{int(n)} samples); the Kinetic-Optimal path needs data that vary (disable the callback)"
        )
    return DataNormalization(mean.reshape(data.shape[1:]), v, int(n))


def local_separation_sums(
    module: PathModule,
    data: Tensor,
    theta: Tensor,
    estimator: str,
    normalization: DataNormalization,
    *,
    n_queries: int,
    seed: int,
    data_chunk: int,
    batch_size: int,
    conditions: Tensor | None = None,
) -> SeparationSums | PendingSums:
    """One rank's separation sums over ``n_queries`` queries drawn from ``data`` (deterministic in ``seed``).

    ``"data"``: the closed-form posterior over ``data`` (docs/math.md §3.6); ``"model"``: ``module``'s
    x1-prediction error at queries picked from ``data`` (docs/math.md §3.7), in eval mode; ``"data+model"``: both
    added per grid point (the model estimator has no control variate, so the pooled sums keep none). With
    ``conditions`` (one per data row) the sums estimate the conditional ``lambda_cond`` (docs/math.md §3.10): the
    data posterior runs over each query's own class, and the model is given each query's condition.

    Under data parallelism (an initialized process group of several ranks) ``data`` is this rank's shard and the
    data estimator is the sharded one (docs/scale.md §2): this rank's queries come from its shard (none from an
    empty one), their posteriors run over the union of all shards, and the ranks' sums add to the estimate over
    all rows. Its collectives must not start before every rank is known to have prepared its share, so then the
    result is a :class:`PendingSums` (queries drawn and checked, model sums computed) that
    :func:`~ko_lightning.callbacks.distributed.all_reduce_sums` completes on every rank. The model estimator
    stays per rank.
    """
    if estimator not in ("data", "model", "data+model"):
        raise ValueError(f"estimator must be 'data', 'model' or 'data+model', got {estimator!r}")
    gen = torch.Generator().manual_seed(seed)
    reduce = data_parallel_reduce() if estimator != "model" else None
    total: SeparationSums | None = None
    collective: Callable[[], SeparationSums] | None = None
    if reduce is not None:
        labels = None if conditions is None else check_labels(conditions, data.shape[0])
        index, noise = draw_queries(data.shape[0], n_queries, tuple(data.shape[1:]), gen)
        # the shard goes to the device once: every query block streams all of it (docs/scale.md §2.2)
        collective = partial(
            sharded_separation_sums, data.to(module.device), theta, index, noise, normalization, reduce,
            data_chunk=data_chunk, device=module.device, labels=labels,
        )  # fmt: skip
    elif estimator != "model":
        total = separation_sums_from_data(
            data,
            theta,
            n_queries=n_queries,
            normalization=normalization,
            generator=gen,
            data_chunk=data_chunk,
            device=module.device,
            labels=conditions,
        )
    if estimator != "data":
        pick = torch.randperm(data.shape[0], generator=gen)[:n_queries]
        model_sums = _model_sums(module, data[pick], theta, normalization, seed, batch_size, conditions, pick)
        total = model_sums if total is None else total + model_sums
    if collective is not None:
        return PendingSums(collective, total)
    assert total is not None  # one of the estimators ran
    return total


def _model_sums(
    module: PathModule,
    x1: Tensor,
    theta: Tensor,
    normalization: DataNormalization,
    seed: int,
    batch_size: int,
    conditions: Tensor | None,
    pick: Tensor,
) -> SeparationSums:
    """The model estimator at the rows ``x1`` (docs/math.md §3.7); zero sums when the shard is empty."""
    if x1.shape[0] == 0:  # an empty shard adds nothing, with the fields of the others' sums
        zero = torch.zeros(theta.numel(), dtype=torch.float64)
        return SeparationSums(theta.double().cpu(), zero, zero.clone(), zero.clone())
    x1 = x1.to(module.device)
    with module.eval_mode():
        return separation_sums_from_model(
            module.predict_x1,
            module.path,
            x1,
            theta,
            normalization=normalization,
            generator=torch.Generator(device=x1.device).manual_seed(seed + 1),
            batch_size=batch_size,
            cond=None if conditions is None else conditions[pick].to(module.device),
        )
