"""Integer pixels to the model's continuous space, and the discrete bits/dim of their dequantized images.

One affine map covers every normalization of integer data (:class:`PixelMap`): with ``w`` the dequantization
offset in ``[0, 1)`` (``w ~ U[0, 1)`` per dimension, or ``w = 1/2``), the model sees

    y = (pixel + w - offset) / scale,

e.g. ``scale = num_bins / (hi - lo)``, ``offset = -lo scale`` for ``num_bins`` levels mapped onto
``data_range = (lo, hi)`` (``y = lo + (hi - lo)(pixel + w) / num_bins``), or a data module's per-pixel mean and
global scale (the digits). ``z = pixel + w`` fills ``[0, levels)`` with unit cells, one per level, and the map has
the Jacobian ``dy/dz = 1 / scale`` in each of the ``D`` dimensions, so ``log p_z(z) = log p_y(y) - D log(scale)``.
Jensen's inequality over ``w ~ U[0, 1)^D`` gives ``log P(pixel) >= E_w log p_z(pixel + w)``, hence the bound

    bpd = -(log p_y(y) - D log(scale)) / (D ln 2)  >=  -log2 P(pixel) / D  (in expectation over w).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ko_lightning.likelihood.trace import check_data

__all__ = [
    "DIGITS_LEVELS",
    "PixelMap",
    "bpd_from_log_prob",
    "data_pixel_map",
    "dequantize",
    "dequantize_pixels",
    "discrete_bits_per_dim",
    "resolve_pixel_map",
]

DequantizeMethod = Literal["uniform", "center"]
DEQUANTIZE = ("uniform", "center")

DIGITS_LEVELS = 17
"""The sklearn digits have integer pixels 0..16: 17 levels (a uniform model scores log2(17) = 4.09 bits/dim)."""

_LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------------- checks
def _check_levels(levels: Any, name: str) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {levels!r}")
    return levels


def _check_num_dims(num_dims: Any) -> int:
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
    return num_dims


def _check_scale(scale: Tensor | float) -> float:
    value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    return value


def _check_range(data_range: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a pair (lo, hi) of numbers, got {data_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"data_range must be finite with hi > lo, got {data_range!r}")
    return lo, hi


def check_integer_data(x: Any, levels: int, name: str = "x") -> Tensor:
    """Validate integer-valued data in ``[0, levels - 1]`` (uint8, integer, or integer-valued float); return it.

    Raises:
        TypeError: naming ``name`` when ``x`` is not a tensor.
        ValueError: naming ``name`` for a bool or complex dtype, a wrong shape, non-finite or non-integer values,
            or values outside ``[0, levels - 1]``.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor of integer values (e.g. uint8 images), got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} must be uint8 (or an integer-valued integer/float tensor), got dtype {x.dtype}")
    check_data(x, name)
    xf = x.double()
    if x.is_floating_point():
        if not bool(torch.isfinite(xf).all()):
            raise ValueError(f"{name} contains non-finite values; expected integers in [0, {levels - 1}]")
        frac = (xf - xf.round()).abs()
        if bool((frac > 0).any()):
            example = float(xf.flatten()[int(frac.flatten().argmax())])
            raise ValueError(
                f"{name} must hold integer values in [0, {levels - 1}] (uint8 or integer-valued float), got "
                f"non-integer values such as {example!r}; for data already scaled to a continuous range use "
                "log_prob and bpd_from_log_prob"
            )
    lo, hi = float(xf.min()), float(xf.max())
    if lo < 0 or hi > levels - 1:
        raise ValueError(f"{name} must lie in [0, {levels - 1}] (num_bins = {levels}), got values in [{lo:g}, {hi:g}]")
    return x


