"""Compare Gaussian paths (Cond-OT, KO, cosine, VP) with the same network, budget and seed.

Usage::

    python recipes/compare_paths.py --config recipes/compare_paths.yaml
    python recipes/compare_paths.py --config recipes/compare_paths_digits.yaml --max-steps 500
    python recipes/compare_paths.py --paths cond_ot ko --out runs/quick --set eval.n_samples=1000

Writes results.md, results.json, samples.png and schedules.png into the run directory (default
runs/compare_paths/<data>/) and prints the tables. The logic lives in :mod:`ko_lightning.comparison`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ko_lightning.comparison import PATH_NAMES, ConfigError, load_config, run_comparison


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``key.sub=value`` pairs; values are read as YAML (numbers, lists, true/false, null)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the comparison, return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/compare_paths.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, help="training steps per path (train.max_steps)")
    parser.add_argument("--out", help="run directory (default: runs/compare_paths/<data>)")
    parser.add_argument("--paths", nargs="+", metavar="PATH", help=f"paths to compare, from {', '.join(PATH_NAMES)}")
    parser.add_argument("--seed", type=int, help="seed of data, weights, training and evaluation noise")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="other config overrides, e.g. eval.n_samples=1000 train.lr=1e-3")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        overrides = _parse_set(args.set)
        if args.max_steps is not None:
            overrides["train.max_steps"] = args.max_steps
        if args.out is not None:
            overrides["out"] = args.out
        if args.paths is not None:
            overrides["paths"] = args.paths
        if args.seed is not None:
            overrides["seed"] = args.seed
        config = load_config(args.config, overrides)
    except ConfigError as err:
        parser.error(str(err))
    run_comparison(config, verbose=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
