"""Piecewise cubic Hermite interpolation: node slopes (PCHIP) and the one evaluator of values and derivatives.

Between nodes ``x_k <= x <= x_{k+1}`` (``h = x_{k+1} - x_k``, ``u = (x - x_k) / h``) the interpolant through values
``y`` with node slopes ``m`` is

    p(x) = H00(u) y_k + h H10(u) m_k + H01(u) y_{k+1} + h H11(u) m_{k+1},
    H00 = 2u^3 - 3u^2 + 1,  H10 = u^3 - 2u^2 + u,  H01 = -2u^3 + 3u^2,  H11 = u^3 - u^2,

and its derivative is ``p'(x) = H01'(u) (y_{k+1} - y_k) / h + H10'(u) m_k + H11'(u) m_{k+1}`` (using
``H00' = -H01'``), so values and derivatives are exactly consistent and the interpolant is C^1. A cubic is
reproduced exactly from its own values and slopes. Used by :class:`~ko_lightning.paths.TabulatedPath` (path
coefficients, docs/math.md §4.3) and by :class:`~ko_lightning.kinetic.SeparationFunction` (docs/math.md §3.8).

The evaluator works on torch tensors and, for the KO solver's small float64 grids, on numpy arrays alike.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["HermiteSegments", "cubic_hermite", "pchip_slopes"]

Array = TypeVar("Array", Tensor, np.ndarray)


def pchip_slopes(x: Tensor, y: Tensor) -> Tensor:
    """Shape-preserving (monotone) node slopes of Fritsch and Carlson / Fritsch and Butland.

    Interior slope: 0 where the neighbouring secants change sign, else the weighted harmonic mean
    ``(w1 + w2) / (w1 / d_{k-1} + w2 / d_k)`` with ``w1 = 2 h_k + h_{k-1}``, ``w2 = h_k + 2 h_{k-1}``.
    End slopes: the one-sided three-point formula, limited so the end intervals stay monotone.

    Args:
        x: strictly increasing nodes, shape ``(N,)``, ``N >= 2``.
        y: values, shape ``(N,)``.
    """
    h = x[1:] - x[:-1]
    d = (y[1:] - y[:-1]) / h
    if x.numel() == 2:
        return torch.stack([d[0], d[0]])
    m = torch.zeros_like(y)
    w1 = 2 * h[1:] + h[:-1]
    w2 = h[1:] + 2 * h[:-1]
    same_sign = d[:-1] * d[1:] > 0
    safe_prev = torch.where(same_sign, d[:-1], torch.ones_like(d[:-1]))
    safe_next = torch.where(same_sign, d[1:], torch.ones_like(d[1:]))
    harmonic = (w1 + w2) / (w1 / safe_prev + w2 / safe_next)
    m[1:-1] = torch.where(same_sign, harmonic, torch.zeros_like(harmonic))

    def end_slope(h0: Tensor, h1: Tensor, d0: Tensor, d1: Tensor) -> Tensor:
        s = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
        if torch.sign(s) != torch.sign(d0):
            return torch.zeros_like(s)
        if torch.sign(d0) != torch.sign(d1) and s.abs() > 3 * d0.abs():
            return 3 * d0
        return s

    m[0] = end_slope(h[0], h[1], d[0], d[1])
    m[-1] = end_slope(h[-1], h[-2], d[-1], d[-2])
    return m


class HermiteSegments(Generic[Array]):
    """Where the points ``x`` fall among the ``nodes``, with the Hermite basis there: evaluate several splines
    on the same nodes and points (e.g. ``alpha`` and ``sigma`` of a path) for one search.

    Args:
        nodes: strictly increasing nodes, shape ``(N,)``, ``N >= 2`` (a tensor or a numpy array).
        x: evaluation points, any shape, of the same kind as ``nodes``. A point outside ``[nodes[0], nodes[-1]]``
            uses the end segment's cubic (extrapolation).
        clamp: hold ``u`` in ``[0, 1]`` instead, so outside points get the end node's value (and its slope as
            the derivative).
    """

    def __init__(self, nodes: Array, x: Array, clamp: bool = False) -> None:
        if isinstance(nodes, np.ndarray):
            idx = np.clip(np.searchsorted(nodes, x, side="right") - 1, 0, nodes.size - 2)
        else:
            idx = (torch.searchsorted(nodes, x.contiguous(), right=True) - 1).clamp(0, nodes.numel() - 2)
        x0 = nodes[idx]
        self.idx: Array = idx
        self.h: Array = nodes[idx + 1] - x0
        u = (x - x0) / self.h
        if clamp:
            u = np.clip(u, 0.0, 1.0) if isinstance(u, np.ndarray) else u.clamp(0.0, 1.0)
        self.u: Array = u
        u2, u3 = u * u, u * u * u
        self._u2: Array = u2
        h00, h10, h01, h11 = 2 * u3 - 3 * u2 + 1, u3 - 2 * u2 + u, -2 * u3 + 3 * u2, u3 - u2
        self._basis: tuple[Array, Array, Array, Array] = (h00, h10, h01, h11)
        self._slope_basis: tuple[Array, Array, Array] | None = None  # H01', H10', H11', made on first use

    def value(self, y: Array, m: Array) -> Array:
        """``p(x)`` of the spline with node values ``y`` and node slopes ``m``."""
        idx, h = self.idx, self.h
        h00, h10, h01, h11 = self._basis
        return h00 * y[idx] + h10 * h * m[idx] + h01 * y[idx + 1] + h11 * h * m[idx + 1]

    def value_and_derivative(self, y: Array, m: Array) -> tuple[Array, Array]:
        """``(p(x), p'(x))`` of the spline with node values ``y`` and node slopes ``m``."""
        idx, h = self.idx, self.h
        y0, y1, m0, m1 = y[idx], y[idx + 1], m[idx], m[idx + 1]
        h00, h10, h01, h11 = self._basis
        if self._slope_basis is None:
            u, u2 = self.u, self._u2
            self._slope_basis = (6 * u - 6 * u2, 3 * u2 - 4 * u + 1, 3 * u2 - 2 * u)  # d/du (H00' = -H01')
        g01, g10, g11 = self._slope_basis
        value = h00 * y0 + h10 * h * m0 + h01 * y1 + h11 * h * m1
        slope = g01 * (y1 - y0) / h + g10 * m0 + g11 * m1
        return value, slope


def cubic_hermite(nodes: Array, y: Array, m: Array, x: Array, clamp: bool = False) -> Array:
    """The cubic Hermite interpolant through ``(nodes, y)`` with node slopes ``m``, evaluated at ``x``.

    Args:
        nodes: strictly increasing nodes, shape ``(N,)``, ``N >= 2``.
        y: node values, shape ``(N,)``.
        m: node slopes ``dy/dx``, shape ``(N,)``.
        x: evaluation points, any shape (tensors with tensors, numpy arrays with numpy arrays).
        clamp: hold points outside the nodes at the end values (see :class:`HermiteSegments`).

    Example:
        >>> nodes = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
        >>> float(cubic_hermite(nodes, nodes**3, 3 * nodes**2, torch.tensor(2.0, dtype=torch.float64)))  # 2^3
        8.0
    """
    return HermiteSegments(nodes, x, clamp).value(y, m)
