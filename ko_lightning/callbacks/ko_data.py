"""What the KO callback estimates from: a bounded sample of the training set, its normalization over all ranks,
and one rank's separation sums."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from ko_lightning.batches import batch_condition, batch_data
from ko_lightning.callbacks.distributed import reduce_sum
from ko_lightning.conditioning import Conditioning
from ko_lightning.kinetic import (
    DataNormalization,
    SeparationSums,
    separation_sums_from_data,
    separation_sums_from_model,
)
from ko_lightning.protocols import PathModule

__all__ = ["global_normalization", "local_separation_sums", "training_data"]


def training_data(
    trainer: L.Trainer, max_data: int, conditioning: Conditioning | None = None
) -> tuple[Tensor, Tensor | None]:
    """At most ``max_data`` training samples of this rank, float32 on the CPU, with their conditions.

    Taken from the datamodule's ``train_tensor(max_data)`` (and ``labels_tensor("train")`` for a conditional
    model) if it has them, else from the first batches of the training loader (tensors, ``(x, y, ...)`` tuples or
    ``{"x": ..., "y": ...}`` dicts).

    Returns:
        ``(data, conditions)``; ``conditions`` is None unless ``conditioning`` is conditional (then one row per
        sample: labels, or float conditions).

    Raises:
        ValueError: when the loader yields no batch, fewer than 2 samples, or non-finite values; for a conditional
            model whose batches carry no conditions.
    """
    conditioning = conditioning or Conditioning()
    datamodule = getattr(trainer, "datamodule", None)  # set by Trainer.fit (None without a datamodule)
    conds: Tensor | None = None
    labelled = bool(getattr(datamodule, "labels", False)) and hasattr(datamodule, "labels_tensor")
    if datamodule is not None and hasattr(datamodule, "train_tensor") and (labelled or not conditioning.is_conditional):
        data = datamodule.train_tensor(max_data)
        if conditioning.is_conditional:
            conds = datamodule.labels_tensor("train")[: data.shape[0]]
    else:
        data, conds = _first_batches(trainer, max_data, conditioning)
    data = data[:max_data].float().cpu()
    if data.shape[0] < 2:
        raise ValueError(f"KOScheduleCallback needs at least 2 training samples, got {data.shape[0]}")
    if not bool(torch.isfinite(data).all()):
        raise ValueError("KOScheduleCallback: the training data contain non-finite values (NaN or Inf)")
    if conds is not None:
        conds = conditioning.check(conds[:max_data].cpu(), data.shape[0], "KOScheduleCallback: training conditions")
    return data, conds


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
    x = data.double().reshape(data.shape[0], -1)
    stats = torch.cat([x.sum(0), (x * x).sum(0), torch.tensor([float(x.shape[0])], dtype=torch.float64)])
    stats = reduce_sum(trainer, stats)
    d = x.shape[1]
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
) -> SeparationSums:
    """One rank's separation sums over ``n_queries`` queries drawn from ``data`` (deterministic in ``seed``).

    ``"data"``: the closed-form posterior over ``data`` (docs/math.md §3.6); ``"model"``: ``module``'s
    x1-prediction error at queries picked from ``data`` (docs/math.md §3.7), in eval mode; ``"data+model"``: both
    added per grid point (the model estimator has no control variate, so the pooled sums keep none). With
    ``conditions`` (one per data row) the sums estimate the conditional ``lambda_cond`` (docs/math.md §3.10): the
    data posterior runs over each query's own class, and the model is given each query's condition.
    """
    gen = torch.Generator().manual_seed(seed)
    total: SeparationSums | None = None
    if estimator in ("data", "data+model"):
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
    if estimator in ("model", "data+model"):
        pick = torch.randperm(data.shape[0], generator=gen)[:n_queries]
        x1 = data[pick].to(module.device)
        with module.eval_mode():
            model_sums = separation_sums_from_model(
                module.predict_x1,
                module.path,
                x1,
                theta,
                normalization=normalization,
                generator=torch.Generator(device=x1.device).manual_seed(seed + 1),
                batch_size=batch_size,
                cond=None if conditions is None else conditions[pick].to(module.device),
            )
        total = model_sums if total is None else total + model_sums
    if total is None:
        raise ValueError(f"estimator must be 'data', 'model' or 'data+model', got {estimator!r}")
    return total
