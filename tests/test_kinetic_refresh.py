"""One KO refresh without Lightning (ko_lightning.kinetic.refresh): check, merge, solve and the report numbers."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys

import pytest
import torch
from torch import Tensor

from ko_lightning.kinetic import (
    RefreshNumbers,
    RefreshReport,
    SeparationFunction,
    SeparationSums,
    default_theta_grid,
    implausible_estimate,
    solve_refresh,
)
from ko_lightning.paths import CondOTPath

pytestmark = pytest.mark.usefixtures("one_thread")

THETA = default_theta_grid(16)
SIGMA_MIN = 0.01


def _exact_sums(lam: Tensor, count: Tensor) -> SeparationSums:
    """Sums whose every query has the squared error ``1 - lam``: mean ``lam``, zero variance, zero standard error."""
    err = (1.0 - lam).double()
    return SeparationSums(THETA, count * err, count, count * err * err)


def _ones() -> Tensor:
    return torch.ones_like(THETA)


def test_lambda_one_everywhere_installs_the_closed_form_path_next_to_cond_ot() -> None:
    """``lambda = 1`` at every grid angle. Below the first angle ``theta_0`` a separation function made from sums
    follows the small-SNR law ``gamma = (theta / theta_0)^2`` (docs/math.md §3.8, ``lambda(0) = 0`` for any data),
    so the KO path is Cond-OT except for a turn through ``theta < theta_0``, in closed form (docs/math.md §4.2):

    ``phi(theta) = int_0^theta sqrt(gamma)`` is ``theta - theta_0 / 2`` above ``theta_0`` (``Phi = theta_1 -
    theta_0 / 2``, ``KE_min = 1 + r_1^2 - 2 r_1 cos Phi``); with the floor ``eps`` the installed path is the
    segment ``P(t) = (1 - t) (1, 0) + t r_1 (cos Phi_eps, sin Phi_eps)`` in the plane ``(r, phi_eps)``,
    ``Phi_eps = theta_1 - theta_0 (1 - eps) / 2``, mapped back through the piecewise ``phi_eps^{-1}``."""
    theta0 = float(THETA[0])
    outcome = solve_refresh(_exact_sums(_ones(), 256.0 * _ones()), CondOTPath(SIGMA_MIN), sigma_min=SIGMA_MIN)
    assert outcome.installed and outcome.reason == "" and outcome.table is not None and outcome.numbers is not None
    numbers = outcome.numbers
    theta1, r1 = math.atan2(1.0, SIGMA_MIN), math.hypot(1.0, SIGMA_MIN)
    # phi of the piecewise-linear sqrt(gamma) is exact here (sqrt(gamma) is linear below theta_0, 1 above): float64
    assert numbers.phi == pytest.approx(theta1 - theta0 / 2, abs=1e-12)
    assert numbers.ke_min == pytest.approx(1 + r1**2 - 2 * r1 * math.cos(numbers.phi), abs=1e-12)
    # The regularized path costs at least KE_min and less than Cond-OT, the path the optimum is taken over.
    assert numbers.ke_min <= numbers.ke_new < numbers.ke_cond_ot
    # The previous path is Cond-OT, integrated to 1 - 1e-5: the missing piece is 1e-5 times its density at t -> 1,
    # alpha'^2 + sigma'^2 = 1 + (1 - sigma_min)^2 (lambda -> 1); 1e-8 covers the quadrature (8-point Gauss-Legendre).
    assert numbers.ke_cond_ot - numbers.ke_old == pytest.approx(1e-5 * (1 + (1 - SIGMA_MIN) ** 2), abs=1e-8)

    eps = numbers.gamma_floor
    phi_end = theta1 - theta0 * (1 - eps) / 2
    t = torch.linspace(0.0, 1.0, 20_001, dtype=torch.float64)
    px, py = 1 - t + t * r1 * math.cos(phi_end), t * r1 * math.sin(phi_end)
    r, phi = torch.hypot(px, py), torch.atan2(py, px)
    knee = theta0 * math.sqrt(eps)  # sqrt(gamma_eps) = max(theta / theta_0, sqrt(eps))
    on_parabola = torch.sqrt((2 * theta0 * (phi - eps * theta0) + knee**2).clamp_min(0))  # knee < theta < theta_0
    theta_t = torch.where(
        phi < math.sqrt(eps) * knee,
        phi / math.sqrt(eps),
        torch.where(phi < theta0 * (1 + eps) / 2, on_parabola, phi + theta0 * (1 - eps) / 2),
    )
    path = outcome.table.to_path()
    got = path(t.float())
    # The solver integrates sqrt(gamma_eps) piecewise-linearly on steps h = theta_1 / 4096; across the knee this
    # misses at most h^2 / (8 theta_0) of phi, i.e. h^2 / (8 theta_0 sqrt(eps)) ~ 1.1e-5 of theta (and of alpha).
    # Measured 9.5e-6; fp32 table values add ~1e-7.
    tol = 2 * (theta1 / 4096) ** 2 / (8 * theta0 * math.sqrt(eps)) + 1e-6
    torch.testing.assert_close(got.alpha.double(), r * torch.sin(theta_t), atol=tol, rtol=0)
    torch.testing.assert_close(got.sigma.double(), r * torch.cos(theta_t), atol=tol, rtol=0)
    # Against Cond-OT itself: every angle moves by at most theta_0 / 2 (measured: 0.0024 in alpha, 3e-6 in sigma).
    cond_ot = CondOTPath(SIGMA_MIN)(t.float())
    torch.testing.assert_close(got.alpha, cond_ot.alpha, atol=theta0 / 2, rtol=0)
    torch.testing.assert_close(got.sigma, cond_ot.sigma, atol=theta0 / 2, rtol=0)


def test_the_outcome_pickles_to_the_same_path_on_every_process() -> None:
    """What rank 0 broadcasts: plain tensors from which every rank builds bit-identical buffers."""
    outcome = solve_refresh(_exact_sums(_ones(), 256.0 * _ones()), CondOTPath(SIGMA_MIN), sigma_min=SIGMA_MIN)
    received = pickle.loads(pickle.dumps(outcome))
    assert received.installed and received.numbers == outcome.numbers
    sent, got = outcome.table.to_path().state_dict(), received.table.to_path().state_dict()
    assert list(sent) == list(got) and all(torch.equal(sent[name], got[name]) for name in sent)
    assert outcome.old_schedule is not None and len(outcome.old_schedule[0]) == 401


def test_nan_sums_give_a_reason_and_no_path() -> None:
    sums = _exact_sums(_ones(), 64.0 * _ones())
    sums.sq_error[3] = float("nan")
    outcome = solve_refresh(sums, CondOTPath(), sigma_min=0.0)
    assert not outcome.installed and outcome.table is None and outcome.separation is None
    assert outcome.numbers is None and outcome.error == ""
    assert outcome.reason == "lambda estimate has 1 non-finite values"


def test_lambda_beyond_six_standard_errors_is_refused_and_within_them_is_solved() -> None:
    """At one grid point ``n = 100`` queries of squared error with mean ``-k * 0.01`` and standard deviation 0.1
    (standard error 0.01), so ``lambda = 1 + k * 0.01``: ``k`` standard errors above 1."""
    n = 100.0

    def sums_above_one(k: float) -> SeparationSums:
        sums = _exact_sums(_ones(), n * _ones())
        mean, std = -k * 0.01, 0.1
        sums.sq_error[5], sums.sq_error_sq[5] = n * mean, n * (std**2 + mean**2)
        torch.testing.assert_close(sums.standard_error[5], torch.tensor(0.01, dtype=torch.float64))
        return sums

    assert implausible_estimate(sums_above_one(5.0)) == ""  # Monte-Carlo noise: used (clipped to 1)
    assert solve_refresh(sums_above_one(5.0), CondOTPath(), sigma_min=0.0).installed
    far = solve_refresh(sums_above_one(7.0), CondOTPath(), sigma_min=0.0)
    assert not far.installed and far.table is None
    assert "[0, 1]" in far.reason and "Monte-Carlo error" in far.reason
    # Far above 1 with zero error (as a broken estimator produces): refused as well.
    broken = _exact_sums(_ones(), 64.0 * _ones())
    broken.sq_error[3] = -50.0 * broken.count[3]
    assert "[0, 1]" in solve_refresh(broken, CondOTPath(), sigma_min=0.0).reason


def test_merge_with_the_previous_estimate_pools_counts_per_grid_point() -> None:
    """``lam = (c_a lam_a + c_b lam_b) / (c_a + c_b)`` and ``counts = c_a + c_b`` at each grid point."""
    k = torch.arange(THETA.numel(), dtype=torch.float64)
    sin2, cos2 = torch.sin(THETA) ** 2, torch.cos(THETA) ** 2
    lam_a, count_a = sin2 + 0.5 * cos2, 100.0 + 10.0 * k  # gamma = 0.5
    lam_b, count_b = sin2 + 0.9 * cos2, 300.0 - 5.0 * k  # gamma = 0.9
    previous = _exact_sums(lam_a, count_a).to_function(smoothing=1.0)

    alone = solve_refresh(_exact_sums(lam_b, count_b), CondOTPath(), sigma_min=0.0)
    merged = solve_refresh(_exact_sums(lam_b, count_b), CondOTPath(), sigma_min=0.0, previous=previous)
    assert alone.separation is not None and merged.separation is not None
    torch.testing.assert_close(alone.separation.counts, count_b, atol=0, rtol=0)
    torch.testing.assert_close(alone.separation.lam_raw, lam_b, atol=1e-15, rtol=0)
    torch.testing.assert_close(merged.separation.counts, count_a + count_b, atol=0, rtol=0)
    pooled = (count_a * lam_a + count_b * lam_b) / (count_a + count_b)
    torch.testing.assert_close(merged.separation.lam_raw, pooled, atol=1e-15, rtol=0)  # a few float64 roundings
    assert isinstance(merged.separation, SeparationFunction)
    # More separated data (gamma 0.9 against the pooled ~0.75) make the straight Cond-OT-like path cheaper.
    assert alone.numbers is not None and merged.numbers is not None and alone.numbers.phi > merged.numbers.phi


def test_report_takes_the_numbers_and_logs_them_under_ko() -> None:
    report = RefreshReport(step=7, estimator="data")
    report.record(RefreshNumbers(phi=1.0, ke_min=2.0, ke_new=3.0, ke_old=4.0, ke_cond_ot=5.0, gamma_floor=0.1))
    report.seconds = {"total": 0.5}
    metrics = report.metrics()
    assert (metrics["ko/phi"], metrics["ko/ke_min"], metrics["ko/ke_new"]) == (1.0, 2.0, 3.0)
    assert (metrics["ko/ke_old"], metrics["ko/ke_cond_ot"], metrics["ko/gamma_floor"]) == (4.0, 5.0, 0.1)
    assert metrics["ko/installed"] == 0.0 and metrics["ko/seconds_total"] == 0.5
    assert math.isnan(metrics["ko/max_delta_alpha"])


def test_the_refresh_logic_imports_no_lightning() -> None:
    code = (
        "import sys, ko_lightning.kinetic.refresh; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
