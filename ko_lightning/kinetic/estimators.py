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
from typing import Any, cast

import torch
from torch import Tensor

from ko_lightning.kinetic.collectives import Reduce, SingleProcess, raise_together
from ko_lightning.kinetic.conditional import (
    ConditionalX1Predictor,
    accepts_cond,
    check_cond,
    check_labels,
    class_groups,
)
from ko_lightning.kinetic.data_kernel import mean_sq_norm, query_sums
from ko_lightning.kinetic.normalization import DataNormalization
from ko_lightning.kinetic.posterior import data_chunk_fp32
from ko_lightning.kinetic.separation import SeparationFunction, check_theta_grid, default_theta_grid
from ko_lightning.kinetic.sharded import sharded_separation_sums
from ko_lightning.kinetic.sums import SeparationSums
from ko_lightning.paths.base import GaussianPath

__all__ = [
    "SeparationSums",
    "draw_queries",
    "estimate_separation_from_data",
    "estimate_separation_from_model",
    "separation_sums_from_data",
    "separation_sums_from_model",
    "separation_sums_from_queries",
]

X1Predictor = Callable[[Tensor, Tensor], Tensor]


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
    dtype: torch.dtype = torch.float32,
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
        dtype: compute dtype, ``torch.float32`` (default, fast) or ``torch.float64`` (exact comparisons).

    The kernel itself is :func:`ko_lightning.kinetic.data_kernel.query_sums`; its data-parallel twin, with the
    data split across ranks, is :func:`ko_lightning.kinetic.sharded.sharded_separation_sums` (docs/scale.md §2).
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
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
                dtype=dtype,
            )
            for rows, local, pos in class_groups(check_labels(labels, n), query_index)
        ]
        return functools.reduce(operator.add, parts)
    dev = torch.device(device) if device is not None else data.device
    flat = data.reshape(n, d)
    yq_all, _ = data_chunk_fp32(flat[query_index.to(data.device)], 0, n_q, norm, dev, dtype=dtype)
    eps_all = noise.reshape(n_q, d).to(device=dev, dtype=dtype)
    m2 = mean_sq_norm(flat, norm, dev, dtype, data_chunk, SingleProcess())
    return query_sums(flat, norm, theta64, yq_all, eps_all, slice(0, n_q), m2, query_chunk, data_chunk, SingleProcess())


def draw_queries(
    n: int, n_queries: int, sample_shape: tuple[int, ...], generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The data estimator's queries: ``n_queries`` indices into ``n`` rows, drawn as whole random permutations (every
    row used equally often), then their standard normal noise ``(n_queries, *sample_shape)``, on the CPU.

    ``n = 0`` (an empty shard) gives no query.
    """
    if n == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros((0, *sample_shape))
    perms = [torch.randperm(n, generator=generator, device=generator.device) for _ in range(-(-n_queries // n))]
    index = torch.cat(perms)[:n_queries].cpu()
    return index, torch.randn((n_queries, *sample_shape), generator=generator, device=generator.device).cpu()


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
    reduce: Reduce | None = None,
    dtype: torch.dtype = torch.float32,
) -> SeparationSums:
    """Partial sums of the finite-set estimate of ``1 - lambda`` (see :func:`estimate_separation_from_data`).

    With ``reduce`` over several ranks (a collective), ``x`` (and ``labels``) is this rank's shard, the queries
    are drawn from it (:func:`draw_queries`), ``normalization`` must be the global one, and each query's posterior
    runs over the union of the shards (:func:`ko_lightning.kinetic.sharded.sharded_separation_sums`,
    docs/scale.md §2); a bad argument on any rank raises on every rank.
    """
    sharded = reduce is not None and reduce.world_size > 1
    error: Exception | None = None
    try:
        if not torch.is_tensor(x):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty data set of shape (n, ...), got {tuple(x.shape)}")
        if sharded and normalization is None:
            raise ValueError("normalization must be given (the global statistics) when the data are sharded")
        norm = DataNormalization.from_data(x) if normalization is None else normalization
        n_queries = _check_positive_int(n_queries, "n_queries")
        grid = default_theta_grid() if theta is None else theta
        gen = _default_generator(generator)
        lab = None if labels is None else check_labels(labels, x.shape[0])  # before drawing: bad labels fail fast
        query_index, noise = draw_queries(x.shape[0], n_queries, tuple(x.shape[1:]), gen)
    except Exception as err:  # noqa: BLE001 - on several ranks made known to all first
        if not sharded:
            raise
        error = err
    if reduce is not None and sharded:
        raise_together(reduce, error, "separation_sums_from_data: drawing the queries", device or x.device)
        return sharded_separation_sums(
            x, grid, query_index, noise, norm, reduce, query_chunk, data_chunk, device, lab, dtype
        )
    query_index = query_index.to(x.device)
    return separation_sums_from_queries(x, grid, query_index, noise, norm, query_chunk, data_chunk, device, lab, dtype)


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
