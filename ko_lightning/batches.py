"""The one place that knows how a batch carries its data: a tensor, a tuple/list led by one, or a dict."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["DATA_KEYS", "batch_data"]

#: dict keys that hold the data samples, tried in this order.
DATA_KEYS: tuple[str, ...] = ("x", "x1", "data", "image", "images")


def batch_data(batch: Any, where: str = "batch") -> Tensor:
    """The data tensor of ``batch``: the batch itself, its first element, or its entry under a :data:`DATA_KEYS` key.

    Args:
        batch: a tensor ``(B, ...)``, a tuple/list whose first element is one (``(x, y)``), or a dict with one of
            the keys in :data:`DATA_KEYS`.
        where: how to name the batch in an error (e.g. ``"train batch 3"``).

    Returns:
        The data tensor (not copied, not converted).

    Raises:
        TypeError: naming ``where`` and what was found, when no data tensor can be located.

    Example:
        >>> batch_data({"x": torch.zeros(2, 3), "y": torch.tensor([0, 1])}).shape
        torch.Size([2, 3])
    """
    if isinstance(batch, (list, tuple)) and batch:
        x = batch[0]
    elif isinstance(batch, dict):
        key = next((k for k in DATA_KEYS if k in batch), None)
        if key is None:
            raise TypeError(f"{where}: a dict batch must hold its data under one of the keys {DATA_KEYS}, "
                            f"got keys {sorted(map(str, batch))}")
        x = batch[key]
    else:
        x = batch
    if not torch.is_tensor(x):
        raise TypeError(f"{where}: expected a tensor, a tuple/list starting with one, or a dict with a key in "
                        f"{DATA_KEYS}; got {type(x).__name__}")
    return x
