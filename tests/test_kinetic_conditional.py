"""lambda of conditional models (docs/math.md §3.10) against its known answers.

Point-mass classes (``lambda_cond = 1``, KO = Cond-OT), Gaussian classes (closed form), ``lambda_cond >= lambda``,
``labels=None`` unchanged, the model estimator with conditions (int labels and float vectors), and bad input.
"""

from __future__ import annotations

import math

import pytest
import torch

from kinetic_helpers import U32, gamma, hermite_table_rounding
from ko_lightning.kinetic import (
    DataNormalization,
    SeparationSums,
    default_theta_grid,
    estimate_separation_from_data,
    estimate_separation_from_model,
    separation_sums_from_data,
    separation_sums_from_model,
    separation_sums_from_queries,
    solve_ko,
)
from ko_lightning.paths import CondOTPath

# One intra-op thread (tests/conftest.py): the test machine's two cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")

_FIELDS = ("sq_error", "count", "sq_error_sq", "cv_sum", "cv_sq", "cv_cross", "cv2_sum", "cv2_sq", "cv2_cross", "cv12")

# Three Gaussian classes in data units: different means and standard deviations, overlapping.
D = 4
MEANS = torch.tensor([[2.0, 0.0, 0.0, 0.0], [-1.0, 1.5, 0.0, 0.0], [0.0, -1.0, -1.0, 0.5]], dtype=torch.float64)
STDS = torch.tensor([0.5, 1.0, 0.3], dtype=torch.float64)
N_CLASS = 4000


def _one_minus_lam(snr: torch.Tensor, p: torch.Tensor, tau2: torch.Tensor) -> torch.Tensor:
    """``1 - lambda_cond(s) = sum_c p_c tau_c^2 / (1 + s^2 tau_c^2)`` for Gaussian classes (docs/math.md §3.10)."""
    return (p[None] * tau2[None] / (1 + snr[:, None] ** 2 * tau2[None])).sum(1)


def _assert_equal_sums(a: SeparationSums, b: SeparationSums) -> None:
    assert torch.equal(a.theta, b.theta)
    for name in _FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        assert x is None or torch.equal(x, y), name


@pytest.fixture(scope="module")
def gaussian_classes() -> dict[str, torch.Tensor]:
    """4000 points per class whose class means and covariances are exactly ``MEANS`` and ``STDS^2 I`` (each class
    whitened), shuffled so the classes interleave; and the closed form's inputs computed from the set itself."""
    g = torch.Generator().manual_seed(0)
    parts = []
    for mean, std in zip(MEANS, STDS, strict=True):
        z = torch.randn(N_CLASS, D, generator=g, dtype=torch.float64)
        z = z - z.mean(0)
        e, vec = torch.linalg.eigh(z.T @ z / N_CLASS)
        parts.append(mean + std * (z @ vec @ torch.diag(e.rsqrt()) @ vec.T))
    order = torch.randperm(3 * N_CLASS, generator=g)
    x = torch.cat(parts).float()[order]
    labels = torch.arange(3).repeat_interleave(N_CLASS)[order]
    # Class shares and within-class variances tau_c^2 of the float32 set in the units of its own (global)
    # normalization: the float32 rounding of the whitened points moves them by ~1e-7, far below the
    # standard errors, and is included this way.
    y = DataNormalization.from_data(x).normalize(x).double()
    p = torch.bincount(labels).double() / labels.numel()
    tau2 = torch.stack([((y[labels == c] - y[labels == c].mean(0)) ** 2).mean() for c in range(3)])
    return {"x": x, "labels": labels, "p": p, "tau2": tau2}


@pytest.fixture(scope="module")
def gaussian_sums(gaussian_classes: dict[str, torch.Tensor]) -> tuple[SeparationSums, SeparationSums]:
    """Conditional and unconditional data-estimator sums on the Gaussian classes (one permutation of queries)."""
    x, labels = gaussian_classes["x"], gaussian_classes["labels"]
    theta = torch.linspace(0.05, 1.2, 12, dtype=torch.float64)
    cond = separation_sums_from_data(
        x, theta, n_queries=x.shape[0], labels=labels, generator=torch.Generator().manual_seed(1)
    )
    uncond = separation_sums_from_data(x, theta, n_queries=2048, generator=torch.Generator().manual_seed(2))
    return cond, uncond


