"""Image batches for the feature extractors and the reports: validation, 8-bit quantization, hashing, a Dataset view,
and display (samples to [0, 1] images, tiled into one grid).

Images are tensors ``(N, C, H, W)``, either ``uint8`` in ``[0, 255]`` or floating point in ``value_range``
(default ``[0, 1]``). Floats are quantized to 8 bits exactly as if the samples were saved as PNG (the standard FID
protocol)::

    u = round(255 (x - lo) / (hi - lo))
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ImageSet", "display_images", "display_tiles", "images_sha256", "tile_images", "to_uint8_images"]


def to_uint8_images(images: Tensor, name: str = "images", value_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Validate an image batch and return it as uint8 ``(N, C, H, W)`` on the CPU.

    ``uint8`` input is returned as is. Floating point input must be finite and lie in ``value_range`` (a slack of
    ``1e-6`` of its width absorbs round-off); it is mapped to ``round(255 (x - lo) / (hi - lo))``.

    Args:
        images: tensor of shape ``(N, C, H, W)``.
        name: the argument's name, used in error messages.
        value_range: ``(lo, hi)`` of floating point input.

    Raises:
        TypeError: naming ``name`` if ``images`` is not a tensor.
        ValueError: naming ``name`` for a wrong number of dimensions, an empty batch, a dtype other than
            uint8/float, non-finite values or values outside ``value_range``.

    Example:
        >>> to_uint8_images(torch.tensor([0.0, 0.2, 0.5, 1.0]).reshape(1, 1, 2, 2)).flatten().tolist()
        [0, 51, 128, 255]
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(images.shape)})")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images.contiguous()
    if not images.is_floating_point():
        raise ValueError(
            f"{name} must be uint8 in [0, 255] or floating point in value_range={value_range}, got dtype {images.dtype}"
        )
    x = images.double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    x_min, x_max = float(x.min()), float(x.max())
    slack = 1e-6 * (hi - lo)
    if x_min < lo - slack or x_max > hi + slack:
        raise ValueError(
            f"{name} has values in [{x_min:.4g}, {x_max:.4g}], outside value_range={value_range}; clamp generated "
            "samples to the data range first, or pass the right value_range"
        )
    return ((x - lo) * (255.0 / (hi - lo))).round().clamp(0, 255).to(torch.uint8).contiguous()


def images_sha256(images: Tensor) -> str:
    """SHA-256 of a CPU image tensor: its shape, then its bytes (identifies a reference set in the FID cache)."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.numpy().tobytes())
    return digest.hexdigest()


class ImageSet(Dataset):
    """A uint8 image tensor as the map-style Dataset torch-fidelity reads one item at a time."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def tile_images(images: Tensor, columns: int | None = None, pad: int = 1, pad_value: float = 255) -> Tensor:
    """Tile images ``(N, C, H, W)`` into one ``(C, rows (H + pad) + pad, cols (W + pad) + pad)`` image.

    Image ``i`` sits in row ``i // cols``, column ``i mod cols`` (``cols = ceil(sqrt(N))`` by default), its top-left
    pixel at ``(pad + row (H + pad), pad + col (W + pad))``; the rest is ``pad_value``. Keeps the images' dtype.
    """
    n, c, h, w = images.shape
    cols = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), pad_value, dtype=images.dtype)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def display_images(x: Tensor, datamodule: Any, value_range: tuple[float, float]) -> Tensor:
    """Model-space samples as float images in ``[0, 1]`` on the CPU: ``datamodule.to_display(x)`` (clamped) when
    the datamodule has it, else ``(clamp(x, lo, hi) - lo) / (hi - lo)``. NaN stays NaN (the FID code rejects it)."""
    x = x.detach().float().cpu()
    if datamodule is not None and hasattr(datamodule, "to_display"):
        return datamodule.to_display(x).clamp(0.0, 1.0)
    lo, hi = value_range
    return (x.clamp(lo, hi) - lo) / (hi - lo)


def display_tiles(images: Tensor, columns: int | None = None) -> Any:
    """Images in ``[0, 1]`` (``(N, C, H, W)``, or flattened squares ``(N, H * W)``) as one array for ``imshow``:
    :func:`tile_images` with white 1-pixel borders, clipped to ``[0, 1]``, ``(H', W')`` for one channel, else
    ``(H', W', C)``."""
    if images.ndim == 2:  # flattened square images
        side = math.isqrt(images.shape[1])
        images = images.reshape(-1, 1, side, side)
    grid = tile_images(images.float().cpu(), columns, pad=1, pad_value=1.0).clamp(0, 1).permute(1, 2, 0)
    return (grid[..., 0] if images.shape[1] == 1 else grid).numpy()
