"""``python -m recipes.compare_paths --config recipes/compare_paths.yaml`` (see :mod:`recipes.compare_paths.cli`)."""

import sys

from recipes.compare_paths.cli import main

if __name__ == "__main__":
    sys.exit(main())
