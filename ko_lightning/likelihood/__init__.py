"""Log-likelihood and bits/dim of a flow by the instantaneous change of variables (docs/math.md §1 conventions).

t = 0 is noise ``N(0, I)``, t = 1 is data, ``dx/dt = v(x, t)``; along a trajectory
``d/dt log p_t(x_t) = -div v(x_t, t)``, so ``log p_1(x1) = log N(x0; 0, I) - ∫_0^1 div v(x_t, t) dt``.

Modules, one job each:

- :mod:`~ko_lightning.likelihood.trace`: the divergence, exact or by Hutchinson's estimator;
- :mod:`~ko_lightning.likelihood.solve`: the change of variables (:func:`log_prob`, :func:`sample_with_log_prob`),
  integrated by the guarded ODE core :func:`ko_lightning.ode.solve_ode`;
- :mod:`~ko_lightning.likelihood.pixels`: integer pixels to the model's space (one affine dequantization map) and
  the discrete bits/dim formula with its Jacobian term;
- :mod:`~ko_lightning.likelihood.discrete`: bits/dim of integer data under a flow (:func:`bits_per_dim`) or a
  trained model (:func:`pixel_bits_per_dim`);
- :mod:`~ko_lightning.likelihood.evaluate`: means and standard errors over a data set;
- :mod:`~ko_lightning.likelihood.results`: the result records.

Example:
    >>> import torch
    >>> from ko_lightning.likelihood import log_prob
    >>> res = log_prob(lambda x, t: -x, torch.zeros(4, 2))  # x_t = x_0 e^{-t}: p_1 = N(0, e^{-2} I)
    >>> round(float(res.log_prob[0]), 4)  # log N(0; 0, e^{-2} I) = -log(2 pi) + 2
    0.1621
"""

from ko_lightning.likelihood.discrete import bits_per_dim, pixel_bits_per_dim
from ko_lightning.likelihood.evaluate import evaluate_log_prob
from ko_lightning.likelihood.pixels import (
    DIGITS_LEVELS,
    PixelMap,
    bpd_from_log_prob,
    data_pixel_map,
    dequantize,
    dequantize_pixels,
    discrete_bits_per_dim,
    resolve_pixel_map,
)
from ko_lightning.likelihood.results import BitsPerDimResult, EvaluationResult, LogProbResult, PixelBpd
from ko_lightning.likelihood.solve import log_prob, sample_with_log_prob, standard_normal_log_prob
from ko_lightning.likelihood.trace import EXACT_DIVERGENCE_MAX_DIM, divergence

__all__ = [
    "DIGITS_LEVELS",
    "EXACT_DIVERGENCE_MAX_DIM",
    "BitsPerDimResult",
    "EvaluationResult",
    "LogProbResult",
    "PixelBpd",
    "PixelMap",
    "bits_per_dim",
    "bpd_from_log_prob",
    "data_pixel_map",
    "dequantize",
    "dequantize_pixels",
    "discrete_bits_per_dim",
    "divergence",
    "evaluate_log_prob",
    "log_prob",
    "pixel_bits_per_dim",
    "resolve_pixel_map",
    "sample_with_log_prob",
    "standard_normal_log_prob",
]
