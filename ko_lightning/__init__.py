"""ko_lightning: flow matching on pluggable Gaussian paths, with the Kinetic-Optimal path, for PyTorch Lightning.

Light imports stay light: ``import ko_lightning.paths`` needs only torch; the Lightning-facing names
(``FlowMatching``, callbacks) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "FlowMatching": "ko_lightning.module",
    "EvalCallback": "ko_lightning.callbacks.eval_callback",
    "KOScheduleCallback": "ko_lightning.callbacks.ko_schedule",
    "SolverSpec": "ko_lightning.sampling",
    "SampleResult": "ko_lightning.sampling",
    "integrate": "ko_lightning.sampling",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ko_lightning' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
