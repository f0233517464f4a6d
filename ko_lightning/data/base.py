"""Shared plumbing for the in-memory data modules: fast batch loaders, seeded splits, derived seeds.

Every data set in :mod:`ko_lightning.data` fits in memory as one tensor. Instead of letting a ``DataLoader`` fetch
``batch_size`` items one by one and collate them (slow in Python for 2D toys at batch 4096), the loaders here use a
sampler that yields whole *index batches* and a dataset whose ``__getitem__`` slices the tensor with them, with
``DataLoader(batch_size=None)``. A batch then costs one ``tensor[index]``.

Under DDP, Lightning wraps such a sampler in its ``DistributedSamplerWrapper``, which hands each rank a disjoint
subset of the batches (the sampler is seeded identically on every rank, so all ranks agree on the batch list).

The loaders are :class:`IndexBatchLoader` objects: their position in the epoch is part of Lightning's checkpoints,
so a run resumed mid-epoch sees exactly the batches the uninterrupted run would have seen.

The data modules share their loaders through :class:`SplitTensorDataModule`, and the normalized ones (digits, 2D
toys) their split tensors and docs/math.md §2 normalization through :class:`NormalizedSplitDataModule`.
Class labels (opt-in, ``labels=True``) are one int64 tensor ``(N,)`` per split, indexed with the same index batch
as the data: batches are then ``(x, y)``, each label with its sample under any shuffling, sharding or transform.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ko_lightning.data.rows import RowSource
from ko_lightning.data.splits import moment_normalization, split_indices, split_sizes
from ko_lightning.seeding import derive_seed

__all__ = [
    "IndexBatchLoader",
    "IndexBatchSampler",
    "IndexedTransform",
    "NormalizedSplitDataModule",
    "SplitTensorDataModule",
    "TensorBatchDataset",
    "derive_seed",
    "make_loader",
    "moment_normalization",
    "split_indices",
    "split_sizes",
]


class IndexBatchSampler(Sampler[Tensor]):
    """Yields whole batches of indices (``LongTensor`` of shape ``(batch_size,)``) into ``range(num_samples)``.

    With ``shuffle=True`` each epoch uses the permutation seeded by ``derive_seed(seed, epoch)``. The epoch is set by
    :meth:`set_epoch` (Lightning calls it before every epoch, also through its distributed wrapper) and otherwise
    advances by one after each pass, so plain iteration also reshuffles. A pass fixes its epoch when it yields its
    first batch; :attr:`pass_epoch` records it (the loader's checkpoint state needs it).

    Args:
        num_samples: size of the data set.
        batch_size: indices per batch.
        shuffle: permute the indices every epoch.
        drop_last: drop the final incomplete batch.
        seed: base seed of the permutations.

    Example:
        >>> sampler = IndexBatchSampler(10, 4, shuffle=False, drop_last=False)
        >>> [b.tolist() for b in sampler]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if drop_last and batch_size > num_samples:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {num_samples} samples of this split, so drop_last would leave "
                "no batch; lower batch_size"
            )
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.epoch = 0  # epoch of the next pass
        self.pass_epoch: int | None = None  # epoch of the latest pass that started (None: none yet)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of the next pass (called by Lightning at each epoch start)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        self.pass_epoch = self.epoch
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        self.epoch += 1
        for i in range(len(self)):
            yield order[i * self.batch_size : (i + 1) * self.batch_size]


