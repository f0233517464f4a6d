"""Separation-function estimators: exactness of the chunked kernel, partial sums, accuracy, Thm 4.1, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from kinetic_helpers import U32, gamma, softmax_mean_rounding_bound, two_point_lam
from ko_lightning.data import sample_checkerboard
from ko_lightning.kinetic import (
    DataNormalization,
    SeparationFunction,
    SeparationSums,
    default_theta_grid,
    estimate_separation_from_data,
    posterior_mean,
    separation_sums_from_data,
    separation_sums_from_model,
    separation_sums_from_queries,
    solve_ko,
)
from ko_lightning.paths import CondOTPath, VPPath

# One intra-op thread (tests/conftest.py): the test machine's two cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int, d: int, seed: int, scale: float = 3.0, shift: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Clustered, un-normalized data: a few centres plus noise, so the posterior is neither flat nor one-hot.
    centres = torch.randn(4, d, generator=g)
    return scale * (centres[torch.randint(4, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)) + shift


def _queries(n: int, d: int, n_queries: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random query points of a data set of ``n`` points in ``d`` dims: ``(index, noise)``."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(n, (n_queries,), generator=g)
    noise = torch.randn(n_queries, d, generator=g)
    return index, noise


def _reference_sums(data: torch.Tensor, theta: torch.Tensor, index: torch.Tensor, noise: torch.Tensor):
    """Unchunked float64 reference: per-angle mean of ||y - E[y|x]||^2 / d and of ||E[y|x]||^2 / d."""
    x = data.double()
    mean = x.mean(0)
    v = float(((x - mean) ** 2).mean())
    y = (x - mean) / math.sqrt(v)
    yq, eps = y[index], noise.double()
    mse, norm2 = [], []
    for th in theta.tolist():
        a, s = math.sin(th), math.cos(th)
        x_t = a * yq + s * eps
        w = torch.softmax(-(torch.cdist(x_t, a * y) ** 2) / (2 * s * s), 1)
        post = w @ y
        mse.append(float(((yq - post) ** 2).sum(1).mean()) / y.shape[1])
        norm2.append(float((post**2).sum(1).mean()) / y.shape[1])
    return torch.tensor(mse, dtype=torch.float64), torch.tensor(norm2, dtype=torch.float64)


_SUM_FIELDS = (
    "sq_error",
    "count",
    "sq_error_sq",
    "cv_sum",
    "cv_sq",
    "cv_cross",
    "cv2_sum",
    "cv2_sq",
    "cv2_cross",
    "cv12",
)


def _reference_per_query(
    data: torch.Tensor, theta: torch.Tensor, index: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unchunked float64 per-(angle, query) values ``A``, ``D1 = A - B`` and ``D2 = L - E[L]``, each ``(G, Q)``."""
    x = data.double()
    mean = x.mean(0)
    y = (x - mean) / math.sqrt(float(((x - mean) ** 2).mean()))
    d = y.shape[1]
    m2 = float((y**2).sum(1).mean()) / d
    yq, eps = y[index], noise.double()
    a_rows, d1_rows, d2_rows = [], [], []
    for th in theta.tolist():
        sn, cs = math.sin(th), math.cos(th)
        x_t = sn * yq + cs * eps
        post = torch.softmax(-(torch.cdist(x_t, sn * y) ** 2) / (2 * cs * cs), 1) @ y
        a = ((yq - post) ** 2).sum(1) / d
        a_rows.append(a)
        d1_rows.append(a - (1 - (post**2).sum(1) / d))
        lin = ((yq - sn * x_t) ** 2).sum(1) / d  # linear-posterior residual L
        d2_rows.append(lin - (cs**4 * m2 + sn**2 * cs**2))
    return torch.stack(a_rows), torch.stack(d1_rows), torch.stack(d2_rows)