# ---------------------------------------------------------------------------------------------------- the map
@dataclass(frozen=True)
class PixelMap:
    """The affine map from dequantized pixels ``z = pixel + w`` to the model's space: ``y = (z - offset) / scale``.

    Attributes:
        offset: subtracted in pixel units: a number, or a per-pixel tensor broadcastable to one sample.
        scale: pixel units per model unit, a number ``> 0``.
        levels: the number of integer levels; pixels lie in ``[0, levels - 1]``.
    """

    offset: Tensor | float
    scale: float
    levels: int

    @classmethod
    def from_range(cls, num_bins: int, data_range: tuple[float, float] = (-1.0, 1.0)) -> PixelMap:
        """``num_bins`` levels onto ``data_range = (lo, hi)``: ``y = lo + (hi - lo)(pixel + w) / num_bins``.

        Raises:
            ValueError: naming ``num_bins`` or ``data_range``.
        """
        num_bins = _check_levels(num_bins, "num_bins")
        lo, hi = _check_range(data_range)
        scale = num_bins / (hi - lo)
        return cls(offset=-lo * scale, scale=scale, levels=num_bins)

    @classmethod
    def from_normalization(cls, mean: Tensor | float, scale: Tensor | float, levels: int = DIGITS_LEVELS) -> PixelMap:
        """A data module's normalization ``(pixel - mean) / scale`` (per-pixel ``mean``, one global ``scale``).

        Raises:
            ValueError: naming ``scale`` or ``levels``.
        """
        return cls(offset=mean, scale=_check_scale(scale), levels=_check_levels(levels, "levels"))

    def log_det(self, num_dims: int) -> float:
        """``log |det dy/dz| = -D log(scale)`` over ``D`` dimensions (the offset has unit Jacobian)."""
        return -_check_num_dims(num_dims) * math.log(self.scale)

    def dequantize(
        self,
        pixels: Tensor,
        method: DequantizeMethod,
        generator: torch.Generator | None,
        noise_device: torch.device,
        name: str,
    ) -> Tensor:
        """``y = (pixel + w - offset) / scale`` in fp32 on the pixels' device, after checking the pixels.

        ``w ~ U[0, 1)`` per dimension is drawn on ``generator``'s device, else on ``noise_device``, then moved.
        """
        if method not in DEQUANTIZE:
            raise ValueError(f"dequantize must be one of {DEQUANTIZE}, got {method!r}")
        pixels = check_integer_data(pixels, self.levels, name)
        z = pixels.to(torch.float32)
        if method == "uniform":
            device = generator.device if generator is not None else noise_device
            w = torch.rand(pixels.shape, generator=generator, device=device, dtype=torch.float32).to(pixels.device)
        else:
            w = torch.full_like(z, 0.5)
        offset = self.offset
        if torch.is_tensor(offset):
            offset = torch.as_tensor(offset).to(pixels.device).float()
        return (z + w - offset) / self.scale

    def bits_per_dim(self, log_prob_y: Tensor, num_dims: int) -> Tensor:
        """``-(log p_y(y) + log_det) / (D ln 2)``: bits/dim of the pixels from the model's density of ``y``."""
        return discrete_bits_per_dim(log_prob_y, num_dims, self.scale)

    def to_pixels(self, y: Tensor) -> Tensor:
        """Model space -> integer pixels: ``round(y scale + offset)`` clipped to ``[0, levels - 1]`` (int64).

        The inverse of the data's own normalization ``y = (pixel - offset) / scale`` (the training data are not
        dequantized, so a model puts its mass near those values; rounding, not the cell's floor, maps them back).
        """
        offset = self.offset
        if torch.is_tensor(offset):
            offset = torch.as_tensor(offset).to(y.device).float()
        return (y.float() * self.scale + offset).round().clamp(0, self.levels - 1).to(torch.int64)

    def to_state(self) -> dict[str, Any]:
        """Plain tensors and numbers for a checkpoint (read back by :meth:`from_state`)."""
        offset = self.offset
        offset = torch.as_tensor(offset).detach().cpu().clone() if torch.is_tensor(offset) else float(offset)
        return {"offset": offset, "scale": float(self.scale), "levels": int(self.levels)}

    @classmethod
    def from_state(cls, state: Any) -> PixelMap:
        """The map :meth:`to_state` saved.

        Raises:
            ValueError: when ``state`` is not such a dict (naming what is wrong).
        """
        if not isinstance(state, dict) or set(state) != {"offset", "scale", "levels"}:
            raise ValueError(f"a saved pixel map is a dict with offset, scale and levels, got {state!r:.200}")
        offset = state["offset"]
        if not (torch.is_tensor(offset) or isinstance(offset, (int, float))):
            raise ValueError(f"a saved pixel map's offset must be a tensor or a number, got {type(offset).__name__}")
        return cls(offset=offset, scale=_check_scale(state["scale"]), levels=_check_levels(state["levels"], "levels"))


def data_pixel_map(datamodule: Any, current: PixelMap | None = None) -> PixelMap | None:
    """The pixel map a data module declares through a ``pixel_map()`` method (integer pixel data: the digits, image
    folders and arrays), else ``current`` (data without integer pixels, or no data module).

    Raises:
        TypeError: when ``datamodule.pixel_map()`` returns something other than a :class:`PixelMap` or None.
    """
    method = getattr(datamodule, "pixel_map", None)
    if not callable(method):
        return current
    found = method()
    if found is not None and not isinstance(found, PixelMap):
        raise TypeError(f"{type(datamodule).__name__}.pixel_map() must return a PixelMap or None, got {found!r:.100}")
    return current if found is None else found


# ---------------------------------------------------------------------------------------------------- public API
def resolve_pixel_map(num_bins: int | None, data_range: tuple[float, float] | None, known: PixelMap | None) -> PixelMap:
    """The map bits/dim is computed with: explicit ``num_bins`` / ``data_range`` (``y = lo + (hi - lo)(pixel + w) /
    num_bins``, defaults 256 and ``(-1, 1)`` for the one not given), else ``known`` (the data's own map, recorded
    from the data module at fit time), else 8-bit data on ``[-1, 1]``."""
    if num_bins is not None or data_range is not None:
        return PixelMap.from_range(
            256 if num_bins is None else num_bins, (-1.0, 1.0) if data_range is None else data_range
        )
    return known if known is not None else PixelMap.from_range(256, (-1.0, 1.0))