# ----------------------------------------------------------------------------------------------- (a) point masses
@pytest.mark.parametrize("copies", [1, 30])
def test_point_mass_classes_have_lambda_one_and_cond_ot_as_ko_path(copies: int) -> None:
    """Each class one point (``copies`` identical rows of it): the class posterior is that point at every SNR, so
    lambda_cond = 1, gamma = 1, and the KO path is Cond-OT whatever the floor (max(1, eps) = 1)."""
    g = torch.Generator().manual_seed(3)
    n_classes = 64 if copies == 1 else 6
    centres = 3 * torch.randn(n_classes, 5, generator=g) + 1
    labels = torch.arange(n_classes).repeat_interleave(copies)
    perm = torch.randperm(labels.numel(), generator=g)
    x, labels = centres[labels][perm], labels[perm]
    theta = default_theta_grid(64)
    n_q = 4 * x.shape[0]
    sums = separation_sums_from_data(x, theta, n_queries=n_q, labels=labels, generator=torch.Generator().manual_seed(4))
    # Rounding: the posterior mean of `copies` identical fp32 rows is the row times sum(w) / sum(w), each sum of
    # `copies` terms in any order: |post - y| <= (2 gamma(copies) + u) |y| per component, so
    # A = |y - post|^2 / d <= (2 gamma(copies) + u)^2 max|y|^2 / d (u for the division; the logits' rounding only
    # moves the weights of identical rows). The control-variate correction b^T mean(D) is then second order in
    # rounding (b = Cov(D)^-1 Cov(D, A) with A at rounding level), inside the standard error's scale.
    y = DataNormalization.from_data(x).normalize(x).double()
    a_bound = (2 * gamma(copies) + U32) ** 2 * float((y**2).sum(1).max()) / 5
    tol = 4 * sums.standard_error + a_bound
    assert bool((sums.sq_error / sums.count <= a_bound).all())
    assert bool(((1 - sums.lam).abs() <= tol).all()), ((1 - sums.lam).abs() / tol).max()

    fn = estimate_separation_from_data(
        x, theta, n_queries=n_q, labels=labels, generator=torch.Generator().manual_seed(4)
    )
    assert not bool(fn.zero_at_origin)  # conditional: gamma is held constant below the first node
    fine = torch.linspace(0.0, math.pi / 2, 2001, dtype=torch.float64)
    # 1 - lambda = (1 - gamma) cos^2 and gamma interpolates its node values monotonically (PCHIP), so between and
    # beyond the nodes 1 - lambda <= max_k (1 - lambda_k) / cos^2 theta_k.
    node_gap = float((tol / torch.cos(theta) ** 2).max())
    assert float((1 - fn.at_theta(fine)).max()) <= node_gap

    # KO path vs Cond-OT. With sigma_min = 0, v = 1 the regularized segment ends at angle Phi_eps =
    # theta_1 - delta in the unrolled plane; P(t) moves by at most t * delta from Cond-OT's (1 - t, t), and turning
    # a point of radius r <= 1 by the angle deficit phi - theta in [0, delta] moves it by at most delta: every
    # node of the table is within 2 delta of Cond-OT (plus the fp32 rounding of the stored values, and 1e-12 for
    # the solver's float64 arithmetic, whose error is ~1e-15).
    sol = solve_ko(fn)  # the default floor, 0.1
    delta = math.pi / 2 - sol.phi_regularized  # int (1 - sqrt(gamma_eps)) <= int (1 - gamma) <= (pi / 2) node_gap
    assert -1e-12 <= delta <= 2 * node_gap
    delta = max(delta, 0.0)
    path = sol.path
    t_nodes = path.t_grid.double()
    for value, exact in ((path.alpha_grid, t_nodes), (path.sigma_grid, 1 - t_nodes)):
        dev = (value.double() - exact).abs()
        assert bool((dev <= 2 * delta + U32 * exact.abs() + 1e-12).all()), dev.max()
    assert abs(sol.ke_min - 2.0) <= 2 * delta + 1e-12  # KE_min = 2 - 2 cos(Phi) = 2 (1 - sin delta)

    # On a uniform grid of times: the Hermite interpolant of the node data minus Cond-OT (which it reproduces
    # exactly) is the interpolant of the node deviations (|h00| + |h01| <= 1 on values, |h10|, |h11| <= 4/27 on
    # h times slopes), plus the table's fp32 evaluation error and Cond-OT's own rounding.
    t = torch.linspace(0.0, 1.0, 1001)
    got = path(t)
    rounding = hermite_table_rounding(path, t)
    grid = path.t_grid.double()
    k = (torch.searchsorted(grid, t.double().contiguous(), right=True) - 1).clamp(0, grid.numel() - 2)
    h = grid[k + 1] - grid[k]
    for name, slope_name, exact_value, exact_slope in (
        ("alpha", "d_alpha", t_nodes, 1.0),
        ("sigma", "d_sigma", 1 - t_nodes, -1.0),
    ):
        dy = (getattr(path, f"{name}_grid").double() - exact_value).abs()
        dm = (getattr(path, f"{slope_name}_grid").double() - exact_slope).abs()
        interp = torch.maximum(dy[k], dy[k + 1]) + 4 / 27 * h * (dm[k] + dm[k + 1])
        want = t.double() if name == "alpha" else 1 - t.double()
        err = (getattr(got, name).double() - want).abs()
        tol_t = interp + rounding[name] + U32 * want.abs()
        assert bool((err <= tol_t).all()), (err / tol_t).max()


