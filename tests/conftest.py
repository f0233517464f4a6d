"""Fixtures shared by several test modules (the kinetic tests in particular)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kinetic_helpers import two_point_separation
from ko_lightning.kinetic import SeparationFunction


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test on one intra-op thread and restore the setting after.

    Not autouse: a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``. The test machine's
    two cores are shared; intra-op threads only add contention for the small tensors of these tests.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fake_training(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the digits classifier's training run (1-7 s) by seeded random weights: the cache logic is what the
    cache and security tests check. The returned list records each call's seed."""
    from ko_lightning.metrics import digits_features

    calls: list[int] = []

    def train(seed: int = 0) -> tuple[digits_features.DigitsClassifier, digits_features.DigitsTrainingInfo]:
        calls.append(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + len(calls))
            model = digits_features.DigitsClassifier()
        model.heldout_accuracy = 0.5
        return model.eval(), digits_features.DigitsTrainingInfo(seed, 0.5, 1, 1, 1, 0.0)

    monkeypatch.setattr(digits_features, "train_digits_classifier", train)
    return calls


@pytest.fixture(scope="module")
def lam_two_point() -> SeparationFunction:
    """The separation function of two-point data {+u, -u} with ||u||^2 = 4 (see kinetic_helpers)."""
    return two_point_separation(4)