class _KernelRounding:
    """Exact (float64) per-query inputs of the estimator kernel's sums, and bounds on their fp32 rounding errors.

    A first-order worst-case analysis of separation_sums_from_queries, valid for any summation order (so for any
    chunking, matmul kernel or instruction set; two fp32 runs differ by at most twice the bound):

    - normalized data ``y = (x - mean) / sqrt(v)`` in fp32: ``|dy| <= u (3 |y| + |mean| / sqrt(v))`` (mean and
      scale rounded, subtraction, product), plus the effect of ``raw_err`` (a bound on ``|data - exact data|``)
      on the data and on its float64 statistics;
    - the logit ``s^2 G0 + s G1`` relative to the own point, ``G0 = y_q.y_k - |y_k|^2 / 2 - |y_q|^2 / 2`` and
      ``G1 = eps.(y_k - y_q)`` from fp32 dot products of d terms: ``gamma(d + 5) (s^2 (P + (|y_k|^2 + |y_q|^2) / 2)
      + s (E_k + E_q))`` with ``P = sum |y_q y_k|``, ``E = sum |eps y|`` (d products and sums, two subtractions,
      the 2-term coefficient matmul and the fp32 rounding of s^2 and s), plus the input rounding propagated:
      ``s^2 sum |y_q - y_k| (dy_q + dy_k) + s sum |eps| (dy_k + dy_q)``;
    - the softmax-weighted mean ``post`` over the n points (kinetic_helpers.softmax_mean_rounding_bound);
    - ``A = |y_q - post|^2 / d`` and ``|post|^2 / d`` from fp32 sums of d terms (``gamma(d + 3) A``,
      ``gamma(d + 2) |post|^2 / d``), ``m2`` from fp32 squared norms.

    :meth:`bound` propagates these per-query bounds to first order through any statistic of the sums (a field,
    ``lam``, ``standard_error``) by autograd, so errors shared by several fields (``A`` and ``D1`` both depend on
    ``post``) are not counted twice. The float64 accumulation over the queries adds ~1e-16 relative: neglected.
    """

    def __init__(
        self,
        data: torch.Tensor,
        theta: torch.Tensor,
        index: torch.Tensor,
        noise: torch.Tensor,
        normalization: DataNormalization | None = None,
        raw_err: torch.Tensor | float = 0.0,
        n_rescales: int = 0,
    ) -> None:
        x = data.reshape(data.shape[0], -1)
        n, d = x.shape
        norm = DataNormalization.from_data(data) if normalization is None else normalization
        mean = norm.mean.reshape(-1).double()
        c = 1 / math.sqrt(norm.second_moment)
        y = (x.double() - mean) * c
        dy = U32 * (3 * y.abs() + c * mean.abs())
        e_raw = torch.as_tensor(raw_err, dtype=torch.float64).expand_as(y)
        if bool((e_raw > 0).any()):  # data rounding, and its effect on the float64 mean and second moment
            e_tot = e_raw + e_raw.mean(0)
            dy = dy + c * e_tot + y.abs() * c * float((y.abs() * e_tot).mean())
        yq, dyq, eps = y[index], dy[index], noise.reshape(len(index), d).double()
        self.theta = theta.double()
        s = torch.tan(self.theta)
        s2, s1 = (s**2)[:, None, None], s[:, None, None]
        q_sq, k_sq = (yq * yq).sum(1), (y * y).sum(1)
        dots = yq.abs() @ y.abs().T + 0.5 * (q_sq[:, None] + k_sq[None])  # bounds |G0| and its sum |terms|
        eps_dots = eps.abs() @ y.abs().T + (eps * yq).abs().sum(1, keepdim=True)  # bounds |G1|
        gap = (yq[:, None, :] - y[None]).abs()  # (Q, n, d)
        in0 = (gap * (dyq[:, None, :] + dy[None])).sum(-1)
        in1 = eps.abs() @ dy.T + (eps.abs() * dyq).sum(1, keepdim=True)
        logits = s2 * (-0.5 * (gap**2).sum(-1)) + s1 * (eps @ y.T - (eps * yq).sum(1, keepdim=True))  # (G, Q, n)
        logit_err = s2 * (gamma(d + 5) * dots + in0) + s1 * (gamma(d + 5) * eps_dots + in1)
        post, dpost = softmax_mean_rounding_bound(logits, logit_err, y, dy, n_rescales)
        n_g, n_q = len(self.theta), len(index)
        a = ((yq[None] - post) ** 2).sum(-1) / d
        p = (post**2).sum(-1) / d
        m2 = float(k_sq.mean()) / d
        e_m2 = float((2 * (y.abs() * dy).sum(1) + gamma(d) * k_sq).mean()) / d
        self.eps = eps
        # Per-angle copies of the shared inputs, so that each angle's bound sees only its own derivatives.
        self.leaves = {
            "yq": yq.expand(n_g, n_q, d),
            "post": post,
            "m2": torch.full((n_g, 1), m2),
            "eta_a": torch.zeros_like(a),
            "eta_p": torch.zeros_like(p),
        }
        self.errs = {
            "yq": dyq.expand(n_g, n_q, d),
            "post": dpost,
            "m2": torch.full((n_g, 1), e_m2),
            "eta_a": gamma(d + 3) * a,
            "eta_p": gamma(d + 2) * p,
        }

    def sums(self, leaves: dict[str, torch.Tensor] | None = None) -> SeparationSums:
        """The kernel's sums as a function of the per-query inputs (float64; exact for the exact inputs)."""
        v = self.leaves if leaves is None else leaves
        yq, post = v["yq"], v["post"]
        d = yq.shape[-1]
        sn, cs = torch.sin(self.theta)[:, None], torch.cos(self.theta)[:, None]
        a = ((yq - post) ** 2).sum(-1) / d + v["eta_a"]
        d1 = a - (1 - ((post**2).sum(-1) / d + v["eta_p"]))
        lin_y = (yq * yq).sum(-1) / d - v["m2"]
        lin_cross = (yq * self.eps).sum(-1) / d
        lin_eps = (self.eps * self.eps).sum(-1) / d - 1
        d2 = cs**4 * lin_y - 2 * sn * cs**3 * lin_cross + (sn * cs) ** 2 * lin_eps
        return SeparationSums(
            self.theta,
            a.sum(1),
            torch.full_like(self.theta, float(a.shape[1])),
            (a * a).sum(1),
            d1.sum(1),
            (d1 * d1).sum(1),
            (a * d1).sum(1),
            d2.sum(1),
            (d2 * d2).sum(1),
            (a * d2).sum(1),
            (d1 * d2).sum(1),
        )

    def bound(self, statistic) -> torch.Tensor:
        """First-order bound per angle on the fp32 error of ``statistic(sums)``: sum |derivative| x input bound."""
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in self.leaves.items()}
        value = statistic(self.sums(leaves))
        if not value.requires_grad:  # e.g. the count: no rounding
            return torch.zeros_like(value).detach()
        grads = torch.autograd.grad(value.sum(), list(leaves.values()), allow_unused=True)
        total = torch.zeros_like(value)
        for (name, _), grad in zip(leaves.items(), grads, strict=True):
            if grad is not None:
                total = total + (grad.abs() * self.errs[name]).flatten(1).sum(1)
        return total.detach()

    def field(self, name: str, d1_only: bool = False) -> torch.Tensor:
        """:meth:`bound` of one field of the sums (or of ``lam`` / ``standard_error``, optionally D1 only)."""
        if d1_only:
            return self.bound(lambda s: getattr(SeparationSums(**{n: getattr(s, n) for n in _D1_FIELDS}), name))
        return self.bound(lambda s: getattr(s, name))


