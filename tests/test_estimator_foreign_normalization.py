"""The data estimator under a normalization that is not the data's own (a shard under global statistics)."""

from __future__ import annotations

import math

import torch

from ko_lightning.kinetic import DataNormalization, default_theta_grid, separation_sums_from_data


def test_control_variate_d1_has_mean_zero_under_a_foreign_normalization() -> None:
    """With the data scaled so that ``m2 = mean ||y||^2 / d = 2``, ``E[A] - E[B] = m2 - 1 = 1``: the control variate
    must subtract it, or the estimate of ``1 - lambda`` is biased by ``b1 (m2 - 1)``.

    Tolerance: 5 Monte-Carlo standard errors of the mean of ``D1`` per grid point (a false alarm has probability
    below 1e-5 over the 16 points), where an uncorrected ``D1`` would sit at ``1`` (hundreds of standard errors).
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=gen)
    own = DataNormalization.from_data(x)
    foreign = DataNormalization(own.mean, own.second_moment / 2.0, own.count)  # y = (x - mean) / sqrt(v / 2)
    theta = default_theta_grid(16)
    sums = separation_sums_from_data(x, theta, n_queries=800, normalization=foreign, generator=gen)
    mean = sums.cv_sum / sums.count
    var = (sums.cv_sq / sums.count - mean**2).clamp_min(0.0)
    standard_error = torch.sqrt(var / sums.count)
    assert math.isclose(float(((x - own.mean) ** 2).mean() / (own.second_moment / 2.0)), 2.0, rel_tol=1e-9)
    assert bool((mean.abs() <= 5.0 * standard_error + 1e-12).all()), (mean, standard_error)
