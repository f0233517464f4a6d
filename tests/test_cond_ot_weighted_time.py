"""Cond-OT's weighting of noise levels on another path (``time_sampler="cond_ot_snr"``, docs/math.md §1.5)."""

from __future__ import annotations

import math

import pytest
import torch

from ko_lightning.kinetic import SeparationFunction, default_theta_grid, solve_ko
from ko_lightning.paths import CondOTPath, CosinePath, GaussianPath, TabulatedPath
from ko_lightning.time_samplers import CondOTWeightedTime, make_time_sampler

CPU = torch.device("cpu")


def _ko_like_path() -> TabulatedPath:
    """A solved KO path with a fast turn near t = 0 (lambda well above the Gaussian bound at low SNR), floor 0.1."""
    theta = default_theta_grid(64)
    lam = (torch.sin(theta) ** 2) ** 0.7
    return solve_ko(SeparationFunction(theta, lam.clamp(0, 1), torch.ones_like(theta)), gamma_floor=0.1).path


def _draw(path: GaussianPath, share: float, n: int, t_eps: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    sampler = CondOTWeightedTime(share)
    t, w = sampler.weighted_times(path, n, torch.Generator().manual_seed(seed), CPU, t_eps)
    return t.double(), w.double()


def test_on_cond_ot_it_is_the_uniform_draw_with_unit_weights() -> None:
    """Cond-OT's own weighting on Cond-OT: ``alpha' sigma - alpha sigma' = 1`` and ``(alpha + sigma)^2 = 1``."""
    t, w = _draw(CondOTPath(), 1.0, 10_000, 0.0, seed=1)
    u = torch.rand(10_000, generator=torch.Generator().manual_seed(1)).double()
    assert torch.allclose(t, u, atol=1e-6)
    assert torch.allclose(w, torch.ones_like(w), atol=1e-6)


def test_on_cosine_the_target_is_the_uniform_objective() -> None:
    """On the cosine path ``alpha' sigma - alpha sigma' = pi / 2`` is constant: uniform times in its velocity loss
    already weight each SNR as Cond-OT does, so the draw's weights are exactly ``1 / q`` with
    ``q = (1 + sin(pi t))^-1 / mean``, where the mean of ``1 / (1 + sin(pi t))`` over [0, 1] is ``2 / pi``: each
    loss is weighted by ``(2 / pi) (1 + sin(pi t))``."""
    t, w = _draw(CosinePath(), 1.0, 50_000, 0.0)
    expected = (2.0 / math.pi) * (1.0 + torch.sin(math.pi * t))
    # the table is piecewise constant on 2048 cells: |d/dt| of the weight <= 2, so a cell is off by <= 2 / 4096
    assert torch.allclose(w, expected, atol=2.0 / 4096 + 1e-6)


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_the_weighted_draw_estimates_its_objective(share: float) -> None:
    """``E_q[w f(t)] = mean_t[c(t) f(t)]`` with ``c = (1 - share) + share w_ot / mean(w_ot)`` and
    ``w_ot = 1 / (alpha' sigma - alpha sigma')``, here against trapezoid quadrature on a fine grid."""
    path, t_eps = _ko_like_path(), 0.01
    t, w = _draw(path, share, 400_000, t_eps)
    assert float(t.min()) >= t_eps and float(t.max()) <= 1 - t_eps
    f = torch.cos(3 * t) + t**2
    estimate, se = float((w * f).mean()), float((w * f).std() / math.sqrt(t.numel()))
    grid = torch.linspace(t_eps, 1 - t_eps, 40_001, dtype=torch.float64)
    c = path(grid.float())
    rate = c.d_alpha.double() * c.sigma.double() - c.alpha.double() * c.d_sigma.double()
    w_ot = 1.0 / rate
    span = 1 - 2 * t_eps
    target = (1 - share) + share * w_ot / (float(torch.trapezoid(w_ot, grid)) / span)
    exact = float(torch.trapezoid(target * (torch.cos(3 * grid) + grid**2), grid)) / span
    # 4 standard errors plus the table's piecewise-constant error (2048 cells) on this smooth integrand
    assert abs(estimate - exact) < 4 * se + 2e-3, (estimate, exact, se)


def test_the_objective_weights_each_snr_as_cond_ot_training_does() -> None:
    """A predictor whose x1 error at SNR s is e(s) has velocity loss ``beta_t^2 e(s_t)`` on any path. Cond-OT's
    uniform-time loss is then ``∫ e(s) ds`` over its SNR range; the weighted draw on the KO path must give the same
    integral over the KO path's SNR range, up to the normalization ``1 / mean(w_ot)`` (brute force quadrature)."""
    path, t_eps = _ko_like_path(), 0.02
    t, w = _draw(path, 1.0, 400_000, t_eps, seed=3)
    c = path(t.float())
    alpha, sigma = c.alpha.double(), c.sigma.double()
    rate = c.d_alpha.double() * sigma - alpha * c.d_sigma.double()
    snr = alpha / sigma
    beta_sq = (rate / sigma) ** 2  # beta = sigma s' = (alpha' sigma - alpha sigma') / sigma
    e = torch.exp(-snr) + 0.1  # an x1 error that falls with the SNR
    loss = w * beta_sq * e
    estimate, se = float(loss.mean()), float(loss.std() / math.sqrt(t.numel()))
    grid = torch.linspace(t_eps, 1 - t_eps, 40_001, dtype=torch.float64)
    cg = path(grid.float())
    rate_g = cg.d_alpha.double() * cg.sigma.double() - cg.alpha.double() * cg.d_sigma.double()
    mean_w_ot = float(torch.trapezoid(1.0 / rate_g, grid)) / (1 - 2 * t_eps)
    s_lo, s_hi = float(cg.alpha[0] / cg.sigma[0]), float(cg.alpha[-1] / cg.sigma[-1])
    s = torch.linspace(s_lo, s_hi, 200_001, dtype=torch.float64)
    in_snr = float(torch.trapezoid(torch.exp(-s) + 0.1, s)) / (1 - 2 * t_eps)
    assert abs(estimate - in_snr / mean_w_ot) < 4 * se + 3e-3 * estimate, (estimate, in_snr / mean_w_ot, se)


def test_weights_are_bounded_on_a_solved_ko_path() -> None:
    """Bounded weights keep the loss's variance bounded: on this KO path the weights stay within [0.05, 5]."""
    _, w = _draw(_ko_like_path(), 1.0, 100_000, 0.0)
    assert 0.05 < float(w.min()) and float(w.max()) < 5.0


def test_names_parse_and_bad_values_are_named() -> None:
    assert str(make_time_sampler("cond_ot_snr")) == "cond_ot_snr"
    assert str(make_time_sampler("cond_ot_snr(0.5)")) == "cond_ot_snr(0.5)"
    with pytest.raises(ValueError, match="share in \\[0, 1\\]"):
        make_time_sampler("cond_ot_snr(1.5)")