class IndexedTransform:
    """Base of batch transforms that also see the indices of the batch: called as ``transform(batch, index)``.

    A random transform (e.g. a random flip) that draws from a generator seeded by the batch's indices is a function
    of the batch alone: it repeats exactly on a resumed run and in loader workers, where the global RNG does not.
    """

    def __call__(self, batch: Tensor, index: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(batch, index)")


class TensorBatchDataset(Dataset[Any]):
    """A tensor seen as a data set that is indexed with whole index batches.

    ``dataset[index]`` returns ``transform(data[index])`` (or ``transform(data[index], index)`` for an
    :class:`IndexedTransform`, or ``data[index]`` without transform), a plain tensor of shape ``(len(index), ...)``;
    used with :class:`IndexBatchSampler` and ``DataLoader(batch_size=None)``. With ``labels`` it returns the tuple
    ``(x, labels[index])`` instead: the labels are indexed with the same index batch as the data (the transform
    sees the data only), so each label stays with its sample under any sampler, shuffling or sharding.

    Args:
        data: the samples, shape ``(N, ...)``: a tensor, or a row source read per index batch (e.g. images on disk,
            :mod:`ko_lightning.data.rows`).
        transform: optional batch transform (must be picklable when loader workers are used).
        labels: optional per-sample labels, shape ``(N,)`` (a ``ValueError`` names ``labels`` for another shape).
    """

    def __init__(
        self,
        data: Tensor | RowSource,
        transform: Callable[[Tensor], Tensor] | IndexedTransform | None = None,
        labels: Tensor | None = None,
    ) -> None:
        if labels is not None and (labels.ndim != 1 or labels.shape[0] != data.shape[0]):
            raise ValueError(
                f"labels must have shape (N,) = ({data.shape[0]},), one per sample of data, got {tuple(labels.shape)}"
            )
        self.data = data
        self.transform = transform
        self.labels = labels

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: Tensor | int) -> Tensor | tuple[Tensor, Tensor]:
        batch = self.data[index]
        if isinstance(self.transform, IndexedTransform):
            batch = self.transform(batch, torch.as_tensor(index))
        elif self.transform is not None:
            batch = self.transform(batch)
        return batch if self.labels is None else (batch, self.labels[index])


_END = object()


def _index_batch_sampler(sampler: object) -> IndexBatchSampler | None:
    """The :class:`IndexBatchSampler` behind a loader's sampler: the sampler itself, or the one inside Lightning's
    ``DistributedSamplerWrapper`` (kept as ``wrapper.dataset._sampler``); None for any other sampler."""
    if isinstance(sampler, IndexBatchSampler):
        return sampler
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
    return inner if isinstance(inner, IndexBatchSampler) else None


class _Position:
    """Where an :class:`IndexBatchLoader` stands in its epoch, shared with the index source of its iterators."""

    def __init__(self) -> None:
        self.pending: tuple[int, int] | None = None  # (epoch, batches to skip) restored by load_state_dict
        self.offset = 0  # batches skipped at the start of the current pass


class _ResumingIndexSampler:
    """The index source of an :class:`IndexBatchLoader`'s iterators: the loader's sampler, less the batches that a
    restored state says the epoch being resumed has already used.

    It refers to the loader's :class:`_Position`, not to the loader: torch's iterators keep their index source, and
    a loader -> iterator -> loader cycle would leave worker processes to the cyclic garbage collector, whose
    unordered finalization makes their shutdown wait for a timeout.
    """

    def __init__(self, position: _Position, sampler: Any) -> None:
        self.position = position
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        self.position.offset = 0
        return self._pass(iter(self.sampler))

    def _pass(self, batches: Iterator[Any]) -> Iterator[Any]:
        # The first batch starts the pass, which fixes its epoch; only then can the restored position be matched
        # to it (Lightning calls set_epoch after it creates the iterator).
        first = next(batches, _END)
        skip = self._take_skip()
        for _ in range(skip):  # index batches only: the skipped batches' data are never read
            first = next(batches, _END)
        self.position.offset = skip
        if first is _END:
            return
        yield first
        yield from batches

    def _take_skip(self) -> int:
        """Batches the pass that just started must skip: the restored position, if the pass is of its epoch."""
        pending, self.position.pending = self.position.pending, None
        if pending is None:
            return 0
        sampler = _index_batch_sampler(self.sampler)
        epoch, done = pending
        return done if sampler is not None and sampler.pass_epoch == epoch else 0


