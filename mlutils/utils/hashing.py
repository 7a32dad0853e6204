"""md5_hash: one hash of a value, the same in every run and process."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from typing import Any, Mapping

from .._torch import loaded_torch

__all__ = ["md5_hash"]


def _canonical(x: Any, where: str) -> Any:
    """x as plain JSON data with an order that does not depend on insertion or hashing."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return {"__float__": repr(x)}
        return x
    if isinstance(x, (bytes, bytearray, memoryview)):
        return {"__bytes__": bytes(x).hex()}
    if isinstance(x, Mapping):
        items = []
        for k, v in x.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"md5_hash: key of type {type(k).__name__} at {where} has no canonical form")
            items.append((json.dumps(k), _canonical(v, f"{where}[{k!r}]")))
        return {"__map__": sorted(items)}
    if isinstance(x, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, (set, frozenset)):
        parts = [_canonical(v, f"{where}{{}}") for v in x]
        return {"__set__": sorted(parts, key=lambda p: json.dumps(p, sort_keys=True))}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _canonical(dataclasses.asdict(x), where)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(x, (np.ndarray, np.generic)):
        return {"__array__": str(x.dtype), "shape": list(np.shape(x)), "data": _canonical(x.tolist(), where)}
    torch = loaded_torch()
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        return {"__tensor__": str(t.dtype), "shape": list(t.shape), "data": _canonical(t.tolist(), where)}
    raise TypeError(
        f"md5_hash: {type(x).__name__} at {where} has no deterministic form "
        "(hash str(x) yourself if its text is stable)"
    )


def md5_hash(x: Any) -> str:
    """Hex MD5 of a value or list of values, the same in every run and process.

    * ``str``: MD5 of its UTF-8 bytes; ``bytes``-like: MD5 of the bytes.
    * ``int``, ``float``, ``bool``, ``None``: MD5 of ``str(x)`` (as the original).
    * ``list`` / ``tuple``: MD5 of the members' hashes joined by ``":"`` (as the
      original did for lists).
    * dicts, sets, dataclasses, numpy arrays, tensors (and containers of them):
      MD5 of a canonical JSON text with sorted keys and sorted set members, so
      equal values hash equally whatever their insertion order.  The original
      hashed ``str(x)``, which depends on insertion order, on string hashing
      (sets) and on object addresses.
    * Anything else raises TypeError rather than hashing an address.
    """
    if isinstance(x, str):
        data = x.encode("utf-8")
    elif isinstance(x, (bytes, bytearray, memoryview)):
        data = bytes(x)
    elif x is None or isinstance(x, (bool, int, float)):
        data = str(x).encode("utf-8")
    elif isinstance(x, (list, tuple)):
        return md5_hash(":".join(md5_hash(v) for v in x))
    else:
        text = json.dumps(_canonical(x, "x"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        data = text.encode("utf-8")
    return hashlib.md5(data).hexdigest()
