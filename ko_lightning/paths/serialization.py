"""Save a path as plain data and rebuild it, so a checkpoint restores the schedule a model was trained on.

A saved path names its class as ``"module:QualName"``. Rebuilding never imports that module or looks the name up
in one: only classes in a registry are rebuilt. The shipped paths (:class:`CondOTPath`, :class:`VPPath`,
:class:`CosinePath`, :class:`PolynomialPath`, :class:`LinearVPPath`, :class:`TabulatedPath`) are registered here;
register your own :class:`GaussianPath` subclasses with :func:`register_path` (a class decorator) before loading a
checkpoint that uses them. Any other name is an error that imports nothing, so a checkpoint cannot make this
code import (and run) an arbitrary module.

Example:
    >>> from ko_lightning.paths import CondOTPath, GaussianPath, register_path
    >>> @register_path
    ... class MyPath(CondOTPath):
    ...     pass
    >>> type(path_from_state(path_to_state(MyPath()))).__name__
    'MyPath'
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, TypeVar

import torch

from ko_lightning.paths.analytic import CondOTPath, CosinePath, LinearVPPath, PolynomialPath, VPPath
from ko_lightning.paths.base import GaussianPath
from ko_lightning.paths.tabulated import TabulatedPath

__all__ = ["path_class_name", "path_from_state", "path_to_state", "register_path", "registered_paths"]

PathClass = TypeVar("PathClass", bound=type)

_REGISTRY: dict[str, type[GaussianPath]] = {}


def path_class_name(cls: type) -> str:
    """The name a checkpoint stores for ``cls``: ``"module:QualName"`` (e.g.
    ``"ko_lightning.paths.analytic:CondOTPath"``)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def register_path(cls: PathClass) -> PathClass:
    """Class decorator: allow :func:`path_from_state` to rebuild ``cls`` from a checkpoint.

    The class is registered under :func:`path_class_name` (the name :func:`path_to_state` writes). Registering
    the same name again replaces the entry (e.g. a class redefined in a notebook).

    Args:
        cls: a subclass of :class:`GaussianPath`.

    Returns:
        ``cls`` unchanged.

    Raises:
        TypeError: if ``cls`` is not a subclass of :class:`GaussianPath`.
    """
    if not (isinstance(cls, type) and issubclass(cls, GaussianPath)):
        raise TypeError(f"register_path expects a subclass of GaussianPath, got {cls!r}")
    _REGISTRY[path_class_name(cls)] = cls
    return cls


def registered_paths() -> dict[str, type[GaussianPath]]:
    """A copy of the registry: class name (``"module:QualName"``) -> class."""
    return dict(_REGISTRY)


for _shipped in (CondOTPath, VPPath, CosinePath, PolynomialPath, LinearVPPath, TabulatedPath):
    register_path(_shipped)


def path_to_state(path: GaussianPath) -> dict[str, Any]:
    """Describe ``path`` as ``{"class": "module:QualName", "init": {...}, "buffers": {...}}``.

    ``init`` holds the constructor arguments that are stored as attributes of the same name (the convention of
    every path here); ``buffers`` holds the tensors (the table of a :class:`TabulatedPath`). A class that
    is not registered is still described, with a warning: :func:`path_from_state` will rebuild it only once it
    is registered with :func:`register_path`.
    """
    cls = type(path)
    name = path_class_name(cls)
    if _REGISTRY.get(name) is not cls:
        warnings.warn(
            f"path class {name!r} is not registered: a checkpoint holding it can be loaded only after decorating "
            "the class with @ko_lightning.paths.register_path",
            stacklevel=2,
        )
    init = {
        arg: getattr(path, arg)
        for arg in inspect.signature(cls.__init__).parameters
        if arg != "self" and hasattr(path, arg)  # a TabulatedPath's table is in buffers, its sample_grid here
    }
    buffers = {k: v.detach().cpu().clone() for k, v in path.state_dict().items()}
    return {"class": name, "init": init, "buffers": buffers}


def path_from_state(state: dict[str, Any]) -> GaussianPath:
    """Rebuild a path saved by :func:`path_to_state`, from the registry only (nothing is imported).

    Raises:
        TypeError: if ``state`` is not a dict with a string ``"class"``.
        ValueError: if that class is not registered (the message names it and says how to register it).
    """
    if not isinstance(state, dict) or not isinstance(state.get("class"), str):
        raise TypeError(f"a saved path must be a dict with a 'class' string, got {type(state).__name__}")
    name = state["class"]
    cls = _REGISTRY.get(name)
    if cls is None:
        shipped = ", ".join(sorted(n.rpartition(":")[2] for n in _REGISTRY))
        raise ValueError(
            f"path class {name!r} is not registered, so it is not rebuilt (nothing was imported). Registered: "
            f"{shipped}. If it is your own GaussianPath subclass, import the module that defines it and decorate "
            f"the class with @ko_lightning.paths.register_path before loading the checkpoint."
        )
    buffers = state.get("buffers", {})
    if issubclass(cls, TabulatedPath):
        path: GaussianPath = cls(
            buffers["t_grid"],
            buffers["alpha_grid"],
            buffers["sigma_grid"],
            buffers["d_alpha_grid"],
            buffers["d_sigma_grid"],
            **state.get("init", {}),  # sample_grid; older checkpoints hold none and get the time grid
        )
    else:
        path = cls(**state.get("init", {}))
        if buffers:
            path.load_state_dict({k: torch.as_tensor(v) for k, v in buffers.items()})
    return path
