"""Path comparison: train one network on several Gaussian paths with the same budget and seed, then evaluate.

This is the logic behind ``recipes/compare_paths.py`` (a table in the spirit of the paper's Table 1, docs/math.md §6).
For every path (Cond-OT, KO, cosine, VP) the same network is built from the same seed (identical initial weights),
trained for the same number of steps on the same data with the same noise and times per step
(``FlowMatching(train_seed=seed)``: common random numbers, so the rows differ only by the path), and evaluated on

- held-out NLL in bits/dim: for 2D data ``-log p(x) / (D ln 2)`` in the normalized data units (dopri5, exact
  divergence); for the digits a discrete bound in pixel units (:func:`pixel_bits_per_dim`);
- kinetic energy: the trained model's own ``(1/D) int ||v||^2 dt`` along its dopri5 trajectories
  (:func:`ko_lightning.metrics.model_kinetic_energy`), beside the analytic KE of its (final) path under the data
  separation function estimated from the training data (:func:`ko_lightning.kinetic.kinetic_energy`);
- sample quality with Euler at a few step counts and with dopri5 (with its NFE): sliced Wasserstein-2, MMD^2 and
  the fraction of samples on the checkerboard squares for 2D data; FID/KID in the digits-classifier feature space
  against the training split for the digits.

Outputs (in the run directory): ``results.md`` (tables, settings, hardware, wall times), ``results.json``,
``samples.png`` (samples per solver for each path) and ``schedules.png`` (lambda(theta) and alpha_t / sigma_t of
every path, including the final KO one).

Example:
    >>> config = load_config("recipes/compare_paths.yaml", {"train.max_steps": 100})  # doctest: +SKIP
    >>> result = run_comparison(config)  # doctest: +SKIP
    >>> print(result.markdown)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import platform
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union, get_args, get_origin, get_type_hints

import lightning as L
import torch
from torch import Tensor, nn

from ko_lightning.callbacks.ko_schedule import KOScheduleCallback
from ko_lightning.data import DigitsDataModule, TOY2D_SAMPLERS, Toy2DDataModule, on_checkerboard
from ko_lightning.kinetic import (
    SeparationFunction,
    default_theta_grid,
    estimate_separation_from_data,
    kinetic_energy,
)
from ko_lightning.metrics import compute_fid_kid, mmd_rbf, model_kinetic_energy, sliced_wasserstein
from ko_lightning.module import FlowMatching
from ko_lightning.nets import TimeMLP, UNet
from ko_lightning.paths import CondOTPath, CosinePath, GaussianPath, VPPath
from ko_lightning.sampling import SolverSpec, integrate
from ko_lightning.seeding import derive_seed

__all__ = [
    "DEFAULT_T_EPS",
    "PATH_LABELS",
    "PATH_NAMES",
    "CompareConfig",
    "ComparisonResult",
    "ConfigError",
    "EvalSettings",
    "PathResult",
    "TrainSettings",
    "config_from_dict",
    "dequantize_pixels",
    "discrete_bits_per_dim",
    "load_config",
    "pixel_bits_per_dim",
    "run_comparison",
]

PATH_NAMES: tuple[str, ...] = ("cond_ot", "ko", "cosine", "vp")
"""Paths the comparison knows, in table order."""

PATH_LABELS: dict[str, str] = {"cond_ot": "Cond-OT", "ko": "KO", "cosine": "cosine (trig.)", "vp": "VP (DDPM)"}

DEFAULT_T_EPS: dict[str, float] = {"cond_ot": 0.0, "ko": 0.0, "cosine": 0.0, "vp": 1e-3}
"""Training times ``t ~ U[t_eps, 1 - t_eps]`` per path: VP's ``sigma'_t`` diverges at t = 1, so it needs > 0."""

DIGITS_LEVELS = 17
"""The sklearn digits have integer pixels 0..16: 17 levels (a uniform model scores log2(17) = 4.09 bits/dim)."""

_PARAMETRIZATIONS = ("velocity", "x1", "eps", "polar_v")
_LR_SCHEDULES = ("constant", "cosine")
_NET_KINDS = {"mlp": TimeMLP, "unet": UNet}
_LN2 = math.log(2.0)

# The KO row's callback settings (measured to refresh cheaply on the CPU checkerboard); a config's ``ko`` section
# is merged into these, so a partial section changes only what it names.
KO_DEFAULTS: dict[str, Any] = {
    "estimator": "data", "init_from_data": True, "every_n_steps": 1000, "warmup_steps": 1000, "n_queries": 256,
    "n_theta": 48, "max_data": 8192, "plot": False,
}


class ConfigError(ValueError):
    """A bad comparison config: names the offending key and lists the valid ones."""


# ================================================================================================== configuration
@dataclass
class TrainSettings:
    """Training budget, identical for every path.

    Attributes:
        max_steps: optimizer steps per path.
        batch_size: batch size.
        lr: Adam learning rate.
        lr_schedule: ``"constant"`` or ``"cosine"`` (cosine annealing to 0 over ``max_steps``).
        accelerator: Lightning accelerator (``"cpu"``, ``"gpu"``, ``"auto"``).
        dequantize: digits only: train on ``(pixel + u - mean) / scale``, ``u ~ U[0, 1)`` fresh per batch, the
            distribution whose density the discrete NLL bound evaluates (without it the model learns point masses
            at the 17 levels and the bound is loose).
        progress_bar: show Lightning's progress bar.
        log_every_n_steps: Lightning logging interval.
    """

    max_steps: int = 3000
    batch_size: int = 1024
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    accelerator: str = "cpu"
    dequantize: bool = False
    progress_bar: bool = True
    log_every_n_steps: int = 50


@dataclass
class EvalSettings:
    """Evaluation settings, identical for every path.

    Attributes:
        n_samples: generated samples per solver setting (the same initial noise for every path and solver).
        euler_steps: Euler step counts.
        atol: absolute tolerance of dopri5 (samples, NLL, KE).
        rtol: relative tolerance of dopri5.
        n_nll: held-out points for the NLL (None: the whole test split).
        nll_batch_size: points per likelihood solve.
        divergence: ``"auto"`` (exact up to 32 dimensions, Hutchinson above), ``"exact"`` or ``"hutchinson"``.
        n_ke: trajectories for the model's kinetic energy.
        n_lambda_data: training points behind the data separation function of the analytic KE.
        n_lambda_queries: noisy queries per angle of that estimate.
        n_theta: angles of its grid.
        lambda_smoothing: its Whittaker smoothing (as the KO callback's default).
        sw_projections: directions of the sliced Wasserstein distance (2D).
        mmd_bandwidths: Gaussian kernel widths of MMD^2, in normalized units (2D).
        n_mmd: samples (and reference points) used for MMD^2, whose cost is quadratic (2D).
        kid_subset_size: KID subset size, capped at the number of generated and reference samples (digits).
        fid_cache_dir: cache folder of the digits classifier and reference features (None: the package default).
        fid_reference_name: cache name of the reference features (None: derived from the split, ``digits-train-...``).
        device: where to evaluate: ``"auto"`` (CUDA when available and the accelerator is not ``"cpu"``),
            ``"cpu"`` or ``"cuda"``.
        n_plot: samples drawn per panel of ``samples.png`` (2D; digits show a 6 x 6 mosaic).
    """

    n_samples: int = 4000
    euler_steps: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    atol: float = 1e-5
    rtol: float = 1e-5
    n_nll: Union[int, None] = 2000
    nll_batch_size: int = 1000
    divergence: str = "auto"
    n_ke: int = 1000
    n_lambda_data: int = 8192
    n_lambda_queries: int = 1024
    n_theta: int = 64
    lambda_smoothing: float = 1.0
    sw_projections: int = 256
    mmd_bandwidths: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.5])
    n_mmd: int = 2000
    kid_subset_size: int = 500
    fid_cache_dir: Union[str, None] = None
    fid_reference_name: Union[str, None] = None
    device: str = "auto"
    n_plot: int = 2000


@dataclass
class CompareConfig:
    """Everything one comparison run needs (see ``recipes/compare_paths.yaml``).

    Attributes:
        data: the data set: ``{"name": "checkerboard", ...}`` (a 2D toy of :data:`TOY2D_SAMPLERS` with the other
            arguments of :class:`Toy2DDataModule`) or ``{"name": "digits", ...}`` (:class:`DigitsDataModule`);
            ``batch_size`` and ``seed`` come from ``train`` and ``seed``.
        net: ``{"kind": "mlp", ...}`` (:class:`TimeMLP` arguments; ``dim`` is set from the data) or
            ``{"kind": "unet", ...}`` (:class:`UNet` arguments).
        paths: which paths to compare, a subset of :data:`PATH_NAMES`.
        parametrization: what the network predicts (default ``"polar_v"``: path-invariant input, which the KO
            callback's schedule swaps need).
        loss_weighting: ``FlowMatching``'s ``loss_weighting`` (``"velocity"`` or ``"output"``; None: the module's
            default, ``"output"`` for ``polar_v``).
        t_eps: per-path overrides of :data:`DEFAULT_T_EPS`.
        seed: seed of the data, the initial weights, the training noise and the evaluation noise.
        out: run directory (None: ``runs/compare_paths/<data name>``).
        threads: torch intra-op threads during the run (None: leave torch's setting).
        train: :class:`TrainSettings`.
        ko: :class:`KOScheduleCallback` arguments of the KO row, merged into :data:`KO_DEFAULTS`.
        eval: :class:`EvalSettings`.
    """

    data: dict[str, Any] = field(default_factory=lambda: {"name": "checkerboard", "n_train": 200_000,
                                                          "n_val": 1000, "n_test": 10_000})
    net: dict[str, Any] = field(default_factory=lambda: {"kind": "mlp", "hidden": 256, "depth": 4,
                                                         "time_scale": 1.0})
    paths: list[str] = field(default_factory=lambda: list(PATH_NAMES))
    parametrization: str = "polar_v"
    loss_weighting: Union[str, None] = None
    t_eps: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    out: Union[str, None] = None
    threads: Union[int, None] = None
    train: TrainSettings = field(default_factory=TrainSettings)
    ko: dict[str, Any] = field(default_factory=dict)
    eval: EvalSettings = field(default_factory=EvalSettings)

    @property
    def data_name(self) -> str:
        """The data set's name (``"checkerboard"``, ``"digits"``, ...)."""
        return str(self.data["name"])

    @property
    def is_digits(self) -> bool:
        """True for the sklearn digits."""
        return self.data_name == "digits"

    def t_eps_of(self, path: str) -> float:
        """``t_eps`` of one path (the default, unless overridden)."""
        return float(self.t_eps.get(path, DEFAULT_T_EPS[path]))

    def out_dir(self) -> Path:
        """The run directory."""
        return Path(self.out) if self.out is not None else Path("runs") / "compare_paths" / self.data_name

    def ko_settings(self) -> dict[str, Any]:
        """Arguments of the KO row's :class:`KOScheduleCallback`."""
        return {**KO_DEFAULTS, **self.ko}

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for ``results.json``)."""
        return dataclasses.asdict(self)


def _valid_keys(keys: Sequence[str]) -> str:
    return ", ".join(sorted(keys))


def _check_keys(given: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    unknown = [k for k in given if k not in valid]
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(repr(f'{where}{k}') for k in unknown)}; valid keys "
                          f"{'of ' + repr(where[:-1]) if where else 'at the top level'}: {_valid_keys(valid)}")


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against a simple type hint (int, float, bool, str, list[...], dict, Optional) and return it."""
    origin = get_origin(hint)
    if origin is Union:
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {name!r} must be a list, got {value!r}")
        (item,) = get_args(hint)
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {name!r} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {name!r} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {name!r} must be an integer, got {value!r}")
        return value
    if hint is float:
        # YAML 1.1 reads "1e-5" (no dot) as a string: accept numeric strings rather than fail obscurely later.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"config key {name!r} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {name!r} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {name!r} must be a string, got {value!r}")
        return value
    return value


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _yaml_numbers(section: Mapping[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; turn such values of a free-form section into floats."""
    return {k: float(v) if isinstance(v, str) and _SCIENTIFIC.match(v) else v for k, v in section.items()}


def _dataclass_from(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config section {where[:-1]!r} must be a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    _check_keys(raw, names, where)
    return cls(**{k: _coerce(v, hints[k], where + k) for k, v in raw.items()})


def _signature_keys(target: Callable[..., Any], exclude: Sequence[str] = ()) -> list[str]:
    params = inspect.signature(target).parameters.values()
    return [p.name for p in params if p.name not in exclude and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


_DATA_EXCLUDE = ("batch_size", "seed", "flatten")


def _check_data(data: Mapping[str, Any]) -> dict[str, Any]:
    data = dict(data)
    name = data.get("name")
    names = ["digits", *TOY2D_SAMPLERS]
    if name not in names:
        raise ConfigError(f"config key 'data.name' must be one of {names}, got {name!r}")
    if name == "digits":
        valid = ["name", *_signature_keys(DigitsDataModule, _DATA_EXCLUDE)]
    else:
        valid = _signature_keys(Toy2DDataModule, _DATA_EXCLUDE)
    _check_keys(data, valid, "data.")
    return data


def _check_net(net: Mapping[str, Any]) -> dict[str, Any]:
    net = dict(net)
    kind = net.get("kind")
    if kind not in _NET_KINDS:
        raise ConfigError(f"config key 'net.kind' must be one of {sorted(_NET_KINDS)}, got {kind!r}")
    exclude = ("dim",) if kind == "mlp" else ()
    _check_keys(net, ["kind", *_signature_keys(_NET_KINDS[kind], exclude)], "net.")
    return net


def config_from_dict(raw: Mapping[str, Any]) -> CompareConfig:
    """Validate a config mapping (as read from YAML) and build a :class:`CompareConfig`.

    Sections ``train`` and ``eval`` are merged field by field into their defaults, ``ko`` into :data:`KO_DEFAULTS`;
    ``data`` and ``net``, when given, replace the defaults (their valid keys depend on ``name`` / ``kind``).

    Raises:
        ConfigError: naming an unknown key (and listing the valid ones), a value of the wrong type, an unknown
            path, data set or network kind.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(raw).__name__}")
    top = [f.name for f in dataclasses.fields(CompareConfig)]
    _check_keys(raw, top, "")
    defaults = CompareConfig()
    hints = get_type_hints(CompareConfig)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "train":
            kwargs[key] = _dataclass_from(TrainSettings, value, "train.")
        elif key == "eval":
            kwargs[key] = _dataclass_from(EvalSettings, value, "eval.")
        else:
            kwargs[key] = _coerce(value, hints[key], key)
    config = dataclasses.replace(defaults, **kwargs)
    config.data = _check_data(_yaml_numbers(config.data))
    config.net = _check_net(_yaml_numbers(config.net))
    config.ko = _yaml_numbers(config.ko)
    if config.net["kind"] == "unet" and not config.is_digits:
        raise ConfigError("net.kind 'unet' needs image data (data.name 'digits')")
    _check_keys(config.ko, _signature_keys(KOScheduleCallback), "ko.")
    if not config.paths:
        raise ConfigError("config key 'paths' must name at least one path")
    for p in config.paths:
        if p not in PATH_NAMES:
            raise ConfigError(f"unknown path {p!r} in 'paths'; valid paths: {', '.join(PATH_NAMES)}")
    if len(set(config.paths)) != len(config.paths):
        raise ConfigError(f"'paths' lists a path twice: {config.paths}")
    _check_keys(config.t_eps, PATH_NAMES, "t_eps.")
    for p in config.t_eps:
        v = _coerce(config.t_eps[p], float, f"t_eps.{p}")
        if not 0.0 <= v < 0.5:
            raise ConfigError(f"config key 't_eps.{p}' must lie in [0, 0.5), got {v!r}")
        config.t_eps[p] = v
    if config.parametrization not in _PARAMETRIZATIONS:
        raise ConfigError(f"config key 'parametrization' must be one of {_PARAMETRIZATIONS}, "
                          f"got {config.parametrization!r}")
    if config.loss_weighting not in (None, "velocity", "output"):
        raise ConfigError(f"config key 'loss_weighting' must be 'velocity', 'output' or null, "
                          f"got {config.loss_weighting!r}")
    if config.train.lr_schedule not in _LR_SCHEDULES:
        raise ConfigError(f"config key 'train.lr_schedule' must be one of {_LR_SCHEDULES}, "
                          f"got {config.train.lr_schedule!r}")
    if config.train.dequantize and not config.is_digits:
        raise ConfigError("config key 'train.dequantize' applies to integer data (data.name 'digits') only")
    for name in ("max_steps", "batch_size"):
        if getattr(config.train, name) < 1:
            raise ConfigError(f"config key 'train.{name}' must be >= 1")
    ev = config.eval
    for name in ("n_samples", "n_ke", "n_lambda_data", "n_lambda_queries", "n_mmd", "kid_subset_size",
                 "nll_batch_size", "sw_projections", "n_plot"):
        if getattr(ev, name) < 2:
            raise ConfigError(f"config key 'eval.{name}' must be >= 2, got {getattr(ev, name)!r}")
    if ev.n_nll is not None and ev.n_nll < 1:
        raise ConfigError(f"config key 'eval.n_nll' must be >= 1 or null, got {ev.n_nll!r}")
    if not ev.euler_steps or any(s < 1 for s in ev.euler_steps):
        raise ConfigError(f"config key 'eval.euler_steps' must list integers >= 1, got {ev.euler_steps!r}")
    if ev.divergence not in ("auto", "exact", "hutchinson"):
        raise ConfigError(f"config key 'eval.divergence' must be 'auto', 'exact' or 'hutchinson', "
                          f"got {ev.divergence!r}")
    if ev.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"config key 'eval.device' must be 'auto', 'cpu' or 'cuda', got {ev.device!r}")
    if config.threads is not None and config.threads < 1:
        raise ConfigError(f"config key 'threads' must be >= 1 or null, got {config.threads!r}")
    return config


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> CompareConfig:
    """Read a YAML config (or start from the defaults), apply dotted overrides, validate.

    Args:
        path: YAML file; None starts from the built-in checkerboard defaults.
        overrides: ``{"train.max_steps": 100, "paths": ["cond_ot", "ko"], ...}`` applied before validation.

    Raises:
        ConfigError: see :func:`config_from_dict`.
        FileNotFoundError: when ``path`` does not exist.
    """
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            loaded = yaml.safe_load(f)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return config_from_dict(raw)


# ================================================================================================== digits bpd
def _check_pixels(pixels: Tensor, levels: int) -> None:
    if not torch.is_tensor(pixels) or pixels.ndim < 2:
        raise ValueError(f"pixels must be a tensor of shape (B, ...), got {type(pixels).__name__}")
    p = pixels.double()
    if not bool(torch.isfinite(p).all()) or bool((p != p.round()).any()):
        raise ValueError("pixels must hold integer values")
    if float(p.min()) < 0 or float(p.max()) > levels - 1:
        raise ValueError(f"pixels must lie in [0, {levels - 1}], got [{float(p.min()):g}, {float(p.max()):g}]")


def dequantize_pixels(
    pixels: Tensor,
    mean: Tensor,
    scale: Tensor | float,
    generator: torch.Generator | None = None,
    levels: int = DIGITS_LEVELS,
) -> Tensor:
    """Uniform dequantization into the model's space: ``y = (pixel + u - mean) / scale`` with ``u ~ U[0, 1)``.

    ``pixel + u`` fills ``[0, levels)`` with unit cells, one per integer level; ``mean`` (per pixel) and ``scale``
    are the data module's normalization (:class:`DigitsDataModule`).

    Args:
        pixels: integer pixel values in ``[0, levels - 1]``, shape ``(B, *data_shape)``.
        mean: per-pixel mean in pixel units, broadcastable to one sample.
        scale: the global scale (a number or 0-d tensor).
        generator: source of ``u`` (drawn on the CPU, so results do not depend on the device).
        levels: number of integer levels (17 for the digits).

    Returns:
        ``y`` in fp32, shaped like ``pixels``.
    """
    _check_pixels(pixels, levels)
    u = torch.rand(pixels.shape, generator=generator, dtype=torch.float32).to(pixels.device)
    return (pixels.float() + u - torch.as_tensor(mean).to(pixels.device).float()) / float(scale)


def discrete_bits_per_dim(log_prob_y: Tensor, num_dims: int, scale: Tensor | float) -> Tensor:
    """Bits/dim of integer pixels from the model's log-density of their dequantized images ``y``.

    With ``z = pixel + u`` (unit cells) and ``y = (z - mean) / scale``, ``log p_z(z) = log p_y(y) - D log(scale)``
    (the shift has unit Jacobian), and Jensen's inequality over ``u`` gives the bound
    ``log P(pixel) >= E_u log p_z(pixel + u)``, hence

        ``bpd = -(log p_y(y) - D log(scale)) / (D ln 2)``  (an upper bound on ``-log2 P(pixel) / D`` in expectation).

    Args:
        log_prob_y: ``log p_y(y)`` in nats, any shape.
        num_dims: ``D``, dimensions per sample.
        scale: the data module's global scale.
    """
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    return -(log_prob_y - num_dims * math.log(scale)) / (num_dims * _LN2)


@dataclass(frozen=True)
class PixelBpd:
    """Per-sample discrete bits/dim of :func:`pixel_bits_per_dim`, with the solver's total NFE."""

    bpd: Tensor
    nfe: int


def pixel_bits_per_dim(
    model: FlowMatching,
    pixels: Tensor,
    mean: Tensor,
    scale: Tensor | float,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    divergence: str = "auto",
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    levels: int = DIGITS_LEVELS,
) -> PixelBpd:
    """Discrete bits/dim of integer pixels under a model trained in the normalized space ``(x - mean) / scale``.

    Dequantizes (:func:`dequantize_pixels`, one ``u`` per pixel), computes ``log p_y`` with
    ``model.log_prob`` (dopri5, data at ``t = 1 - t_eps``) and converts with :func:`discrete_bits_per_dim`.

    Args:
        model: the trained flow.
        pixels: integer pixels in ``[0, levels - 1]``, shape ``(B, *data_shape)``.
        mean: per-pixel mean of the normalization.
        scale: global scale of the normalization.
        atol: dopri5 absolute tolerance.
        rtol: dopri5 relative tolerance.
        divergence: ``"auto"``, ``"exact"`` or ``"hutchinson"``.
        generator: source of the dequantization noise (all of it drawn first) and then of the Hutchinson probes.
        batch_size: samples per solve.
        levels: number of integer levels.
    """
    y = dequantize_pixels(pixels, mean, scale, generator, levels)
    num_dims = int(y[0].numel())
    out, nfe = [], 0
    for chunk in y.split(batch_size):
        res = model.log_prob(chunk.to(model.device), method="dopri5", atol=atol, rtol=rtol, divergence=divergence,
                             generator=generator)
        out.append(res.log_prob.detach().double().cpu())
        nfe += res.nfe
    return PixelBpd(discrete_bits_per_dim(torch.cat(out), num_dims, scale), nfe)


class _DequantizedDigits(DigitsDataModule):
    """Digits whose *training* batches are dequantized: ``x + u / scale``, ``u ~ U[0, 1)``.

    The noise of step ``k`` comes from a generator seeded by ``(seed, k)``, so every path of a comparison sees the
    same dequantization noise at the same step (like ``FlowMatching(train_seed=...)`` for its own noise).
    """

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training or not torch.is_tensor(batch):
            return batch
        _, scale = self._stats()
        gen = torch.Generator().manual_seed(derive_seed(self.seed, trainer.global_step, 17))
        u = torch.rand(batch.shape, generator=gen).to(batch.device, batch.dtype)
        return batch + u / float(scale)


# ================================================================================================== building blocks
def build_datamodule(config: CompareConfig) -> L.LightningDataModule:
    """The data module of ``config`` (seeded by ``config.seed``), set up."""
    args = {k: v for k, v in config.data.items() if k != "name"}
    if config.is_digits:
        cls = _DequantizedDigits if config.train.dequantize else DigitsDataModule
        dm: L.LightningDataModule = cls(batch_size=config.train.batch_size, seed=config.seed,
                                        flatten=config.net["kind"] == "mlp", **args)
    else:
        dm = Toy2DDataModule(config.data_name, batch_size=config.train.batch_size, seed=config.seed, **args)
    dm.setup("fit")
    return dm


def build_net(config: CompareConfig, data_shape: tuple[int, ...]) -> nn.Module:
    """A fresh network (call after seeding, so every path starts from the same weights)."""
    args = {k: v for k, v in config.net.items() if k != "kind"}
    if config.net["kind"] == "mlp":
        return TimeMLP(dim=int(math.prod(data_shape)), **args)
    return UNet(**args)


def build_path(name: str) -> GaussianPath:
    """The starting path of a row (KO starts on Cond-OT; its callback installs the KO path before step 1)."""
    if name in ("cond_ot", "ko"):
        return CondOTPath()
    if name == "cosine":
        return CosinePath()
    if name == "vp":
        return VPPath()
    raise ValueError(f"unknown path {name!r}; valid paths: {', '.join(PATH_NAMES)}")


def build_model(config: CompareConfig, name: str, data_shape: tuple[int, ...]) -> FlowMatching:
    """Seed, build the net and wrap it in :class:`FlowMatching` for path ``name``."""
    L.seed_everything(config.seed, verbose=False)  # identical initial weights for every path
    net = build_net(config, data_shape)
    scheduler = None
    if config.train.lr_schedule == "cosine":
        scheduler = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=config.train.max_steps)
    return FlowMatching(
        net, build_path(name), parametrization=config.parametrization,  # type: ignore[arg-type]
        loss_weighting=config.loss_weighting,  # type: ignore[arg-type]
        optimizer=functools.partial(torch.optim.Adam, lr=config.train.lr), lr_scheduler=scheduler,
        t_eps=config.t_eps_of(name), data_shape=data_shape, train_seed=config.seed,
    )