# ---------------------------------------------------------------------------------------- (b) Gaussian classes
def test_gaussian_classes_match_the_closed_form(
    gaussian_classes: dict[str, torch.Tensor], gaussian_sums: tuple[SeparationSums, SeparationSums]
) -> None:
    """lambda_cond of Gaussian classes: 1 - lambda_cond = sum_c p_c tau_c^2 / (1 + s^2 tau_c^2).

    The finite classes memorize (docs/math.md §3.10): their 1 - lambda_c lies below the Gaussian value by about
    2 / n_eff relative, n_eff = n_c (1 + s^2 tau_c^2)^(-d/2) (>= 90 on this grid). The test allows twice that shift
    on top of 4 standard errors (fp32 rounding of the kernel, ~1e-7 relative, is far below both)."""
    cond, _ = gaussian_sums
    p, tau2 = gaussian_classes["p"], gaussian_classes["tau2"]
    snr = torch.tan(cond.theta)
    expected = 1 - _one_minus_lam(snr, p, tau2)
    mmse = tau2[None] / (1 + snr[:, None] ** 2 * tau2[None])
    n_eff = N_CLASS * (1 + snr[:, None] ** 2 * tau2[None]) ** (-D / 2)
    assert float(n_eff.min()) > 50  # the first-order memorization estimate applies
    shift = (p[None] * mmse * 2 / n_eff).sum(1)
    tol = 4 * cond.standard_error + 2 * shift
    err = (cond.lam - expected).abs()
    assert bool((err <= tol).all()), (err / tol).max()
    # Not vacuous: the between-class share at s -> 0 is far from the unconditional lambda(0) = 0.
    between = 1 - float((p * tau2).sum())
    assert between > 0.3 and float(cond.lam[0]) > 0.3


# ------------------------------------------------------------------------------------------ (c) cond >= uncond
def test_conditioning_does_not_lower_lambda(gaussian_sums: tuple[SeparationSums, SeparationSums]) -> None:
    """The conditional MMSE is at most the unconditional one (docs/math.md §3.10): lambda_cond >= lambda within 4
    standard errors of the difference, and far above it at low SNR, where the label alone locates the mean."""
    cond, uncond = gaussian_sums
    se = torch.sqrt(cond.standard_error**2 + uncond.standard_error**2)
    diff = cond.lam - uncond.lam
    assert bool((diff >= -4 * se).all()), (diff / se).min()
    assert bool((diff[:6] > 20 * se[:6]).all()), (diff / se)[:6]


# --------------------------------------------------------------------------------------- (d) labels=None as before
def test_labels_none_is_bitwise_unchanged_and_one_class_is_the_unconditional_estimate() -> None:
    g = torch.Generator().manual_seed(5)
    x = 2 * torch.randn(300, 6, generator=g) + 0.5
    theta = default_theta_grid(16)

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(6)

    base = separation_sums_from_data(x, theta, n_queries=500, generator=gen(), data_chunk=128)
    _assert_equal_sums(
        base, separation_sums_from_data(x, theta, n_queries=500, generator=gen(), data_chunk=128, labels=None)
    )
    index = torch.randint(300, (40,), generator=g)
    noise = torch.randn(40, 6, generator=g)
    _assert_equal_sums(
        separation_sums_from_queries(x, theta, index, noise),
        separation_sums_from_queries(x, theta, index, noise, labels=None),
    )
    fn = estimate_separation_from_data(x, theta, n_queries=500, generator=gen())
    fn_none = estimate_separation_from_data(x, theta, n_queries=500, generator=gen(), labels=None)
    for key, value in fn.state_dict().items():
        assert torch.equal(value, fn_none.state_dict()[key]), key
    assert bool(fn_none.zero_at_origin)
    # One class for all points: the class posterior is the whole set's, computed by the same kernel.
    one_class = torch.zeros(300, dtype=torch.long)
    _assert_equal_sums(
        base, separation_sums_from_data(x, theta, n_queries=500, generator=gen(), data_chunk=128, labels=one_class)
    )


