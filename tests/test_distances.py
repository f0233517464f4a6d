"""Sample distances: exact values on shifted sets, brute-force MMD."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ko_lightning.metrics import mmd_rbf, sliced_wasserstein


def test_sliced_wasserstein_of_identical_sets_is_zero() -> None:
    x = torch.randn(500, 3)
    assert float(sliced_wasserstein(x, x.clone())) == 0.0


def test_sliced_wasserstein_of_a_translation() -> None:
    # y = x + m e1: every projection differs by m w1, so SW2^2 = m^2 E[w1^2] = m^2 / D for uniform directions.
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    m = 0.8
    y = x + torch.tensor([m, 0.0])
    sw = float(sliced_wasserstein(x, y, n_projections=20_000, generator=torch.Generator().manual_seed(1)))
    assert sw == pytest.approx(m / math.sqrt(2), rel=0.02)
    one_d = float(sliced_wasserstein(x[:, :1], x[:, :1] + m))
    assert one_d == pytest.approx(m, rel=1e-6)


def test_sliced_wasserstein_handles_unequal_sizes() -> None:
    x = torch.linspace(-1, 1, 1001)[:, None]
    y = torch.linspace(-1, 1, 333)[:, None] + 0.5
    assert float(sliced_wasserstein(x, y)) == pytest.approx(0.5, abs=0.01)


def test_mmd_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 2, generator=g), torch.randn(9, 2, generator=g) + 0.5
    bandwidths = (0.3, 1.0)

    def k(a, b):
        d2 = float(((a - b) ** 2).sum())
        return sum(math.exp(-d2 / (2 * h * h)) for h in bandwidths)

    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(12), 2)) / (12 * 11)
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(9), 2)) / (9 * 8)
    xy = sum(k(a, b) for a in x for b in y) / (12 * 9)
    assert float(mmd_rbf(x, y, bandwidths)) == pytest.approx(xx + yy - 2 * xy, rel=1e-5)


def test_mmd_separates_distributions() -> None:
    g = torch.Generator().manual_seed(3)
    same = float(mmd_rbf(torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g)))
    shifted = float(mmd_rbf(torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g) + 0.5))
    assert abs(same) < 0.01 < shifted


def test_distance_shape_errors() -> None:
    with pytest.raises(ValueError, match="same D"):
        sliced_wasserstein(torch.randn(10, 2), torch.randn(10, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        mmd_rbf(torch.randn(1, 2), torch.randn(10, 2))
