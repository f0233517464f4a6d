"""Plain helpers shared by the kinetic tests: the separation function of two-point data.

Imported as ``from kinetic_helpers import ...``: tests/ has no ``__init__.py``, so pytest's default ``prepend``
import mode puts this folder on ``sys.path`` (for tests/conftest.py and the test modules alike).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ko_lightning.kinetic import SeparationFunction, default_theta_grid

__all__ = ["two_point_lam", "two_point_separation"]


def two_point_lam(theta: np.ndarray, d: int) -> np.ndarray:
    """lambda of {+u, -u} with ||u||^2 = d: E tanh^2(d s^2 + sqrt(d) s xi), xi ~ N(0, 1) (Gauss-Hermite)."""
    x, w = np.polynomial.hermite_e.hermegauss(200)
    s = np.tan(theta)[:, None]
    return (np.tanh(d * s**2 + math.sqrt(d) * s * x[None]) ** 2 * (w / w.sum())).sum(1)


def two_point_separation(d: int) -> SeparationFunction:
    """:func:`two_point_lam` tabulated on ``default_theta_grid(256)``."""
    th = default_theta_grid(256)
    return SeparationFunction(th, torch.from_numpy(two_point_lam(th.numpy(), d)))
