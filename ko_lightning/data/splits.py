"""Seeded splits of a data set and the moment normalization of docs/math.md §2 (used by the data modules)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ko_lightning.seeding import derive_seed

__all__ = ["moment_normalization", "split_indices", "split_sizes"]


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
    """Statistics of the normalization of docs/math.md §2: a per-feature mean and one global scale.

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
