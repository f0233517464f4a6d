"""Log-likelihood and bits/dim over a data set, with standard errors over samples."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ko_lightning.batches import batch_data
from ko_lightning.likelihood.discrete import bits_per_dim
from ko_lightning.likelihood.pixels import DEQUANTIZE, DequantizeMethod
from ko_lightning.likelihood.progress import progress_bar
from ko_lightning.likelihood.results import EvaluationResult
from ko_lightning.likelihood.solve import log_prob
from ko_lightning.likelihood.trace import DivergenceMethod, ProbeKind, VelocityFn
from ko_lightning.ode import SolverSpec

__all__ = ["evaluate_log_prob"]


def evaluate_log_prob(
    velocity: VelocityFn,
    dataloader: Iterable[Any],
    solver: SolverSpec | None = None,
    divergence: DivergenceMethod = "auto",
    probe: ProbeKind = "rademacher",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    t_start: float = 1.0,
    t_end: float = 0.0,
    dequantize: DequantizeMethod | None = None,
    num_bins: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Mean log-likelihood and bits/dim over a data set, with standard errors over samples.

    Each batch (a tensor, a tuple/list whose first item is the data, or a dict: see
    :func:`ko_lightning.batches.batch_data`) goes through :func:`log_prob` (continuous
    data, ``dequantize=None``: ``bpd = -log p / (D ln 2)``) or :func:`bits_per_dim` (integer data, with
    ``dequantize="uniform"`` or ``"center"``; ``log p`` is then the discrete bound
    ``log p(y) + D log((hi - lo) / num_bins)``). Runs without gradients.

    Args:
        velocity: ``velocity(x, t)``; a network should be in eval mode.
        dataloader: any iterable of batches (a ``torch.utils.data.DataLoader``).
        solver, divergence, probe, num_probes, generator, t_start, t_end: as in :func:`log_prob`.
        dequantize: None for continuous data, or the dequantization of integer data.
        num_bins, data_range: as in :func:`bits_per_dim` (used only when dequantizing).
        device: move each batch there first (default: leave it where the loader put it).
        max_batches: stop after this many batches.
        progress: show a rich progress bar over batches with the running mean bits/dim.

    Returns:
        ``EvaluationResult`` with means, standard errors ``std / sqrt(N)`` and per-sample log-likelihoods.

    Example:
        >>> loader = [torch.zeros(4, 2), torch.zeros(4, 2)]
        >>> res = evaluate_log_prob(lambda x, t: -x, loader)
        >>> res.num_samples, round(res.mean_log_prob, 3)
        (8, 0.162)
    """
    if dequantize is not None and dequantize not in DEQUANTIZE:
        raise ValueError(f"dequantize must be None or one of {DEQUANTIZE}, got {dequantize!r}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    try:
        total: int | None = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    values: list[Tensor] = []
    num_dims: int | None = None
    nfe = 0
    running_sum, running_count = 0.0, 0
    with progress_bar(progress, "log-likelihood", total, counted=True) as update:
        for index, batch in enumerate(dataloader):
            if max_batches is not None and index >= max_batches:
                break
            x = batch_data(batch, f"dataloader batch {index}")
            if device is not None:
                x = x.to(device)
            dims = x[0].numel() if x.ndim >= 2 else 0
            if num_dims is not None and dims != num_dims:
                raise ValueError(f"dataloader batch {index}: {dims} dims per sample, earlier batches had {num_dims}")
            if dequantize is None:
                res = log_prob(
                    velocity,
                    x,
                    solver=solver,
                    divergence=divergence,
                    probe=probe,
                    num_probes=num_probes,
                    generator=generator,
                    create_graph=False,
                    t_start=t_start,
                    t_end=t_end,
                )
                lp, nfe_batch = res.log_prob, res.nfe
            else:
                bres = bits_per_dim(
                    velocity,
                    x,
                    solver=solver,
                    divergence=divergence,
                    probe=probe,
                    num_probes=num_probes,
                    generator=generator,
                    create_graph=False,
                    t_start=t_start,
                    t_end=t_end,
                    dequantize=dequantize,
                    num_bins=num_bins,
                    data_range=data_range,
                )
                lp, nfe_batch = bres.log_prob_discrete, bres.likelihood.nfe
            num_dims = dims
            nfe += nfe_batch
            values.append(lp.detach().to("cpu", torch.float64))
            running_sum += float(values[-1].sum())
            running_count += values[-1].numel()
            update(index + 1, bpd=-running_sum / running_count / (num_dims * math.log(2.0)), n=running_count)
    if not values or num_dims is None:
        raise ValueError("dataloader yielded no batches")
    log_probs = torch.cat(values)
    n = log_probs.numel()
    mean = float(log_probs.mean())
    se = float(log_probs.std() / math.sqrt(n)) if n >= 2 else float("nan")
    scale = 1.0 / (num_dims * math.log(2.0))
    return EvaluationResult(
        mean_log_prob=mean,
        log_prob_std_error=se,
        mean_bpd=-mean * scale,
        bpd_std_error=se * scale,
        num_samples=n,
        num_dims=num_dims,
        nfe=nfe,
        log_probs=log_probs,
    )
