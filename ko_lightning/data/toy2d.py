"""Two-dimensional toy distributions and their Lightning data module.

The samplers return raw (un-normalized) points; :class:`Toy2DDataModule` draws fixed train/val/test sets from them
and normalizes them as in docs/math.md §2 (mean 0, per-dimension second moment 1).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import Tensor

from ko_lightning.data.base import NormalizedSplitDataModule, derive_seed, moment_normalization

__all__ = [
    "TOY2D_SAMPLERS",
    "Toy2DDataModule",
    "on_checkerboard",
    "sample_checkerboard",
    "sample_eight_gaussians",
    "sample_mixture12",
    "sample_moons",
    "sample_rings",
    "sample_spiral",
]


def _check_n(n: int) -> int:
    try:
        value = operator.index(n)  # accepts Python and NumPy integers, rejects floats
    except TypeError:
        value = -1
    if isinstance(n, bool) or value < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return value


def _check_nonnegative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def sample_checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform samples on the 8 black squares of a 4 x 4 checkerboard covering ``[-2, 2]^2``.

    The unit cells are ``[i, i+1) x [j, j+1)`` for ``i, j in {-2, -1, 0, 1}``; a cell is black when ``i + j`` is
    even, so a point ``(x, y)`` lies on the board iff ``floor(x) + floor(y)`` is even (see :func:`on_checkerboard`).

    Args:
        n: number of samples.
        generator: optional ``torch.Generator`` for reproducibility.

    Returns:
        Tensor of shape ``(n, 2)``, float32.

    Example:
        >>> x = sample_checkerboard(1000, torch.Generator().manual_seed(0))
        >>> bool(on_checkerboard(x).all())
        True
    """
    n = _check_n(n)
    corners = torch.tensor(
        [(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0], dtype=torch.float32
    )  # (8, 2) lower-left corners of the black cells
    cell = torch.randint(0, corners.shape[0], (n,), generator=generator)
    return corners[cell] + torch.rand(n, 2, generator=generator)


def on_checkerboard(x: Tensor) -> Tensor:
    """Boolean mask of the points of ``x`` (shape ``(N, 2)``, raw coordinates) on the black squares of
    :func:`sample_checkerboard`: inside ``[-2, 2)^2`` with ``floor(x) + floor(y)`` even."""
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (N, 2), got {tuple(x.shape)}")
    cells = torch.floor(x)
    inside = ((x >= -2) & (x < 2)).all(dim=1)
    even = torch.remainder(cells.sum(dim=1), 2) == 0
    return inside & even


def sample_eight_gaussians(
    n: int, generator: torch.Generator | None = None, radius: float = 2.0, std: float = 0.2
) -> Tensor:
    """A mixture of 8 equally weighted isotropic Gaussians centred on a circle.

    Centres ``radius * (cos(2 pi k / 8), sin(2 pi k / 8))`` for ``k = 0..7``, standard deviation ``std``.

    Args:
        n: number of samples.
        generator: optional ``torch.Generator``.
        radius: radius of the circle of centres.
        std: standard deviation of each component.

    Returns:
        Tensor of shape ``(n, 2)``, float32.

    Example:
        >>> sample_eight_gaussians(5, torch.Generator().manual_seed(0)).shape
        torch.Size([5, 2])
    """
    n = _check_n(n)
    _check_nonnegative("std", std)
    k = torch.randint(0, 8, (n,), generator=generator).float()
    angle = 2 * math.pi * k / 8
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centres + std * torch.randn(n, 2, generator=generator)


def sample_moons(n: int, generator: torch.Generator | None = None, noise: float = 0.1) -> Tensor:
    """Two interleaving half circles ("moons"), each drawn with probability 1/2, plus Gaussian noise.

    Upper moon ``(cos a, sin a)``, lower moon ``(1 - cos a, 1/2 - sin a)``, with ``a ~ U[0, pi]``; then
    ``noise * N(0, I)`` is added.

    Args:
        n: number of samples.
        generator: optional ``torch.Generator``.
        noise: standard deviation of the added Gaussian noise.

    Returns:
        Tensor of shape ``(n, 2)``, float32.

    Example:
        >>> sample_moons(5, torch.Generator().manual_seed(0)).shape
        torch.Size([5, 2])
    """
    n = _check_n(n)
    _check_nonnegative("noise", noise)
    lower = torch.randint(0, 2, (n,), generator=generator).bool()
    a = math.pi * torch.rand(n, generator=generator)
    upper_pts = torch.stack([torch.cos(a), torch.sin(a)], dim=1)
    lower_pts = torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], dim=1)
    x = torch.where(lower[:, None], lower_pts, upper_pts)
    return x + noise * torch.randn(n, 2, generator=generator)


