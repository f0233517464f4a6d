"""Shared plumbing for the in-memory data modules: fast batch loaders, seeded splits, derived seeds.

Every data set in :mod:`ko_lightning.data` fits in memory as one tensor. Instead of letting a ``DataLoader`` fetch
``batch_size`` items one by one and collate them (slow in Python for 2D toys at batch 4096), the loaders here use a
sampler that yields whole *index batches* and a dataset whose ``__getitem__`` slices the tensor with them, with
``DataLoader(batch_size=None)``. A batch then costs one ``tensor[index]``.

Under DDP, Lightning wraps such a sampler in its ``DistributedSamplerWrapper``, which hands each rank a disjoint
subset of the batches (the sampler is seeded identically on every rank, so all ranks agree on the batch list).

The data modules share their loaders through :class:`SplitTensorDataModule`, and the normalized ones (digits, 2D
toys) their split tensors and ko-math §2 normalization through :class:`NormalizedSplitDataModule`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "IndexBatchSampler",
    "NormalizedSplitDataModule",
    "SplitTensorDataModule",
    "TensorBatchDataset",
    "derive_seed",
    "make_loader",
    "moment_normalization",
    "split_indices",
    "split_sizes",
]


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed from a base ``seed`` and integer ``keys`` (e.g. a split id and an epoch).

    Deterministic across processes and Python versions (it does not use ``hash``).

    Example:
        >>> derive_seed(0, 1) != derive_seed(0, 2) != derive_seed(1, 1)
        True
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(k) for k in keys)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class IndexBatchSampler(Sampler[Tensor]):
    """Yields whole batches of indices (``LongTensor`` of shape ``(batch_size,)``) into ``range(num_samples)``.

    With ``shuffle=True`` each epoch uses the permutation seeded by ``derive_seed(seed, epoch)``. The epoch is set by
    :meth:`set_epoch` (Lightning calls it before every epoch, also through its distributed wrapper) and otherwise
    advances by one after each pass, so plain iteration also reshuffles.

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
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of the next pass (called by Lightning at each epoch start)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        self.epoch += 1
        for i in range(len(self)):
            yield order[i * self.batch_size : (i + 1) * self.batch_size]


class TensorBatchDataset(Dataset[Tensor]):
    """A tensor seen as a data set that is indexed with whole index batches.

    ``dataset[index]`` returns ``transform(data[index])`` (or ``data[index]``), a plain tensor of shape
    ``(len(index), ...)``; used with :class:`IndexBatchSampler` and ``DataLoader(batch_size=None)``.

    Args:
        data: the samples, shape ``(N, ...)``.
        transform: optional batch transform (must be picklable when loader workers are used).
    """

    def __init__(self, data: Tensor, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: Tensor | int) -> Tensor:
        batch = self.data[index]
        return self.transform(batch) if self.transform is not None else batch


def make_loader(
    data: Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    seed: int = 0,
    num_workers: int = 0,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> DataLoader:
    """A ``DataLoader`` yielding plain tensor batches of ``data`` through :class:`IndexBatchSampler`.

    Args:
        data: the samples, shape ``(N, ...)``.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch (seeded by ``seed`` and the epoch).
        drop_last: drop the final incomplete batch.
        seed: base seed of the shuffling.
        num_workers: loader worker processes (0 loads in the main process, the fastest choice for in-memory data).
        transform: optional per-batch transform.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler = IndexBatchSampler(data.shape[0], batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
    return DataLoader(
        TensorBatchDataset(data, transform),
        batch_size=None,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def split_indices(num_samples: int, sizes: Sequence[int], seed: int) -> list[Tensor]:
    """Disjoint random index sets of the given ``sizes`` (the remainder is not returned), seeded by ``seed``.

    Example:
        >>> a, b = split_indices(10, [3, 7], seed=0)
        >>> sorted(a.tolist() + b.tolist()) == list(range(10))
        True
    """
    if sum(sizes) > num_samples or any(s < 0 for s in sizes):
        raise ValueError(f"cannot split {num_samples} samples into sizes {list(sizes)}")
    generator = torch.Generator().manual_seed(derive_seed(seed, 0x5EED))
    order = torch.randperm(num_samples, generator=generator)
    out, start = [], 0
    for size in sizes:
        out.append(order[start : start + size])
        start += size
    return out


def split_sizes(num_samples: int, val_fraction: float, test_fraction: float = 0.0) -> tuple[int, int, int]:
    """``(n_train, n_val, n_test)`` with ``n_val = round(val_fraction * N)`` and likewise for test.

    Raises:
        ValueError: naming ``val_fraction``/``test_fraction`` if a fraction is outside ``[0, 1)`` or nothing is left
            for training.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {value}")
    n_val = int(round(val_fraction * num_samples))
    n_test = int(round(test_fraction * num_samples))
    n_train = num_samples - n_val - n_test
    if n_train <= 0:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training samples out of "
            f"{num_samples}"
        )
    return n_train, n_val, n_test


