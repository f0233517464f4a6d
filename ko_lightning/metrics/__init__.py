"""Evaluation metrics."""

from ko_lightning.metrics.distances import mmd_rbf, sliced_wasserstein

__all__ = ["mmd_rbf", "sliced_wasserstein"]
