"""Helpers that need no dedicated module (same names as the original utils)."""
from __future__ import annotations

from typing import TypeVar, Union

from . import _core

__all__ = ["truncate_json"]

T = TypeVar("T", str, bytes)


def truncate_json(x: T) -> T:
    """Round every JSON number with 8 or more fractional digits to 4 digits.

    Takes and returns ``str`` or ``bytes``.  Only number tokens change: text
    inside JSON strings is left alone (the original's regex rewrote it too).
    """
    return _core.truncate_json(x)