class IndexBatchLoader(DataLoader):
    """A ``DataLoader`` over an :class:`IndexBatchSampler` whose position in the epoch is saved and restored.

    Lightning's fit loop treats a training loader that has ``state_dict()`` and ``load_state_dict()`` as resumable
    (``lightning.fabric.utilities.types._Stateful``): it stores ``state_dict()`` in the checkpoint's loop state
    (``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]``) and, on resume, calls
    ``load_state_dict`` before it creates the iterator of the resumed epoch. The state is the epoch of the pass in
    progress and the number of batches this loader has delivered in it. The resumed pass regenerates that epoch's
    batch order and skips the delivered batches (their indices are drawn, their data are never read), so a run
    resumed from any step trains on exactly the batches of the uninterrupted run, in the same order. A state saved
    at the end of a pass resumes at the start of the next epoch; a restored position is used only by a pass of
    the same epoch (if the trainer has moved on to another epoch, that pass starts from its first batch).

    This holds with loader workers too: the skip happens in the main process before any index is sent to a worker,
    and the count is of batches delivered to the training loop, not of batches prefetched. Under DDP, Lightning
    re-creates the loader around a ``DistributedSamplerWrapper`` of the sampler; the state then counts the batches
    of this rank's shard (every rank has the same number and delivers in lockstep, so rank 0's saved state is every
    rank's), and the skip applies to the shard.

    Where the position cannot be restored, ``load_state_dict`` warns and the resumed epoch starts from its first
    batch: a checkpoint whose loader had a different number of batches per epoch (another data set, ``batch_size``
    or number of devices), or a sampler that is neither an :class:`IndexBatchSampler` nor Lightning's wrapper of one.
    A checkpoint written before loaders had a state holds no position: Lightning then calls nothing and the epoch
    restarts silently. Under DDP the resumed order also needs the same ``PL_GLOBAL_SEED`` (the wrapper's shuffling
    seed; ``seed_everything`` sets it). Batch transforms must be functions of the batch (this cannot be checked):
    seed random augmentations from the batch's indices (:class:`IndexedTransform`, as the image module's flips do),
    not from the global RNG, which Lightning does not restore (nor do loader workers, reseeded at every start).

    Build it with :func:`make_loader`.
    """

    _live_iterator: Any = None  # the iterator of the current pass

    @property
    def _position(self) -> _Position:
        position = self.__dict__.get("_position_state")
        if position is None:  # created on first use: Lightning re-creates loaders through DataLoader's __init__
            position = self._position_state = _Position()
        return position

    @property
    def _index_sampler(self) -> Any:
        # Where torch's loader iterators draw their indices from (in the main process, before any prefetching).
        base = DataLoader._index_sampler.fget(self)  # type: ignore[attr-defined]
        return _ResumingIndexSampler(self._position, base)

    def __iter__(self) -> Any:
        iterator = super().__iter__()
        self._live_iterator = iterator
        return iterator

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_live_iterator"] = None  # torch's loader iterators cannot be pickled
        return state

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches", "num_batches"}``: the epoch of the pass in progress (or of the next pass if none
        has started), the batches delivered in it, and the batches per pass (to detect a changed configuration)."""
        sampler = _index_batch_sampler(self.sampler)
        if sampler is None:
            return {}
        if sampler.pass_epoch is None or self._live_iterator is None:
            return {"epoch": sampler.epoch, "batches": 0, "num_batches": len(self)}
        delivered = self._position.offset + int(getattr(self._live_iterator, "_num_yielded", 0))
        return {"epoch": sampler.pass_epoch, "batches": delivered, "num_batches": len(self)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the position saved by :meth:`state_dict`: the next pass is that epoch's, less the batches
        already delivered (or the following epoch's, from its start, if the saved pass had ended)."""
        sampler = _index_batch_sampler(self.sampler)
        if sampler is None or not state_dict:
            warnings.warn(
                f"cannot restore the training loader's position: its sampler is a {type(self.sampler).__name__}, "
                f"not an IndexBatchSampler (or the checkpoint holds no position), so the resumed epoch starts from "
                "its first batch and the run differs from an uninterrupted one",
                stacklevel=2,
            )
            return
        epoch, done, saved = int(state_dict["epoch"]), int(state_dict["batches"]), int(state_dict["num_batches"])
        if saved != len(self):
            warnings.warn(
                f"the checkpoint's training loader had {saved} batches per epoch, this one has {len(self)} (another "
                f"data set, batch_size or number of devices): epoch {epoch} resumes from its first batch instead of "
                f"batch {done}, so the run differs from an uninterrupted one",
                stacklevel=2,
            )
            done = 0
        if done >= len(self):  # the saved pass had ended
            epoch, done = epoch + 1, 0
        # Set the epoch now: under DDP the wrapper draws the whole pass when the iterator is created, which Lightning
        # does before its own set_epoch call.
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        else:
            sampler.set_epoch(epoch)
        self._position.pending = (epoch, done) if done else None