def dequantize(
    x: Tensor,
    method: DequantizeMethod = "uniform",
    num_bins: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Map integer data to the model's continuous range: ``y = lo + (hi - lo) (x_int + w) / num_bins``.

    ``method="uniform"``: ``w ~ U[0, 1)`` per dimension (the standard variational bound);
    ``method="center"``: ``w = 1/2`` (deterministic cell centres; a midpoint approximation, not a bound).

    Args:
        x: integer data, uint8 or an integer-valued tensor in ``[0, num_bins - 1]``.
        method: ``"uniform"`` or ``"center"``.
        num_bins: number of levels (256 for 8-bit images).
        data_range: ``(lo, hi)``, the interval the model was trained on.
        generator: random generator for ``w`` (without one, ``w`` is drawn on ``x``'s device).

    Returns:
        ``y`` in fp32, shaped like ``x``, on ``x``'s device.
    """
    pixel_map = PixelMap.from_range(num_bins, data_range)
    device = x.device if torch.is_tensor(x) else torch.device("cpu")
    return pixel_map.dequantize(x, method, generator, device, "x")


def dequantize_pixels(
    pixels: Tensor,
    mean: Tensor,
    scale: Tensor | float,
    generator: torch.Generator | None = None,
    levels: int = DIGITS_LEVELS,
) -> Tensor:
    """Uniform dequantization into the model's space: ``y = (pixel + u - mean) / scale`` with ``u ~ U[0, 1)``.

    ``pixel + u`` fills ``[0, levels)`` with unit cells, one per integer level; ``mean`` (per pixel) and ``scale``
    are the data module's normalization (:class:`~ko_lightning.data.DigitsDataModule`).

    Args:
        pixels: integer pixel values in ``[0, levels - 1]``, shape ``(B, *data_shape)``.
        mean: per-pixel mean in pixel units, broadcastable to one sample.
        scale: the global scale (a number or 0-d tensor).
        generator: source of ``u`` (without one, ``u`` is drawn on the CPU, so results do not depend on the device).
        levels: number of integer levels (17 for the digits).

    Returns:
        ``y`` in fp32, shaped like ``pixels``.
    """
    pixel_map = PixelMap.from_normalization(torch.as_tensor(mean), scale, levels)
    return pixel_map.dequantize(pixels, "uniform", generator, torch.device("cpu"), "pixels")


def discrete_bits_per_dim(log_prob_y: Tensor, num_dims: int, scale: Tensor | float) -> Tensor:
    """Bits/dim of integer pixels from the model's log-density of their dequantized images ``y``.

    With ``z = pixel + u`` (unit cells) and ``y = (z - mean) / scale``, ``log p_z(z) = log p_y(y) - D log(scale)``
    (the shift has unit Jacobian), and Jensen's inequality over ``u`` gives the bound
    ``log P(pixel) >= E_u log p_z(pixel + u)``, hence

        ``bpd = -(log p_y(y) - D log(scale)) / (D ln 2)``  (an upper bound on ``-log2 P(pixel) / D`` in expectation).

    Args:
        log_prob_y: ``log p_y(y)`` in nats, any shape.
        num_dims: ``D``, dimensions per sample.
        scale: the data module's global scale.

    Example:
        >>> import math
        >>> uniform = torch.tensor(64 * math.log(2.0 / 17))  # a model uniform on the 17 cells, scale 2
        >>> round(float(discrete_bits_per_dim(uniform, 64, 2.0)), 4)  # log2(17)
        4.0875
    """
    _check_num_dims(num_dims)
    # log_det = -D log(scale) (PixelMap.log_det), written out so that the one formula lives here.
    return -(log_prob_y - num_dims * math.log(_check_scale(scale))) / (num_dims * _LN2)


def bpd_from_log_prob(
    log_prob: Tensor,
    num_dims: int,
    num_bins: int | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> Tensor:
    """Bits per dimension from a log-density in nats.

    Continuous data (``num_bins=None``): ``bpd = -log p(y) / (D ln 2)``.

    Discrete data with ``num_bins`` levels mapped affinely onto ``data_range = (lo, hi)`` by
    ``y = lo + (hi - lo) (x_int + w) / num_bins`` (``w`` the dequantization offset): this is :class:`PixelMap`
    with ``scale = num_bins / (hi - lo)``, so

        bpd = -(log p(y) + D log((hi - lo) / num_bins)) / (D ln 2)

    (for 8-bit data on ``[-1, 1]``: ``-log p(y) / (D ln 2) + 7``).

    Args:
        log_prob: ``log p(y)`` in nats, any shape.
        num_dims: ``D``, dimensions per sample.
        num_bins: number of discrete levels, or None for continuous data.
        data_range: ``(lo, hi)``, the model's data interval.
    """
    _check_num_dims(num_dims)
    if num_bins is None:
        return -log_prob / (num_dims * _LN2)
    return PixelMap.from_range(num_bins, data_range).bits_per_dim(log_prob, num_dims)
