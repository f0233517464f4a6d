"""The exact posterior mean ``E[x1 | x_t]`` over a finite data set, chunked so memory is bounded (docs/math.md §3)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ko_lightning.kinetic.normalization import DataNormalization

__all__ = ["posterior_mean"]

#: Weights below this fraction of a row's reference weight (its running maximum, or in the estimator the
#: query's own data point) are skipped in the weighted sum: even summed over 10^6 data points they change the
#: result by less than fp32 rounding.
PRUNE_BELOW = 1e-14
#: Logits are clamped at this offset below the row's reference before exponentiation.
LOGIT_FLOOR = -60.0
#: ``log2(e)``: logits in nats times this are in bits (``e^l = 2^(l log2 e)``).
LOG2E = 1.0 / math.log(2.0)


def data_chunk_fp32(
    data: Tensor,
    start: int,
    stop: int,
    normalization: DataNormalization | None,
    device: torch.device,
    out: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Rows ``start:stop`` of flattened ``data`` in ``dtype`` (fp32 by default) on ``device`` (normalized if asked)
    and their squared norms.

    ``out`` (a flat ``dtype`` buffer of at least ``(stop - start) * d`` elements) is reused when a copy is needed:
    large temporaries freshly allocated per chunk cost page faults on CPU.
    """
    chunk = data[start:stop]
    if normalization is None and chunk.dtype == dtype and chunk.device == device:
        y = chunk
    elif out is not None:
        y = out[: chunk.numel()].view(chunk.shape).copy_(chunk)
    else:
        y = chunk.to(device=device, dtype=dtype, copy=True)
    if normalization is not None:
        mean = normalization.mean.reshape(1, -1).to(device=device, dtype=dtype)
        y.sub_(mean).mul_(1.0 / math.sqrt(normalization.second_moment))
    return y, (y * y).sum(1)


