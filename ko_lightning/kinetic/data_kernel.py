"""The data estimator's kernel: exact posterior means of query blocks over (a shard of) the data set, and the
error terms of the queries (docs/math.md §3.6, docs/scale.md §2).

One process or many: each rank streams its own data rows, and the partial sums of the softmax are combined
exactly across ranks through a :class:`~ko_lightning.kinetic.collectives.Reduce` before the posterior is formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ko_lightning.kinetic.collectives import Reduce
from ko_lightning.kinetic.normalization import DataNormalization
from ko_lightning.kinetic.posterior import (
    LOG2E,
    accumulate_weighted,
    data_chunk_fp32,
    exp2_clamped_,
    online_softmax_update,
)
from ko_lightning.kinetic.sums import SeparationSums

__all__ = ["KernelWork", "mean_sq_norm", "query_sums"]


@dataclass
class KernelWork:
    """What :func:`query_sums` did on this rank (docs/scale.md §2.1), for benchmarks and the cost model.

    Attributes:
        flops: matmul FLOPs run: the Gram matmuls ``Y_q Y^T`` and ``E Y^T`` (``4 q C d`` per block and data
            chunk), the angle combination (``4 R C``) and the weighted sums actually run after pruning
            (``2 d`` per weight kept).
        data_rows: data rows streamed (each row is read, and normalized, once per block and pass).
        reduced_values: values all-reduced across ranks (0 on one process).
        redone_blocks: blocks redone with the log-sum-exp update after an fp overflow.
    """

    flops: float = 0.0
    data_rows: int = 0
    reduced_values: int = 0
    redone_blocks: int = 0


def mean_sq_norm(
    flat: Tensor, norm: DataNormalization, dev: torch.device, dtype: torch.dtype, data_chunk: int, reduce: Reduce
) -> float:
    """``m2 = sum_i ||y_i||^2 / (n d)`` of the normalized data over all ranks' rows (a collective).

    1 up to rounding when ``norm`` is the data's own statistics; a rank with no rows adds zeros.
    """
    n, d = flat.shape
    total = torch.zeros(2, dtype=torch.float64, device=dev)
    buf = torch.empty(min(data_chunk, n) * d, device=dev, dtype=dtype)
    for d0 in range(0, n, data_chunk):
        _, ysq = data_chunk_fp32(flat, d0, d0 + data_chunk, norm, dev, buf, dtype)
        total[0] += ysq.double().sum()
    total[1] = n
    reduce.all_reduce(total)
    return float(total[0] / (total[1] * d)) if float(total[1]) > 0 else 1.0


class _Buffers:
    """Work buffers reused across blocks (fresh large CPU allocations per chunk cost page faults)."""

    def __init__(self, per_block: int, theta_block: int, c_max: int, d: int, dev: torch.device, dtype: torch.dtype):
        self.grams = torch.empty(2 * per_block * c_max, device=dev, dtype=dtype)
        self.logits = torch.empty(theta_block * per_block * c_max, device=dev, dtype=dtype)
        self.y = torch.empty(c_max * d, device=dev, dtype=dtype)


def _posterior_block(
    flat: Tensor,
    norm: DataNormalization,
    yq: Tensor,
    eps: Tensor,
    coeffs: Tensor,
    data_chunk: int,
    bufs: _Buffers,
    reduce: Reduce,
    work: KernelWork,
) -> Tensor:
    """``E[y | x]`` for every (angle, query) row of a block, over all ranks' rows: ``(n_g * n_b, d)``.

    Logits relative to the query's own point ``y_i`` (whose logit is 0, on whichever rank it lives):

        ``l_k - l_i = -s^2 ||y_i - y_k||^2 / 2 + s eps . (y_k - y_i)``.

    The reference is the same on every rank, so the ranks' ``S = sum_k exp(l_k - l_i)`` and
    ``A = sum_k exp(l_k - l_i) y_k`` simply add (a rank without the own point has all its weights relative to
    it; those below ``exp(LOGIT_FLOOR)`` are negligible next to the own point's 1). Should some weight overflow
    (a point beating the own one by > 88 nats in fp32; the all-reduced sums are then not finite on every rank
    alike, so every rank takes the same branch), the block is redone with a running maximum ``M_r`` per rank,
    combined exactly: ``M = max_r M_r``, ``S = sum_r exp(M_r - M) S_r``, ``A = sum_r exp(M_r - M) A_r``.
    """
    dev, dtype = yq.device, yq.dtype
    n, d = flat.shape
    n_g, n_b = coeffs.shape[0], yq.shape[0]
    rows = n_g * n_b
    own_sq, own_eps = (yq * yq).sum(1), (eps * yq).sum(1)
    run_max = torch.full((rows,), -math.inf, device=dev, dtype=dtype)
    run_sum = torch.zeros(rows, device=dev, dtype=dtype)
    acc = torch.zeros(rows, d, device=dev, dtype=dtype)
    for fixed_reference in (True, False):
        for d0 in range(0, n, data_chunk):
            y, ysq = data_chunk_fp32(flat, d0, d0 + data_chunk, norm, dev, bufs.y, dtype)
            c = y.shape[0]
            grams = bufs.grams[: 2 * n_b * c].view(2, n_b, c)
            torch.mm(yq, y.T, out=grams[0])
            grams[0].sub_(0.5 * ysq).sub_(0.5 * own_sq[:, None])
            torch.mm(eps, y.T, out=grams[1])
            grams[1].sub_(own_eps[:, None])
            # every (angle, query) row in one small-K matmul: log2(e) [s^2, s] @ [-|y_i - y_k|^2 / 2; eps.(y_k - y_i)]
            logits = bufs.logits[: rows * c].view(n_g, n_b * c)
            torch.mm(coeffs, grams.view(2, -1), out=logits)
            if fixed_reference:
                probs = exp2_clamped_(logits.view(rows, c))
                run_sum.add_(probs.sum(1))
                kept = accumulate_weighted(probs, acc, y, groups=n_g)
            else:
                kept = online_softmax_update(logits.view(rows, c), run_max, run_sum, acc, y, groups=n_g, base2=True)
            work.flops += 4.0 * n_b * c * d + 4.0 * rows * c + 2.0 * kept * d
            work.data_rows += c
        if reduce.world_size > 1:
            if not fixed_reference:  # rescale to the common maximum (exp(-inf) = 0 on a rank with no rows)
                common = reduce.all_reduce(run_max.clone(), "max")
                scale = torch.exp2(run_max - common)
                run_sum.mul_(scale)
                acc.mul_(scale[:, None])
            reduce.all_reduce(run_sum)
            reduce.all_reduce(acc)
            work.reduced_values += rows * (d + 1)
        if bool(torch.isfinite(run_sum).all()) and bool(torch.isfinite(acc).all()):
            break
        run_sum.zero_()
        acc.zero_()
        work.redone_blocks += 1
    return acc.div_(run_sum[:, None])


def query_sums(
    flat: Tensor,
    norm: DataNormalization,
    theta64: Tensor,
    yq_all: Tensor,
    eps_all: Tensor,
    own: slice,
    m2: float,
    query_chunk: int,
    data_chunk: int,
    reduce: Reduce,
    work: KernelWork | None = None,
) -> SeparationSums:
    """Separation sums of the queries ``own`` of ``yq_all``, with posteriors over every rank's rows of the data.

    Every rank calls this with the same ``yq_all`` / ``eps_all`` (all ranks' queries: the blocks and their
    collectives match), its own rows ``flat`` and its own slice ``own``; the error terms ``A``, ``D1``, ``D2``
    (:class:`SeparationSums`) are formed only for ``own``, so the ranks' sums add to those of all queries.

    Args:
        flat: this rank's data rows, ``(n_r, d)`` unnormalized, any dtype (``n_r`` may be 0).
        norm: the normalization (the same on every rank).
        theta64: checked angle grid, float64 ``(G,)``.
        yq_all: normalized query points, ``(Q, d)`` in the compute dtype on the compute device.
        eps_all: their noise, ``(Q, d)``, same dtype and device.
        own: this rank's queries in ``[0, Q)``.
        m2: ``mean ||y||^2 / d`` over all ranks' rows (:func:`mean_sq_norm`).
        query_chunk: max (query, angle) rows per block.
        data_chunk: data rows per chunk.
        reduce: the collectives (:class:`~ko_lightning.kinetic.collectives.SingleProcess` on one process).
        work: if given, incremented with what was done.
    """
    work = KernelWork() if work is None else work
    dev, dtype = yq_all.device, yq_all.dtype
    n_q, d = yq_all.shape
    n_theta = theta64.numel()
    snr = torch.tan(theta64)
    per_block = max(1, query_chunk // n_theta)  # queries per block
    theta_block = max(1, min(n_theta, query_chunk // per_block))  # angles per block
    bufs = _Buffers(per_block, theta_block, max(1, min(data_chunk, flat.shape[0])), d, dev, dtype)
    sums = [torch.zeros(n_theta, dtype=torch.float64) for _ in range(10)]
    sq_error, count, sq_error_sq, cv_sum, cv_sq, cv_cross, cv2_sum, cv2_sq, cv2_cross, cv12 = sums
    # Second control variate D2 = L - E[L] (SeparationSums), L = ||cos^2 y - sin cos eps||^2 / d
    #   = cos^4 ||y||^2/d - 2 sin cos^3 y.eps/d + sin^2 cos^2 ||eps||^2/d,  E[L] = cos^4 m2 + sin^2 cos^2,
    # with m2 = mean ||y||^2 / d over the data set (queries uniform over it); split into per-query zero-mean parts.
    yq64, eps64 = yq_all[own].double(), eps_all[own].double()
    lin_parts = torch.stack(
        [(yq64 * yq64).sum(1) / d - m2, (yq64 * eps64).sum(1) / d, (eps64 * eps64).sum(1) / d - 1.0], 0
    )  # (3, Q_own), each of mean 0
    del yq64, eps64
    cos_t, sin_t = torch.cos(theta64).to(dev), torch.sin(theta64).to(dev)
    lin_coeffs = torch.stack([cos_t**4, -2.0 * sin_t * cos_t**3, sin_t**2 * cos_t**2], 1)  # (G, 3) float64
    for g0 in range(0, n_theta, theta_block):
        s_g = snr[g0 : g0 + theta_block]
        n_g = s_g.numel()
        # logits in bits (l log2 e): the factor rides on the angle matmul, and exp2 is ~3x faster than exp on CPU
        coeffs = (LOG2E * torch.stack([s_g**2, s_g], 1)).to(device=dev, dtype=dtype)  # (n_g, 2)
        for q0 in range(0, n_q, per_block):
            yq, eps = yq_all[q0 : q0 + per_block], eps_all[q0 : q0 + per_block]
            n_b = yq.shape[0]
            post = _posterior_block(flat, norm, yq, eps, coeffs, data_chunk, bufs, reduce, work).view(n_g, n_b, d)
            lo, hi = max(q0, own.start), min(q0 + n_b, own.stop)
            if lo >= hi:
                continue
            post, yq = post[:, lo - q0 : hi - q0], yq[lo - q0 : hi - q0]
            err = (((yq[None] - post) ** 2).sum(-1) / d).double()  # A = ||y - E[y|x]||^2 / d, (n_g, n_own)
            # D1 = A - B - (m2 - 1), B = 1 - ||E[y|x]||^2 / d: E[A] - E[B] = m2 - 1 (0 under the data's own
            # normalization), subtracted so that D1 has mean 0 under a foreign one too (a shard, global statistics).
            cv = err - (1.0 - ((post**2).sum(-1) / d).double()) - (m2 - 1.0)
            cv2 = lin_coeffs[g0 : g0 + n_g] @ lin_parts[:, lo - own.start : hi - own.start]  # D2 = L - E[L]
            g = slice(g0, g0 + n_g)
            for total, term in (
                (sq_error, err),
                (sq_error_sq, err * err),
                (cv_sum, cv),
                (cv_sq, cv * cv),
                (cv_cross, err * cv),
                (cv2_sum, cv2),
                (cv2_sq, cv2 * cv2),
                (cv2_cross, err * cv2),
                (cv12, cv * cv2),
            ):
                total[g] += term.sum(1).cpu()
            count[g] += hi - lo
    return SeparationSums(
        theta64.cpu(), sq_error, count, sq_error_sq, cv_sum, cv_sq, cv_cross, cv2_sum, cv2_sq, cv2_cross, cv12
    )
