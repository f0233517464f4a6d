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


@pytest.fixture(scope="module")
def lam_two_point() -> SeparationFunction:
    """The separation function of two-point data {+u, -u} with ||u||^2 = 4 (see kinetic_helpers)."""
    return two_point_separation(4)
