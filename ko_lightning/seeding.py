"""Seeds derived from a base seed and integer keys: the one way ko_lightning mixes seeds."""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed from a base ``seed`` and integer ``keys`` (e.g. a step and a rank).

    Deterministic across processes and Python versions (it does not use ``hash``); the base seed enters modulo
    ``2**32`` and each key must be a non-negative integer.

    Example:
        >>> derive_seed(0, 1) != derive_seed(0, 2) != derive_seed(1, 1)
        True
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(k) for k in keys)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))
