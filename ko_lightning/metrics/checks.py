"""Argument checks shared by the FID/KID functions; each error names the argument."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["SHA256_PATTERN", "check_positive_int", "check_sha256"]

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
"""A hex SHA-256 digest, lower case."""


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is an ``int`` >= 1 (``bool`` is refused).

    Raises:
        ValueError: naming ``name`` otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_sha256(weights_sha256: str | None) -> str | None:
    """``weights_sha256`` in lower case (``None`` passes through).

    Raises:
        ValueError: naming ``weights_sha256`` if it is not 64 hexadecimal digits.
    """
    if weights_sha256 is None:
        return None
    if not isinstance(weights_sha256, str) or not SHA256_PATTERN.match(weights_sha256.lower()):
        raise ValueError(f"weights_sha256 must be 64 hexadecimal digits, got {weights_sha256!r}")
    return weights_sha256.lower()
