"""Path comparison: train one network on several Gaussian paths with the same budget and seed, then evaluate.

A table in the spirit of the paper's Table 1 (docs/math.md §6). For every row (Cond-OT, Cond-OT sampled on the angle
grid, Cond-OT trained with logit-normal times, KO with the package defaults, KO in the paper's setting, cosine, VP)
the same network is built from the same seed (identical initial weights), trained for the same number of steps on
the same data with the same noise and times per step (the logit-normal row: its own times), and evaluated on
held-out NLL in bits/dim, kinetic energy (the model's own and its path's under the data's lambda) and sample quality
per solver (Euler at a few step counts and dopri5).

Run it from the repository root::

    python -m recipes.compare_paths --config recipes/compare_paths.yaml
    python -m recipes.compare_paths --config recipes/compare_paths_digits.yaml --train.max_steps 2000
    python -m recipes.compare_paths --paths '[cond_ot, cond_ot_logit_normal, ko]'   # rows of PATH_NAMES

It writes ``results.md`` (tables, settings, hardware, wall times), ``results.json``, ``samples.png`` and
``schedules.png`` into the run directory (default ``runs/compare_paths/<data>``). Runs of several seeds are averaged
by ``python -m recipes.compare_paths.aggregate <results.json ...>`` (:mod:`~recipes.compare_paths.aggregate`).

Modules, one job each:

- :mod:`~recipes.compare_paths.config`: the settings (dataclasses read by jsonargparse) and their checks;
- :mod:`~recipes.compare_paths.build`: data module, network, path and model of one row;
- :mod:`~recipes.compare_paths.evaluate`: NLL, kinetic energy and sample quality of a trained row;
- :mod:`~recipes.compare_paths.report`: tables, notes, hardware and JSON; :mod:`~recipes.compare_paths.figures`:
  the pictures;
- :mod:`~recipes.compare_paths.run`: the whole comparison; :mod:`~recipes.compare_paths.cli`: the command line.

Example:
    >>> config = load_config("recipes/compare_paths.yaml", {"train.max_steps": 100})  # doctest: +SKIP
    >>> result = run_comparison(config)  # doctest: +SKIP
    >>> print(result.markdown)  # doctest: +SKIP
"""

from recipes.compare_paths.cli import main
from recipes.compare_paths.config import (
    KO_DEFAULTS,
    PATH_LABELS,
    PATH_NAMES,
    CompareConfig,
    ConfigError,
    EvalSettings,
    TimeMargins,
    TrainSettings,
    config_from_dict,
    load_config,
)
from recipes.compare_paths.evaluate import PathResult, evaluate_path
from recipes.compare_paths.run import ComparisonResult, run_comparison

__all__ = [
    "KO_DEFAULTS",
    "PATH_LABELS",
    "PATH_NAMES",
    "CompareConfig",
    "ComparisonResult",
    "ConfigError",
    "EvalSettings",
    "PathResult",
    "TimeMargins",
    "TrainSettings",
    "config_from_dict",
    "evaluate_path",
    "load_config",
    "main",
    "run_comparison",
]
