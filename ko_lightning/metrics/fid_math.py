"""The formulas of FID and KID, on feature tensors (no network, no cache).

FID (Frechet Inception Distance) is the Frechet distance between Gaussians fitted to two feature sets, with means
``mu1, mu2`` and unbiased covariances ``S1, S2``::

    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

KID (Kernel Inception Distance) is the unbiased squared MMD with the cubic polynomial kernel
``k(a, b) = (a.b / d + 1)^3`` (``d`` the feature dimension): for subsets ``x_1..x_m`` and ``y_1..y_m``::

    MMD^2_u = 1/(m(m-1)) sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] - 2/m^2 sum_{i, j} k(x_i, y_j)

averaged over ``kid_subsets`` random subsets of ``m = kid_subset_size`` samples from each set (reported as mean
and standard deviation; it can be slightly negative).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ko_lightning.metrics.checks import check_positive_int

__all__ = [
    "check_feature_pair",
    "check_kid_counts",
    "fid_from_features",
    "fid_from_statistics",
    "fid_statistics",
    "kid_from_features",
]


def fid_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of ``(N, D)`` features, in float64.

    ``mu = (1/N) sum_n f_n`` and ``S = 1/(N-1) sum_n (f_n - mu)(f_n - mu)^T``.

    Returns:
        ``(mu, S)`` of shapes ``(D,)`` and ``(D, D)``.
    """
    f = features.detach().cpu().double().numpy()
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def fid_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))`` (torch-fidelity's and pytorch-fid's method).

    ``S1 S2`` is similar to the PSD matrix ``S1^(1/2) S2 S1^(1/2)``, so its eigenvalues are real and >= 0 up to
    round-off and ``Tr((S1 S2)^(1/2))`` is the sum of their square roots (real parts, for round-off).
    """
    diff = mu1 - mu2
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
    tr_covmean = float(np.sqrt(eigenvalues).real.sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def check_feature_pair(features1: Tensor, features2: Tensor) -> None:
    """Both sets are tensors ``(N, D)`` with ``N >= 2`` and the same ``D``.

    Raises:
        ValueError: naming ``features1`` or ``features2`` otherwise.
    """
    for name, f in (("features1", features1), ("features2", features2)):
        if not isinstance(f, Tensor) or f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be a tensor of shape (N, D) with N >= 2, got {getattr(f, 'shape', f)!r}")
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(f"feature dimensions differ: {features1.shape[1]} vs {features2.shape[1]}")


def check_kid_counts(kid_subset_size: int, n_generated: int, n_reference: int) -> None:
    """Both sets hold at least ``kid_subset_size`` samples (KID subsets are drawn without replacement).

    Raises:
        ValueError: naming ``kid_subset_size`` and both counts otherwise.
    """
    if n_generated < kid_subset_size or n_reference < kid_subset_size:
        raise ValueError(
            f"kid_subset_size={kid_subset_size} exceeds the number of samples (generated: {n_generated}, reference: "
            f"{n_reference}); lower kid_subset_size to at most {min(n_generated, n_reference)} or pass more samples"
        )


def fid_from_features(features1: Tensor, features2: Tensor) -> float:
    """FID between two feature sets ``(N1, D)`` and ``(N2, D)``.

    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` with unbiased sample covariances, in float64.

    Raises:
        ValueError: if the sets are not 2-D with the same ``D`` or have fewer than 2 samples.

    Example:
        >>> import torch
        >>> x = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
        >>> fid_from_features(x, x) < 1e-9, round(fid_from_features(x, x + 1.0), 6)  # a shift by 1 in 4 dims
        (True, 4.0)
    """
    check_feature_pair(features1, features2)
    return fid_from_statistics(*fid_statistics(features1), *fid_statistics(features2))


def kid_from_features(
    features1: Tensor, features2: Tensor, kid_subset_size: int, kid_subsets: int = 100, seed: int = 2020
) -> tuple[float, float]:
    """KID (mean, std over subsets) between two feature sets, with torch-fidelity's formula.

    The unbiased ``MMD^2`` with the cubic kernel ``k(a, b) = (a.b / d + 1)^3`` on ``kid_subsets`` random subsets
    of ``kid_subset_size`` samples of each set (see the module docstring); pure arithmetic on the tensors given,
    in float64.

    Args:
        features1: ``(N1, D)``, e.g. the generated set.
        features2: ``(N2, D)``, e.g. the reference set.
        kid_subset_size: samples per subset (at most ``min(N1, N2)``).
        kid_subsets: number of subsets.
        seed: seed of the subset draws.

    Returns:
        ``(mean, std)`` of the subset estimates.

    Raises:
        ValueError: naming ``kid_subset_size`` if a set has fewer samples than it.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    check_feature_pair(features1, features2)
    check_positive_int("kid_subset_size", kid_subset_size)
    check_positive_int("kid_subsets", kid_subsets)
    check_kid_counts(kid_subset_size, features1.shape[0], features2.shape[0])
    out = kid_features_to_metric(
        features1.detach().cpu().double(),
        features2.detach().cpu().double(),
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        rng_seed=seed,
        verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])