def test_classes_are_estimated_under_the_global_normalization() -> None:
    """The labelled sums are the per-class kernel's sums on each class's points with the whole set's statistics
    (docs/math.md §3.10), added: lambda_cond = sum_c p_c lambda_c with one normalization."""
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(4, (200,), generator=g)
    x = torch.randn(200, 3, generator=g) + 3 * labels[:, None].float()
    theta = default_theta_grid(8)
    index = torch.randint(200, (64,), generator=g)
    noise = torch.randn(64, 3, generator=g)
    got = separation_sums_from_queries(x, theta, index, noise, labels=labels)
    norm = DataNormalization.from_data(x)
    parts = []
    for c in range(4):
        rows = (labels == c).nonzero().squeeze(1)
        mine = (labels[index] == c).nonzero().squeeze(1)
        local = torch.searchsorted(rows, index[mine])
        parts.append(separation_sums_from_queries(x[rows], theta, local, noise[mine], norm))
    _assert_equal_sums(got, parts[0] + parts[1] + parts[2] + parts[3])


# ------------------------------------------------------------------------------------------- (e) model estimator
class _GaussianClassesPosterior:
    """The exact conditional posterior mean E[x1 | x_t, c] of Gaussian classes, in data units (float64 inside).

    ``cond`` is a class label ``(B,)`` or a float weight vector ``(B, 3)`` (one-hot: the same class)."""

    def __init__(self, path: CondOTPath) -> None:
        self.path = path
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        assert cond is not None and cond.shape[0] == x.shape[0]
        self.calls += 1
        c = self.path(t)
        a, s = c.alpha.double()[:, None], c.sigma.double()[:, None]
        if cond.dtype.is_floating_point:
            mu, var = cond.double() @ MEANS, (cond.double() @ STDS**2)[:, None]
        else:
            mu, var = MEANS[cond], (STDS**2)[cond][:, None]
        return (mu + a * var / (a * a * var + s * s) * (x.double() - a * mu)).float()


def _model_rounding(x1: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, sums: SeparationSums, v: float):
    """First-order bound on the fp32 rounding of the model estimate of ``1 - lambda`` for a predictor that
    computes ``mu + k (x_t - alpha mu)`` in float64 with gain ``0 <= k <= 1 / alpha``.

    ``x_t = alpha x1 + sigma eps`` in fp32 is off by <= 2u (|alpha x1| + sigma |eps|) per component (|eps| <= 7:
    P(any of 10^5 normals beyond) ~ 3e-7); the gain maps it to <= 2u (|x1| + 7 sigma / alpha), and the fp32
    output adds u |x1_hat| <= u (|x1| + 1) here. An error dp per component moves A = |x1 - x1_hat|^2 / (d v) by
    <= 2 dp sqrt(A / v) + dp^2 / v (Cauchy-Schwarz, then Jensen over the queries), and A's own fp32 sum of d terms
    adds gamma(d + 3) A."""
    big = float(x1.abs().max())
    dp = 2 * U32 * (big + 7 * sigma.double() / alpha.double()) + U32 * (big + 1)
    mean_a = sums.sq_error / sums.count
    return 2 * dp * torch.sqrt(mean_a / v) + dp**2 / v + gamma(D + 3) * mean_a


