"""The scikit-learn handwritten digits (1797 images of 8 x 8 pixels, values 0..16), shipped with sklearn: offline."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ko_lightning.data.base import NormalizedSplitDataModule, moment_normalization, split_indices, split_sizes
from ko_lightning.likelihood.pixels import DIGITS_LEVELS, PixelMap

__all__ = ["DigitsDataModule"]

_MAX_PIXEL = 16.0


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[Tensor, Tensor]:
    """The 1797 x 64 raw pixel values (0..16, float32) of ``sklearn.datasets.load_digits`` and their 1797 digit
    classes (0..9, int64), read once per process."""
    from sklearn.datasets import load_digits  # bundled with sklearn: no download

    digits = load_digits()
    return torch.as_tensor(digits.data, dtype=torch.float32), torch.as_tensor(digits.target, dtype=torch.int64)


class DigitsDataModule(NormalizedSplitDataModule):
    """Real, small image data for fast experiments: ``sklearn.datasets.load_digits``, normalized as in docs/math.md §2.

    The 1797 images are split at random (seeded) into train/val/test. On the train split only, the per-pixel mean
    ``mu`` and one global scale ``c = sqrt(E||x - mu||^2 / 64)`` are computed, and every split is mapped to
    ``(x - mu) / c``: the train split then has mean 0 and per-dimension second moment 1. Batches are plain tensors
    of shape ``(B, 1, 8, 8)``, or ``(B, 64)`` with ``flatten=True``; with ``labels=True`` they are tuples
    ``(x, y)``, ``y`` the int64 digit classes ``(B,)`` in ``0..9`` of the images (``load_digits().target``).

    Args:
        batch_size: batch size of all loaders (train reshuffles every epoch and drops the last incomplete batch).
        val_fraction: fraction of the 1797 images held out for validation (may be 0: no validation loader).
        test_fraction: fraction held out for testing (may be 0: no test loader).
        seed: seed of the split and of the shuffling.
        flatten: yield ``(B, 64)`` vectors instead of ``(B, 1, 8, 8)`` images.
        num_workers: loader worker processes (0 is best for in-memory data).
        labels: yield ``(x, y)`` batches with the digit classes; :meth:`labels_tensor` gives a split's classes.

    Attributes:
        data_shape: ``(1, 8, 8)``, or ``(64,)`` with ``flatten=True``.
        mean: per-pixel train mean in raw pixel units, shape ``data_shape`` (after :meth:`setup`).
        scale: global scale, a 0-d tensor (after :meth:`setup`).
        indices: ``{"train", "val", "test"}`` -> indices into ``load_digits().data`` (after :meth:`setup`).
        num_classes: 10 with ``labels=True``, None without (batches carry no labels).

    Example:
        >>> dm = DigitsDataModule(batch_size=64)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader())).shape
        torch.Size([64, 1, 8, 8])
        >>> dm.to_display(dm.train_tensor(4)).shape  # images in [0, 1] for plotting
        torch.Size([4, 1, 8, 8])
    """

    def __init__(
        self,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        flatten: bool = False,
        num_workers: int = 0,
        labels: bool = False,
    ) -> None:
        super().__init__(batch_size, seed, num_workers, labels)  # validates batch_size and num_workers
        split_sizes(1797, val_fraction, test_fraction)  # validates the fractions early
        self.save_hyperparameters(logger=False)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.flatten = flatten
        self.data_shape: tuple[int, ...] = (64,) if flatten else (1, 8, 8)
        self.indices: dict[str, Tensor] = {}
        self.num_classes: int | None = 10 if labels else None

    def setup(self, stage: str | None = None) -> None:
        """Load, split and normalize (once; later calls do nothing)."""
        if self._splits:
            return
        raw, targets = _load_digits()  # (1797, 64), values 0..16, and (1797,); never modified in place
        sizes = split_sizes(raw.shape[0], self.val_fraction, self.test_fraction)
        if self.batch_size > sizes[0]:
            raise ValueError(f"batch_size={self.batch_size} exceeds the {sizes[0]} training images")
        train_idx, val_idx, test_idx = split_indices(raw.shape[0], sizes, self.seed)
        self.indices = {"train": train_idx, "val": val_idx, "test": test_idx}
        mean, scale = moment_normalization(raw[train_idx])
        self.mean, self.scale = mean.reshape(self.data_shape), scale
        self._splits = {
            name: self.normalize(raw[idx].reshape(-1, *self.data_shape)) for name, idx in self.indices.items()
        }
        if self.labels:
            self._labels = {name: targets[idx] for name, idx in self.indices.items()}

    def denormalize(self, x: Tensor, clamp: bool = False) -> Tensor:
        """Model space -> raw pixel values: ``x * scale + mean``, the exact inverse of :meth:`normalize`.

        Args:
            x: normalized samples, shape ``(B, *data_shape)``.
            clamp: clip the result to the valid pixel range ``[0, 16]`` (for generated samples).
        """
        out = super().denormalize(x)
        return out.clamp(0.0, _MAX_PIXEL) if clamp else out

    def raw_tensor(self, split: str = "train") -> Tensor:
        """A split's pixels in the data's own units: uint8 values ``0..16``, shape ``(N, *data_shape)``, row ``i``
        the image of row ``i`` of the split's normalized tensor (the input of ``model.bpd``)."""
        self.setup()
        if split not in self.indices:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        raw, _ = _load_digits()
        return raw[self.indices[split]].reshape(-1, *self.data_shape).to(torch.uint8)

    def pixel_map(self) -> PixelMap:
        """The map from pixels (17 levels, ``0..16``) to model space, ``y = (pixel + w - mean) / scale`` with the
        train split's statistics: what ``model.bpd`` dequantizes with (docs/math.md §8)."""
        mean, scale = self._stats()  # sets up on first use
        return PixelMap.from_normalization(mean, scale, DIGITS_LEVELS)

    def to_display(self, x: Tensor) -> Tensor:
        """Normalized samples -> images in ``[0, 1]`` of shape ``(B, 1, 8, 8)`` (0 = background), for plotting."""
        return (self.denormalize(x, clamp=True) / _MAX_PIXEL).reshape(-1, 1, 8, 8)
