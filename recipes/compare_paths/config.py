"""The settings of a path comparison: dataclasses read by jsonargparse from YAML and the command line.

A config is a YAML file with the sections of :class:`CompareConfig` (see ``recipes/compare_paths.yaml``). jsonargparse
reads it against the dataclasses' type hints, so an unknown key or a value of the wrong type is an error that names
the key. The free-form sections ``data``, ``net`` and ``ko`` are checked the same way against the signature of the
class they configure (:class:`~ko_lightning.data.Toy2DDataModule` or :class:`~ko_lightning.data.DigitsDataModule`,
:class:`~ko_lightning.nets.TimeMLP` or :class:`~ko_lightning.nets.UNet`,
:class:`~ko_lightning.callbacks.KOScheduleCallback`). Ranges and combinations are checked in ``__post_init__``.

Example:
    >>> config = load_config("recipes/compare_paths.yaml", {"train.max_steps": 100})  # doctest: +SKIP
    >>> config.train.max_steps, config.t_eps_of("vp")  # doctest: +SKIP
    (100, 0.001)
"""

from __future__ import annotations

import dataclasses
import json
from argparse import ArgumentError
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from ko_lightning.callbacks import KOScheduleCallback
from ko_lightning.data import TOY2D_SAMPLERS, DigitsDataModule, Toy2DDataModule
from ko_lightning.nets import TimeMLP, UNet
from ko_lightning.sampling import SolverSpec
from ko_lightning.time_samplers import make_time_sampler

__all__ = [
    "KO_DEFAULTS",
    "KO_PAPER_SETTINGS",
    "PATH_GRIDS",
    "PATH_TIME_SAMPLERS",
    "PATH_LABELS",
    "PATH_NAMES",
    "CompareConfig",
    "ConfigError",
    "EvalSettings",
    "PathName",
    "TimeMargins",
    "TrainSettings",
    "build_parser",
    "config_from_dict",
    "config_from_namespace",
    "load_config",
]

PathName = Literal["cond_ot", "cond_ot_angle", "cond_ot_logit_normal", "ko", "ko_paper", "cosine", "vp"]
PATH_NAMES: tuple[PathName, ...] = (
    "cond_ot",
    "cond_ot_angle",
    "cond_ot_logit_normal",
    "ko",
    "ko_paper",
    "cosine",
    "vp",
)
"""Rows the comparison knows, in table order. ``cond_ot_angle`` is the ``cond_ot`` model (trained once) sampled on
the angle grid; ``cond_ot_logit_normal`` is Cond-OT (velocity) trained with logit-normal times
(``FlowMatching(time_sampler="logit_normal")``, ``t = sigmoid(z)``, ``z ~ N(0, 1)``), sampled like ``cond_ot``
(Euler uniform in t): it moves the training signal to intermediate noise levels instead of changing the path;
``ko`` is ``KOScheduleCallback()`` with the package defaults (sampled on the KO path's default grid, the angle
grid); ``ko_paper`` is the paper's setting: KO solved once from the data, floor 0.01, Euler uniform in t."""

PATH_LABELS: dict[str, str] = {
    "cond_ot": "Cond-OT",
    "cond_ot_angle": "Cond-OT, angle grid",
    "cond_ot_logit_normal": "Cond-OT, logit-normal t",
    "ko": "KO (package defaults)",
    "ko_paper": "KO (paper: once, floor 0.01)",
    "cosine": "cosine (trig.)",
    "vp": "VP (DDPM)",
}

#: the fixed-step grid each row samples on (None: the path's own default, docs/math.md §5.3).
PATH_GRIDS: dict[str, str | None] = {"cond_ot_angle": "angle", "ko_paper": "time"}

#: the density of training times of each row (``FlowMatching(time_sampler=...)``; the others: ``"uniform"``).
#: ``ko`` keeps the package default (``"auto"``: importance-sampled times on the KO path, docs/math.md §1.4); the
#: paper's setting drew uniform times.
PATH_TIME_SAMPLERS: dict[str, str] = {"cond_ot_logit_normal": "logit_normal", "ko": "auto"}

# The KO row's callback settings: the package defaults (no plot); a config's ``ko`` section is merged into these,
# so a partial section changes only what it names.
KO_DEFAULTS: dict[str, Any] = {"plot": False}

#: the ``ko_paper`` row: lambda from the data once before step 1 (no refresh after), floor 0.01, 1024 queries.
KO_PAPER_SETTINGS: dict[str, Any] = {
    "estimator": "data",
    "init_from_data": True,
    "every_n_steps": 10**9,
    "warmup_steps": 10**9,
    "n_queries": 1024,
    "max_data": 8192,
    "gamma_floor": 0.01,
    "plot": False,
}