_D1_FIELDS = ("theta", *_SUM_FIELDS[:6])


def _data_queries(n: int, sample_shape: tuple[int, ...], n_queries: int, seed: int):
    """The queries separation_sums_from_data draws from ``Generator().manual_seed(seed)`` (its documented order:
    whole random permutations of the n points, then one standard normal noise per query)."""
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=gen) for _ in range(-(-n_queries // n))]
    return torch.cat(perms)[:n_queries], torch.randn((n_queries, *sample_shape), generator=gen)


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    err = (actual.double() - expected.double()).abs()
    assert bool((err <= tol).all()), f"{what}: error / tolerance up to {float((err / tol).max()):.3g} ({err}, {tol})"


def _least_squares_estimate(a: torch.Tensor, cvs: list[torch.Tensor]) -> torch.Tensor:
    """Per row: mean(A) - b^T mean(D) with b the least-squares coefficients of A on the centred D's (float64)."""
    out = []
    for g in range(a.shape[0]):
        design = torch.stack([cv[g] - cv[g].mean() for cv in cvs], 1)
        b = torch.linalg.lstsq(design, (a[g] - a[g].mean())[:, None]).solution[:, 0]
        out.append(a[g].mean() - b @ torch.stack([cv[g].mean() for cv in cvs]))
    return torch.stack(out)


def test_posterior_mean_matches_float64_and_is_chunk_invariant() -> None:
    data = _data(300, 10, 0)
    norm = DataNormalization.from_data(data)
    y = norm.normalize(data).double()
    g = torch.Generator().manual_seed(1)
    q = 50
    alpha = torch.rand(q, generator=g, dtype=torch.float64)
    sigma = 0.05 + torch.rand(q, generator=g, dtype=torch.float64)
    x_t = alpha[:, None] * y[torch.randint(300, (q,), generator=g)] + sigma[:, None] * torch.randn(q, 10, generator=g)
    logits = -((x_t[:, None, :] - alpha[:, None, None] * y[None]) ** 2).sum(-1) / (2 * sigma[:, None] ** 2)
    ref = torch.softmax(logits, 1) @ y
    # Tolerance: worst-case fp32 rounding of posterior_mean in any summation order. Its logits
    # coef x.y_k - half |y_k|^2 (coef = alpha / sigma^2, half = alpha^2 / (2 sigma^2); equal to the reference's up
    # to a per-row shift) come from fp32 dot products of 10 terms with x_t, coef and half rounded to fp32:
    # error <= gamma(d + 4) (coef sum |x y_k| + half |y_k|^2); the data rows are the same fp32 values as ``y``.
    coef, half = (alpha / sigma**2)[:, None], (0.5 * alpha**2 / sigma**2)[:, None]
    kernel_logits = coef * (x_t @ y.T) - half * (y * y).sum(1)
    logit_err = gamma(10 + 4) * (coef * (x_t.abs() @ y.abs().T) + half * (y * y).sum(1))
    for qc, dc in ((1024, 4096), (7, 13), (1, 37)):
        got = posterior_mean(x_t.float(), data, alpha, sigma, normalization=norm, query_chunk=qc, data_chunk=dc)
        # streamed log-sum-exp: one rescaling of the running sums per data chunk
        post, tol = softmax_mean_rounding_bound(kernel_logits, logit_err, y, n_rescales=-(-300 // dc))
        _assert_within(got, ref, tol, f"posterior mean, chunks {qc} x {dc}")
    raw = posterior_mean(x_t.float(), y.float(), alpha, sigma)  # already-normalized data, no normalization
    _assert_within(raw, ref, softmax_mean_rounding_bound(kernel_logits, logit_err, y, n_rescales=1)[1], "raw")
    with pytest.raises(ValueError, match="sigma"):
        posterior_mean(x_t.float(), data, alpha, 0.0)


def test_estimator_kernel_matches_unchunked_float64_and_chunking_does_not_matter() -> None:
    data = _data(257, 12, 2)
    theta = default_theta_grid(9)
    index, noise = _queries(257, 12, 40, seed=3)
    ref_mse, ref_norm2 = _reference_sums(data, theta, index, noise)
    # Tolerances: the kernel's worst-case fp32 rounding (_KernelRounding) against the float64 reference; twice
    # that between two chunkings (each within the bound of the exact sums, whatever its summation order).
    rounding = _KernelRounding(data, theta, index, noise)
    bound = {name: rounding.field(name) for name in (*_SUM_FIELDS, "lam")}
    results = []
    for qc, dc in ((1024, 2048), (5, 16), (3, 50), (9, 100000)):
        sums = separation_sums_from_queries(data, theta, index, noise, query_chunk=qc, data_chunk=dc)
        torch.testing.assert_close(sums.count, torch.full_like(sums.count, 40.0))  # integer counts: exact
        _assert_within(sums.sq_error / sums.count, ref_mse, bound["sq_error"] / 40, "mean A")
        # D = A - B with B = 1 - ||E[y|x]||^2 / d
        _assert_within(sums.cv_sum / sums.count, ref_mse - (1 - ref_norm2), bound["cv_sum"] / 40, "mean D1")
        results.append(sums)
    for other in results[1:]:
        for name in (*_SUM_FIELDS, "lam"):
            _assert_within(getattr(other, name), getattr(results[0], name), 2 * bound[name], name)


def test_both_control_variates_match_float64_least_squares() -> None:
    """The D2 sums and the bivariate regression estimate agree with an unchunked float64 computation."""
    data = _data(257, 12, 2)
    theta = default_theta_grid(9)
    index, noise = _queries(257, 12, 40, seed=3)
    a, d1, d2 = _reference_per_query(data, theta, index, noise)
    # Tolerances: the kernel's fp32 rounding bound, propagated to first order through the regression.
    rounding = _KernelRounding(data, theta, index, noise)
    bound = {name: rounding.field(name) for name in (*_SUM_FIELDS, "lam", "standard_error")}
    lam1_bound = rounding.field("lam", d1_only=True)
    for qc, dc in ((1024, 2048), (5, 16)):
        sums = separation_sums_from_queries(data, theta, index, noise, query_chunk=qc, data_chunk=dc)
        _assert_within(sums.cv2_sum / 40, d2.mean(1), bound["cv2_sum"] / 40, "cv2_sum")
        _assert_within(sums.cv2_sq / 40, (d2 * d2).mean(1), bound["cv2_sq"] / 40, "cv2_sq")
        _assert_within(sums.cv2_cross / 40, (a * d2).mean(1), bound["cv2_cross"] / 40, "cv2_cross")
        _assert_within(sums.cv12 / 40, (d1 * d2).mean(1), bound["cv12"] / 40, "cv12")
        _assert_within(sums.lam, 1 - _least_squares_estimate(a, [d1, d2]), bound["lam"], "lam")
        resid_var = torch.stack(
            [
                (
                    (a[g] - a[g].mean())
                    - torch.stack([d1[g] - d1[g].mean(), d2[g] - d2[g].mean()], 1)
                    @ torch.linalg.lstsq(
                        torch.stack([d1[g] - d1[g].mean(), d2[g] - d2[g].mean()], 1), (a[g] - a[g].mean())[:, None]
                    ).solution[:, 0]
                )
                .pow(2)
                .mean()
                for g in range(a.shape[0])
            ]
        )
        _assert_within(sums.standard_error, torch.sqrt(resid_var / 40), bound["standard_error"], "standard_error")
        d1_only = SeparationSums(**{n: getattr(sums, n) for n in _D1_FIELDS})
        _assert_within(d1_only.lam, 1 - _least_squares_estimate(a, [d1]), lam1_bound, "lam (D1 only)")


def test_second_control_variate_has_mean_zero_also_under_a_foreign_normalization() -> None:
    """E[D2] = 0: over many queries its mean is within a few standard errors of 0, also on a shard normalized by
    global statistics (m2 != 1), where the uncorrected E[L] = cos^2 would be many standard errors off."""
    full = _data(3000, 6, 13)
    global_norm = DataNormalization.from_data(full)
    # an unrepresentative shard (its points far from the global mean): its m2 under the global statistics is > 1
    shard = full[global_norm.normalize(full).pow(2).sum(1).argsort(descending=True)[:400]]
    theta = torch.tensor([0.2, 0.5, 0.8, 1.1, 1.4], dtype=torch.float64)
    y_shard = global_norm.normalize(shard).double()
    m2 = float((y_shard**2).mean())
    assert abs(m2 - 1) > 0.05
    for x, norm in ((full[:1500], None), (shard, global_norm)):
        sums = separation_sums_from_data(
            x, theta, n_queries=4000, normalization=norm, generator=torch.Generator().manual_seed(14)
        )
        mean = sums.cv2_sum / sums.count
        se = torch.sqrt((sums.cv2_sq / sums.count - mean**2) / sums.count)
        # Monte Carlo: a zero-mean D2 is within 4 standard errors with probability 1 - 6e-5 per angle (the
        # kernel's D2 is float64 from fp32 queries, its rounding ~1e-7 is far below se)
        assert bool((mean.abs() <= 4 * se).all()), mean / se
        if norm is not None:
            offset = torch.cos(theta) ** 4 * (m2 - 1)  # what D2's mean would be with E||y||^2 / d = 1 assumed
            assert bool((offset.abs() > 8 * se)[:3].all())


def test_sums_fields_are_all_or_none_and_collinear_control_variates_fall_back() -> None:
    data = _data(100, 4, 15)
    theta = default_theta_grid(6)
    sums = separation_sums_from_data(data, theta, n_queries=64)
    fields = {n: getattr(sums, n) for n in ("theta", *_SUM_FIELDS)}
    with pytest.raises(ValueError, match="cv2_sum"):
        SeparationSums(**{**fields, "cv12": None})
    with pytest.raises(ValueError, match="cv_sum"):
        SeparationSums(**{**fields, "cv_sum": None, "cv_sq": None, "cv_cross": None})
    d1_only = SeparationSums(**{n: fields[n] for n in ("theta", *_SUM_FIELDS[:6])})
    assert (sums + d1_only).cv2_sum is None and (sums + d1_only).cv_sum is not None
    assert (sums + sums).cv12 is not None
    # D2 := D1 (exactly collinear): falls back to the single control variate, finite and equal to D1 alone.
    dup = SeparationSums(
        **{**fields, "cv2_sum": sums.cv_sum, "cv2_sq": sums.cv_sq, "cv2_cross": sums.cv_cross, "cv12": sums.cv_sq}
    )
    # float64 arithmetic on O(1) sums, a few tens of operations: rounding <= ~1e-14, well inside 1e-12
    torch.testing.assert_close(dup.lam, d1_only.lam, rtol=0, atol=1e-12)
    torch.testing.assert_close(dup.standard_error, d1_only.standard_error, rtol=0, atol=1e-12)


def test_second_control_variate_reduces_checkerboard_variance() -> None:
    """On 2D checkerboard data (nearly Gaussian at coarse scale) D1 alone removes little of A's variance; with
    the linear-posterior control variate D2 the spread of gamma and of Phi over seeds shrinks by > 2x.
    Measured (1000 points, 256 queries, 12 seeds): gamma std over theta in (0.6, 1.4) 0.019 vs 0.049 (D1 only),
    Phi std about 0.015 vs 0.07."""
    x = sample_checkerboard(1000, generator=torch.Generator().manual_seed(0))
    theta = default_theta_grid(48)
    sel = (theta > 0.6) & (theta < 1.4)
    gammas: dict[str, list[torch.Tensor]] = {"both": [], "d1": []}
    phis: dict[str, list[float]] = {"both": [], "d1": []}
    for seed in range(12):
        sums = separation_sums_from_data(x, theta, n_queries=256, generator=torch.Generator().manual_seed(seed))
        d1_only = SeparationSums(**{n: getattr(sums, n) for n in ("theta", *_SUM_FIELDS[:6])})
        for key, s in (("both", sums), ("d1", d1_only)):
            gammas[key].append((1 - (1 - s.lam) / torch.cos(theta) ** 2)[sel])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a noisy gamma may make solve_ko warn about its floor
                phis[key].append(solve_ko(s.to_function()).phi)
    gamma_std = {k: float(torch.stack(v).std(0).mean()) for k, v in gammas.items()}
    phi_std = {k: float(torch.tensor(v).std()) for k, v in phis.items()}
    assert gamma_std["d1"] > 2.0 * gamma_std["both"], gamma_std
    assert phi_std["d1"] > 2.0 * phi_std["both"], phi_std


def test_overflow_fallback_matches_float64() -> None:
    """Noise aligned with the data makes a foreign point beat the query's own point by > 88 nats: the kernel's
    fixed reference would overflow in fp32, and the log-sum-exp fallback must take over."""
    data = _data(64, 6, 11)
    theta = torch.tensor([0.3, 0.8, 1.2], dtype=torch.float64)
    y = DataNormalization.from_data(data).normalize(data)
    index = torch.tensor([0, 1, 2, 3])
    direction = y[10] - y[0]
    noise = torch.zeros(4, 6)
    noise[0] = 400.0 * direction / direction.norm()
    noise[1:] = torch.randn(3, 6, generator=torch.Generator().manual_seed(12))
    sums = separation_sums_from_queries(data, theta, index, noise, data_chunk=16)
    ref_mse, _ = _reference_sums(data, theta, index, noise)
    assert bool(torch.isfinite(sums.sq_error).all())
    # fp32 rounding bound of the kernel, with the log-sum-exp rescaling over the 64 / 16 = 4 data chunks
    bound = _KernelRounding(data, theta, index, noise, n_rescales=4).field("sq_error")
    _assert_within(sums.sq_error / sums.count, ref_mse, bound / 4, "mean A")


def test_partial_sums_of_two_halves_equal_one_pass() -> None:
    data = _data(200, 8, 4)
    theta = default_theta_grid(12)
    index, noise = _queries(200, 8, 64, seed=5)
    norm = DataNormalization.from_data(data)
    whole = separation_sums_from_queries(data, theta, index, noise, norm)
    halves = separation_sums_from_queries(data, theta, index[:30], noise[:30], norm) + separation_sums_from_queries(
        data, theta, index[30:], noise[30:], norm
    )
    # The two runs block the queries differently (other matmul shapes): each is within the kernel's fp32
    # rounding bound of the exact sums, so they differ by at most twice that.
    rounding = _KernelRounding(data, theta, index, noise, norm)
    for name in _SUM_FIELDS:
        assert getattr(whole, name) is not None
        _assert_within(getattr(halves, name), getattr(whole, name), 2 * rounding.field(name), name)
    _assert_within(halves.lam, whole.lam, 2 * rounding.field("lam"), "lam")


def test_reproducible_normalization_invariant_and_within_bounds() -> None:
    data = _data(150, 6, 6)
    theta = default_theta_grid(24)

    def run(x: torch.Tensor, seed: int) -> torch.Tensor:
        return separation_sums_from_data(x, theta, n_queries=150, generator=torch.Generator().manual_seed(seed)).lam

    first = run(data, 0)
    torch.testing.assert_close(run(data, 0), first, rtol=0, atol=0)  # same inputs, same kernels: bitwise
    index, noise = _data_queries(150, (6,), 150, seed=0)
    lam_bound = _KernelRounding(data, theta, index, noise).field("lam")
    # another seed, other queries: differs by more than the fp32 rounding of two runs could explain
    assert float((run(data, 1) - first - 2 * lam_bound).max()) > 0
    # lambda is a property of the normalized data: affine changes of units give the same estimate, up to the
    # rounding of each run (the fp32 map 7 x - 40 adds u (|7 x| + |7 x - 40|) to the data of the second).
    moved = 7.0 * data - 40.0
    raw_err = U32 * ((7.0 * data).abs() + moved.abs()).double()
    tol = lam_bound + _KernelRounding(moved, theta, index, noise, raw_err=raw_err).field("lam")
    _assert_within(run(moved, 0), first, tol, "lam of 7 x - 40")
    lam = estimate_separation_from_data(data, theta, n_queries=150)
    fine = torch.linspace(0, math.pi / 2, 2001, dtype=torch.float64)
    values = lam.at_theta(fine)
    assert bool((values >= torch.sin(fine) ** 2 - 1e-12).all()) and bool((values <= 1 + 1e-12).all())
    assert float(lam.at_snr(torch.tensor(0.0))) == 0.0


@pytest.mark.parametrize("d", [1, 8])
def test_two_point_data_matches_quadrature(d: int) -> None:
    x = torch.zeros(2, d)
    x[0, 0], x[1, 0] = 5.0, -5.0  # normalized: +-u with ||u||^2 = d
    theta = default_theta_grid(20)
    sums = separation_sums_from_data(x, theta, n_queries=3000, generator=torch.Generator().manual_seed(0))
    ref = torch.from_numpy(two_point_lam(theta.numpy(), d))
    err = (sums.lam - ref).abs()
    # Where lambda > 0.99 the mean of 1 - lambda comes from rare noise draws (x_t near the midpoint) that 3000
    # queries may miss entirely, and the sample standard error cannot see them: allow that tail.
    rare_tail = torch.where(ref > 0.99, 1 - ref, torch.zeros_like(ref))
    # Besides 4 standard errors (the regression's O(1/n) bias, ~se sqrt(kurtosis / n) < 0.1 se, is inside):
    # the reference's quadrature error and the kernel's fp32 rounding.
    quadrature = torch.from_numpy(abs(two_point_lam(theta.numpy(), d, 150) - ref.numpy()))
    rounding = _KernelRounding(x, theta, *_data_queries(2, (d,), 3000, seed=0)).field("lam")
    assert bool((err <= 4 * sums.standard_error + quadrature + rounding + rare_tail).all())
    assert float(sums.standard_error.max()) < 0.01


def test_theorem_4_1_bound_and_memorization_with_dimension() -> None:
    """int_0^inf |1 - lambda(s)| ds <= 3 n / sqrt(d) on random normalized data; lambda -> 1 as d grows."""
    n = 4
    integrals, at_half = [], []
    for d in (16, 128, 1024):
        for seed in (0, 1):
            x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
            sums = separation_sums_from_data(x, default_theta_grid(64), n_queries=512)
            lam = sums.to_function()
            integral = lam.memorization_integral()
            assert integral <= 3 * n / math.sqrt(d), (d, integral)
            if seed == 0:
                integrals.append(integral)
                at_half.append(float(lam.at_snr(torch.tensor(0.5))))
    assert integrals[0] > integrals[1] > integrals[2]
    assert at_half[0] < at_half[1] < at_half[2] and at_half[2] > 0.99


def test_data_normalization() -> None:
    data = _data(100, 5, 7).double()
    norm = DataNormalization.from_data(data)
    torch.testing.assert_close(norm.mean, data.mean(0))  # float64 means of 100 terms: ~1e-14, default 1e-7
    # float64 sums of 500 terms in two orders: relative error <= 2 gamma_500 (u64) ~ 1e-13
    assert norm.second_moment == pytest.approx(float(((data - data.mean(0)) ** 2).mean()), rel=1e-12)
    y = norm.normalize(data).double()
    # normalize() is fp32 (the data are fp32 values): |y - exact| <= u (3 |y| + |mean| / sqrt(v)) (mean and scale
    # rounded, subtraction, product), so the mean of y is within that of 0 and the mean of y^2 within 2 |y| times
    # that of 1.
    y_err = U32 * (3 * y.abs() + norm.mean.abs() / math.sqrt(norm.second_moment))
    assert float((y.mean(0).abs() - y_err.mean(0)).max()) <= 0
    assert float((y**2).mean()) == pytest.approx(1.0, abs=float((2 * y.abs() * y_err + y_err**2).mean()))
    pooled = DataNormalization.from_data(data[:37]) + DataNormalization.from_data(data[37:])
    torch.testing.assert_close(pooled.mean, norm.mean)
    assert pooled.second_moment == pytest.approx(norm.second_moment, rel=1e-12) and pooled.count == 100  # float64


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(0, 4), "x"),
        (torch.ones(10, 4), "constant"),
        (torch.ones(1, 4), "constant"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "x"),
        ([[1.0, 2.0]], "x"),
    ],
)
def test_bad_data_is_named(x, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        estimate_separation_from_data(x, n_queries=4)


def test_bad_estimator_arguments_are_named() -> None:
    data = _data(20, 3, 8)
    with pytest.raises(ValueError, match="n_queries"):
        separation_sums_from_data(data, n_queries=0)
    with pytest.raises(ValueError, match="query_chunk"):
        separation_sums_from_data(data, n_queries=4, query_chunk=0)
    with pytest.raises(ValueError, match="data_chunk"):
        separation_sums_from_data(data, n_queries=4, data_chunk=-3)
    with pytest.raises(ValueError, match="theta"):
        separation_sums_from_data(data, theta=torch.tensor([0.5, 0.2]), n_queries=4)
    with pytest.raises(ValueError, match="query_index"):
        separation_sums_from_queries(data, default_theta_grid(4), torch.tensor([0, 20]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="noise"):
        separation_sums_from_queries(data, default_theta_grid(4), torch.tensor([0, 1]), torch.zeros(3, 3))


def _exact_predictor(data: torch.Tensor, path: CondOTPath):
    """The posterior mean E[x1 | x_t] over a finite raw data set, in float64: the ideal x1-predictor."""
    x64 = data.double()

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = path(t)
        a, s = c.alpha.double()[:, None, None], c.sigma.double()[:, None, None]
        logits = -((x_t.double()[:, None, :] - a * x64[None]) ** 2).sum(-1) / (2 * s[:, :, 0] ** 2)
        return (torch.softmax(logits, 1) @ x64).float()

    return predict


def test_model_estimator_with_exact_predictor_matches_data_estimator() -> None:
    data = _data(40, 5, 9)  # un-normalized: the SNR map t = snr_inverse(tan(theta) / sqrt(v)) is exercised
    theta = default_theta_grid(16)[:-2]  # keep t < 1 so sigma_t > 0 for the exact predictor
    path = CondOTPath()
    model = separation_sums_from_model(
        _exact_predictor(data, path), path, data.repeat(50, 1), theta, generator=torch.Generator().manual_seed(1)
    )
    exact = separation_sums_from_data(data, theta, n_queries=2000, generator=torch.Generator().manual_seed(2))
    diff = (model.lam - exact.lam).abs()
    # 4 standard errors of the difference of two independent estimates, plus fp32 rounding: the data kernel's
    # bound, and the model estimator's A = |x1 - x1_hat|^2 / (d v) (prediction rounded to fp32, d-term sum:
    # gamma(d + 4) relative). The model's fp32 times reach the angles to ~1e-8 rad: negligible.
    rounding = _KernelRounding(data, theta, *_data_queries(40, (5,), 2000, seed=2)).field("lam")
    rounding = rounding + gamma(5 + 4) * model.sq_error / model.count
    tol = 4 * torch.sqrt(model.standard_error**2 + exact.standard_error**2) + rounding
    assert bool((diff <= tol).all()), (diff / tol).max()
    assert model.cv_sum is None and float(model.count[0]) == 2000
    # Merging two model estimates equals estimating from the summed sums (weights = counts).
    other = separation_sums_from_model(
        _exact_predictor(data, path), path, data, theta, generator=torch.Generator().manual_seed(3)
    )
    merged = model.to_function().merge(other.to_function())
    inside = ((model.lam > 0) & (other.lam > 0) & (model.lam < 1) & (other.lam < 1)).numpy()  # unclipped
    assert inside.sum() >= 8
    # float64, a few operations on O(1) values either way: rounding ~1e-15
    torch.testing.assert_close(merged.lam_raw[inside], (model + other).lam[inside], rtol=0, atol=1e-12)
    torch.testing.assert_close(merged.counts, model.count + other.count)
    assert isinstance(merged, SeparationFunction)


def test_model_estimator_rejects_unreachable_snr() -> None:
    data = _data(10, 3, 10)
    vp = VPPath()  # alpha_0 = exp(-(0.1 + 20) / 4) > 0: the smallest SNRs are out of reach
    with pytest.raises(ValueError, match="theta"):
        separation_sums_from_model(lambda x, t: x, vp, data, default_theta_grid(32))
    with pytest.raises(ValueError, match="x1_predictor"):
        separation_sums_from_model("not callable", CondOTPath(), data)  # type: ignore[arg-type]
