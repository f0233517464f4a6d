"""How precisely a (merged) separation-function estimate is known: per-angle precision ``1 / SE^2``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ko_lightning.kinetic.estimators import SeparationSums

__all__ = ["EstimatePrecision"]


class EstimatePrecision:
    """The precision ``sum_k 1 / SE_k^2`` per grid angle of the estimates merged so far.

    Merging independent estimates weighted by their sample counts, as :meth:`SeparationFunction.merge` does, has
    (for estimates of similar per-sample variance) the precision of the sum, so the merged standard error is
    ``1 / sqrt(precision)``. A grid point whose estimate is exact (standard error 0) has infinite precision.
    """

    def __init__(self) -> None:
        self.precision: Tensor | None = None

    def add(self, sums: SeparationSums, merged: bool) -> None:
        """Account for the estimate of ``sums``; ``merged=False`` replaces what was known (the estimate is not
        pooled with the previous one)."""
        se = sums.standard_error.double().cpu()
        precision = torch.where(se > 0, 1.0 / se.clamp_min(1e-300) ** 2, torch.full_like(se, torch.inf))
        if merged and self.precision is not None and self.precision.shape == precision.shape:
            precision = self.precision + precision
        self.precision = precision

    def max_standard_error(self) -> float:
        """The largest standard error of lambda over the grid (``inf`` before any estimate)."""
        if self.precision is None:
            return float("inf")
        return float(1.0 / self.precision.min().sqrt())

    def state_dict(self) -> dict[str, Any]:
        return {"precision": None if self.precision is None else self.precision.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        value = state.get("precision")
        self.precision = None if value is None else torch.as_tensor(value, dtype=torch.float64)
