"""The command line of the comparison: ``python -m recipes.compare_paths --config recipes/compare_paths.yaml``.

Every config key is also an option, read after the file (``--train.max_steps 500``, ``--paths '[cond_ot, ko]'``,
``--eval.n_nll null``); ``--print_config`` prints the resulting config and ``--help`` lists every key.
"""

from __future__ import annotations

import sys

from recipes.compare_paths.config import DEFAULT_CONFIG, ConfigError, build_parser, config_from_namespace
from recipes.compare_paths.run import run_comparison

__all__ = ["main"]


def _with_default_config(argv: list[str]) -> list[str]:
    """Put the checkerboard config first when none is named, so the options after it override it."""
    if any(a in ("--config", "-h", "--help") or a.startswith("--config=") for a in argv):
        return argv
    return ["--config", str(DEFAULT_CONFIG), *argv]


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the comparison, return the exit status (a bad config exits with status 2).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    parser = build_parser()
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    namespace = parser.parse_args(_with_default_config(list(sys.argv[1:] if argv is None else argv)))
    try:
        config = config_from_namespace(namespace)
    except ConfigError as err:
        parser.error(str(err))
    run_comparison(config, verbose=not namespace.quiet)
    return 0
