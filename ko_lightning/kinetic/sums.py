"""Additive partial sums of a separation-function estimate and their control-variate combination (docs/math.md §3.6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ko_lightning.kinetic.separation import SeparationFunction

__all__ = ["SeparationSums"]

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
