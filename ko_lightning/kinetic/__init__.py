"""Kinetic-optimal Gaussian paths (Shaul et al., ICML 2023): the data separation function, its estimators, the
kinetic energy of any path, the closed-form KO solver (docs/math.md §2-4) and one refresh of the KO path from
pooled estimator sums. The estimators also measure ``lambda_cond`` of conditional models (docs/math.md §3.10).
Knows nothing of Lightning."""

from ko_lightning.kinetic.conditional import ConditionalX1Predictor
from ko_lightning.kinetic.energy import kinetic_energy, kinetic_energy_density
from ko_lightning.kinetic.estimators import (
    SeparationSums,
    estimate_separation_from_data,
    estimate_separation_from_model,
    separation_sums_from_data,
    separation_sums_from_model,
    separation_sums_from_queries,
)
from ko_lightning.kinetic.normalization import DataNormalization
from ko_lightning.kinetic.posterior import posterior_mean
from ko_lightning.kinetic.precision import EstimatePrecision
from ko_lightning.kinetic.refresh import (
    PathTable,
    RefreshNumbers,
    RefreshOutcome,
    RefreshReport,
    implausible_estimate,
    solve_refresh,
)
from ko_lightning.kinetic.separation import SeparationFunction, default_theta_grid
from ko_lightning.kinetic.solver import DEFAULT_GAMMA_FLOOR, DEFAULT_GAMMA_FLOORS, KOSolution, solve_ko

__all__ = [
    "ConditionalX1Predictor",
    "DEFAULT_GAMMA_FLOOR",
    "DEFAULT_GAMMA_FLOORS",
    "DataNormalization",
    "EstimatePrecision",
    "KOSolution",
    "PathTable",
    "RefreshNumbers",
    "RefreshOutcome",
    "RefreshReport",
    "SeparationFunction",
    "SeparationSums",
    "default_theta_grid",
    "estimate_separation_from_data",
    "estimate_separation_from_model",
    "implausible_estimate",
    "kinetic_energy",
    "kinetic_energy_density",
    "posterior_mean",
    "separation_sums_from_data",
    "separation_sums_from_model",
    "separation_sums_from_queries",
    "solve_ko",
    "solve_refresh",
]