# Arguments of the data modules that the comparison sets itself (from ``train`` and ``seed``, and the net kind).
_DATA_SET_BY_COMPARISON = {"batch_size", "seed", "flatten"}
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "compare_paths.yaml"
"""The config used when the command line names none: the checkerboard comparison."""


class ConfigError(ValueError):
    """A bad comparison config; the message names the offending key."""


def _reject_null(settings: Any, section: str) -> None:
    """Raise on a None in a field whose type does not allow it.

    jsonargparse lets ``key: null`` in a config file through for any type, so a required number could arrive as None.
    """
    for name, hint in get_type_hints(type(settings)).items():
        if getattr(settings, name) is None and type(None) not in get_args(hint):
            raise ConfigError(f"config key '{section}{name}' must not be null")


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
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    accelerator: str = "cpu"
    dequantize: bool = False
    progress_bar: bool = True
    log_every_n_steps: int = 50

    def __post_init__(self) -> None:
        _reject_null(self, "train.")
        for name in ("max_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'train.{name}' must be >= 1, got {getattr(self, name)!r}")


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
    n_nll: int | None = 2000
    nll_batch_size: int = 1000
    divergence: Literal["auto", "exact", "hutchinson"] = "auto"
    n_ke: int = 1000
    n_lambda_data: int = 8192
    n_lambda_queries: int = 1024
    n_theta: int = 64
    lambda_smoothing: float = 1.0
    sw_projections: int = 256
    mmd_bandwidths: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.5])
    n_mmd: int = 2000
    kid_subset_size: int = 500
    fid_cache_dir: str | None = None
    fid_reference_name: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    n_plot: int = 2000

    def __post_init__(self) -> None:
        _reject_null(self, "eval.")
        for name in (
            "n_samples",
            "n_ke",
            "n_lambda_data",
            "n_lambda_queries",
            "n_mmd",
            "kid_subset_size",
            "nll_batch_size",
            "sw_projections",
            "n_plot",
        ):
            if getattr(self, name) < 2:
                raise ConfigError(f"config key 'eval.{name}' must be >= 2, got {getattr(self, name)!r}")
        if self.n_nll is not None and self.n_nll < 1:
            raise ConfigError(f"config key 'eval.n_nll' must be >= 1 or null, got {self.n_nll!r}")
        if not self.euler_steps or any(s < 1 for s in self.euler_steps):
            raise ConfigError(f"config key 'eval.euler_steps' must list integers >= 1, got {self.euler_steps!r}")

    def solver_names(self) -> list[str]:
        """The solver settings of the sample tables: ``"euler 2"``, ..., ``"dopri5"``."""
        return [f"euler {s}" for s in self.euler_steps] + ["dopri5"]

    def solver_spec(self, name: str) -> SolverSpec:
        """The :class:`SolverSpec` of one of :meth:`solver_names`."""
        if name == "dopri5":
            return SolverSpec("dopri5", atol=self.atol, rtol=self.rtol)
        return SolverSpec("euler", steps=int(name.split()[1]))


