"""Estimators of the separation function: from a finite data set and from a trained x1-predictor (docs/math.md §3).

Both estimate ``1 - lambda(s)`` in its low-variance MSE form, ``(1/d) E||y - E[y | x_t]||^2`` on normalized data
``y``, and both return additive partial sums (:class:`SeparationSums`) so several processes can add theirs before
dividing.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from ko_lightning.kinetic.conditional import (
    ConditionalX1Predictor,
    accepts_cond,
    check_cond,
    check_labels,
    class_groups,
)
from ko_lightning.kinetic.normalization import DataNormalization
from ko_lightning.kinetic.posterior import (
    accumulate_weighted,
    data_chunk_fp32,
    exp_clamped_,
    online_softmax_update,
)
from ko_lightning.kinetic.separation import SeparationFunction, check_theta_grid, default_theta_grid
from ko_lightning.paths.base import GaussianPath

__all__ = [
    "SeparationSums",
    "estimate_separation_from_data",
    "estimate_separation_from_model",
    "separation_sums_from_data",
    "separation_sums_from_model",
    "separation_sums_from_queries",
]

X1Predictor = Callable[[Tensor, Tensor], Tensor]


_CV1_FIELDS = ("cv_sum", "cv_sq", "cv_cross")
_CV2_FIELDS = ("cv2_sum", "cv2_sq", "cv2_cross", "cv12")
#: Two control variates whose sample correlation is this close to +-1 (``det Cov(D) <= tol var(D1) var(D2)``) are
#: treated as collinear: the regression falls back to the better single one.
_COLLINEAR_TOL = 1e-8


@dataclass(frozen=True)
class SeparationSums:
    """Additive partial sums of a separation-function estimate.

    Per grid point ``k`` and query ``j`` the estimators record the MSE form ``A = ||y - y_hat||^2 / d``
    (docs/math.md §3: low variance where ``lambda ~ 1``). The data estimator, whose ``y_hat = E[y | x_t]`` is
    exact, also records two control variates of exactly known mean 0:

    - ``D1 = A - B - (m2 - 1)`` with ``B = 1 - ||y_hat||^2 / d`` (``E[A] - E[B] = m2 - 1``, 0 under the data's own
      normalization; ``B`` has low variance where ``lambda ~ 0``);
    - ``D2 = L - E[L]`` with ``L = ||y - sin(theta) x_t||^2 / d = ||cos^2(theta) y - sin(theta) cos(theta) eps||^2
      / d``, the residual of the linear (Gaussian) posterior mean, for ``x_t = sin(theta) y + cos(theta) eps``.
      ``E[L] = cos^4(theta) m2 + sin^2(theta) cos^2(theta)`` with ``m2 = E||y||^2 / d`` over the data set the
      queries are drawn from (``1`` when the normalization is that set's own). ``A ~ L`` for nearly Gaussian
      data, where ``D1`` alone removes little of ``A``'s variance.

    The estimate is the minimum-variance (least-squares) combination

        ``1 - lambda = mean(A) - b^T mean(D)``,  ``b = Cov(D)^{-1} Cov(D, A)``,

    per grid point over the control variates present (``b`` from the same samples: bias ``O(1/count)``; a
    singular / collinear ``Cov(D)`` falls back to the better single control variate). All fields are sums, so
    partial sums from disjoint query sets (other processes, other seeds) add with ``+`` (or
    ``torch.distributed.all_reduce`` of each tensor) before dividing; every field other than ``theta`` is a
    ``(G,)`` tensor or ``None``.

    Attributes:
        theta: the grid, ``(G,)`` float64.
        sq_error: ``sum_j A`` per grid point (float64).
        count: number of queries per grid point (float64).
        sq_error_sq: ``sum_j A^2`` (for :attr:`standard_error`).
        cv_sum: ``sum_j D1``, or ``None`` (model estimator: no control variate).
        cv_sq: ``sum_j D1^2``, or ``None``.
        cv_cross: ``sum_j A D1``, or ``None``.
        cv2_sum: ``sum_j D2``, or ``None`` (then only ``D1`` is used). Requires the ``D1`` fields.
        cv2_sq: ``sum_j D2^2``, or ``None``.
        cv2_cross: ``sum_j A D2``, or ``None``.
        cv12: ``sum_j D1 D2``, or ``None``.
    """

    theta: Tensor
    sq_error: Tensor
    count: Tensor
    sq_error_sq: Tensor
    cv_sum: Tensor | None = None
    cv_sq: Tensor | None = None
    cv_cross: Tensor | None = None
    cv2_sum: Tensor | None = None
    cv2_sq: Tensor | None = None
    cv2_cross: Tensor | None = None
    cv12: Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("sq_error", "count", "sq_error_sq", *_CV1_FIELDS, *_CV2_FIELDS):
            value = getattr(self, name)
            if value is not None and value.shape != self.theta.shape:
                raise ValueError(f"{name} must have theta's shape {tuple(self.theta.shape)}, got {tuple(value.shape)}")
        if len({getattr(self, n) is None for n in _CV1_FIELDS}) != 1:
            raise ValueError("cv_sum, cv_sq and cv_cross must be given together")
        if len({getattr(self, n) is None for n in _CV2_FIELDS}) != 1:
            raise ValueError("cv2_sum, cv2_sq, cv2_cross and cv12 must be given together")
        if self.cv2_sum is not None and self.cv_sum is None:
            raise ValueError("cv2_sum, cv2_sq, cv2_cross and cv12 need cv_sum, cv_sq and cv_cross")

    def __add__(self, other: SeparationSums) -> SeparationSums:
        if not isinstance(other, SeparationSums):
            return NotImplemented
        if other.theta.shape != self.theta.shape or not torch.allclose(other.theta.to(self.theta), self.theta):
            raise ValueError("other must be on the same theta grid")

        def add(name: str) -> Tensor | None:
            a, b = getattr(self, name), getattr(other, name)
            return None if a is None or b is None else a + b.to(a)

        # A control-variate group survives only if both operands carry it (D2 needs D1).
        kept = {name: add(name) for name in ("sq_error", "count", "sq_error_sq", *_CV1_FIELDS)}
        if kept["cv_sum"] is not None:
            kept.update({name: add(name) for name in _CV2_FIELDS})
        return SeparationSums(self.theta, **kept)  # type: ignore[arg-type]  # the required fields are never None

    def _moments(self) -> tuple[Tensor, Tensor, Tensor]:
        """``mean(A)``, the correction ``b^T mean(D)`` and the per-sample variance of ``A - b^T D``."""
        n = self.count
        mean_a = self.sq_error / n
        var_a = (self.sq_error_sq / n - mean_a**2).clamp_min(0.0)
        zero = torch.zeros_like(mean_a)
        if self.cv_sum is None or self.cv_sq is None or self.cv_cross is None:
            return mean_a, zero, var_a
        tiny = 1e-300

        def single(s: Tensor, sq: Tensor, cross: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            mean_d = s / n
            var_d = (sq / n - mean_d**2).clamp_min(0.0)
            cov = cross / n - mean_a * mean_d
            ok = var_d > tiny
            beta = torch.where(ok, cov / var_d.clamp_min(tiny), zero)
            return mean_d, var_d, cov, beta

        m1, v1, c1, beta1 = single(self.cv_sum, self.cv_sq, self.cv_cross)
        red1 = beta1 * c1  # variance removed by D1 alone: cov^2 / var
        if self.cv2_sum is None or self.cv2_sq is None or self.cv2_cross is None or self.cv12 is None:
            return mean_a, beta1 * m1, (var_a - red1).clamp_min(0.0)
        m2, v2, c2, beta2 = single(self.cv2_sum, self.cv2_sq, self.cv2_cross)
        red2 = beta2 * c2
        c12 = self.cv12 / n - m1 * m2
        det = v1 * v2 - c12**2
        ok = (v1 > tiny) & (v2 > tiny) & (det > _COLLINEAR_TOL * v1 * v2)
        safe_det = torch.where(ok, det, torch.ones_like(det))
        b1 = torch.where(ok, (v2 * c1 - c12 * c2) / safe_det, torch.where(red1 >= red2, beta1, zero))
        b2 = torch.where(ok, (v1 * c2 - c12 * c1) / safe_det, torch.where(red1 >= red2, zero, beta2))
        # Residual variance of A - b1 D1 - b2 D2 with the least-squares b: var(A) - b . Cov(D, A).
        return mean_a, b1 * m1 + b2 * m2, (var_a - b1 * c1 - b2 * c2).clamp_min(0.0)

    @property
    def lam(self) -> Tensor:
        """Raw estimate of ``lambda`` (not projected; Monte-Carlo noise may take it slightly out of ``[0, 1]``)."""
        mean_a, correction, _ = self._moments()
        return 1.0 - (mean_a - correction)

    @property
    def standard_error(self) -> Tensor:
        """Monte-Carlo standard error of :attr:`lam` per grid point, ``sqrt(var(A - b^T D) / count)``.

        Treats the queries as independent (they are, within a grid point).
        """
        return torch.sqrt(self._moments()[2] / self.count)

    def to_function(self, smoothing: float = 0.0, zero_at_origin: bool = True) -> SeparationFunction:
        """The :class:`SeparationFunction` of these sums: :attr:`lam` clipped to ``[0, 1]``, ``counts = count``.

        ``zero_at_origin`` is passed on: ``False`` for a conditional ``lambda_cond``, whose value at ``s = 0`` is
        the between-class share of the second moment, not 0 (docs/math.md §3.10).

        Raises:
            ValueError: if some grid point has no queries.
        """
        if not bool((self.count > 0).all()):
            raise ValueError("every grid point needs count > 0 before dividing")
        lam = self.lam.clamp(0.0, 1.0).cpu()
        return SeparationFunction(self.theta.cpu(), lam, self.count.cpu(), smoothing, zero_at_origin)


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    return torch.Generator().manual_seed(0) if generator is None else generator


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def separation_sums_from_queries(
    data: Tensor,
    theta: Tensor,
    query_index: Tensor,
    noise: Tensor,
    normalization: DataNormalization | None = None,
    query_chunk: int = 1024,
    data_chunk: int = 2048,
    device: torch.device | str | None = None,
    labels: Tensor | None = None,
) -> SeparationSums:
    """Partial sums of ``1 - lambda`` for given queries: the deterministic kernel behind the data estimator.

    With normalized data ``y_i`` and ``s = tan theta`` (path ``alpha = sin theta``, ``sigma = cos theta``), query
    ``j`` at angle ``theta`` is ``x = sin(theta) y_{i_j} + cos(theta) eps_j`` and contributes
    ``||y_{i_j} - E[y | x]||^2 / d`` (and the control variates ``D1``, ``D2`` of :class:`SeparationSums`), where
    ``E[y | x] = sum_k softmax_k(l_k) y_k`` with logits

        ``l_k = -s^2 ||y_{i_j} - y_k||^2 / 2 + s eps_j . (y_k - y_{i_j})``  (relative to the query's own point).

    The same queries serve every angle (common random numbers: the error of the curve is smooth in theta), so the
    two matmuls ``Y_q Y^T`` and ``E Y^T`` of a block are shared by all angles; the weighted sums are streamed
    over data chunks (fp32; the own point's logit 0 is the reference, with a log-sum-exp fallback should some
    weight overflow), and at high SNR only the data points that carry weight enter the weighted sum. Peak
    temporaries: ``R x data_chunk`` logits with ``R <= query_chunk`` rows (query x angle pairs), ``R x d``
    sums, ``2 x data_chunk x d`` data and the ``Q x d`` queries themselves.

    ``D2``'s known mean ``E[L] = cos^4(theta) m2 + sin^2(theta) cos^2(theta)`` uses ``m2 = mean_i ||y_i||^2 / d``
    over all of ``data`` under ``normalization`` (computed here in one extra pass over ``data``: ``m2 = 1`` for
    the data's own normalization, and a foreign one, e.g. global statistics on a data-parallel shard, is
    corrected exactly). That is the mean for queries drawn uniformly from ``data``, as
    :func:`separation_sums_from_data` draws them; for a non-uniform ``query_index`` the mean of ``D2`` is
    ``cos^4(theta) (mean_j ||y_{i_j}||^2 / d - m2)`` and the estimate carries that bias times ``D2``'s coefficient.

    Args:
        data: the finite set, ``(n, ...)``, any dtype/device (converted chunk by chunk).
        theta: angle grid, strictly increasing inside ``(0, pi/2)``.
        query_index: ``(Q,)`` indices of the data points the queries are built from.
        noise: ``(Q, ...)`` standard normal noise ``eps`` (sample shape of ``data``).
        normalization: statistics to normalize by; default computed from ``data``.
        query_chunk: max rows (query, angle pairs) per block.
        data_chunk: data rows per block.
        device: where to compute; default ``data``'s device.
        labels: ``(n,)`` non-negative integer class labels of ``data``, or ``None``. Given, each query is denoised
            by the posterior over the points of its own data point's class (``E[y | x, c]``), so the sums estimate
            the conditional ``1 - lambda_cond`` (docs/math.md §3.10). ``normalization`` stays global (default:
            all of ``data``'s statistics), and the classes are computed one after the other, each as above on its
            own points (``m2`` then is the class's, which keeps ``D1`` and ``D2`` of mean 0 per class); their
            sums are added.
    """
    norm = DataNormalization.from_data(data) if normalization is None else normalization
    theta64 = check_theta_grid(theta, "theta")
    query_chunk = _check_positive_int(query_chunk, "query_chunk")
    data_chunk = _check_positive_int(data_chunk, "data_chunk")
    n = data.shape[0]
    d = data[0].numel()
    if norm.dim != d:
        raise ValueError(f"normalization has {norm.dim} features, data has {d}")
    query_index = torch.as_tensor(query_index)
    if query_index.ndim != 1 or query_index.numel() == 0 or query_index.dtype.is_floating_point:
        raise ValueError(f"query_index must be a non-empty 1D integer tensor, got shape {tuple(query_index.shape)}")
    if int(query_index.min()) < 0 or int(query_index.max()) >= n:
        raise ValueError(f"query_index must lie in [0, {n})")
    n_q = query_index.numel()
    if tuple(noise.shape) != (n_q, *data.shape[1:]):
        raise ValueError(f"noise must have shape {(n_q, *data.shape[1:])}, got {tuple(noise.shape)}")
    if labels is not None:  # one class at a time, each over its own points (global normalization)
        parts = [
            separation_sums_from_queries(
                data[rows.to(data.device)],
                theta64,
                local,
                noise[pos.to(noise.device)],
                norm,
                query_chunk,
                data_chunk,
                device,
            )
            for rows, local, pos in class_groups(check_labels(labels, n), query_index)
        ]
        return functools.reduce(operator.add, parts)
    dev = torch.device(device) if device is not None else data.device
    flat = data.reshape(n, d)
    yq_all = norm.normalize(flat[query_index.to(data.device)].reshape(n_q, *data.shape[1:])).reshape(n_q, d)
    yq_all = yq_all.to(dev)
    eps_all = noise.reshape(n_q, d).to(device=dev, dtype=torch.float32)

    n_theta = theta64.numel()
    snr = torch.tan(theta64)
    per_block = max(1, query_chunk // n_theta)  # queries per block
    theta_block = max(1, min(n_theta, query_chunk // per_block))  # angles per block
    # Work buffers reused across blocks (fresh large CPU allocations per chunk cost page faults).
    c_max = min(data_chunk, n)
    grams_buf = torch.empty(2 * per_block * c_max, device=dev)
    logits_buf = torch.empty(theta_block * per_block * c_max, device=dev)
    y_buf = torch.empty(c_max * d, device=dev)
    sums = [torch.zeros(n_theta, dtype=torch.float64) for _ in range(10)]
    sq_error, count, sq_error_sq, cv_sum, cv_sq, cv_cross, cv2_sum, cv2_sq, cv2_cross, cv12 = sums
    # Second control variate D2 = L - E[L] (SeparationSums), L = ||cos^2 y - sin cos eps||^2 / d
    #   = cos^4 ||y||^2/d - 2 sin cos^3 y.eps/d + sin^2 cos^2 ||eps||^2/d,  E[L] = cos^4 m2 + sin^2 cos^2,
    # with m2 = mean ||y||^2 / d over the data set (queries uniform over it); split into per-query zero-mean parts.
    m2 = _mean_sq_norm(flat, norm, dev, data_chunk, y_buf)
    lin_y, lin_cross, lin_eps = (torch.empty(n_q, dtype=torch.float64, device=dev) for _ in range(3))
    for r0 in range(0, n_q, 1024):  # float64 in row chunks (no Q x d float64 copy)
        yq64, eps64 = yq_all[r0 : r0 + 1024].double(), eps_all[r0 : r0 + 1024].double()
        lin_y[r0 : r0 + 1024] = (yq64 * yq64).sum(1) / d - m2  # mean 0 over a uniform query point
        lin_cross[r0 : r0 + 1024] = (yq64 * eps64).sum(1) / d  # mean 0: eps independent of y
        lin_eps[r0 : r0 + 1024] = (eps64 * eps64).sum(1) / d - 1.0  # mean 0
    cos_t, sin_t = torch.cos(theta64).to(dev), torch.sin(theta64).to(dev)
    lin_coeffs = torch.stack([cos_t**4, -2.0 * sin_t * cos_t**3, sin_t**2 * cos_t**2], 1)  # (G, 3) float64
    lin_parts = torch.stack([lin_y, lin_cross, lin_eps], 0)  # (3, Q) float64
    for g0 in range(0, n_theta, theta_block):
        s_g = snr[g0 : g0 + theta_block]
        n_g = s_g.numel()
        coeffs = torch.stack([s_g**2, s_g], 1).to(device=dev, dtype=torch.float32)  # (n_g, 2)
        for q0 in range(0, n_q, per_block):
            yq, eps = yq_all[q0 : q0 + per_block], eps_all[q0 : q0 + per_block]
            n_b = yq.shape[0]
            rows = n_g * n_b
            own_sq, own_eps = (yq * yq).sum(1), (eps * yq).sum(1)
            run_max = torch.full((rows,), -math.inf, device=dev)
            run_sum = torch.zeros(rows, device=dev)
            acc = torch.zeros(rows, d, device=dev)
            for fixed_reference in (True, False):
                for d0 in range(0, n, data_chunk):
                    y, ysq = data_chunk_fp32(flat, d0, d0 + data_chunk, norm, dev, y_buf)
                    c = y.shape[0]
                    grams = grams_buf[: 2 * n_b * c].view(2, n_b, c)
                    # Logits relative to the query's own data point k = i (its logit is 0):
                    #   l_k - l_i = -s^2 ||y_i - y_k||^2 / 2 + s eps.(y_k - y_i),
                    # so the maximum is about 0 and no running maximum is needed (one pass less per chunk).
                    torch.mm(yq, y.T, out=grams[0])
                    grams[0].sub_(0.5 * ysq).sub_(0.5 * own_sq[:, None])
                    torch.mm(eps, y.T, out=grams[1])
                    grams[1].sub_(own_eps[:, None])
                    # every (angle, query) row in one small-K matmul: [s^2, s] @ [-|y_i - y_k|^2 / 2; eps.(y_k - y_i)]
                    logits = logits_buf[: rows * c].view(n_g, n_b * c)
                    torch.mm(coeffs, grams.view(2, -1), out=logits)
                    if fixed_reference:
                        probs = exp_clamped_(logits.view(rows, c))
                        run_sum.add_(probs.sum(1))
                        accumulate_weighted(probs, acc, y, groups=n_g)
                    else:
                        online_softmax_update(logits.view(rows, c), run_max, run_sum, acc, y, groups=n_g)
                # exp overflows only if some point beats the own one by > 88 nats (noise aligned with the data);
                # then redo the block with the running-maximum (log-sum-exp) update.
                if bool(torch.isfinite(run_sum).all()) and bool(torch.isfinite(acc).all()):
                    break
                run_sum.zero_()
                acc.zero_()
            post = (acc / run_sum[:, None]).view(n_g, n_b, d)
            err = (((yq[None] - post) ** 2).sum(-1) / d).double()  # A = ||y - E[y|x]||^2 / d, (n_g, n_b)
            # D1 = A - B - (m2 - 1), B = 1 - ||E[y|x]||^2 / d: E[A] - E[B] = m2 - 1 (0 under the data's own
            # normalization), subtracted so that D1 has mean 0 under a foreign one too (a shard, global statistics).
            cv = err - (1.0 - ((post**2).sum(-1) / d).double()) - (m2 - 1.0)
            sq_error[g0 : g0 + n_g] += err.sum(1).cpu()
            sq_error_sq[g0 : g0 + n_g] += (err * err).sum(1).cpu()
            cv_sum[g0 : g0 + n_g] += cv.sum(1).cpu()
            cv_sq[g0 : g0 + n_g] += (cv * cv).sum(1).cpu()
            cv_cross[g0 : g0 + n_g] += (err * cv).sum(1).cpu()
            cv2 = lin_coeffs[g0 : g0 + n_g] @ lin_parts[:, q0 : q0 + n_b]  # D2 = L - E[L], (n_g, n_b)
            cv2_sum[g0 : g0 + n_g] += cv2.sum(1).cpu()
            cv2_sq[g0 : g0 + n_g] += (cv2 * cv2).sum(1).cpu()
            cv2_cross[g0 : g0 + n_g] += (err * cv2).sum(1).cpu()
            cv12[g0 : g0 + n_g] += (cv * cv2).sum(1).cpu()
            count[g0 : g0 + n_g] += n_b
    return SeparationSums(
        theta64.cpu(), sq_error, count, sq_error_sq, cv_sum, cv_sq, cv_cross, cv2_sum, cv2_sq, cv2_cross, cv12
    )


def _mean_sq_norm(flat: Tensor, norm: DataNormalization, dev: torch.device, data_chunk: int, y_buf: Tensor) -> float:
    """``mean_i ||y_i||^2 / d`` of the normalized data (1 up to rounding when ``norm`` is the data's own)."""
    n, d = flat.shape
    total = 0.0
    for d0 in range(0, n, data_chunk):
        _, ysq = data_chunk_fp32(flat, d0, d0 + data_chunk, norm, dev, y_buf)
        total += float(ysq.double().sum())
    return total / (n * d)


def separation_sums_from_data(
    x: Tensor,
    theta: Tensor | None = None,
    n_queries: int = 1024,
    normalization: DataNormalization | None = None,
    generator: torch.Generator | None = None,
    query_chunk: int = 1024,
    data_chunk: int = 2048,
    device: torch.device | str | None = None,
    labels: Tensor | None = None,
) -> SeparationSums:
    """Partial sums of the finite-set estimate of ``1 - lambda`` (see :func:`estimate_separation_from_data`)."""
    if not torch.is_tensor(x):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty data set of shape (n, ...), got {tuple(x.shape)}")
    norm = DataNormalization.from_data(x) if normalization is None else normalization
    n_queries = _check_positive_int(n_queries, "n_queries")
    theta = default_theta_grid() if theta is None else theta
    gen = _default_generator(generator)
    n = x.shape[0]
    lab = None if labels is None else check_labels(labels, n)  # before drawing: bad labels fail fast
    # Stratified query points: whole random permutations, so every data point is used equally often.
    perms = [torch.randperm(n, generator=gen, device=gen.device) for _ in range(-(-n_queries // n))]
    query_index = torch.cat(perms)[:n_queries].to(x.device)
    noise = torch.randn((n_queries, *x.shape[1:]), generator=gen, device=gen.device)
    return separation_sums_from_queries(x, theta, query_index, noise, norm, query_chunk, data_chunk, device, lab)


def estimate_separation_from_data(
    x: Tensor,
    theta: Tensor | None = None,
    n_queries: int = 1024,
    normalization: DataNormalization | None = None,
    generator: torch.Generator | None = None,
    query_chunk: int = 1024,
    data_chunk: int = 2048,
    device: torch.device | str | None = None,
    smoothing: float = 0.0,
    labels: Tensor | None = None,
) -> SeparationFunction:
    """Separation function of a finite data set (the training set's own ``lambda``; docs/math.md §3).

    ``1 - lambda(s) = (1/d) E||y - E[y | x_t]||^2`` on ``y = (x - mean) / sqrt(v)``, with the exact posterior mean
    over the set (:func:`separation_sums_from_queries`), and ``1 - ||E[y | x_t]||^2 / d`` as control variate
    (:class:`SeparationSums`), so the estimate is precise at both ends of the SNR range. Queries: ``n_queries``
    data points drawn as whole random permutations, and one standard normal noise each, shared by all angles.
    Memory: the ``n_queries x d`` queries plus temporaries bounded by ``query_chunk`` and ``data_chunk``.

    Args:
        x: data, ``(n, ...)``; normalized internally.
        theta: angle grid (default :func:`default_theta_grid`).
        n_queries: queries per angle.
        normalization: statistics to normalize by (pass global ones under data parallelism); default from ``x``.
        generator: source of the queries (default ``torch.Generator().manual_seed(0)``; give each process its own).
        query_chunk: max (query, angle) rows per block.
        data_chunk: data rows per block.
        device: where to compute (default ``x``'s device).
        smoothing: passed to :class:`SeparationFunction`.
        labels: ``(n,)`` non-negative integer class labels of ``x`` for a class-conditional model, or ``None``.
            Given, the result is ``lambda_cond`` (docs/math.md §3.10): the queries are drawn as without labels
            (uniform over ``x``, so classes weigh by their share ``p_c``), each is denoised by the posterior over
            its own class's points, the normalization stays global, and the function has
            ``zero_at_origin=False`` (``lambda_cond(0) > 0``). Float condition vectors have no finite-set
            posterior: use :func:`estimate_separation_from_model` with ``cond``.

    Raises:
        ValueError: naming ``x`` when it is empty, non-finite or constant; naming the chunk sizes or
            ``n_queries`` when they are not positive integers; naming ``labels`` unless they are ``(n,)``
            non-negative integers.

    Example:
        >>> x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
        >>> lam = estimate_separation_from_data(x, n_queries=50)
        >>> bool(lam.at_snr(torch.tensor(10.0)) > 0.9)
        True
    """
    sums = separation_sums_from_data(
        x, theta, n_queries, normalization, generator, query_chunk, data_chunk, device, labels
    )
    return sums.to_function(smoothing, zero_at_origin=labels is None)


def _model_times(path: GaussianPath, theta: Tensor, v: float) -> Tensor:
    """Times ``t`` on ``path`` whose normalized SNR ``sqrt(v) alpha_t / sigma_t`` equals ``tan theta``."""
    target = torch.tan(theta) / math.sqrt(v)
    t = path.snr_inverse(target.float()).float().clamp(0.0, 1.0)
    c = path(t)
    reached = torch.atan2(math.sqrt(v) * c.alpha.double(), c.sigma.double())
    bad = (reached - theta).abs() > 1e-3
    if bool(bad.any()):
        th = theta[bad]
        raise ValueError(
            f"theta: {int(bad.sum())} angle(s) (e.g. {float(th[0]):.4g}) correspond to SNRs the path does not "
            "reach; restrict theta to the path's SNR range"
        )
    return t


def _predict(predictor: Any, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
    """``predictor(x_t, t)``, or ``predictor(x_t, t, cond=cond)`` when there is a condition."""
    if cond is None:
        return cast(X1Predictor, predictor)(x_t, t)
    return cast(ConditionalX1Predictor, predictor)(x_t, t, cond=cond)


@torch.no_grad()
def separation_sums_from_model(
    x1_predictor: X1Predictor | ConditionalX1Predictor,
    path: GaussianPath,
    x1: Tensor,
    theta: Tensor | None = None,
    normalization: DataNormalization | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    cond: Tensor | None = None,
) -> SeparationSums:
    """Partial sums of the model estimate of ``1 - lambda`` (see :func:`estimate_separation_from_model`)."""
    if not callable(x1_predictor):
        raise ValueError("x1_predictor must be callable as x1_predictor(x_t, t)")
    if not isinstance(path, GaussianPath):
        raise ValueError(f"path must be a GaussianPath, got {type(path).__name__}")
    if not torch.is_tensor(x1) or x1.ndim < 2 or x1.shape[0] == 0:
        raise ValueError(f"x1 must be a non-empty tensor of shape (n, ...), got {getattr(x1, 'shape', x1)!r}")
    batch_size = _check_positive_int(batch_size, "batch_size")
    if cond is not None:
        cond = check_cond(cond, x1.shape[0])
        if not accepts_cond(x1_predictor):
            raise ValueError("x1_predictor must take a cond= keyword when cond is given: x1_predictor(x_t, t, cond=c)")
    norm = DataNormalization.from_data(x1) if normalization is None else normalization
    theta64 = check_theta_grid(default_theta_grid() if theta is None else theta, "theta")
    v = norm.second_moment
    times = _model_times(path, theta64.to(x1.device), v)  # on x1's device, like the predictor's inputs
    coeffs = path(times)
    gen = _default_generator(generator)
    d = x1[0].numel()
    sums = [torch.zeros(theta64.numel(), dtype=torch.float64, device=x1.device) for _ in range(3)]
    sq_error, count, sq_error_sq = sums
    for b0 in range(0, x1.shape[0], batch_size):
        xb = x1[b0 : b0 + batch_size].float()
        cb = None if cond is None else cond[b0 : b0 + batch_size].to(x1.device)
        n_b = xb.shape[0]
        eps = torch.randn(xb.shape, generator=gen, device=gen.device).to(xb.device)  # shared by all angles
        for g in range(theta64.numel()):
            x_t = coeffs.alpha[g] * xb + coeffs.sigma[g] * eps
            pred = _predict(x1_predictor, x_t, times[g].expand(n_b), cb)
            if tuple(pred.shape) != tuple(xb.shape):
                raise ValueError(f"x1_predictor returned shape {tuple(pred.shape)}, expected {tuple(xb.shape)}")
            err = ((xb - pred.float()) ** 2).reshape(n_b, d).sum(1) / (d * v)  # the mean cancels in x1 - x1_hat
            err = err.double()
            sq_error[g] += err.sum()
            sq_error_sq[g] += (err * err).sum()
            count[g] += n_b
    return SeparationSums(theta64.cpu(), sq_error.cpu(), count.cpu(), sq_error_sq.cpu())


def estimate_separation_from_model(
    x1_predictor: X1Predictor | ConditionalX1Predictor,
    path: GaussianPath,
    x1: Tensor,
    theta: Tensor | None = None,
    normalization: DataNormalization | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    smoothing: float = 0.0,
    cond: Tensor | None = None,
) -> SeparationFunction:
    """Separation function measured through a network's x1-prediction error (docs/math.md §3).

    ``1 - lambda(s) ~ E||x1 - x1_hat(x_t, t)||^2 / (d v)`` with ``x_t = alpha_t x1 + sigma_t eps`` at the time
    ``t = path.snr_inverse(tan(theta) / sqrt(v))`` where the normalized SNR is ``tan theta``. An upper bound on
    the MMSE, tight as the model improves; it measures the population rather than the training set.

    Args:
        x1_predictor: ``x1_predictor(x_t, t) -> x1_hat`` in data units, ``t`` of shape ``(B,)`` (put a network
            in eval mode first; calls run under ``torch.no_grad``); with ``cond``, ``x1_predictor(x_t, t,
            cond=c)`` (:class:`ConditionalX1Predictor`).
        path: the path the predictor was trained on.
        x1: data samples ``(n, ...)`` in the units the predictor sees.
        theta: angle grid (default :func:`default_theta_grid`); every angle must be reachable on ``path``.
        normalization: statistics of the data (default computed from ``x1``).
        generator: noise source (default ``torch.Generator().manual_seed(0)``).
        batch_size: samples per predictor call.
        smoothing: passed to :class:`SeparationFunction`.
        cond: the conditions of ``x1``'s samples for a conditional model, ``(n, ...)``: integer class labels
            ``(n,)`` or float condition vectors ``(n, k)`` (the float case works only here, not in the data
            estimator). Given, each batch's rows go to the predictor as ``x1_predictor(x_t, t, cond=c)``, the
            result is ``lambda_cond`` (docs/math.md §3.10; ``normalization`` should be the whole data set's, not
            a class's) and the function has ``zero_at_origin=False``. ``None`` calls ``x1_predictor(x_t, t)``.

    Raises:
        ValueError: naming ``theta`` if an angle's SNR is outside the path's range, ``cond`` if it is malformed or
            the predictor has no ``cond`` keyword, or the bad argument.
    """
    sums = separation_sums_from_model(x1_predictor, path, x1, theta, normalization, generator, batch_size, cond)
    return sums.to_function(smoothing, zero_at_origin=cond is None)
