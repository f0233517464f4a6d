"""SeparationFunction: bounds, interpolation, smoothing, merge, state_dict, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from kinetic_helpers import U64
from ko_lightning.kinetic import SeparationFunction, default_theta_grid

# One intra-op thread (tests/conftest.py): the test machine's two cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def _random_lam(theta: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(theta.shape, generator=g, dtype=torch.float64)


def test_default_grid_is_inside_and_denser_near_zero() -> None:
    th = default_theta_grid(64)
    assert th.dtype == torch.float64 and th.numel() == 64
    assert float(th[0]) > 0 and float(th[-1]) < math.pi / 2
    gaps = th.diff()
    assert bool((gaps > 0).all())
    assert float(gaps[0]) < 0.05 * float(gaps[-1])  # graded: first gap much smaller than the last


def test_bounds_hold_everywhere_for_arbitrary_values() -> None:
    th = default_theta_grid(40)
    lam = SeparationFunction(th, _random_lam(th), smoothing=0.5)
    fine = torch.linspace(0.0, math.pi / 2, 5001, dtype=torch.float64)
    values = lam.at_theta(fine)
    lower = torch.sin(fine) ** 2  # s^2 / (1 + s^2)
    # float64, ~20 operations on O(1) values: rounding <= ~1e-14
    assert bool((values >= lower - 1e-12).all()) and bool((values <= 1 + 1e-12).all())
    gamma = lam.gamma(fine)
    assert bool((gamma >= 0).all()) and bool((gamma <= 1).all())
    assert float(lam.at_snr(torch.tensor(0.0))) == 0.0  # lambda(0) = 0 for centred data
    assert float(lam.at_snr(torch.tensor(math.inf))) == pytest.approx(1.0, abs=1e-12)  # float64: 1 - 0 x cos^2


def test_nodes_are_reproduced_and_projection_raises_low_values() -> None:
    th = default_theta_grid(30)
    lower = torch.sin(th) ** 2
    lam_in = lower + 0.7 * (1 - lower) * torch.linspace(0, 1, 30, dtype=torch.float64) ** 2
    lam_in[5] = 0.5 * float(lower[5])  # below the Gaussian bound: must be projected up to it
    f = SeparationFunction(th, lam_in)
    expected = lam_in.clone()
    expected[5] = lower[5]
    # float64 round trip lambda -> gamma -> lambda at the nodes: a few operations, ~1e-16 relative
    torch.testing.assert_close(f.at_theta(th), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(f.lam_nodes(), expected, rtol=0, atol=1e-12)


def test_gaussian_and_constant_one() -> None:
    s = torch.tensor([0.0, 0.01, 0.3, 1.0, 4.0, 100.0], dtype=torch.float64)
    # float64 closed forms evaluated through atan / cos^2: ~1e-16 relative
    torch.testing.assert_close(SeparationFunction.gaussian().at_snr(s), s**2 / (1 + s**2), rtol=0, atol=1e-12)
    one = SeparationFunction.constant_one()
    torch.testing.assert_close(one.at_snr(s), torch.ones_like(s), rtol=0, atol=1e-12)
    fine = torch.linspace(0.0, math.pi / 2, 101, dtype=torch.float64)
    torch.testing.assert_close(one.gamma(fine), torch.ones_like(fine), rtol=0, atol=1e-12)


def test_small_snr_law_and_memorization_integral() -> None:
    th = default_theta_grid(64)
    # lambda = kappa s^2 / (1 + kappa s^2) has the small-SNR law lambda ~ kappa s^2.
    kappa = 3.0
    s = torch.tan(th)
    f = SeparationFunction(th, kappa * s**2 / (1 + kappa * s**2))
    tiny = torch.tensor([1e-6, 1e-5], dtype=torch.float64)
    # Below the first node th0 the law is gamma = gamma(th0) (theta / th0)^2, while exactly gamma = (kappa - 1)
    # theta^2 - (kappa^2 - 5 kappa / 3 + 2 / 3) theta^4 + O(theta^6): lambda / s^2 is off by
    # (kappa^2 - 5 kappa / 3 + 2 / 3) th0^2 / kappa relatively (+10% for the higher orders, O(th0^2) of that).
    # And at_theta's float64 lambda = 1 - (1 - gamma) cos^2 theta cancels for tiny theta: an absolute rounding of
    # <= 6 u64 (1 - gamma, cos, its square, the product), i.e. 6 u64 / (kappa s^2) relatively.
    offset = (kappa**2 - 5 * kappa / 3 + 2 / 3) * float(th[0]) ** 2 / kappa
    rel_tol = 1.1 * offset + 6 * U64 / (kappa * tiny**2)
    assert bool(((f.at_snr(tiny) / tiny**2 / kappa - 1).abs() <= rel_tol).all())
    # gamma = 0 resp. 1 exactly: the trapezoid rule is exact, the float64 sum of 8193 terms within ~1e-12
    assert SeparationFunction.gaussian().memorization_integral() == pytest.approx(math.pi / 2, abs=1e-9)
    assert SeparationFunction.constant_one().memorization_integral() == pytest.approx(0.0, abs=1e-12)
    # int_0^inf 1/(1 + kappa s^2) ds = pi / (2 sqrt(kappa)); the tabulated one agrees to interpolation error,
    # estimated against a 4x finer table (|coarse - truth| <= 4/3 |coarse - fine| for any order >= 1; allow 2),
    # plus the trapezoid rule's (8193 points: (pi / 2) H^2 / 12 max|gamma''|, H = (pi / 2) / 8192, |gamma''| <=
    # 2 kappa^2 here).
    th_fine = default_theta_grid(256)
    s_fine = torch.tan(th_fine)
    f_fine = SeparationFunction(th_fine, kappa * s_fine**2 / (1 + kappa * s_fine**2))
    trapezoid = (math.pi / 2) ** 3 / 8192**2 / 12 * 2 * kappa**2
    tol = 2 * abs(f.memorization_integral() - f_fine.memorization_integral()) + trapezoid
    assert f.memorization_integral() == pytest.approx(math.pi / (2 * math.sqrt(kappa)), abs=tol)


def test_smoothing_reduces_noise_and_respects_weights() -> None:
    th = default_theta_grid(80)
    s = torch.tan(th)
    truth = 2 * s**2 / (1 + 2 * s**2)
    g = torch.Generator().manual_seed(3)
    noisy = (truth + 0.02 * torch.randn(th.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    raw = SeparationFunction(th, noisy)
    smooth = SeparationFunction(th, noisy, smoothing=5.0)
    err_raw = float((raw.at_theta(th) - truth).abs().mean())
    err_smooth = float((smooth.at_theta(th) - truth).abs().mean())
    assert err_smooth < 0.6 * err_raw
    # A node with an overwhelming count is kept (nearly) exactly by the weighted smoother.
    counts = torch.ones_like(th)
    counts[40] = 1e9
    pinned = SeparationFunction(th, noisy, counts=counts, smoothing=50.0)
    gamma_in = (1 - (1 - noisy) / torch.cos(th) ** 2).clamp(0, 1)
    # The smoother minimizes F(g) = sum_k w_k (g_k - gamma_k)^2 + smoothing |D2 g|^2 (w = counts / mean). The
    # constant g = gamma_40 has D2 g = 0, so F(optimum) <= sum_{k != 40} w_k (gamma_k - gamma_40)^2, and
    # F(optimum) >= w_40 (g_40 - gamma_40)^2: that bounds the node's move (the final clip only shortens it).
    w = counts / counts.mean()
    others = torch.arange(80) != 40
    bound = math.sqrt(float((w[others] * (gamma_in[others] - gamma_in[40]) ** 2).sum() / w[40]))
    assert float(pinned.gamma_nodes[40]) == pytest.approx(float(gamma_in[40]), abs=bound)


def test_merge_weights_by_counts() -> None:
    th = default_theta_grid(16)
    a = SeparationFunction(th, torch.full_like(th, 0.9), counts=torch.full_like(th, 3.0))
    b = SeparationFunction(th, torch.full_like(th, 0.5), counts=torch.full_like(th, 1.0))
    m = a.merge(b)
    # (3 x 0.9 + 1 x 0.5) / 4 in float64: three roundings of O(1) values, <= 4 u64 ~ 4e-16
    torch.testing.assert_close(m.lam_raw, torch.full_like(th, 0.8), rtol=0, atol=1e-15)
    torch.testing.assert_close(m.counts, torch.full_like(th, 4.0))
    with pytest.raises(ValueError, match="other"):
        a.merge(SeparationFunction(default_theta_grid(17), torch.full((17,), 0.9, dtype=torch.float64)))
    with pytest.raises(ValueError, match="other"):
        a.merge("not a separation function")  # type: ignore[arg-type]


def test_state_dict_round_trip_including_other_grid_length() -> None:
    th = default_theta_grid(33)
    src = SeparationFunction(th, _random_lam(th, 1), counts=torch.arange(1, 34, dtype=torch.float64), smoothing=2.0)
    dst = SeparationFunction.gaussian(default_theta_grid(10))
    dst.load_state_dict(src.state_dict())
    fine = torch.linspace(0.0, math.pi / 2, 777, dtype=torch.float64)
    torch.testing.assert_close(dst.at_theta(fine), src.at_theta(fine), rtol=0, atol=0)
    assert float(dst.smoothing) == 2.0 and dst.theta.numel() == 33
    assert set(src.state_dict()) == {"theta", "lam_raw", "counts", "smoothing", "zero_at_origin"}
    bad = src.state_dict()
    bad["lam_raw"] = bad["lam_raw"].clone()
    bad["lam_raw"][0] = float("nan")
    with pytest.raises(ValueError, match="lam"):
        SeparationFunction.gaussian().load_state_dict(bad)


@pytest.mark.parametrize(
    ("theta", "lam", "match"),
    [
        (torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.1, float("nan"), 0.3]), "lam"),
        (torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.1, 1.2, 0.3]), "lam"),
        (torch.tensor([0.1, 0.2, 0.3]), torch.tensor([-0.1, 0.2, 0.3]), "lam"),
        (torch.tensor([0.1, 0.3, 0.2]), torch.tensor([0.1, 0.2, 0.3]), "theta"),
        (torch.tensor([0.1, 0.1, 0.2]), torch.tensor([0.1, 0.2, 0.3]), "theta"),
        (torch.tensor([0.0, 0.1, 0.2]), torch.tensor([0.0, 0.2, 0.3]), "theta"),
        (torch.tensor([0.1, 0.2, 1.6]), torch.tensor([0.1, 0.2, 0.3]), "theta"),
        (torch.tensor([0.1]), torch.tensor([0.1]), "theta"),
        (torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.1, 0.2]), "lam"),
    ],
)
def test_bad_input_names_the_argument(theta: torch.Tensor, lam: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SeparationFunction(theta, lam)


def test_bad_counts_and_smoothing() -> None:
    th = torch.tensor([0.1, 0.2, 0.3])
    lam = torch.tensor([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="counts"):
        SeparationFunction(th, lam, counts=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="smoothing"):
        SeparationFunction(th, lam, smoothing=-1.0)
    with pytest.raises(ValueError, match="snr"):
        SeparationFunction(th, lam).at_snr(torch.tensor([-1.0]))


def test_numpy_and_torch_evaluations_agree() -> None:
    th = default_theta_grid(50)
    for lam in (SeparationFunction(th, _random_lam(th, 2), smoothing=1.0), SeparationFunction.constant_one(th)):
        probe = torch.cat([torch.linspace(0.0, math.pi / 2, 999, dtype=torch.float64), th, th[:1] / 3])
        # the same float64 cubic in two libraries, ~15 operations on values in [0, 1]: <= ~1e-15 apart
        torch.testing.assert_close(
            torch.from_numpy(lam.gamma_array(probe.numpy())), lam.gamma(probe), rtol=0, atol=1e-14
        )