def _population(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, DataNormalization, torch.Tensor]:
    """Fresh Gaussian-class samples (exactly n_per_class per class, shuffled), the population's own normalization
    and tau_c^2 = s_c^2 / v."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)[torch.randperm(3 * n_per_class, generator=g)]
    x1 = (
        MEANS[labels] + STDS[labels][:, None] * torch.randn(labels.numel(), D, generator=g, dtype=torch.float64)
    ).float()
    mean = MEANS.mean(0)
    v = float((STDS**2 + ((MEANS - mean) ** 2).sum(1) / D).mean())
    return x1, labels, DataNormalization(mean, v, labels.numel()), STDS**2 / v


def test_model_estimator_with_exact_conditional_posterior_matches_the_closed_form() -> None:
    path = CondOTPath()
    x1, labels, norm, tau2 = _population(2000, seed=8)
    theta = torch.linspace(0.05, 1.45, 15, dtype=torch.float64)
    model = _GaussianClassesPosterior(path)

    def run(cond: torch.Tensor) -> SeparationSums:
        gen = torch.Generator().manual_seed(9)
        return separation_sums_from_model(model, path, x1, theta, norm, gen, batch_size=700, cond=cond)

    sums = run(labels)
    assert model.calls == 15 * math.ceil(6000 / 700)
    # The estimator evaluates the path at fp32 times: the closed form at the SNR those coefficients give.
    v = norm.second_moment
    times = path.snr_inverse((torch.tan(theta) / math.sqrt(v)).float()).float().clamp(0.0, 1.0)
    c = path(times)
    snr = math.sqrt(v) * c.alpha.double() / c.sigma.double()
    p = torch.full((3,), 1 / 3, dtype=torch.float64)
    expected = 1 - _one_minus_lam(snr, p, tau2)
    # the posterior's gain alpha s_c^2 / (alpha^2 s_c^2 + sigma^2) is at most 1 / alpha
    tol = 4 * sums.standard_error + _model_rounding(x1, c.alpha, c.sigma, sums, v)
    err = (sums.lam - expected).abs()
    assert bool((err <= tol).all()), (err / tol).max()
    # Float condition vectors (one-hot rows) reach the model as they are and give the same predictions.
    _assert_equal_sums(sums, run(torch.nn.functional.one_hot(labels, 3).double()))
    fn = estimate_separation_from_model(model, path, x1, theta, norm, torch.Generator().manual_seed(9), cond=labels)
    assert not bool(fn.zero_at_origin)


def test_model_without_cond_keyword_still_works() -> None:
    """A predictor ``f(x, t)`` keeps working without ``cond``: the best scalar-linear denoiser of the mixture has
    1 - lambda = cos^2(theta) exactly (docs/math.md §3.3, only the trace of the covariance enters)."""
    path = CondOTPath()
    x1, labels, norm, _ = _population(600, seed=10)
    mean, v = norm.mean, norm.second_moment

    def linear(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = path(t)
        a, s = c.alpha.double()[:, None], c.sigma.double()[:, None]
        return (mean + a * v / (a * a * v + s * s) * (x.double() - a * mean)).float()

    theta = torch.linspace(0.1, 1.4, 6, dtype=torch.float64)
    sums = separation_sums_from_model(linear, path, x1, theta, norm, torch.Generator().manual_seed(11))
    times = path.snr_inverse((torch.tan(theta) / math.sqrt(v)).float()).float().clamp(0.0, 1.0)
    c = path(times)
    snr = math.sqrt(v) * c.alpha.double() / c.sigma.double()  # the SNR of the fp32 coefficients used
    err = (sums.lam - snr**2 / (1 + snr**2)).abs()
    tol = 4 * sums.standard_error + _model_rounding(x1, c.alpha, c.sigma, sums, v)  # gain a v / (a^2 v + s^2)
    assert bool((err <= tol).all()), (err / tol).max()
    fn = estimate_separation_from_model(linear, path, x1, theta, norm, torch.Generator().manual_seed(11))
    assert bool(fn.zero_at_origin)
    with pytest.raises(ValueError, match="cond"):
        separation_sums_from_model(linear, path, x1, theta, norm, cond=labels)

    def with_kwargs(x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        assert torch.equal(kwargs["cond"], labels[: x.shape[0]])
        return linear(x, t)

    separation_sums_from_model(with_kwargs, path, x1, theta, norm, batch_size=2000, cond=labels)


# ---------------------------------------------------------------------------------------------- (f) bad input
def test_bad_labels_and_conditions_are_refused() -> None:
    g = torch.Generator().manual_seed(12)
    x = torch.randn(20, 3, generator=g)
    theta = default_theta_grid(4)
    good = torch.arange(20) % 3
    bad = {
        "length": good[:19],
        "shape": good[:, None],
        "float": good.float(),
        "negative": good - 1,
        "bool": good > 0,
        "strings": ["a"] * 20,
    }
    for what, labels in bad.items():
        with pytest.raises(ValueError, match="labels") as info:
            separation_sums_from_data(x, theta, n_queries=8, labels=labels)  # type: ignore[arg-type]
        if what == "float":
            assert "model estimator" in str(info.value)
        with pytest.raises(ValueError, match="labels"):
            estimate_separation_from_data(x, theta, n_queries=8, labels=labels)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="labels"):
            separation_sums_from_queries(x, theta, torch.arange(4), torch.randn(4, 3), labels=labels)  # type: ignore[arg-type]
    model = _GaussianClassesPosterior(CondOTPath())
    x1 = torch.randn(20, D, generator=g)
    for cond in (torch.zeros(19, dtype=torch.long), [0] * 20, torch.full((20, 3), math.inf)):
        with pytest.raises(ValueError, match="cond"):
            separation_sums_from_model(model, CondOTPath(), x1, theta, cond=cond)  # type: ignore[arg-type]
