"""Save a path as plain data and rebuild it, so a checkpoint restores the schedule a model was trained on."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from ko_lightning.paths.base import GaussianPath
from ko_lightning.paths.tabulated import TabulatedPath

__all__ = ["path_from_state", "path_to_state"]


def path_to_state(path: GaussianPath) -> dict[str, Any]:
    """Describe ``path`` as ``{"class": "module:QualName", "init": {...}, "buffers": {...}}``.

    ``init`` holds the constructor arguments that are stored as attributes of the same name (the convention of
    every analytic path here); ``buffers`` holds the tensors (the table of a :class:`TabulatedPath`).
    """
    cls = type(path)
    init: dict[str, Any] = {}
    if not isinstance(path, TabulatedPath):
        for name in inspect.signature(cls.__init__).parameters:
            if name != "self" and hasattr(path, name):
                init[name] = getattr(path, name)
    buffers = {k: v.detach().cpu().clone() for k, v in path.state_dict().items()}
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "init": init, "buffers": buffers}


def path_from_state(state: dict[str, Any]) -> GaussianPath:
    """Rebuild a path saved by :func:`path_to_state`."""
    module_name, _, qualname = state["class"].partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, GaussianPath)):
        raise TypeError(f"{state['class']} is not a GaussianPath")
    buffers = state.get("buffers", {})
    if issubclass(obj, TabulatedPath):
        path: GaussianPath = obj(
            buffers["t_grid"], buffers["alpha_grid"], buffers["sigma_grid"],
            buffers["d_alpha_grid"], buffers["d_sigma_grid"],
        )
    else:
        path = obj(**state.get("init", {}))
        if buffers:
            path.load_state_dict({k: torch.as_tensor(v) for k, v in buffers.items()})
    return path
