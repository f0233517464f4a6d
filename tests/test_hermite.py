"""The one cubic Hermite evaluator (ko_lightning.paths.hermite): it reproduces a cubic exactly, on torch and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ko_lightning.paths.hermite import HermiteSegments, cubic_hermite

EPS64 = float(np.finfo(np.float64).eps)
COEFFS = (0.7, -1.3, 2.1, -0.9)  # p(x) = 0.7 - 1.3 x + 2.1 x^2 - 0.9 x^3


def _cubic(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b, c, d = COEFFS
    return a + x * (b + x * (c + x * d)), b + x * (2 * c + x * 3 * d)


def _nodes_and_points() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    nodes = np.sort(np.concatenate([[-1.0, 2.0], rng.uniform(-1.0, 2.0, 9)]))  # irregular spacing on [-1, 2]
    points = np.concatenate([rng.uniform(-1.0, 2.0, 2000), nodes, [-1.01, 2.01]])  # two a little outside
    return nodes, points


def _tolerances(nodes: np.ndarray, points: np.ndarray) -> tuple[float, float]:
    """Rounding bounds: an evaluation is ~20 fp64 operations on terms no larger than a few times
    M = sum_k |c_k| R^k (R the largest |x| seen; the points lie at most a fifth of a segment outside the nodes, so
    the basis stays below 2), so its error is below 64 eps M; the derivative also divides the difference
    y_{k+1} - y_k (absolute error ~ eps M) by the segment length h, hence 64 eps M / h_min."""
    radius = float(np.abs(np.concatenate([nodes, points])).max())
    scale = sum(abs(c) * radius**k for k, c in enumerate(COEFFS))
    h_min = float(np.diff(nodes).min())
    return 64 * EPS64 * scale, 64 * EPS64 * scale / h_min


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_hermite_reproduces_a_cubic_and_its_derivative(backend: str) -> None:
    """Hermite interpolation from a cubic's own values and slopes is that cubic on every segment, and the end
    segments' cubics extrapolate it too (without clamp)."""
    nodes, points = _nodes_and_points()
    y, m = _cubic(nodes)
    want, want_slope = _cubic(points)
    tol_value, tol_slope = _tolerances(nodes, points)
    if backend == "torch":
        args = [torch.from_numpy(a) for a in (nodes, points, y, m)]
        value, slope = (v.numpy() for v in HermiteSegments(args[0], args[1]).value_and_derivative(args[2], args[3]))
        single = cubic_hermite(args[0], args[2], args[3], args[1]).numpy()
    else:
        value, slope = HermiteSegments(nodes, points).value_and_derivative(y, m)
        single = cubic_hermite(nodes, y, m, points)
    np.testing.assert_allclose(value, want, rtol=0, atol=tol_value)
    np.testing.assert_allclose(slope, want_slope, rtol=0, atol=tol_slope)
    np.testing.assert_array_equal(single, value)  # the single-spline shortcut is the same evaluation


def test_hermite_clamp_holds_the_end_values_and_matches_between_backends() -> None:
    nodes, points = _nodes_and_points()
    y, m = _cubic(nodes)
    clamped = cubic_hermite(nodes, y, m, points, clamp=True)
    inside = (points >= nodes[0]) & (points <= nodes[-1])
    np.testing.assert_array_equal(clamped[inside], cubic_hermite(nodes, y, m, points)[inside])
    assert clamped[-2] == y[0] and clamped[-1] == y[-1]  # -1.01 and 2.01 lie outside [-1, 2]
    as_torch = cubic_hermite(*(torch.from_numpy(a) for a in (nodes, y, m, points)), clamp=True).numpy()
    np.testing.assert_allclose(as_torch, clamped, rtol=0, atol=_tolerances(nodes, points)[0])


def test_hermite_is_not_fooled_by_slopes_of_another_function() -> None:
    """Control: the same nodes with wrong slopes (a cubic's values, zero slopes) miss the cubic between nodes,
    so the exactness above is a property of the evaluator, not of the tolerance."""
    nodes, points = _nodes_and_points()
    y, _ = _cubic(nodes)
    value = cubic_hermite(nodes, y, np.zeros_like(y), points)
    assert float(np.abs(value - _cubic(points)[0]).max()) > 1e3 * _tolerances(nodes, points)[0]