def sample_rings(n: int, generator: torch.Generator | None = None, noise: float = 0.01) -> Tensor:
    """Three concentric circles of radii 0.4, 0.7 and 1.0, each drawn with probability 1/3, plus Gaussian noise.

    Thin curved structure whose covariance is isotropic: normalized, its low-SNR posterior is close to the
    Gaussian one, the case where variance-preserving paths learn slowly (docs/math.md §4.7).

    Args:
        n: number of samples.
        generator: optional ``torch.Generator``.
        noise: standard deviation of the added Gaussian noise.

    Returns:
        Tensor of shape ``(n, 2)``, float32.

    Example:
        >>> sample_rings(5, torch.Generator().manual_seed(0)).shape
        torch.Size([5, 2])
    """
    n = _check_n(n)
    _check_nonnegative("noise", noise)
    radius = 0.4 + 0.3 * torch.randint(0, 3, (n,), generator=generator).float()
    a = 2 * math.pi * torch.rand(n, generator=generator)
    points = radius[:, None] * torch.stack([torch.cos(a), torch.sin(a)], dim=1)
    return points + noise * torch.randn(n, 2, generator=generator)


def sample_spiral(n: int, generator: torch.Generator | None = None, noise: float = 0.01) -> Tensor:
    """A thin Archimedean spiral of 1.5 turns: ``s (cos s, sin s) / (3 pi)`` with ``s = 3 pi sqrt(u)``, ``u ~ U[0, 1]``
    (uniform along the area it sweeps), plus Gaussian noise.

    Args:
        n: number of samples.
        generator: optional ``torch.Generator``.
        noise: standard deviation of the added Gaussian noise.

    Returns:
        Tensor of shape ``(n, 2)``, float32.

    Example:
        >>> sample_spiral(5, torch.Generator().manual_seed(0)).shape
        torch.Size([5, 2])
    """
    n = _check_n(n)
    _check_nonnegative("noise", noise)
    s = 3 * math.pi * torch.rand(n, generator=generator).sqrt()
    points = s[:, None] * torch.stack([torch.cos(s), torch.sin(s)], dim=1) / (3 * math.pi)
    return points + noise * torch.randn(n, 2, generator=generator)


def sample_mixture12(n: int, generator: torch.Generator | None = None, std: float = 0.3) -> Tensor:
    """A 12-dimensional mixture of 10 equally weighted isotropic Gaussians of standard deviation ``std``, whose
    means are fixed draws of ``N(0, 1.5^2 I)`` (from seed 123, the same in every call).

    Args:
        n: number of samples.
        generator: optional ``torch.Generator``.
        std: standard deviation of each component.

    Returns:
        Tensor of shape ``(n, 12)``, float32.

    Example:
        >>> sample_mixture12(5, torch.Generator().manual_seed(0)).shape
        torch.Size([5, 12])
    """
    n = _check_n(n)
    _check_nonnegative("std", std)
    means = 1.5 * torch.randn(10, 12, generator=torch.Generator().manual_seed(123))
    component = torch.randint(0, 10, (n,), generator=generator)
    return means[component] + std * torch.randn(n, 12, generator=generator)


