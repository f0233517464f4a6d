"""The result records of the likelihood functions (frozen dataclasses of tensors and numbers)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["BitsPerDimResult", "EvaluationResult", "LogProbResult", "PixelBpd"]


@dataclass(frozen=True)
class LogProbResult:
    """Log-likelihood of data points under a flow, with both ends of their trajectories.

    Attributes:
        log_prob: ``log p(x_data)`` in nats, shape ``(B,)`` (for Hutchinson, the mean over the probes).
        x_data: the data end of the trajectories (the input of :func:`log_prob`, the samples of
            :func:`sample_with_log_prob`).
        x_noise: the noise end (the latent of :func:`log_prob`, the input of :func:`sample_with_log_prob`).
        prior_log_prob: ``log N(x_noise; 0, I)``, shape ``(B,)``.
        divergence_integral: ``∫ div v(x_t, t) dt`` over the solve's time interval (taken in increasing t),
            shape ``(B,)``; ``log_prob = prior_log_prob - divergence_integral``.
        nfe: number of velocity evaluations (each also costs the divergence's backward passes).
        estimator: ``"exact"`` or ``"hutchinson"`` (what ``"auto"`` resolved to).
        std_error: standard error of ``log_prob`` due to the divergence estimator, shape ``(B,)``: zeros for
            ``"exact"``; for Hutchinson with ``num_probes >= 2`` the sample standard deviation over the probes
            divided by ``sqrt(num_probes)``; None for Hutchinson with a single probe (one draw carries no estimate
            of its own spread; the standard error of a mean over many samples, as in :func:`evaluate_log_prob`,
            still includes the probe noise because probes are independent across samples).
        probes: the Hutchinson probes, shape ``(num_probes, B, *x.shape[1:])``; None for ``"exact"``.
    """

    log_prob: Tensor
    x_data: Tensor
    x_noise: Tensor
    prior_log_prob: Tensor
    divergence_integral: Tensor
    nfe: int
    estimator: str
    std_error: Tensor | None = None
    probes: Tensor | None = None


@dataclass(frozen=True)
class BitsPerDimResult:
    """Bits per dimension of integer-valued (e.g. 8-bit image) data under a flow, with dequantization.

    Attributes:
        bpd: bits per dimension, shape ``(B,)``: ``-(log p(y) + log_det) / (D ln 2)``.
        log_prob_discrete: ``log p(y) + log_det`` in nats, shape ``(B,)``: with uniform dequantization an unbiased
            estimate of a lower bound on ``log P(x_int)``.
        log_det: ``D log((hi - lo) / num_bins)``, the log-Jacobian of ``x_int + w -> y`` (a number).
        num_dims: ``D``, the number of dimensions per sample.
        std_error: the Hutchinson standard error of ``bpd`` (same rules as ``LogProbResult.std_error``).
        likelihood: the continuous result for the dequantized, rescaled data ``y`` (``likelihood.x_data``).
    """

    bpd: Tensor
    log_prob_discrete: Tensor
    log_det: float
    num_dims: int
    std_error: Tensor | None
    likelihood: LogProbResult


@dataclass(frozen=True)
class PixelBpd:
    """Per-sample discrete bits/dim of :func:`pixel_bits_per_dim`, with the solver's total NFE.

    Attributes:
        bpd: bits per dimension per sample (CPU, float64), shape ``(B,)``.
        nfe: velocity evaluations over all the solves.
    """

    bpd: Tensor
    nfe: int


@dataclass(frozen=True)
class EvaluationResult:
    """Log-likelihood over a data set: means, standard errors over samples, and the per-sample values.

    Attributes:
        mean_log_prob: mean ``log p`` per sample in nats (the discrete bound when dequantizing).
        log_prob_std_error: ``std(log p) / sqrt(N)`` (ddof = 1; NaN for ``N < 2``). It includes the Hutchinson and
            dequantization noise, which are independent across samples.
        mean_bpd: mean bits per dimension, ``-mean_log_prob / (D ln 2)``.
        bpd_std_error: standard error of ``mean_bpd``.
        num_samples: ``N``.
        num_dims: ``D``.
        nfe: total velocity evaluations over all batches.
        log_probs: the per-sample values (CPU, float64), shape ``(N,)``.
    """

    mean_log_prob: float
    log_prob_std_error: float
    mean_bpd: float
    bpd_std_error: float
    num_samples: int
    num_dims: int
    nfe: int
    log_probs: Tensor
