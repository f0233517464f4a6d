"""Conditions for the separation function of a conditional model, ``lambda_cond`` (docs/math.md §3.10).

A class-conditional model learns ``E[x1 | x_t, c]``; on a shared path its kinetic energy uses

    ``lambda_cond(s) = (1/d) E_{c, x1 ~ p(.|c)} ||E[x1 | x_t, c]||^2``

under one global normalization (the whole data set's mean and scale). The estimators take the conditions of
their query points: the data estimator integer class labels (each query's posterior runs over the points of its
own class), the model estimator any per-sample condition (class labels or float vectors) passed on to the
model's x1-prediction. This module validates the conditions and groups the queries by class.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["ConditionalX1Predictor", "accepts_cond", "check_cond", "check_labels", "class_groups"]


class ConditionalX1Predictor(Protocol):
    """An x1-predictor that takes the queries' conditions: ``predictor(x_t, t, cond=c) -> x1_hat``.

    ``cond`` holds one condition per row of ``x_t`` (the rows of the estimator's ``cond`` for those samples);
    the estimator passes it only when it was given one, so the keyword may default to ``None``.
    """

    def __call__(self, x: Tensor, t: Tensor, /, *, cond: Tensor | None = None) -> Tensor: ...


def check_labels(labels: Any, n: int) -> Tensor:
    """Integer class labels of the ``n`` data points as a CPU int64 tensor (data estimator).

    Raises:
        ValueError: naming ``labels`` unless it is a ``(n,)`` tensor (or array) of non-negative integers. Float
            labels (condition vectors) are refused: the finite-set posterior needs the points that share a
            condition, which only discrete labels define; pass them to the model estimator as ``cond`` instead.
    """
    try:
        lab = torch.as_tensor(labels).detach()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"labels must be a (n,) tensor of integer class labels: {err}") from None
    if lab.dtype.is_floating_point or lab.dtype.is_complex or lab.dtype == torch.bool:
        raise ValueError(
            f"labels must have an integer dtype (class labels), got {lab.dtype}; float condition vectors work only "
            "with the model estimator (separation_sums_from_model(..., cond=...))"
        )
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), one label per data point, got {tuple(lab.shape)}")
    lab = lab.to(device="cpu", dtype=torch.int64)
    if n and int(lab.min()) < 0:
        raise ValueError(f"labels must be non-negative, got {int(lab.min())}")
    return lab


def class_groups(labels: Tensor, query_index: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The queries grouped by the class of their data point.

    Args:
        labels: checked labels of the data points (:func:`check_labels`), ``(n,)`` int64 on the CPU.
        query_index: ``(Q,)`` indices into the data of the points the queries are built from.

    Returns:
        One ``(rows, local_index, positions)`` per class that has queries, in increasing label order: ``rows``
        the data indices of the class (increasing), ``local_index`` the queries' points as indices into
        ``rows``, ``positions`` the queries' positions in ``query_index`` (increasing). All int64 on the CPU.
    """
    n = labels.numel()
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)  # the data indices, class by class
    starts = torch.cumsum(counts, 0) - counts
    local = torch.empty(n, dtype=torch.int64)  # each point's index within its class
    local[order] = torch.arange(n) - torch.repeat_interleave(starts, counts)
    q_index = query_index.to(device="cpu", dtype=torch.int64)
    q_class = inverse[q_index]
    q_order = torch.argsort(q_class, stable=True)
    q_counts = torch.bincount(q_class, minlength=classes.numel())
    q_starts = torch.cumsum(q_counts, 0) - q_counts
    groups = []
    for k in q_counts.nonzero().squeeze(1).tolist():
        rows = order[int(starts[k]) : int(starts[k] + counts[k])]
        positions = q_order[int(q_starts[k]) : int(q_starts[k] + q_counts[k])]
        groups.append((rows, local[q_index[positions]], positions))
    return groups


def check_cond(cond: Any, n: int) -> Tensor:
    """The per-sample conditions of the model estimator's ``n`` samples: a tensor of shape ``(n, ...)``.

    Integer class labels ``(n,)`` and float condition vectors ``(n, k)`` (any trailing shape) are accepted. NaN
    passes through (a NaN row is the "no condition" value of the package's conditional networks).

    Raises:
        ValueError: naming ``cond`` if it is not a tensor with one row per sample, or has infinite values.
    """
    if not torch.is_tensor(cond):
        raise ValueError(f"cond must be a torch.Tensor of shape (n, ...), got {type(cond).__name__}")
    if cond.ndim < 1 or cond.shape[0] != n:
        raise ValueError(f"cond must have one row per sample of x1, shape ({n}, ...), got {tuple(cond.shape)}")
    if cond.dtype.is_complex:
        raise ValueError(f"cond must be integer class labels or float condition vectors, got {cond.dtype}")
    if cond.dtype.is_floating_point and bool(torch.isinf(cond).any()):
        raise ValueError("cond has infinite values")
    return cond


def accepts_cond(predictor: Any) -> bool:
    """Whether ``predictor`` takes a ``cond`` keyword (or ``**kwargs``); ``True`` when its signature is unknown."""
    try:
        params = inspect.signature(predictor).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == "cond" and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for p in params
    )
