"""Data normalization statistics: the mean and the per-dimension second moment ``v`` (docs/math.md §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["DataNormalization"]


@dataclass(frozen=True)
class DataNormalization:
    """Mean and per-dimension second moment of a data set, ``v = E||x - mean||^2 / d``.

    The kinetic-energy formulas assume normalized data, ``E y = 0`` and ``E||y||^2 = d``. Raw data ``x`` relate to
    it by ``y = (x - mean) / sqrt(v)``; a path ``(alpha, sigma)`` on raw (centred) data is the path
    ``(sqrt(v) alpha, sigma)`` on ``y``, so the solver and the kinetic energy take ``second_moment=v`` and work in
    the rescaled plane (end point ``(sqrt(v), sigma_min)``). The estimators normalize internally with this object.

    Attributes:
        mean: per-coordinate mean, shaped like one sample (float64).
        second_moment: ``v > 0``.
        count: number of samples the statistics came from (for combining shards with ``+``).

    Example:
        >>> norm = DataNormalization.from_data(torch.tensor([[1.0, 3.0], [3.0, 5.0]]))
        >>> norm.mean.tolist(), norm.second_moment
        ([2.0, 4.0], 1.0)
    """

    mean: Tensor
    second_moment: float
    count: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.second_moment) and self.second_moment > 0):
            raise ValueError(f"second_moment must be finite and > 0, got {self.second_moment!r}")
        if int(self.count) < 1:
            raise ValueError(f"count must be >= 1, got {self.count!r}")

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (the mean on the CPU)."""
        return {"mean": self.mean.cpu(), "second_moment": self.second_moment, "count": self.count}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DataNormalization:
        """Rebuild what :meth:`state_dict` saved."""
        return cls(state["mean"], float(state["second_moment"]), int(state["count"]))

    @classmethod
    def from_data(cls, x: Tensor, chunk: int = 8192) -> DataNormalization:
        """Statistics of samples ``x`` of shape ``(n, ...)`` (accumulated in float64, ``chunk`` rows at a time).

        Raises:
            ValueError: naming ``x`` if it is not a tensor with at least one sample and one feature, has
                non-finite values, or is constant (``v = 0``: nothing to normalize by).
        """
        if not torch.is_tensor(x):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 2 or x.shape[0] == 0 or x[0].numel() == 0:
            raise ValueError(f"x must have shape (n, ...) with n >= 1 samples and >= 1 feature, got {tuple(x.shape)}")
        n, d = x.shape[0], x[0].numel()
        flat = x.reshape(n, d)
        total = torch.zeros(d, dtype=torch.float64, device=x.device)
        for i in range(0, n, chunk):
            block = flat[i : i + chunk].to(torch.float64)
            if not bool(torch.isfinite(block).all()):
                raise ValueError("x has non-finite values")
            total += block.sum(0)
        mean = total / n
        sq = torch.zeros((), dtype=torch.float64, device=x.device)
        for i in range(0, n, chunk):  # second pass: centred sums, no cancellation for large means
            sq += ((flat[i : i + chunk].to(torch.float64) - mean) ** 2).sum()
        v = float(sq) / (n * d)
        if not v > 0:
            raise ValueError("x is constant (zero variance); the separation function is undefined")
        return cls(mean.reshape(x.shape[1:]), v, n)

    @property
    def dim(self) -> int:
        """Number of features ``d``."""
        return self.mean.numel()

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / sqrt(v)`` in fp32 for samples ``x`` of shape ``(n, *mean.shape)``."""
        if tuple(x.shape[1:]) != tuple(self.mean.shape):
            raise ValueError(f"x must have sample shape {tuple(self.mean.shape)}, got {tuple(x.shape[1:])}")
        mean = self.mean.to(device=x.device, dtype=torch.float32)
        return (x.to(torch.float32) - mean) * (1.0 / math.sqrt(self.second_moment))

    def __add__(self, other: DataNormalization) -> DataNormalization:
        """Statistics of the union of two disjoint shards (exact pooled mean and centred second moment)."""
        if not isinstance(other, DataNormalization):
            return NotImplemented
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"other has sample shape {tuple(other.mean.shape)}, expected {tuple(self.mean.shape)}")
        n_a, n_b = self.count, other.count
        mean_b = other.mean.to(self.mean)
        mean = (n_a * self.mean + n_b * mean_b) / (n_a + n_b)
        d = self.dim
        spread_a = float(((self.mean - mean) ** 2).sum()) / d
        spread_b = float(((mean_b - mean) ** 2).sum()) / d
        v = (n_a * (self.second_moment + spread_a) + n_b * (other.second_moment + spread_b)) / (n_a + n_b)
        return DataNormalization(mean, v, n_a + n_b)