def accumulate_weighted(probs: Tensor, acc: Tensor, y: Tensor, groups: int = 1, prune: bool = True) -> int:
    """``acc += probs @ y``, skipping negligible columns; returns the number of weights multiplied (``rows x
    columns`` of the matmuls run: ``2 d`` FLOPs each).

    Args:
        probs: ``(R, C)`` non-negative weights, each row scaled so its largest weight is about 1 or more.
        acc: ``(R, D)`` running weighted sum.
        y: ``(C, D)`` data chunk.
        groups: the rows form this many consecutive equal blocks (e.g. one SNR each); pruning is decided per
            block, and the leading blocks up to the last dense one share one matmul.
        prune: skip columns whose weight is below ``PRUNE_BELOW`` in every row of a block (at high SNR the
            posterior sits on a few data points, and the weighted sum is most of the work).
    """
    if not prune:
        acc.addmm_(probs, y)
        return probs.numel()
    rows, cols = probs.shape
    per = rows // groups
    keep = probs.view(groups, per, cols).amax(1) > PRUNE_BELOW  # (groups, C)
    n_keep = keep.sum(1).tolist()
    dense = [g for g in range(groups) if n_keep[g] >= cols // 2]
    upto = (dense[-1] + 1) * per if dense else 0
    if upto:
        acc[:upto].addmm_(probs[:upto], y)
    for g in range(upto // per, groups):
        if n_keep[g] == 0:
            continue
        idx = keep[g].nonzero().squeeze(1)
        rows_g = slice(g * per, (g + 1) * per)
        acc[rows_g].addmm_(probs[rows_g].index_select(1, idx), y.index_select(0, idx))
    return upto * cols + per * sum(n_keep[g] for g in range(upto // per, groups))


def exp_clamped_(logits: Tensor) -> Tensor:
    """``exp(max(logits, LOGIT_FLOOR))`` in place.

    Clamping first: torch's exp takes a slow path for far-negative inputs (10-30x); ``exp(LOGIT_FLOOR)`` ~ 1e-26
    is below ``PRUNE_BELOW`` and below the fp32 resolution of the sums, so results do not change.
    """
    return logits.clamp_(min=LOGIT_FLOOR).exp_()


def exp2_clamped_(logits: Tensor) -> Tensor:
    """``2^max(logits, LOGIT_FLOOR log2 e)`` in place: :func:`exp_clamped_` for logits in bits (``l log2 e``).

    torch's ``exp2`` runs about 3x faster than ``exp`` on CPU (fp32), and the factor ``log2 e`` folds into the
    matmul that forms the logits, so the data estimator's logits are in bits.
    """
    return logits.clamp_(min=LOGIT_FLOOR * LOG2E).exp2_()


def online_softmax_update(
    logits: Tensor,
    run_max: Tensor,
    run_sum: Tensor,
    acc: Tensor,
    y: Tensor,
    groups: int = 1,
    prune: bool = True,
    base2: bool = False,
) -> int:
    """One data chunk of a streaming ``softmax(logits) @ y`` (in place; ``logits`` is overwritten); returns
    :func:`accumulate_weighted`'s count.

    Keeps per row the running maximum ``M``, ``S = sum exp(l - M)`` and ``A = sum exp(l - M) y``; a new chunk
    rescales ``S`` and ``A`` by ``exp(M_old - M_new)`` (log-sum-exp, so nothing overflows in fp32).

    Args:
        logits: ``(R, C)`` logits of ``R`` rows against the ``C`` rows of ``y``.
        run_max, run_sum: ``(R,)`` running state (``run_max`` starts at ``-inf``).
        acc: ``(R, D)`` running weighted sum.
        y: ``(C, D)`` data chunk.
        groups, prune: see :func:`accumulate_weighted`.
        base2: the logits (and ``run_max``) are in bits, ``l log2 e`` (weights ``2^l``).
    """
    new_max = torch.maximum(run_max, logits.amax(1))
    scale = (torch.exp2 if base2 else torch.exp)(run_max - new_max)  # 0 on the first chunk (run_max = -inf)
    probs = (exp2_clamped_ if base2 else exp_clamped_)(logits.sub_(new_max[:, None]))
    run_sum.mul_(scale).add_(probs.sum(1))
    acc.mul_(scale[:, None])
    run_max.copy_(new_max)
    return accumulate_weighted(probs, acc, y, groups, prune)


def _as_per_query(value: Tensor | float, q: int, name: str, device: torch.device) -> Tensor:
    v = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(-1)
    if v.numel() == 1:
        v = v.expand(q)
    if v.numel() != q:
        raise ValueError(f"{name} must be a scalar or have one entry per query ({q}), got {v.numel()}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} has non-finite values")
    return v


def posterior_mean(
    x_t: Tensor,
    data: Tensor,
    alpha: Tensor | float,
    sigma: Tensor | float,
    normalization: DataNormalization | None = None,
    query_chunk: int = 1024,
    data_chunk: int = 2048,
) -> Tensor:
    """Posterior mean of ``x1`` given ``x_t = alpha x1 + sigma x0`` when ``x1`` is uniform on a finite set.

        ``E[x1 | x_t] = sum_i w_i y_i``,  ``w = softmax_i(-||x_t - alpha y_i||^2 / (2 sigma^2))``.

    The logits are ``(alpha / sigma^2) x_t . y_i - (alpha^2 / (2 sigma^2)) ||y_i||^2`` (``||x_t||^2`` is constant
    per row and dropped): one fp32 matmul per block, streamed over data chunks with a running log-sum-exp. The
    largest temporaries are ``query_chunk x data_chunk`` logits, ``query_chunk x d`` sums and ``data_chunk x d``
    data, whatever ``n`` and the number of queries.

    fp32 limit: the logit of a data point is resolved to about ``1e-7 d / sigma^2``; at very high SNR only
    near-duplicate data points (closer than that) are mixed up, and the posterior is concentrated anyway.

    Args:
        x_t: queries, shape ``(q, ...)``, in the units of ``y`` (normalized units if ``normalization`` is given).
        data: the finite set, shape ``(n, ...)`` with the same sample shape; any dtype and device.
        alpha: data coefficient, scalar or ``(q,)``.
        sigma: noise coefficient ``> 0``, scalar or ``(q,)``.
        normalization: if given, the set is ``y_i = (data_i - mean) / sqrt(v)`` (normalized on the fly, chunk by
            chunk) and the result is in normalized units.
        query_chunk: queries per block.
        data_chunk: data rows per block.

    Returns:
        fp32 tensor shaped like ``x_t`` on ``x_t``'s device.

    Example:
        >>> data = torch.tensor([[1.0], [-1.0]])
        >>> posterior_mean(torch.tensor([[0.0]]), data, 1.0, 1.0)
        tensor([[0.]])
    """
    if data.ndim < 1 or data.shape[0] == 0:
        raise ValueError(f"data must have shape (n, ...) with n >= 1, got {tuple(data.shape)}")
    if x_t.ndim < 1 or tuple(x_t.shape[1:]) != tuple(data.shape[1:]):
        raise ValueError(f"x_t must have shape (q, {tuple(data.shape[1:])}), got {tuple(x_t.shape)}")
    for name, value in (("query_chunk", query_chunk), ("data_chunk", data_chunk)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    device = x_t.device
    q, n = x_t.shape[0], data.shape[0]
    d = data[0].numel()
    a = _as_per_query(alpha, q, "alpha", device)
    s = _as_per_query(sigma, q, "sigma", device)
    if not bool((s > 0).all()):
        raise ValueError("sigma must be > 0 (at sigma = 0 the posterior is a point mass)")
    coef = (a / s**2).float()
    half = (0.5 * a**2 / s**2).float()
    flat_data = data.reshape(n, d)
    x = x_t.reshape(q, d).to(torch.float32)
    out = torch.empty(q, d, dtype=torch.float32, device=device)
    y_buf = torch.empty(min(data_chunk, n) * d, dtype=torch.float32, device=device)
    for q0 in range(0, q, query_chunk):
        xq = x[q0 : q0 + query_chunk]
        rows = xq.shape[0]
        cq, hq = coef[q0 : q0 + rows, None], half[q0 : q0 + rows, None]
        run_max = torch.full((rows,), -math.inf, device=device)
        run_sum = torch.zeros(rows, device=device)
        acc = torch.zeros(rows, d, device=device)
        for d0 in range(0, n, data_chunk):
            y, ysq = data_chunk_fp32(flat_data, d0, d0 + data_chunk, normalization, device, y_buf)
            logits = (xq @ y.T).mul_(cq).addcmul_(hq, ysq[None, :], value=-1.0)
            online_softmax_update(logits, run_max, run_sum, acc, y)
        out[q0 : q0 + rows] = acc / run_sum[:, None]
    return out.reshape(x_t.shape)
