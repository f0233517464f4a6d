"""Gaussian probability paths ``x_t = alpha_t x1 + sigma_t x0`` (t = 0 noise, t = 1 data)."""

from ko_lightning.paths.analytic import CondOTPath, CosinePath, LinearVPPath, PolynomialPath, VPPath
from ko_lightning.paths.base import (
    SAMPLE_GRIDS,
    GaussianPath,
    PathCoefficients,
    PathSample,
    SampleGrid,
    broadcast_time,
    check_unit_interval,
)
from ko_lightning.paths.serialization import register_path, registered_paths
from ko_lightning.paths.tabulated import TabulatedPath, pchip_slopes
from ko_lightning.paths.transform import ScaleTimeVelocity

__all__ = [
    "SAMPLE_GRIDS",
    "CondOTPath",
    "CosinePath",
    "GaussianPath",
    "LinearVPPath",
    "PathCoefficients",
    "PathSample",
    "PolynomialPath",
    "SampleGrid",
    "ScaleTimeVelocity",
    "TabulatedPath",
    "VPPath",
    "broadcast_time",
    "check_unit_interval",
    "pchip_slopes",
    "register_path",
    "registered_paths",
]