def moment_normalization(data: Tensor) -> tuple[Tensor, Tensor]:
    """Statistics of the normalization of ko-math §2: a per-feature mean and one global scale.

    ``mean = E[x]`` (per feature, shape ``data.shape[1:]``) and ``scale = sqrt(E||x - mean||^2 / d)`` (a 0-d
    tensor), so that ``(x - mean) / scale`` has mean 0 and per-dimension second moment ``E||x||^2 / d = 1``.
    Computed in float64 and returned in float32.

    Args:
        data: samples, shape ``(N, ...)``.

    Example:
        >>> x = torch.randn(1000, 3) * 5 + 2
        >>> mean, scale = moment_normalization(x)
        >>> y = (x - mean) / scale
        >>> bool(abs(y.pow(2).mean() - 1) < 1e-5)
        True
    """
    if data.ndim < 2 or data.shape[0] < 2:
        raise ValueError(f"need at least 2 samples of shape (N, ...), got shape {tuple(data.shape)}")
    x = data.double()
    mean = x.mean(dim=0)
    scale = (x - mean).pow(2).mean().sqrt()
    if not bool(scale > 0):
        raise ValueError("the data are constant: cannot normalize to unit second moment")
    return mean.float(), scale.float()


class SplitTensorDataModule(L.LightningDataModule):
    """Base of the in-memory data modules: the loaders of named splits held as tensors.

    A subclass keeps every split (``"train"``, ``"val"``, ``"test"``) as one tensor and implements :meth:`_split`,
    which returns the tensor the loaders of a split draw from (running ``setup`` first if needed). This class
    validates and stores ``batch_size``, ``seed`` and ``num_workers`` and provides the loaders:

    - :meth:`train_dataloader`: shuffled batches, reshuffled every epoch (seeded by ``derive_seed(seed, 3)`` and the
      epoch), the last incomplete batch dropped;
    - :meth:`val_dataloader` / :meth:`test_dataloader`: the split in order, all batches kept; an empty list (which
      Lightning skips) for an empty split.

    Each batch goes through :meth:`_batch_transform` (none by default). A module without some split may raise from
    :meth:`_split` (as :class:`~ko_lightning.data.images.ImageDataModule` does for ``"test"`` without ``test_path``).

    Args:
        batch_size: batch size of all loaders.
        seed: base seed of the shuffling (subclasses also seed their splits with it).
        num_workers: loader worker processes (0 is best for in-memory data).

    Raises:
        ValueError: naming ``batch_size`` if it is not positive, ``num_workers`` if it is negative.
    """

    def __init__(self, batch_size: int, seed: int, num_workers: int) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers

    def _split(self, split: str) -> Tensor:
        """The tensor that the loaders of ``split`` (``"train"``, ``"val"`` or ``"test"``) draw from."""
        raise NotImplementedError(f"{type(self).__name__} must implement _split(split)")

    def _batch_transform(self, train: bool) -> Callable[[Tensor], Tensor] | None:
        """Transform applied to every batch of the train (``train=True``) or evaluation loaders; None: no transform."""
        return None

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (reshuffled every epoch, last incomplete batch dropped)."""
        return make_loader(
            self._split("train"),
            self.batch_size,
            shuffle=True,
            drop_last=True,
            seed=derive_seed(self.seed, 3),
            num_workers=self.num_workers,
            transform=self._batch_transform(True),
        )

    def _eval_loader(self, split: str) -> DataLoader | list:
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
        )

    def val_dataloader(self) -> DataLoader | list:
        """The validation split in order (an empty list when the split is empty)."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        """The test split in order (an empty list when the split is empty)."""
        return self._eval_loader("test")


class NormalizedSplitDataModule(SplitTensorDataModule):
    """A :class:`SplitTensorDataModule` whose splits are stored normalized as in ko-math §2.

    A subclass's ``setup`` fills ``self.mean`` and ``self.scale`` (the :func:`moment_normalization` statistics of
    its raw train split) and ``self._splits`` (``{"train", "val", "test"}`` -> normalized tensors), once: later
    calls must do nothing. This class provides :meth:`normalize` and :meth:`denormalize` and the split tensors
    :meth:`train_tensor`, :meth:`val_tensor` and :meth:`test_tensor`, running ``setup`` when first needed.

    Args:
        batch_size, seed, num_workers: as in :class:`SplitTensorDataModule`.

    Attributes:
        mean: per-feature train mean in raw units, shape ``data_shape`` (after ``setup``).
        scale: global scale, a 0-d tensor (after ``setup``).
    """

    def __init__(self, batch_size: int, seed: int, num_workers: int) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.mean: Tensor | None = None
        self.scale: Tensor | None = None
        self._splits: dict[str, Tensor] = {}

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

    def train_tensor(self, n: int | None = None) -> Tensor:
        """The normalized training set as one tensor ``(N_train, *data_shape)``, or its first ``n`` samples (a
        random subset, since the split is in random order). The input of the KO separation estimator."""
        data = self._split("train")
        return data if n is None else data[:n]

    def val_tensor(self) -> Tensor:
        """The normalized validation set, shape ``(N_val, *data_shape)``."""
        return self._split("val")

    def test_tensor(self) -> Tensor:
        """The normalized test set, shape ``(N_test, *data_shape)``."""
        return self._split("test")
