"""The pure parts of in-training evaluation (:class:`~ko_lightning.callbacks.eval_callback.EvalCallback`): which
samples each rank draws, their noise and labels, the averaged (EMA) weights, images and the sample grid.

Every sample has a global index ``i`` in ``[0, num_samples)``. Its noise and label depend on ``(seed, step, i)``
only, never on the rank or the number of ranks: rank ``r`` of ``W`` draws the contiguous slice
:func:`rank_share` of the indices, so the gathered set of ``W`` ranks is the set one process draws (docs/scale.md
§4).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

from ko_lightning.batches import batch_data
from ko_lightning.metrics.images import display_images
from ko_lightning.seeding import derive_seed

__all__ = [
    "NOISE_BLOCK",
    "LabelMode",
    "averaged_weights",
    "eval_labels",
    "eval_noise",
    "rank_share",
    "reference_images",
]

NOISE_BLOCK = 256
"""Indices per noise block: block ``b`` (indices ``[256 b, 256 (b + 1))``) is drawn from its own seeded generator,
so any slice of the indices is reproduced by drawing only the blocks it touches."""

LabelMode = Literal["balanced", "uniform"]


def rank_share(num_samples: int, world_size: int, rank: int) -> tuple[int, int]:
    """The global indices ``[start, stop)`` rank ``rank`` of ``world_size`` samples.

    Contiguous and in rank order (so a gather in rank order is in index order); the first
    ``num_samples mod world_size`` ranks take one sample more: ``n_r = floor(N / W) + [r < N mod W]``.

    Example:
        >>> [rank_share(10, 3, r) for r in range(3)]
        [(0, 4), (4, 7), (7, 10)]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
    base, extra = divmod(int(num_samples), int(world_size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _blocks(start: int, stop: int) -> range:
    return range(start // NOISE_BLOCK, (stop + NOISE_BLOCK - 1) // NOISE_BLOCK)


def eval_noise(start: int, stop: int, shape: tuple[int, ...], seed: int, step: int) -> Tensor:
    """The initial noise ``x0 ~ N(0, I)`` of samples ``[start, stop)`` at training step ``step``, on the CPU.

    Block ``b`` of :data:`NOISE_BLOCK` indices comes from a generator seeded with ``derive_seed(seed, step, b, 0)``,
    so the noise of index ``i`` does not depend on which slice (which rank) asks for it.

    Returns:
        float32 ``(stop - start, *shape)``.
    """
    parts = []
    for b in _blocks(start, stop):
        gen = torch.Generator().manual_seed(derive_seed(seed, step, b, 0))
        block = torch.randn((NOISE_BLOCK, *shape), generator=gen)
        lo, hi = max(start, b * NOISE_BLOCK), min(stop, (b + 1) * NOISE_BLOCK)
        parts.append(block[lo - b * NOISE_BLOCK : hi - b * NOISE_BLOCK])
    return torch.cat(parts) if parts else torch.empty((0, *shape))


def eval_labels(start: int, stop: int, num_classes: int, mode: LabelMode, seed: int, step: int) -> Tensor:
    """The class labels of samples ``[start, stop)``: ``"balanced"``: ``i mod K`` (every class ``N / K`` times
    when ``K`` divides ``N``); ``"uniform"``: drawn uniformly per block from ``derive_seed(seed, step, b, 1)``.

    Returns:
        int64 ``(stop - start,)``.
    """
    if mode == "balanced":
        return torch.arange(start, stop, dtype=torch.int64) % num_classes
    parts = []
    for b in _blocks(start, stop):
        gen = torch.Generator().manual_seed(derive_seed(seed, step, b, 1))
        block = torch.randint(num_classes, (NOISE_BLOCK,), generator=gen)
        lo, hi = max(start, b * NOISE_BLOCK), min(stop, (b + 1) * NOISE_BLOCK)
        parts.append(block[lo - b * NOISE_BLOCK : hi - b * NOISE_BLOCK])
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def _average_modules(trainer: L.Trainer) -> list[torch.nn.Module]:
    """The averaged copies of the module held by Lightning's weight-averaging callbacks (EMA), if any yet."""
    out = []
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        average = getattr(callback, "_average_model", None) if isinstance(callback, WeightAveraging) else None
        if average is not None:
            out.append(average.module)
    return out


@contextmanager
def averaged_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[bool]:
    """Run the block with the weight-averaging (EMA) callback's averaged weights in ``pl_module``, then restore.

    Lightning 2.6's ``WeightAveraging`` (``EMAWeightAveraging``) keeps the average in an ``AveragedModel``
    (``callback._average_model.module``, a deep copy of the module) and swaps it in for validation the same way:
    parameters and buffers are copied pairwise, in order. The swap keeps everything that is not a weight (the
    module's current path, its device) from ``pl_module``. Yields whether averaged weights are in use.
    """
    averages = _average_modules(trainer)
    if not averages:
        yield False
        return
    if len(averages) > 1:
        raise ValueError(f"found {len(averages)} weight-averaging callbacks; EvalCallback can use one")
    current = list(itertools.chain(pl_module.parameters(), pl_module.buffers()))
    average = list(itertools.chain(averages[0].parameters(), averages[0].buffers()))
    saved = [p.data.clone() for p in current]
    try:
        with torch.no_grad():
            for cur, avg in zip(current, average, strict=True):
                cur.data.copy_(avg.data)
        yield True
    finally:
        with torch.no_grad():
            for cur, old in zip(current, saved, strict=True):
                cur.data.copy_(old)


def reference_images(
    datamodule: Any, split: str, value_range: tuple[float, float], limit: int | None, chunk: int = 1024
) -> Tensor:
    """The datamodule's ``split`` (``"train"``, ``"val"``, ``"test"``) as uint8 images, ``round(255 u)`` of
    :func:`display_images` (the quantization of the FID code), converted in chunks to bound memory.

    Uses ``<split>_tensor()`` when the datamodule has it, else the batches of ``<split>_dataloader()``.

    Raises:
        ValueError: naming ``reference`` when there is no datamodule or the split is empty/missing.
    """
    from ko_lightning.metrics.images import to_uint8_images

    if datamodule is None:
        raise ValueError(f"reference={split!r} needs a datamodule; pass reference images or a reference_name")
    tensor_fn = getattr(datamodule, f"{split}_tensor", None)
    if tensor_fn is not None:
        data = tensor_fn()
        chunks = [data[i : i + chunk] for i in range(0, min(data.shape[0], limit or data.shape[0]), chunk)]
    else:
        chunks, count = [], 0
        for index, batch in enumerate(getattr(datamodule, f"{split}_dataloader")()):
            chunks.append(batch_data(batch, f"EvalCallback: reference batch {index}"))
            count += chunks[-1].shape[0]
            if limit is not None and count >= limit:
                break
    out = [to_uint8_images(display_images(c, datamodule, value_range), "reference") for c in chunks]
    if not out:
        raise ValueError(f"reference={split!r}: the datamodule's {split} split is empty")
    images = torch.cat(out)
    return images if limit is None else images[:limit]