@dataclass
class TimeMargins:
    """``t_eps`` per path: training times ``t ~ U[t_eps, 1 - t_eps]``; evaluation on ``[0, 1 - t_eps]``.

    VP's ``sigma'_t`` diverges at t = 1, so it needs ``t_eps > 0``; the others train on ``[0, 1]``.
    """

    cond_ot: float = 0.0
    cond_ot_angle: float = 0.0
    cond_ot_logit_normal: float = 0.0
    ko: float = 0.0
    ko_paper: float = 0.0
    cosine: float = 0.0
    vp: float = 1e-3

    def __post_init__(self) -> None:
        _reject_null(self, "t_eps.")
        for name, value in dataclasses.asdict(self).items():
            if not 0.0 <= value < 0.5:
                raise ConfigError(f"config key 't_eps.{name}' must lie in [0, 0.5), got {value!r}")


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
        parametrization: what the network predicts (default ``"velocity"``, the package default).
        loss_weighting: ``FlowMatching``'s ``loss_weighting`` (``"velocity"`` or ``"output"``; None: the module's
            default, ``"output"`` for ``polar_v``).
        t_eps: :class:`TimeMargins`, ``t_eps`` per path.
        seed: seed of the data, the initial weights, the training noise and the evaluation noise.
        out: run directory (None: ``runs/compare_paths/<data name>``).
        threads: torch intra-op threads during the run (None: leave torch's setting).
        train: :class:`TrainSettings`.
        ko: :class:`KOScheduleCallback` arguments of the KO row, merged into :data:`KO_DEFAULTS`.
        time_samplers: ``FlowMatching(time_sampler=...)`` per row, merged into :data:`PATH_TIME_SAMPLERS`
            (e.g. ``{"ko": "speed(0.25)"}``).
        eval: :class:`EvalSettings`.

    Raises:
        ConfigError: in ``__post_init__``, naming the bad key of ``data``, ``net``, ``ko``, ``paths`` or ``threads``.
    """

    data: dict[str, Any] = field(
        default_factory=lambda: {"name": "checkerboard", "n_train": 200_000, "n_val": 1000, "n_test": 10_000}
    )
    net: dict[str, Any] = field(default_factory=lambda: {"kind": "mlp", "hidden": 256, "depth": 4, "time_scale": 1.0})
    paths: list[PathName] = field(default_factory=lambda: list(PATH_NAMES))
    parametrization: Literal["velocity", "x1", "eps", "polar_v"] = "velocity"
    loss_weighting: Literal["velocity", "output"] | None = None
    t_eps: TimeMargins = field(default_factory=TimeMargins)
    seed: int = 0
    out: str | None = None
    threads: int | None = None
    train: TrainSettings = field(default_factory=TrainSettings)
    ko: dict[str, Any] = field(default_factory=dict)
    time_samplers: dict[str, str] = field(default_factory=dict)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        _reject_null(self, "")
        self.data = _checked_data(self.data)
        self.net = _checked_net(self.net)
        self.ko = _checked_section("ko", KOScheduleCallback, self.ko)
        if self.net["kind"] == "unet" and not self.is_digits:
            raise ConfigError("config key 'net.kind': 'unet' needs image data (data.name 'digits')")
        if self.train.dequantize and not self.is_digits:
            raise ConfigError("config key 'train.dequantize' applies to integer data (data.name 'digits') only")
        if not self.paths:
            raise ConfigError("config key 'paths' must name at least one path")
        for row, spec in self.time_samplers.items():
            if row not in PATH_NAMES:
                raise ConfigError(f"config key 'time_samplers.{row}': not a path, use one of {list(PATH_NAMES)}")
            try:
                make_time_sampler(spec)
            except ValueError as error:
                raise ConfigError(f"config key 'time_samplers.{row}': {error}") from None
        if len(set(self.paths)) != len(self.paths):
            raise ConfigError(f"config key 'paths' lists a path twice: {self.paths}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"config key 'threads' must be >= 1 or null, got {self.threads!r}")

    @property
    def data_name(self) -> str:
        """The data set's name (``"checkerboard"``, ``"digits"``, ...)."""
        return str(self.data["name"])

    @property
    def is_digits(self) -> bool:
        """True for the sklearn digits."""
        return self.data_name == "digits"

    def t_eps_of(self, path: str) -> float:
        """``t_eps`` of one path."""
        return float(getattr(self.t_eps, path))

    def time_sampler_of(self, path: str) -> str:
        """The training-time density of one path's row (``time_samplers``, else :data:`PATH_TIME_SAMPLERS`, else
        ``"uniform"``)."""
        return self.time_samplers.get(path, PATH_TIME_SAMPLERS.get(path, "uniform"))

    def out_dir(self) -> Path:
        """The run directory."""
        return Path(self.out) if self.out is not None else Path("runs") / "compare_paths" / self.data_name

    def ko_settings(self, name: str = "ko") -> dict[str, Any]:
        """Arguments of the :class:`KOScheduleCallback` of row ``name`` (``"ko"`` or ``"ko_paper"``)."""
        return dict(KO_PAPER_SETTINGS) if name == "ko_paper" else {**KO_DEFAULTS, **self.ko}

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for ``results.json``)."""
        return dataclasses.asdict(self)


# ================================================================================================ free-form sections
def _checked_section(
    section: str,
    target: type,
    given: Mapping[str, Any],
    skip: set[str] | None = None,
    passthrough: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Check ``given`` against the signature of ``target`` and return it with parsed values.

    jsonargparse does the checking, so an unknown key or a wrong type is an error naming ``section`` and the key.

    Args:
        section: the config section, for the messages (``"net"``, ...).
        target: the class whose ``__init__`` arguments the section holds.
        given: the section as read.
        skip: arguments of ``target`` that the comparison sets itself (not allowed in the section).
        passthrough: keys of the section that are not arguments of ``target`` (``"kind"``, ``"name"``).
    """
    if not isinstance(given, Mapping):
        raise ConfigError(f"config section {section!r} must be a mapping, got {given!r}")
    arguments = {k: v for k, v in given.items() if k not in passthrough}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(target, section, skip=skip or set(), fail_untyped=False)
    try:
        parsed = parser.parse_object({section: arguments})
    except ArgumentError as err:
        # The command line's usage shows only ``--net NET`` for these sections: name what they accept.
        valid = ", ".join([*passthrough, *parser.get_defaults()[section].keys()])
        raise ConfigError(f"{err} (valid keys of {section!r}: {valid})") from None
    return {**{k: given[k] for k in passthrough if k in given}, **{k: parsed[section][k] for k in arguments}}