def _eval_device(config: CompareConfig) -> torch.device:
    if config.eval.device == "cuda" or (config.eval.device == "auto" and config.train.accelerator != "cpu"
                                         and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


# ================================================================================================== evaluation
@dataclass
class PathResult:
    """Everything measured for one path (one row of the tables).

    Attributes:
        name: path key (``"cond_ot"``, ...).
        label: display name.
        t_eps: training time margin; samples, likelihoods and KE use ``[0, 1 - t_eps]``.
        nll_bpd: mean held-out NLL in bits/dim (2D: normalized units; digits: discrete pixel bound).
        nll_bpd_se: its standard error over the points.
        nll_nfe: dopri5 evaluations per likelihood solve (mean over batches).
        ke_model: the model's kinetic energy along its dopri5 trajectories.
        ke_model_se: its standard error over the trajectories.
        ke_model_nfe: NFE of that solve.
        ke_path: analytic KE of the (final) path under lambda of the training data.
        solvers: per solver (``"euler 2"``, ..., ``"dopri5"``): ``nfe``, ``seconds`` and the quality metrics.
        train_seconds: wall time of training (incl. KO refreshes).
        eval_seconds: wall time of the evaluation.
        steps_per_second: training throughput.
        ko: the KO callback's final numbers (refreshes, Phi, KE_min, gamma floor), for the KO row.
    """

    name: str
    label: str
    t_eps: float
    nll_bpd: float = math.nan
    nll_bpd_se: float = math.nan
    nll_nfe: float = math.nan
    ke_model: float = math.nan
    ke_model_se: float = math.nan
    ke_model_nfe: int = 0
    ke_path: float = math.nan
    solvers: dict[str, dict[str, float]] = field(default_factory=dict)
    train_seconds: float = math.nan
    eval_seconds: float = math.nan
    steps_per_second: float = math.nan
    ko: dict[str, float] | None = None


@dataclass
class ComparisonResult:
    """The outcome of :func:`run_comparison`.

    Attributes:
        rows: one :class:`PathResult` per path, in config order.
        out_dir: the run directory.
        markdown: the content of ``results.md``.
        tables: the markdown tables alone (what is printed).
        total_seconds: wall time of the whole comparison.
        files: name -> path of every file written.
    """

    rows: list[PathResult]
    out_dir: Path
    markdown: str
    tables: str
    total_seconds: float
    files: dict[str, Path]


class _Log:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.verbose:
            print(f"[compare_paths {time.perf_counter() - self.start:7.1f}s] {message}", flush=True)


def _solver_names(config: CompareConfig) -> list[str]:
    return [f"euler {s}" for s in config.eval.euler_steps] + ["dopri5"]


def _solver_spec(config: CompareConfig, solver: str) -> SolverSpec:
    if solver == "dopri5":
        return SolverSpec("dopri5", atol=config.eval.atol, rtol=config.eval.rtol)
    return SolverSpec("euler", steps=int(solver.split()[1]))


@torch.no_grad()
def _generate(model: FlowMatching, x0: Tensor, solver: SolverSpec, t_end: float) -> tuple[Tensor, int]:
    """Solve noise -> data from ``t_eps`` (where :meth:`FlowMatching.sample` starts too) up to ``t_end`` (< 1 for a
    path whose velocity is singular at t = 1)."""
    model.eval()
    res = integrate(model.velocity, x0.to(model.device), solver, t_start=model.t_eps, t_end=t_end)
    return res.samples.float().cpu(), res.nfe


def _model_ke(model: FlowMatching, x0: Tensor, solver: SolverSpec, t_end: float) -> tuple[float, float, int]:
    """Model KE over ``[0, t_end]``: solve the time-rescaled field ``T v(x, s T)`` on ``s in [0, 1]``, whose
    ``int_0^1 ||.||^2 ds`` equals ``T int_0^T ||v||^2 dt``, and divide by ``T``."""
    model.eval()

    def rescaled(x: Tensor, s: Tensor) -> Tensor:
        return t_end * model.velocity(x, s * t_end)

    ke = model_kinetic_energy(rescaled, x0.to(model.device), solver)
    return ke.mean / t_end, ke.standard_error / t_end, ke.nfe


def _nll_2d(model: FlowMatching, x: Tensor, config: CompareConfig) -> tuple[Tensor, float]:
    """Per-point ``-log p(x) / (D ln 2)`` (normalized units) and the mean NFE per solve."""
    values, nfes = [], []
    gen = torch.Generator().manual_seed(config.seed + 3)
    for chunk in x.split(config.eval.nll_batch_size):
        res = model.log_prob(chunk.to(model.device), method="dopri5", atol=config.eval.atol, rtol=config.eval.rtol,
                             divergence=config.eval.divergence, generator=gen)
        values.append(-res.log_prob.detach().double().cpu() / (chunk[0].numel() * _LN2))
        nfes.append(res.nfe)
    return torch.cat(values), float(sum(nfes) / len(nfes))


def _mean_se(x: Tensor) -> tuple[float, float]:
    x = x.double()
    se = float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else math.nan
    return float(x.mean()), se


def _digits_pixels(dm: DigitsDataModule, x: Tensor) -> Tensor:
    """Normalized data -> the integer pixel values it came from (exact up to float round-off)."""
    return dm.denormalize(x).round().clamp(0, DIGITS_LEVELS - 1)


def _digits_display(dm: DigitsDataModule, x: Tensor, dequantized: bool) -> Tensor:
    """Generated samples -> [0, 1] images; a model of ``pixel + u`` is shifted back by the cell centre 1/2."""
    if dequantized:
        x = x - 0.5 / float(dm.scale)
    return dm.to_display(x)


def _fid_reference_name(config: CompareConfig, dm: DigitsDataModule) -> str:
    if config.eval.fid_reference_name:
        return config.eval.fid_reference_name
    # The cache checks a hash of the reference pixels: one name per split keeps different splits apart.
    return f"digits-train-seed{config.seed}-val{dm.val_fraction:g}-test{dm.test_fraction:g}"


def _quality(
    config: CompareConfig, dm: L.LightningDataModule, samples: Tensor, reference: Tensor,
    reference_display: Tensor | None,
) -> dict[str, float]:
    """Sample-quality metrics of one solver setting."""
    ev = config.eval
    if config.is_digits:
        assert isinstance(dm, DigitsDataModule) and reference_display is not None
        images = _digits_display(dm, samples, config.train.dequantize)
        subset = min(ev.kid_subset_size, images.shape[0], reference_display.shape[0])
        fk = compute_fid_kid(images, reference_display, feature_extractor="digits-classifier",
                             reference_name=_fid_reference_name(config, dm), cache_dir=ev.fid_cache_dir,
                             value_range=(0.0, 1.0), kid_subset_size=subset, seed=config.seed,
                             cuda=_eval_device(config).type == "cuda")
        return {"fid": fk.fid, "kid": float(fk.kid_mean), "kid_std": float(fk.kid_std)}
    gen = torch.Generator().manual_seed(config.seed + 5)
    out = {"sw2": float(sliced_wasserstein(samples, reference, ev.sw_projections, generator=gen))}
    n = min(ev.n_mmd, samples.shape[0], reference.shape[0])
    out["mmd2"] = float(mmd_rbf(samples[:n], reference[:n], tuple(ev.mmd_bandwidths)))
    if config.data_name == "checkerboard":
        assert isinstance(dm, Toy2DDataModule)
        out["on_board"] = float(on_checkerboard(dm.denormalize(samples)).float().mean())
    return out


def evaluate_path(
    config: CompareConfig,
    name: str,
    model: FlowMatching,
    dm: L.LightningDataModule,
    lam: SeparationFunction,
    log: Callable[[str], None] = lambda m: None,
) -> tuple[PathResult, dict[str, Tensor]]:
    """Evaluate one trained model; returns its row and the samples per solver (for the picture)."""
    ev = config.eval
    t_eps = config.t_eps_of(name)
    t_end = 1.0 - t_eps
    row = PathResult(name=name, label=PATH_LABELS[name], t_eps=t_eps)
    device = _eval_device(config)
    model.to(device).eval()
    data_shape = tuple(model.data_shape or ())
    test = dm.test_tensor()  # type: ignore[attr-defined]

    # NLL on held-out data.
    start = time.perf_counter()
    n_nll = test.shape[0] if ev.n_nll is None else min(ev.n_nll, test.shape[0])
    if config.is_digits:
        assert isinstance(dm, DigitsDataModule)
        pixels = _digits_pixels(dm, test[:n_nll])
        res = pixel_bits_per_dim(model, pixels, dm.mean, dm.scale, atol=ev.atol, rtol=ev.rtol,
                                 divergence=ev.divergence, generator=torch.Generator().manual_seed(config.seed + 3),
                                 batch_size=ev.nll_batch_size)
        bpd, n_batches = res.bpd, -(-n_nll // ev.nll_batch_size)
        row.nll_nfe = res.nfe / n_batches
    else:
        bpd, row.nll_nfe = _nll_2d(model, test[:n_nll], config)
    row.nll_bpd, row.nll_bpd_se = _mean_se(bpd)
    log(f"{name}: NLL {row.nll_bpd:.4f} bits/dim ({n_nll} points, NFE {row.nll_nfe:.0f}, "
        f"{time.perf_counter() - start:.1f}s)")

    # Kinetic energy: the model's own, and the path's under the data's lambda.
    start = time.perf_counter()
    x0_ke = torch.randn((ev.n_ke, *data_shape), generator=torch.Generator().manual_seed(config.seed + 2))
    dopri = _solver_spec(config, "dopri5")
    row.ke_model, row.ke_model_se, row.ke_model_nfe = _model_ke(model, x0_ke, dopri, t_end)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the divergence warning does not apply below t = 1
        row.ke_path = kinetic_energy(model.path, lam, second_moment=1.0, t_max=t_end)
    log(f"{name}: KE model {row.ke_model:.4f} +- {row.ke_model_se:.4f} (NFE {row.ke_model_nfe}), "
        f"KE path {row.ke_path:.4f} ({time.perf_counter() - start:.1f}s)")

    # Samples per solver, all from the same noise.
    x0 = torch.randn((ev.n_samples, *data_shape), generator=torch.Generator().manual_seed(config.seed + 1))
    if config.is_digits:
        assert isinstance(dm, DigitsDataModule)
        reference = dm.train_tensor()
        reference_display = dm.to_display(reference)
    else:
        reference, reference_display = test, None
    samples: dict[str, Tensor] = {}
    for solver in _solver_names(config):
        start = time.perf_counter()
        x, nfe = _generate(model, x0, _solver_spec(config, solver), t_end)
        elapsed = time.perf_counter() - start
        if not bool(torch.isfinite(x).all()):
            raise RuntimeError(f"path {name!r}: {solver} produced non-finite samples")
        metrics = {"nfe": float(nfe), "seconds": elapsed, **_quality(config, dm, x, reference, reference_display)}
        row.solvers[solver] = metrics
        samples[solver] = x[: max(ev.n_plot, 36)]
        log(f"{name}: {solver}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return row, samples


# ================================================================================================== reporting
def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def _metric_columns(config: CompareConfig) -> list[tuple[str, str, float]]:
    """(key, title, multiplier) of the per-solver quality metrics."""
    if config.is_digits:
        return [("fid", "FID (digits-classifier features, vs train split)", 1.0),
                ("kid", "KID x 1e3 (digits-classifier features, vs train split)", 1e3)]
    cols = [("sw2", f"sliced Wasserstein-2 ({config.eval.sw_projections} directions, vs test set)", 1.0),
            ("mmd2", "MMD^2 x 1e3 (Gaussian kernels " + ", ".join(f"{b:g}" for b in config.eval.mmd_bandwidths)
             + ", vs test set)", 1e3)]
    if config.data_name == "checkerboard":
        cols.append(("on_board", "fraction of samples on the checkerboard squares", 1.0))
    return cols


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_tables(config: CompareConfig, rows: list[PathResult]) -> str:
    """The markdown tables: the main one (NLL, KE, first metric per solver, dopri5 NFE), one per further metric,
    and the wall times."""
    solvers = _solver_names(config)
    metrics = _metric_columns(config)
    key0, title0, mult0 = metrics[0]
    nll_title = "NLL bits/dim (pixels, 17 levels)" if config.is_digits else "NLL bits/dim (normalized units)"
    short = {"fid": "FID", "sw2": "SW2"}[key0]
    header = ["path", nll_title, "KE model", "KE path(lambda)"]
    header += [f"{short} {s.replace('euler ', 'Euler ')}" for s in solvers] + ["NFE dopri5"]
    body = []
    for r in rows:
        cells = [r.label, f"{_fmt(r.nll_bpd)} ± {_fmt(r.nll_bpd_se, 2)}",
                 f"{_fmt(r.ke_model)} ± {_fmt(r.ke_model_se, 2)}", _fmt(r.ke_path)]
        cells += [_fmt(r.solvers[s][key0] * mult0) for s in solvers] + [str(int(r.solvers["dopri5"]["nfe"]))]
        body.append(cells)
    parts = [f"### Main table ({short}: {title0})\n\n" + _table(header, body)]
    for key, title, mult in metrics[1:]:
        head = ["path"] + [s.replace("euler ", "Euler ") for s in solvers]
        body = [[r.label] + [_fmt(r.solvers[s][key] * mult) for s in solvers] for r in rows]
        parts.append(f"### {title}\n\n" + _table(head, body))
    head = ["path", "t_eps", "train s", "steps/s", "eval s", "NLL NFE/solve", "KE NFE"]
    body = [[r.label, _fmt(r.t_eps), f"{r.train_seconds:.1f}", f"{r.steps_per_second:.1f}", f"{r.eval_seconds:.1f}",
             f"{r.nll_nfe:.0f}", str(r.ke_model_nfe)] for r in rows]
    parts.append("### Wall time and solver cost\n\n" + _table(head, body))
    return "\n\n".join(parts) + "\n"


def _hardware(config: CompareConfig) -> dict[str, Any]:
    device = _eval_device(config)
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "lightning": L.__version__, "torch_threads": torch.get_num_threads(),
        "accelerator": config.train.accelerator, "eval_device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _notes(config: CompareConfig, rows: list[PathResult], lam_points: int, weighting: str) -> list[str]:
    ev = config.eval
    notes = [
        f"Same network, seed {config.seed} (identical initial weights), {config.train.max_steps} steps, batch "
        f"{config.train.batch_size}, Adam lr {config.train.lr:g} ({config.train.lr_schedule}), parametrization "
        f"'{config.parametrization}' with loss weighting '{weighting}', and the same noise and times at every "
        "step (train_seed) for every path.",
        "Training times t ~ U[t_eps, 1 - t_eps]: t_eps = "
        + ", ".join(f"{PATH_LABELS[r.name]} {r.t_eps:g}" for r in rows)
        + ". VP's sigma'_t diverges at t = 1, so it is trained with t_eps = 1e-3 and its samples, KE and likelihood "
        "are taken on [0, 1 - t_eps] (its NLL is the density of p_{1 - t_eps}, data smoothed by sigma ~ 0.01); "
        "the other paths use [0, 1]. VP also starts from alpha_0 = exp(-(beta_min + beta_max)/4) ~ 0.0066, not 0.",
        f"KO row: KOScheduleCallback({', '.join(f'{k}={v!r}' for k, v in config.ko_settings().items())}); the "
        "final KO path (after the last refresh) is the one evaluated and drawn in schedules.png.",
        f"Samples: {ev.n_samples} per solver from the same initial noise for every path and solver; Euler at "
        f"{', '.join(map(str, ev.euler_steps))} steps and dopri5 (atol {ev.atol:g}, rtol {ev.rtol:g}; its NFE "
        "in the main table).",
        f"KE model: (1/D) int ||v_theta||^2 dt along {ev.n_ke} dopri5 trajectories of the trained model "
        "(model_kinetic_energy), ± its standard error. KE path(lambda): analytic KE of the (final) path under the "
        f"separation function lambda estimated from {lam_points} training points (estimate_separation_from_data, "
        f"{ev.n_lambda_queries} queries per angle, {ev.n_theta} angles). Both per dimension, in normalized units "
        "(data normalized to second moment 1).",
    ]
    if config.is_digits:
        notes.append(
            "NLL: a discrete bound in pixel units on the test split. Pixels are integers 0..16 (17 levels); "
            "u ~ U[0, 1) per pixel, pixel + u in [0, 17), y = (pixel + u - mean) / scale is the model's space, "
            "log p_pixel >= log p_y(y) - D log(scale), bpd = -log p_pixel / (D ln 2) (a uniform model: "
            f"log2(17) = {math.log2(DIGITS_LEVELS):.3f}). dopri5 with the '{ev.divergence}' divergence "
            "(Hutchinson with one fixed Rademacher probe per solve for D = 64 under 'auto')."
            + (" Trained on dequantized pixels (train.dequantize), the distribution the bound evaluates; samples "
               "are shifted back by half a level before display." if config.train.dequantize else
               " Trained on the integer pixels themselves (train.dequantize false): the bound is loose.")
        )
        notes.append(
            "FID/KID: digits-classifier features (a small CNN trained on the sklearn digits), generated samples "
            "mapped to [0, 1] with to_display, against the training split; KID subset size "
            f"min({ev.kid_subset_size}, n_generated, n_reference). The lambda behind KE path(lambda) and the KO "
            "path is that of the training set (a finite set of 64-dimensional points), not of the population."
        )
    else:
        n_nll = ev.n_nll if ev.n_nll is not None else "all"
        notes.append(
            f"NLL: -log p(x) / (D ln 2) on {n_nll} held-out test points in the normalized data units (not the raw "
            f"coordinates), dopri5 with the '{ev.divergence}' divergence (exact for D = 2)."
        )
        notes.append(
            f"SW2 with {ev.sw_projections} random directions vs the test set; MMD^2 (unbiased, sum of Gaussian "
            f"kernels) on {min(ev.n_mmd, ev.n_samples)} samples vs as many test points, in normalized units."
            + (" On-board fraction: share of denormalized samples on the black squares (data: 1)."
               if config.data_name == "checkerboard" else "")
        )
    return notes


def _ko_numbers(callback: KOScheduleCallback) -> dict[str, float]:
    installed = [r for r in callback.reports if r.installed]
    last = installed[-1] if installed else None
    return {
        "refreshes": float(len(callback.reports)), "installed": float(len(installed)),
        "phi": last.phi if last else math.nan, "ke_min": last.ke_min if last else math.nan,
        "gamma_floor": last.gamma_floor if last else math.nan,
        "refresh_seconds": float(sum(r.seconds.get("total", 0.0) for r in callback.reports)),
    }


def _save_samples_figure(config: CompareConfig, dm: L.LightningDataModule, rows: list[PathResult],
                         samples: dict[str, dict[str, Tensor]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solvers = _solver_names(config)
    n_rows, n_cols = len(rows), len(solvers) + 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.3 * n_rows), squeeze=False)
    ref = dm.train_tensor() if config.is_digits else dm.test_tensor()  # type: ignore[attr-defined]
    for i, row in enumerate(rows):
        panels = [(s, samples[row.name][s], row.solvers[s]) for s in solvers] + [("data", ref, None)]
        for j, (solver, x, metrics) in enumerate(panels):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if config.is_digits:
                assert isinstance(dm, DigitsDataModule)
                shift = solver != "data" and config.train.dequantize
                img = _digits_display(dm, x[:36], shift)[:, 0]
                img = torch.cat([img, torch.zeros(36 - img.shape[0], 8, 8)]) if img.shape[0] < 36 else img
                img = torch.nn.functional.pad(img, (1, 1, 1, 1), value=0.15)  # a thin frame between the digits
                mosaic = img.reshape(6, 6, 10, 10).permute(0, 2, 1, 3).reshape(60, 60)
                ax.imshow(mosaic.numpy(), cmap="gray_r", vmin=0, vmax=1)
            else:
                pts = dm.denormalize(x[: config.eval.n_plot])  # type: ignore[attr-defined]
                ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=0.3, alpha=0.5, lw=0)
                ax.set_xlim(-2.6, 2.6)
                ax.set_ylim(-2.6, 2.6)
                ax.set_aspect("equal")
            if metrics is not None:
                key = "fid" if config.is_digits else "sw2"
                ax.set_title(f"{solver} (NFE {int(metrics['nfe'])})\n{key} {metrics[key]:.3g}", fontsize=7)
            else:
                ax.set_title("data (train)" if config.is_digits else "data (test)", fontsize=7)
            if j == 0:
                ax.set_ylabel(row.label, fontsize=9)
    fig.suptitle(f"{config.data_name}: samples per solver ({config.train.max_steps} training steps)", fontsize=10)
    fig.tight_layout()
    path = out / "samples.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _save_schedules_figure(config: CompareConfig, rows: list[PathResult], paths: dict[str, GaussianPath],
                           lam: SeparationFunction, ko_lam: SeparationFunction | None, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_a, ax_s) = plt.subplots(1, 3, figsize=(14, 4))
    theta = torch.linspace(1e-3, math.pi / 2 - 1e-3, 400, dtype=torch.float64)
    ax_l.plot(theta, lam.at_theta(theta).cpu(), label="lambda of the training data (KE column)")
    if ko_lam is not None:
        ax_l.plot(theta, ko_lam.at_theta(theta).cpu(), "--", label="lambda of the KO callback (last refresh)")
    ax_l.plot(theta, torch.sin(theta) ** 2, ":", color="0.5", label="Gaussian data: s^2 / (1 + s^2)")
    ax_l.set_xlabel("theta = atan(SNR)")
    ax_l.set_ylabel("lambda")
    ax_l.legend(fontsize=7)
    ax_l.set_title("data separation function")
    for row in rows:
        path = paths[row.name]
        t = torch.linspace(0.0, 1.0 - row.t_eps, 401)
        device = next(iter(path.buffers()), torch.empty(0)).device
        c = path(t.to(device))
        label = row.label + (" (final)" if row.name == "ko" else "")
        ax_a.plot(t, c.alpha.cpu(), label=label)
        ax_s.plot(t, c.sigma.cpu(), label=label)
    for ax, name in ((ax_a, "alpha_t"), (ax_s, "sigma_t")):
        ax.set_xlabel("t (0 noise, 1 data)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path_png = out / "schedules.png"
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    return path_png


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ================================================================================================== the run
def run_comparison(config: CompareConfig, verbose: bool = True) -> ComparisonResult:
    """Train and evaluate every path of ``config``; write ``results.md``, ``results.json``, ``samples.png`` and
    ``schedules.png`` into ``config.out_dir()``.

    Args:
        config: a validated config (:func:`load_config`).
        verbose: print progress (per stage, with elapsed time) and the final tables.

    Returns:
        A :class:`ComparisonResult`.
    """
    log = _Log(verbose)
    total_start = time.perf_counter()
    out = config.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        # Small networks on a shared CPU: one thread avoids thread hand-offs that cost more than the arithmetic.
        torch.set_num_threads(config.threads)
    try:
        dm = build_datamodule(config)
        data_shape = tuple(dm.data_shape)  # type: ignore[attr-defined]
        log(f"data {config.data_name}: shape {data_shape}, train {dm.train_tensor().shape[0]}, "  # type: ignore
            f"test {dm.test_tensor().shape[0]}")  # type: ignore[attr-defined]

        start = time.perf_counter()
        lam_data = dm.train_tensor()[: config.eval.n_lambda_data]  # type: ignore[attr-defined]
        lam = estimate_separation_from_data(
            lam_data, theta=default_theta_grid(config.eval.n_theta), n_queries=config.eval.n_lambda_queries,
            generator=torch.Generator().manual_seed(config.seed + 11), smoothing=config.eval.lambda_smoothing,
        )
        log(f"lambda of {lam_data.shape[0]} training points estimated ({time.perf_counter() - start:.1f}s)")

        rows: list[PathResult] = []
        all_samples: dict[str, dict[str, Tensor]] = {}
        final_paths: dict[str, GaussianPath] = {}
        ko_lam: SeparationFunction | None = None
        weighting = str(config.loss_weighting)
        for name in config.paths:
            log(f"{name}: training {config.train.max_steps} steps (t_eps {config.t_eps_of(name):g})")
            model = build_model(config, name, data_shape)
            weighting = str(getattr(model, "loss_weighting", weighting))
            callbacks: list[L.Callback] = []
            ko_callback = None
            if name == "ko":
                ko_callback = KOScheduleCallback(**config.ko_settings())
                callbacks.append(ko_callback)
            trainer = L.Trainer(
                max_steps=config.train.max_steps, accelerator=config.train.accelerator, devices=1, logger=False,
                enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                num_sanity_val_steps=0, enable_progress_bar=config.train.progress_bar,
                log_every_n_steps=config.train.log_every_n_steps, default_root_dir=str(out / "lightning" / name),
                callbacks=callbacks,
            )
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*does not have many workers.*")
                trainer.fit(model, datamodule=dm)
            train_seconds = time.perf_counter() - start
            start = time.perf_counter()
            row, samples = evaluate_path(config, name, model, dm, lam, log)
            row.train_seconds = train_seconds
            row.steps_per_second = trainer.global_step / train_seconds
            row.eval_seconds = time.perf_counter() - start
            if ko_callback is not None:
                row.ko = _ko_numbers(ko_callback)
                ko_lam = ko_callback.separation
            rows.append(row)
            all_samples[name] = samples
            final_paths[name] = model.path
            log(f"{name}: done (train {row.train_seconds:.1f}s, eval {row.eval_seconds:.1f}s)")

        total_seconds = time.perf_counter() - total_start
        files = {
            "samples.png": _save_samples_figure(config, dm, rows, all_samples, out),
            "schedules.png": _save_schedules_figure(config, rows, final_paths, lam, ko_lam, out),
        }
        tables = results_tables(config, rows)
        hardware = _hardware(config)
        ko_rows = [r for r in rows if r.ko is not None]
        ko_line = ""
        if ko_rows and ko_rows[0].ko is not None:
            k = ko_rows[0].ko
            ko_line = (f"\nKO callback: {int(k['installed'])} of {int(k['refreshes'])} refreshes installed; final "
                       f"Phi {_fmt(k['phi'])}, KE_min {_fmt(k['ke_min'])} (under the callback's lambda), gamma floor "
                       f"{_fmt(k['gamma_floor'])}, {k['refresh_seconds']:.1f}s in refreshes.\n")
        markdown = "\n".join([
            f"# Path comparison on {config.data_name}",
            "",
            "## Results",
            "",
            tables,
            ko_line,
            f"Total wall time: {total_seconds:.1f}s "
            f"({sum(r.train_seconds for r in rows):.1f}s training, {sum(r.eval_seconds for r in rows):.1f}s "
            "evaluation).",
            "",
            "## Settings and definitions",
            "",
            *[f"- {n}" for n in _notes(config, rows, lam_data.shape[0], weighting)],
            f"- Network: {config.net}; data: {config.data}.",
            "",
            "## Hardware",
            "",
            *[f"- {k}: {v}" for k, v in hardware.items()],
            "",
            "Pictures: samples.png (samples per solver for each path), schedules.png (lambda(theta), alpha_t and "
            "sigma_t of every path incl. the final KO one).",
            "",
        ])
        files["results.md"] = out / "results.md"
        files["results.md"].write_text(markdown)
        payload = {
            "data": config.data_name, "rows": [dataclasses.asdict(r) for r in rows], "config": config.to_dict(),
            "hardware": hardware, "total_seconds": total_seconds, "lambda_points": int(lam_data.shape[0]),
        }
        files["results.json"] = out / "results.json"
        files["results.json"].write_text(json.dumps(_json_safe(payload), indent=1))
        if verbose:
            print(tables, flush=True)
            log(f"wrote {', '.join(str(p) for p in files.values())}")
        return ComparisonResult(rows, out, markdown, tables, total_seconds, files)
    finally:
        torch.set_num_threads(previous_threads)
