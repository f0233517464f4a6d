"""The one place that knows how a batch carries its data (a tensor, a tuple/list led by one, or a dict) and its
condition (the tuple's second element, or a dict entry)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ko_lightning.conditioning import Conditioning

__all__ = ["COND_KEYS", "DATA_KEYS", "batch_condition", "batch_data", "check_batch", "check_finite_values"]

#: dict keys that hold the data samples, tried in this order.
DATA_KEYS: tuple[str, ...] = ("x", "x1", "data", "image", "images")
#: dict keys that hold the conditions (class labels or float conditions), tried in this order.
COND_KEYS: tuple[str, ...] = ("y", "cond", "label", "labels")


def batch_condition(
    batch: Any, where: str, conditioning: Conditioning, batch_size: int, check_values: bool = True
) -> Tensor | None:
    """The conditions of ``batch`` for a network with ``conditioning``: the second element of a tuple/list batch
    ``(x, y)``, or the entry under a :data:`COND_KEYS` key of a dict batch; checked against the network.

    An unconditional network ignores any labels the batch carries (None is returned). ``check_values=False``
    checks shape and dtype only (no device sync; ``FlowMatching(check_finite=False)`` passes it).

    Raises:
        ValueError: naming ``where`` when a conditional network gets a batch without conditions, or as
            :meth:`~ko_lightning.conditioning.Conditioning.check` says (labels out of range, wrong width).
    """
    if not conditioning.is_conditional:
        return None
    raw: Any = None
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        raw = batch[1]
    elif isinstance(batch, dict):
        raw = next((batch[k] for k in COND_KEYS if k in batch), None)
    if raw is None:
        raise ValueError(
            f"{where}: the network is conditional ({conditioning.describe()}) but the batch carries no condition; "
            f"give batches (x, y) or dicts with 'x' and one of {COND_KEYS} (e.g. a data module with labels=True)"
        )
    return conditioning.check(raw, batch_size, f"{where}: condition", allow_null=True, check_values=check_values)


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
            raise TypeError(
                f"{where}: a dict batch must hold its data under one of the keys {DATA_KEYS}, "
                f"got keys {sorted(map(str, batch))}"
            )
        x = batch[key]
    else:
        x = batch
    if not torch.is_tensor(x):
        raise TypeError(
            f"{where}: expected a tensor, a tuple/list starting with one, or a dict with a key in "
            f"{DATA_KEYS}; got {type(x).__name__}"
        )
    return x


def check_batch(batch: Any, where: str, data_shape: tuple[int, ...] | None = None, check_finite: bool = True) -> Tensor:
    """The data tensor of a training/validation ``batch`` (see :func:`batch_data`), checked for training on it.

    Args:
        batch: a tensor, a tuple/list starting with one, or a dict (:func:`batch_data`).
        where: how errors name the batch (e.g. ``"train batch 3"``).
        data_shape: the expected shape of one sample; None accepts any.
        check_finite: also reject NaN/inf values (costs one device sync).

    Returns:
        The data tensor (not copied, not converted).

    Raises:
        TypeError: for a batch that is not a tensor, or whose dtype is not floating point (e.g. uint8 pixels:
            normalize them to floats first).
        ValueError: for an empty batch, samples of the wrong shape, or (``check_finite``) NaN/inf values, naming
            ``where``.
    """
    if isinstance(batch, (list, tuple)) and len(batch) == 0:
        raise ValueError(f"{where} is an empty {type(batch).__name__}: expected a tensor of samples")
    x = batch_data(batch, where)
    if x.ndim == 0:
        raise ValueError(f"{where} is a 0-dim tensor: expected a batch of samples of shape (B, *data_shape)")
    if x.shape[0] == 0 or x.numel() == 0:
        # The mean loss over zero samples is NaN, and training would go on with it.
        raise ValueError(
            f"{where} is empty (shape {tuple(x.shape)}): the loss of zero samples is undefined; "
            "check the data set split and the loader (e.g. a sampler that yields no indices)"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"{where} has dtype {x.dtype}; FlowMatching trains on floating point data in model space (e.g. "
            "pixels mapped to [-1, 1]), and integer values such as 0..255 would be taken as coordinates. "
            "Normalize the batch to floats first, e.g. with the data module's transform (ImageDataModule "
            "maps uint8 pixels u to u / 127.5 - 1)"
        )
    if data_shape is not None and tuple(x.shape[1:]) != data_shape:
        raise ValueError(f"{where}: samples have shape {tuple(x.shape[1:])}, expected data_shape {data_shape}")
    if check_finite:
        check_finite_values(x, where)
    return x


def check_finite_values(x: Tensor, where: str) -> None:
    """Reject NaN/inf values in ``x`` (one device sync).

    Raises:
        ValueError: ``"<where> contains <k> non-finite value(s) (NaN or Inf)"``.
    """
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{where} contains {bad} non-finite value(s) (NaN or Inf)")