def _checked_data(data: Mapping[str, Any]) -> dict[str, Any]:
    names = ["digits", *TOY2D_SAMPLERS]
    name = data.get("name") if isinstance(data, Mapping) else None
    if name not in names:
        raise ConfigError(f"config key 'data.name' must be one of {names}, got {name!r}")
    if name == "digits":
        return _checked_section("data", DigitsDataModule, data, _DATA_SET_BY_COMPARISON, passthrough=("name",))
    return _checked_section("data", Toy2DDataModule, data, _DATA_SET_BY_COMPARISON)


def _checked_net(net: Mapping[str, Any]) -> dict[str, Any]:
    kinds: dict[str, tuple[type, set[str]]] = {"mlp": (TimeMLP, {"dim"}), "unet": (UNet, set())}
    kind = net.get("kind") if isinstance(net, Mapping) else None
    if kind not in kinds:
        raise ConfigError(f"config key 'net.kind' must be one of {sorted(kinds)}, got {kind!r}")
    target, skip = kinds[kind]
    return _checked_section("net", target, net, skip, passthrough=("kind",))


# ================================================================================================ parsing
def build_parser(exit_on_error: bool = True) -> ArgumentParser:
    """The parser of a comparison config: ``--config FILE`` and one option per key (``--train.max_steps 500``).

    Args:
        exit_on_error: print the usage and exit on a bad argument (the command line); False raises
            ``argparse.ArgumentError`` instead.
    """
    parser = ArgumentParser(
        prog="python -m recipes.compare_paths",
        exit_on_error=exit_on_error,
        description="Compare Gaussian paths (Cond-OT, KO, cosine, VP) with the same network, budget and seed.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config, e.g. recipes/compare_paths.yaml")
    parser.add_class_arguments(CompareConfig, as_group=False)
    return parser


def config_from_namespace(namespace: Namespace) -> CompareConfig:
    """Build the dataclasses from a parsed namespace (extra keys such as ``config`` are ignored).

    Raises:
        ConfigError: from the dataclasses' checks.
    """
    values = namespace.as_dict()
    sections = {"train": TrainSettings, "eval": EvalSettings, "t_eps": TimeMargins}
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(CompareConfig):
        value = values[f.name]
        if f.name in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"config section {f.name!r} must be a mapping, got {value!r}")
            value = sections[f.name](**value)
        kwargs[f.name] = value
    return CompareConfig(**kwargs)


def config_from_dict(raw: Mapping[str, Any]) -> CompareConfig:
    """Validate a config mapping (as read from YAML) and build a :class:`CompareConfig`.

    Sections ``train``, ``eval`` and ``t_eps`` are merged key by key into their defaults, ``ko`` into
    :data:`KO_DEFAULTS`; ``data`` and ``net``, when given, replace the defaults.

    Raises:
        ConfigError: naming an unknown key, a value of the wrong type or out of range, an unknown path, data set or
            network kind.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(raw).__name__}")
    # jsonargparse checks the keys that hold values: an unknown section left empty would pass unnoticed.
    top = [f.name for f in dataclasses.fields(CompareConfig)]
    unknown = [k for k in raw if k not in top]
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(top)}")
    try:
        namespace = build_parser(exit_on_error=False).parse_object(dict(raw))
    except ArgumentError as err:
        raise ConfigError(str(err)) from None
    return config_from_namespace(namespace)


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> CompareConfig:
    """Read a YAML config (or start from the defaults), apply dotted overrides, validate.

    Args:
        path: YAML file; None starts from the defaults of :class:`CompareConfig`.
        overrides: ``{"train.max_steps": 100, "paths": ["cond_ot", "ko"], ...}``, applied after the file as the
            command line's ``--train.max_steps 100 --paths '["cond_ot", "ko"]'`` would be.

    Raises:
        ConfigError: see :func:`config_from_dict`.
        FileNotFoundError: when ``path`` does not exist.
    """
    args: list[str] = []
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        args += ["--config", str(path)]
    for key, value in (overrides or {}).items():
        # jsonargparse reads an option's value as YAML, and JSON is YAML.
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    try:
        namespace = build_parser(exit_on_error=False).parse_args(args)
    except ArgumentError as err:
        raise ConfigError(str(err)) from None
    return config_from_namespace(namespace)
