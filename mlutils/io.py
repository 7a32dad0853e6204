"""JSON helpers (C, over jansson) and state-dict IO.

Same names and contracts as the original helpers:

* :func:`json_stringify` / :func:`json_parse` / :func:`json_read` / :func:`json_write`
"""
from __future__ import annotations

import os
from typing import Any, Union

from . import _core

__all__ = ["json_stringify", "json_parse", "json_read", "json_write"]

PathLike = Union[str, "os.PathLike[str]"]


def json_stringify(data: Any, truncate: bool = False, pretty: bool = False, raw: bool = False) -> Union[str, bytes]:
    """Serialise ``data`` to JSON text (``bytes`` when ``raw``).

    The text is what ``json.dumps(data, ensure_ascii=False)`` writes (with
    ``indent=4`` when ``pretty``).  numpy scalars and arrays are written as the
    numbers and lists they hold.  With ``truncate`` every number with 8 or more
    fractional digits is rounded to 4.  Anything else raises TypeError naming
    the type and where it is (``data['a'][3]``); integers outside 64 bits raise
    OverflowError.
    """
    return _core.json_dumps(data, truncate, pretty, raw)


def json_parse(string: Union[str, bytes, bytearray, memoryview]) -> Any:
    """Parse JSON text.  Invalid text raises :class:`mlutils.JSONDecodeError`
    (a ValueError and a ``json.JSONDecodeError``, with ``lineno``/``colno``).

    Unlike ``json.loads``, duplicate keys are an error, nesting is capped
    (2048 levels) and integers must fit in 64 bits.
    """
    return _core.json_loads(string)


def json_read(path: PathLike, default: Any = None) -> Any:
    """Parse the JSON file at ``path``; a missing file returns ``default``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return default
    return _core.json_loads(data)


def json_write(data: Any, path: PathLike, **kwargs: Any) -> None:
    """Write ``json_stringify(data, **kwargs)`` to ``path`` atomically: a
    temporary file beside it is written, flushed to disk and renamed over it,
    so a crash leaves the old file or the new one, never half of one."""
    kwargs.pop("raw", None)
    text = _core.json_dumps(data, raw=True, **kwargs)
    _core.write_file_atomic(os.fspath(path), text)
