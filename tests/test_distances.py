"""Sample distances: exact values on shifted sets, brute-force MMD."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kinetic_helpers import U32, U64, gamma
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
    # Exact per direction (the shift keeps the sort order), so only the directions are random: SW^2 is the mean
    # of m^2 cos^2(phi) over 20000 uniform angles, Var(cos^2) = 3/8 - 1/4, and SW's relative standard error is
    # half SW^2's. Allow 4 standard errors.
    rel_se = 0.5 * math.sqrt((3 / 8 - 1 / 4) / 20_000) / (1 / 2)
    assert sw == pytest.approx(m / math.sqrt(2), rel=4 * rel_se)
    # fp32 x + m rounds each shifted point by <= u |x + m|; float64 after that, rounded to fp32 at the end
    one_d = float(sliced_wasserstein(x[:, :1], x[:, :1] + m))
    assert one_d == pytest.approx(m, rel=U32 * (float(x[:, 0].abs().max()) + m) / m + U32)


def test_sliced_wasserstein_handles_unequal_sizes() -> None:
    x = torch.linspace(-1, 1, 1001)[:, None]
    y = torch.linspace(-1, 1, 333)[:, None] + 0.5
    # Both are read at the same quantile levels by index floor(level n): each sorted grid is within its
    # spacing 2 / (n - 1) of its exact (uniform) quantile, so every difference is within the two spacings of 0.5.
    assert float(sliced_wasserstein(x, y)) == pytest.approx(0.5, abs=2 / 1000 + 2 / 332)


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
    # float64 both ways (sums of <= 132 kernel values, exp, distances: <= gamma_1000 (u64) of the terms), and
    # the result is rounded to fp32 once (u relative)
    expected = xx + yy - 2 * xy
    tol = U32 * abs(expected) + gamma(1000, U64) * (xx + yy + 2 * xy)
    assert float(mmd_rbf(x, y, bandwidths)) == pytest.approx(expected, abs=tol)


def test_mmd_separates_distributions() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g)
    same = float(mmd_rbf(x, y))
    shifted = float(mmd_rbf(torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g) + 0.5))

    # Threshold: 4 standard errors of the unbiased MMD^2 under equal distributions, Var = 2 E[h^2] / (n (n - 1))
    # for the U-statistic kernel h(i, j) = k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i), estimated here.
    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(a.double(), b.double()).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in (0.1, 0.2, 0.5, 1.0, 2.0))

    h = (kernel(x, x) + kernel(y, y) - kernel(x, y) - kernel(y, x)).fill_diagonal_(0.0)
    se = math.sqrt(2 * float((h * h).sum()) / (800 * 799) ** 2)
    assert abs(same) < 4 * se < shifted


def test_distance_shape_errors() -> None:
    with pytest.raises(ValueError, match="same D"):
        sliced_wasserstein(torch.randn(10, 2), torch.randn(10, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        mmd_rbf(torch.randn(1, 2), torch.randn(10, 2))


@pytest.mark.parametrize("metric", [sliced_wasserstein, mmd_rbf])
def test_a_non_finite_sample_is_an_error_not_a_nan_distance(metric) -> None:
    x, y = torch.randn(50, 2), torch.randn(60, 2)
    y[7, 1] = float("inf")
    with pytest.raises(ValueError, match=r"y has 1 sample\(s\) with NaN or infinite"):
        metric(x, y)
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x has 1 sample\(s\) with NaN or infinite"):
        metric(x, y)
