"""Two-dimensional toy distributions and their Lightning data module.

The samplers return raw (un-normalized) points; :class:`Toy2DDataModule` draws fixed train/val/test sets from them
and normalizes them as in docs/math.md §2 (mean 0, per-dimension second moment 1).

The sets with a discrete structure also have a labelled sampler, ``sample_<name>_with_labels(n, generator, ...)``
-> ``(x, y)`` (:data:`TOY2D_LABELLED_SAMPLERS`): it draws the same random numbers in the same order as
``sample_<name>``, so ``x`` is the very tensor ``sample_<name>`` returns for an equally seeded generator, and ``y``
(int64, shape ``(n,)``) is the class each point was drawn from: the black square (checkerboard), the mixture
component (eight_gaussians, mixture12), the moon (moons) or the ring (rings). The spiral, one arm, has no class.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import Tensor

from ko_lightning.data.base import NormalizedSplitDataModule, derive_seed, moment_normalization

__all__ = [
    "TOY2D_LABELLED_SAMPLERS",
    "TOY2D_NUM_CLASSES",
    "TOY2D_SAMPLERS",
    "Toy2DDataModule",
    "checkerboard_square",
    "on_checkerboard",
    "sample_checkerboard",
    "sample_checkerboard_with_labels",
    "sample_eight_gaussians",
    "sample_eight_gaussians_with_labels",
    "sample_mixture12",
    "sample_mixture12_with_labels",
    "sample_moons",
    "sample_pinwheel",
    "sample_pinwheel_with_labels",
    "sample_moons_with_labels",
    "sample_rings",
    "sample_rings_with_labels",
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
    return sample_checkerboard_with_labels(n, generator)[0]


def sample_checkerboard_with_labels(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """:func:`sample_checkerboard` and the black square of each point (the same draws: the same points).

    The 8 black squares are numbered by their lower-left corners ``(i, j)`` in lexicographic order, so the square of
    a point is ``2 (i + 2) + (j + 2) // 2`` with ``(i, j) = (floor(x), floor(y))`` (:func:`checkerboard_square`).

    Returns:
        ``(x, y)``: points ``(n, 2)`` float32 and squares ``(n,)`` int64 in ``0..7``.
    """
    n = _check_n(n)
    corners = torch.tensor(
        [(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0], dtype=torch.float32
    )  # (8, 2) lower-left corners of the black cells, in lexicographic order
    cell = torch.randint(0, corners.shape[0], (n,), generator=generator)
    return corners[cell] + torch.rand(n, 2, generator=generator), cell


def checkerboard_square(x: Tensor) -> Tensor:
    """The label of :func:`sample_checkerboard_with_labels` computed from the coordinates of points on the black
    squares (shape ``(N, 2)``, raw coordinates): ``2 (floor(x) + 2) + (floor(y) + 2) // 2``, int64 ``(N,)``.
    Meaningful only where :func:`on_checkerboard` holds."""
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (N, 2), got {tuple(x.shape)}")
    cells = torch.floor(x).long() + 2
    return 2 * cells[:, 0] + torch.div(cells[:, 1], 2, rounding_mode="floor")


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
    return sample_eight_gaussians_with_labels(n, generator, radius, std)[0]


def sample_eight_gaussians_with_labels(
    n: int, generator: torch.Generator | None = None, radius: float = 2.0, std: float = 0.2
) -> tuple[Tensor, Tensor]:
    """:func:`sample_eight_gaussians` and the component ``k`` of each point (the same draws: the same points).

    Returns:
        ``(x, y)``: points ``(n, 2)`` float32 and components ``(n,)`` int64 in ``0..7``, the centre of component
        ``k`` at angle ``2 pi k / 8``.
    """
    n = _check_n(n)
    _check_nonnegative("std", std)
    component = torch.randint(0, 8, (n,), generator=generator)
    angle = 2 * math.pi * component.float() / 8
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centres + std * torch.randn(n, 2, generator=generator), component


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
    return sample_moons_with_labels(n, generator, noise)[0]


def sample_moons_with_labels(
    n: int, generator: torch.Generator | None = None, noise: float = 0.1
) -> tuple[Tensor, Tensor]:
    """:func:`sample_moons` and the moon of each point (the same draws: the same points).

    Returns:
        ``(x, y)``: points ``(n, 2)`` float32 and moons ``(n,)`` int64: 0 for the upper moon, 1 for the lower.
    """
    n = _check_n(n)
    _check_nonnegative("noise", noise)
    moon = torch.randint(0, 2, (n,), generator=generator)
    lower = moon.bool()
    a = math.pi * torch.rand(n, generator=generator)
    upper_pts = torch.stack([torch.cos(a), torch.sin(a)], dim=1)
    lower_pts = torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], dim=1)
    x = torch.where(lower[:, None], lower_pts, upper_pts)
    return x + noise * torch.randn(n, 2, generator=generator), moon


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
    return sample_rings_with_labels(n, generator, noise)[0]


def sample_rings_with_labels(
    n: int, generator: torch.Generator | None = None, noise: float = 0.01
) -> tuple[Tensor, Tensor]:
    """:func:`sample_rings` and the ring of each point (the same draws: the same points).

    Returns:
        ``(x, y)``: points ``(n, 2)`` float32 and rings ``(n,)`` int64 in ``0..2``, ring ``k`` of radius
        ``0.4 + 0.3 k``.
    """
    n = _check_n(n)
    _check_nonnegative("noise", noise)
    ring = torch.randint(0, 3, (n,), generator=generator)
    radius = 0.4 + 0.3 * ring.float()
    a = 2 * math.pi * torch.rand(n, generator=generator)
    points = radius[:, None] * torch.stack([torch.cos(a), torch.sin(a)], dim=1)
    return points + noise * torch.randn(n, 2, generator=generator), ring


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
    return sample_mixture12_with_labels(n, generator, std)[0]


def sample_mixture12_with_labels(
    n: int, generator: torch.Generator | None = None, std: float = 0.3
) -> tuple[Tensor, Tensor]:
    """:func:`sample_mixture12` and the component of each point (the same draws: the same points).

    Returns:
        ``(x, y)``: points ``(n, 12)`` float32 and components ``(n,)`` int64 in ``0..9``.
    """
    n = _check_n(n)
    _check_nonnegative("std", std)
    means = 1.5 * torch.randn(10, 12, generator=torch.Generator().manual_seed(123))
    component = torch.randint(0, 10, (n,), generator=generator)
    return means[component] + std * torch.randn(n, 12, generator=generator), component


def sample_pinwheel(n: int, generator: torch.Generator | None = None, arms: int = 5) -> Tensor:
    """A pinwheel of ``arms`` curved arms: a point ``(rho, tau)`` with radial part ``rho = 1 + 0.3 z_1`` and
    tangential part ``tau = 0.05 z_2`` (``z ~ N(0, I)``) is rotated by ``2 pi k / arms + 0.25 exp(rho)``, ``k`` its
    arm, uniform over the arms; the rotation grows with the radius, so the arms bend and thin out.

    Args:
        n: number of samples.
        generator: optional ``torch.Generator``.
        arms: number of arms (>= 1).

    Returns:
        Tensor of shape ``(n, 2)``, float32.

    Example:
        >>> sample_pinwheel(5, torch.Generator().manual_seed(0)).shape
        torch.Size([5, 2])
    """
    return sample_pinwheel_with_labels(n, generator, arms)[0]


def sample_pinwheel_with_labels(
    n: int, generator: torch.Generator | None = None, arms: int = 5
) -> tuple[Tensor, Tensor]:
    """:func:`sample_pinwheel` and the arm of each point (the same draws: the same points).

    Returns:
        ``(x, y)``: points ``(n, 2)`` float32 and arms ``(n,)`` int64 in ``0..arms - 1``.
    """
    n = _check_n(n)
    if arms < 1:
        raise ValueError(f"arms must be >= 1, got {arms!r}")
    arm = torch.randint(0, arms, (n,), generator=generator)
    z = torch.randn(n, 2, generator=generator)
    rho, tau = 1.0 + 0.3 * z[:, 0], 0.05 * z[:, 1]
    angle = 2 * math.pi * arm.float() / arms + 0.25 * torch.exp(rho)
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([rho * c - tau * s, rho * s + tau * c], dim=1), arm


TOY2D_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "checkerboard": sample_checkerboard,
    "eight_gaussians": sample_eight_gaussians,
    "moons": sample_moons,
    "rings": sample_rings,
    "spiral": sample_spiral,
    "mixture12": sample_mixture12,
    "pinwheel": sample_pinwheel,
}
"""The named toy samplers understood by :class:`Toy2DDataModule` (all 2D but ``mixture12``, which is 12-d)."""

TOY2D_LABELLED_SAMPLERS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "checkerboard": sample_checkerboard_with_labels,
    "eight_gaussians": sample_eight_gaussians_with_labels,
    "moons": sample_moons_with_labels,
    "rings": sample_rings_with_labels,
    "mixture12": sample_mixture12_with_labels,
    "pinwheel": sample_pinwheel_with_labels,
}
"""The toy sets with classes: name -> sampler of ``(x, y)`` drawing the same ``x`` as :data:`TOY2D_SAMPLERS`."""

TOY2D_NUM_CLASSES: dict[str, int] = {
    "checkerboard": 8,
    "eight_gaussians": 8,
    "moons": 2,
    "rings": 3,
    "mixture12": 10,
    "pinwheel": 5,
}
"""The number of classes of each set of :data:`TOY2D_LABELLED_SAMPLERS`."""


class Toy2DDataModule(NormalizedSplitDataModule):
    """Fixed, seeded train/val/test sets from a 2D toy distribution, normalized as in docs/math.md §2.

    The train set defines the normalization ``x_norm = (x - mean) / scale`` with the per-coordinate ``mean`` and
    one global ``scale = sqrt(E||x - mean||^2 / 2)``, so the normalized train set has mean 0 and per-dimension second
    moment 1 (a single scale keeps the geometry, e.g. the squares of the checkerboard stay square). Val and test sets
    are drawn from their own seeds and normalized with the train statistics. Batches are plain tensors of shape
    ``(batch_size, 2)``; with ``labels=True`` they are tuples ``(x, y)``, ``y`` the int64 classes ``(batch_size,)``
    of :data:`TOY2D_LABELLED_SAMPLERS` (the points are the same with and without labels).

    Args:
        name: one of :data:`TOY2D_SAMPLERS` (``"checkerboard"``, ``"eight_gaussians"``, ``"moons"``, ``"rings"``,
            ``"spiral"``, ``"mixture12"``, ``"pinwheel"``).
        n_train: number of training points.
        n_val: number of validation points.
        n_test: number of test points.
        batch_size: batch size of all loaders (train drops the last incomplete batch and reshuffles every epoch).
        seed: base seed of the data sets and of the shuffling.
        num_workers: loader worker processes (0 is best for in-memory data).
        labels: yield ``(x, y)`` batches with the class of each point; :meth:`labels_tensor` gives a split's classes.

    Attributes:
        data_shape: ``(2,)`` (``(12,)`` for ``mixture12``).
        num_classes: :data:`TOY2D_NUM_CLASSES` of the set with ``labels=True``, None without.
        mean: per-coordinate mean of the raw train set, shape ``(2,)`` (after :meth:`setup`).
        scale: global scale, a 0-d tensor (after :meth:`setup`).

    Example:
        >>> dm = Toy2DDataModule("checkerboard", n_train=1000, n_val=100, n_test=100, batch_size=100)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader())).shape
        torch.Size([100, 2])

    Raises:
        ValueError: naming ``name`` for an unknown set, or a set without classes (``spiral``) with ``labels=True``;
            naming ``n_train``/``n_val``/``n_test`` or ``batch_size`` for bad sizes.
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
        labels: bool = False,
    ) -> None:
        if name not in TOY2D_SAMPLERS:
            raise ValueError(f"unknown toy data set name={name!r}; valid names: {sorted(TOY2D_SAMPLERS)}")
        if labels and name not in TOY2D_LABELLED_SAMPLERS:
            raise ValueError(
                f"labels=True, but the toy data set name={name!r} has no classes; the sets with classes are "
                f"{sorted(TOY2D_LABELLED_SAMPLERS)}"
            )
        for arg, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if arg == "n_train" else 1):
                raise ValueError(f"{arg} must be a positive int (n_train >= 2), got {value!r}")
        super().__init__(batch_size, seed, num_workers, labels)  # validates batch_size and num_workers
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
        self._labelled_sampler = TOY2D_LABELLED_SAMPLERS[name] if labels else None
        self.num_classes: int | None = TOY2D_NUM_CLASSES[name] if labels else None

    # ------------------------------------------------------------------ data
    def _draw(self, n: int, split_id: int) -> tuple[Tensor, Tensor | None]:
        """Raw points of a split and, with ``labels=True``, their classes (the same points either way)."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, split_id))
        if self._labelled_sampler is not None:
            return self._labelled_sampler(n, generator)
        return self._sampler(n, generator), None

    def setup(self, stage: str | None = None) -> None:
        """Draw and normalize all three sets (once; later calls do nothing)."""
        if self._splits:
            return
        draws = {
            "train": self._draw(self.n_train, 0),
            "val": self._draw(self.n_val, 1),
            "test": self._draw(self.n_test, 2),
        }
        self.mean, self.scale = moment_normalization(draws["train"][0])
        self._splits = {split: self.normalize(x) for split, (x, _) in draws.items()}
        self._labels = {split: y for split, (_, y) in draws.items() if y is not None}