def make_loader(
    data: Tensor | RowSource,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    seed: int = 0,
    num_workers: int = 0,
    transform: Callable[[Tensor], Tensor] | IndexedTransform | None = None,
    labels: Tensor | None = None,
) -> IndexBatchLoader:
    """An :class:`IndexBatchLoader` yielding plain tensor batches of ``data`` through :class:`IndexBatchSampler`
    (``(x, y)`` tuples with ``labels``).

    Its position in the epoch is part of Lightning's checkpoints (exact mid-epoch resume, see
    :class:`IndexBatchLoader`).

    Args:
        data: the samples, shape ``(N, ...)``.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch (seeded by ``seed`` and the epoch).
        drop_last: drop the final incomplete batch.
        seed: base seed of the shuffling.
        num_workers: loader worker processes (0 loads in the main process, the fastest choice for in-memory data).
        transform: optional per-batch transform (an :class:`IndexedTransform` also receives the batch's indices).
        labels: optional per-sample labels, shape ``(N,)``: batches are then ``(x, labels[index])`` tuples.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler = IndexBatchSampler(data.shape[0], batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
    return IndexBatchLoader(
        TensorBatchDataset(data, transform, labels),
        batch_size=None,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=None if labels is None else tuple,  # keeps (x, y) a tuple: torch's default would make a list
    )


class SplitTensorDataModule(L.LightningDataModule):
    """Base of the in-memory data modules: the loaders of named splits held as tensors.

    A subclass keeps every split (``"train"``, ``"val"``, ``"test"``) as one tensor and implements :meth:`_split`,
    which returns the tensor the loaders of a split draw from (running ``setup`` first if needed). This class
    validates and stores ``batch_size``, ``seed`` and ``num_workers`` and provides the loaders:

    - :meth:`train_dataloader`: shuffled batches, reshuffled every epoch (seeded by ``derive_seed(seed, 3)`` and the
      epoch), the last incomplete batch dropped; an :class:`IndexBatchLoader`, whose position in the epoch is part of
      Lightning's checkpoints (exact mid-epoch resume);
    - :meth:`val_dataloader` / :meth:`test_dataloader`: the split in order, all batches kept; an empty list (which
      Lightning skips) for an empty split.

    Each batch goes through :meth:`_batch_transform` (none by default). A module without some split may raise from
    :meth:`_split` (as :class:`~ko_lightning.data.images.ImageDataModule` does for ``"test"`` without ``test_path``).

    With ``labels=True`` the subclass also fills ``self._labels`` (split name -> int64 class indices ``(N,)``, row
    ``i`` the class of row ``i`` of the split's tensor) whenever it fills a split; every loader then yields
    ``(x, y)`` tuples, ``y`` the int64 labels ``(B,)`` of the batch's samples, and :meth:`labels_tensor` returns
    a split's labels. With ``labels=False`` (the default) batches are plain tensors.

    Args:
        batch_size: batch size of all loaders.
        seed: base seed of the shuffling (subclasses also seed their splits with it).
        num_workers: loader worker processes (0 is best for in-memory data).
        labels: yield ``(x, y)`` batches with the class labels ``y``.

    Raises:
        ValueError: naming ``batch_size`` if it is not positive, ``num_workers`` if it is negative.
    """

    def __init__(self, batch_size: int, seed: int, num_workers: int, labels: bool = False) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.labels = bool(labels)
        self._labels: dict[str, Tensor] = {}

    def _split(self, split: str) -> Tensor | RowSource:
        """The tensor (or row source read per batch) the loaders of ``split`` (``"train"``, ``"val"``, ``"test"``) draw
        from."""
        raise NotImplementedError(f"{type(self).__name__} must implement _split(split)")

    def _split_labels(self, split: str) -> Tensor | None:
        """The labels of ``split`` aligned with :meth:`_split` (None with ``labels=False``)."""
        if not self.labels:
            return None
        self._split(split)  # fills the split, and so its labels, if needed
        return self._labels[split]

    def labels_tensor(self, split: str = "train") -> Tensor:
        """The class labels of a split (``"train"``, ``"val"`` or ``"test"``): int64 ``(N_split,)``, row ``i`` the
        class of row ``i`` of the split's tensor (``train_tensor()``, ``val_tensor()``, ``test_tensor()``,
        ``raw_tensor(split)``): ``labels_tensor("train")[:n]`` labels ``train_tensor(n)``. A ``ValueError`` names
        ``labels`` if the module was built with ``labels=False``, ``split`` for another split name."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        labels = self._split_labels(split)
        if labels is None:
            raise ValueError(f"{type(self).__name__} was built with labels=False: pass labels=True to get class labels")
        return labels

    def _batch_transform(self, train: bool) -> Callable[[Tensor], Tensor] | IndexedTransform | None:
        """Transform applied to every batch of the train (``train=True``) or evaluation loaders; None: no transform."""
        return None

    def train_dataloader(self) -> IndexBatchLoader:
        """Shuffled training batches (reshuffled every epoch, last incomplete batch dropped); the loader's position
        in the epoch is saved in Lightning checkpoints, so a mid-epoch resume repeats the uninterrupted run."""
        return make_loader(
            self._split("train"),
            self.batch_size,
            shuffle=True,
            drop_last=True,
            seed=derive_seed(self.seed, 3),
            num_workers=self.num_workers,
            transform=self._batch_transform(True),
            labels=self._split_labels("train"),
        )

    def _eval_loader(self, split: str) -> IndexBatchLoader | list:
        data = self._split(split)
        if data.shape[0] == 0:
            return []  # Lightning skips an empty list of loaders
        return make_loader(
            data,
            self.batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=self.num_workers,
            transform=self._batch_transform(False),
            labels=self._split_labels(split),
        )

    def val_dataloader(self) -> IndexBatchLoader | list:
        """The validation split in order (an empty list when the split is empty)."""
        return self._eval_loader("val")

    def test_dataloader(self) -> IndexBatchLoader | list:
        """The test split in order (an empty list when the split is empty)."""
        return self._eval_loader("test")


