"""The randomness of one training step, derived from ``(run seed, step, rank)`` so that a resumed run redraws it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ko_lightning.seeding import derive_seed

__all__ = ["draw_run_seed", "step_randomness"]


def draw_run_seed() -> int:
    """``PL_GLOBAL_SEED`` (``seed_everything``) if set, else a draw from the global RNG, in ``[0, 2**31)``."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) % 2**31 if seed is not None else int(torch.randint(2**31, (1,)))


@contextmanager
def step_randomness(run_seed: int, step: int, rank: int, device: torch.device) -> Iterator[torch.Generator]:
    """A generator for step ``step`` on rank ``rank``, and the global RNG seeded for it, restored on exit.

    Everything random in the step comes from ``s = derive_seed(run_seed, step, rank)``: the noise and times through
    the yielded generator (seeded with ``s``, on ``device``), the network's own randomness (dropout) through the
    global RNG, seeded with ``derive_seed(s, 1)`` inside a ``fork_rng`` (CPU, and ``device`` if it is a GPU) that
    restores the previous state afterwards. A resumed run therefore draws exactly what the uninterrupted one drew,
    and the caller's global random stream is left untouched.

    Example:
        >>> with step_randomness(0, 3, 0, torch.device("cpu")) as generator:
        ...     t = torch.rand(2, generator=generator)
    """
    step_seed = derive_seed(run_seed, step, rank)
    generator = torch.Generator(device=device).manual_seed(step_seed)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.manual_seed(derive_seed(step_seed, 1))
        yield generator