TOY2D_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "checkerboard": sample_checkerboard,
    "eight_gaussians": sample_eight_gaussians,
    "moons": sample_moons,
    "rings": sample_rings,
    "spiral": sample_spiral,
    "mixture12": sample_mixture12,
}
"""The named toy samplers understood by :class:`Toy2DDataModule` (all 2D but ``mixture12``, which is 12-d)."""


class Toy2DDataModule(NormalizedSplitDataModule):
    """Fixed, seeded train/val/test sets from a 2D toy distribution, normalized as in docs/math.md §2.

    The train set defines the normalization ``x_norm = (x - mean) / scale`` with the per-coordinate ``mean`` and
    one global ``scale = sqrt(E||x - mean||^2 / 2)``, so the normalized train set has mean 0 and per-dimension second
    moment 1 (a single scale keeps the geometry, e.g. the squares of the checkerboard stay square). Val and test sets
    are drawn from their own seeds and normalized with the train statistics. Batches are plain tensors of shape
    ``(batch_size, 2)``.

    Args:
        name: one of :data:`TOY2D_SAMPLERS` (``"checkerboard"``, ``"eight_gaussians"``, ``"moons"``, ``"rings"``,
            ``"spiral"``, ``"mixture12"``).
        n_train: number of training points.
        n_val: number of validation points.
        n_test: number of test points.
        batch_size: batch size of all loaders (train drops the last incomplete batch and reshuffles every epoch).
        seed: base seed of the data sets and of the shuffling.
        num_workers: loader worker processes (0 is best for in-memory data).

    Attributes:
        data_shape: ``(2,)`` (``(12,)`` for ``mixture12``).
        mean: per-coordinate mean of the raw train set, shape ``(2,)`` (after :meth:`setup`).
        scale: global scale, a 0-d tensor (after :meth:`setup`).

    Example:
        >>> dm = Toy2DDataModule("checkerboard", n_train=1000, n_val=100, n_test=100, batch_size=100)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader())).shape
        torch.Size([100, 2])
    """

    def __init__(
        self,
        name: str = "checkerboard",
        n_train: int = 100_000,
        n_val: int = 10_000,
        n_test: int = 10_000,
        batch_size: int = 4096,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        if name not in TOY2D_SAMPLERS:
            raise ValueError(f"unknown toy data set name={name!r}; valid names: {sorted(TOY2D_SAMPLERS)}")
        for arg, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if arg == "n_train" else 1):
                raise ValueError(f"{arg} must be a positive int (n_train >= 2), got {value!r}")
        super().__init__(batch_size, seed, num_workers)  # validates batch_size and num_workers
        if batch_size > n_train:
            raise ValueError(
                f"batch_size={batch_size} exceeds n_train={n_train}; the train loader drops the last incomplete batch"
            )
        self.save_hyperparameters(logger=False)
        self.name = name
        self._sampler = TOY2D_SAMPLERS[name]  # LightningDataModule types ``name`` as Optional[str]
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        # (2,) for the 2D sets, (12,) for mixture12: the shape of one draw
        self.data_shape: tuple[int, ...] = tuple(self._sampler(1, torch.Generator().manual_seed(0)).shape[1:])

    # ------------------------------------------------------------------ data
    def _draw(self, n: int, split_id: int) -> Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, split_id))
        return self._sampler(n, generator)

    def setup(self, stage: str | None = None) -> None:
        """Draw and normalize all three sets (once; later calls do nothing)."""
        if self._splits:
            return
        raw_train = self._draw(self.n_train, 0)
        self.mean, self.scale = moment_normalization(raw_train)
        self._splits = {
            "train": self.normalize(raw_train),
            "val": self.normalize(self._draw(self.n_val, 1)),
            "test": self.normalize(self._draw(self.n_test, 2)),
        }