class NormalizedSplitDataModule(SplitTensorDataModule):
    """A :class:`SplitTensorDataModule` whose splits are stored normalized as in docs/math.md §2.

    A subclass's ``setup`` fills ``self.mean`` and ``self.scale`` (the :func:`moment_normalization` statistics of
    its raw train split) and ``self._splits`` (``{"train", "val", "test"}`` -> normalized tensors), once: later
    calls must do nothing (with ``labels=True`` it fills ``self._labels`` alongside). This class provides
    :meth:`normalize` and :meth:`denormalize` and the split tensors :meth:`train_tensor`, :meth:`val_tensor` and
    :meth:`test_tensor`, running ``setup`` when first needed; the split tensors stay plain tensors with labels too
    (their labels: :meth:`labels_tensor`).

    Args:
        batch_size, seed, num_workers, labels: as in :class:`SplitTensorDataModule`.

    Attributes:
        mean: per-feature train mean in raw units, shape ``data_shape`` (after ``setup``).
        scale: global scale, a 0-d tensor (after ``setup``).
    """

    def __init__(self, batch_size: int, seed: int, num_workers: int, labels: bool = False) -> None:
        super().__init__(batch_size, seed, num_workers, labels)
        self.mean: Tensor | None = None
        self.scale: Tensor | None = None
        self._splits: dict[str, Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        """Fill ``mean``, ``scale`` and the splits (once); subclasses implement it."""
        raise NotImplementedError

    def _split(self, split: str) -> Tensor:
        self.setup()
        return self._splits[split]

    def _stats(self) -> tuple[Tensor, Tensor]:
        if self.mean is None or self.scale is None:
            self.setup()
        assert self.mean is not None and self.scale is not None
        return self.mean, self.scale

    def normalize(self, x: Tensor) -> Tensor:
        """Raw data, shape ``(B, *data_shape)`` -> model space: ``(x - mean) / scale``."""
        mean, scale = self._stats()
        return (x - mean.to(x.device, x.dtype)) / scale.to(x.device, x.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        """Model space -> raw data: ``x * scale + mean`` (the exact inverse of :meth:`normalize`)."""
        mean, scale = self._stats()
        return x * scale.to(x.device, x.dtype) + mean.to(x.device, x.dtype)

    def train_tensor(self, n: int | None = None, start: int = 0) -> Tensor:
        """The normalized training set as one tensor ``(N_train, *data_shape)``, or its samples ``[start, start + n)``
        (a random subset, since the split is in random order; a view). The input of the KO separation estimator."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        data = self._split("train")
        if n is None:
            return data if start == 0 else data[start:]  # the stored tensor itself when whole
        return data[start : start + n]

    @property
    def train_size(self) -> int:
        """The number of training samples (runs ``setup`` if needed)."""
        return int(self._split("train").shape[0])

    def val_tensor(self) -> Tensor:
        """The normalized validation set, shape ``(N_val, *data_shape)``."""
        return self._split("val")

    def test_tensor(self) -> Tensor:
        """The normalized test set, shape ``(N_test, *data_shape)``."""
        return self._split("test")
