"""Evaluation metrics: sample distances for low-dimensional data, FID/KID through torch-fidelity.

torch-fidelity (and torchvision) load only when an FID/KID is computed, so this import stays light.
"""

from ko_lightning.metrics.digits_features import DigitsClassifier, load_digits_classifier, train_digits_classifier
from ko_lightning.metrics.distances import mmd_rbf, sliced_wasserstein
from ko_lightning.metrics.kinetic import ModelKineticEnergy, model_kinetic_energy
from ko_lightning.metrics.fid import (
    FidKidResult,
    all_gather_samples,
    compute_fid_kid,
    extract_features,
    fid_from_features,
    kid_from_features,
)

__all__ = [
    "DigitsClassifier",
    "FidKidResult",
    "ModelKineticEnergy",
    "all_gather_samples",
    "compute_fid_kid",
    "extract_features",
    "fid_from_features",
    "kid_from_features",
    "load_digits_classifier",
    "mmd_rbf",
    "model_kinetic_energy",
    "sliced_wasserstein",
    "train_digits_classifier",
]
