"""Small helpers on plain values: clamp, coalese/coalesce and truncate_json."""
from __future__ import annotations

from typing import Any, TypeVar

from .. import _core

__all__ = ["clamp", "coalese", "coalesce", "truncate_json"]


T = TypeVar("T", str, bytes)


def truncate_json(x: T) -> T:
    """Round every JSON number with 8 or more fractional digits to 4 digits.

    Takes and returns ``str`` or ``bytes``.  Only number tokens change: text
    inside JSON strings is left alone (the original's regex rewrote it too).
    """
    return _core.truncate_json(x)


def clamp(n: Any, lo: Any, hi: Any) -> Any:
    """n limited to [lo, hi]; ValueError when lo > hi."""
    if lo > hi:
        raise ValueError(f"clamp: lo ({lo!r}) is above hi ({hi!r})")
    return max(lo, min(n, hi))


def coalese(*args: Any, return_last: bool = True) -> Any:
    """The last non-None argument (the first with ``return_last=False``); None when all are None.

    The misspelled name is the original's; :func:`coalesce` is the same
    function.  (The original raised IndexError when every argument was None.)
    """
    values = [a for a in args if a is not None]
    if not values:
        return None
    return values[-1] if return_last else values[0]


coalesce = coalese
