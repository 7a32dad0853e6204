"""Helpers on dicts, objects' fields and keyword arguments: flatten_dict,
prune_missing, convert_kwargs, and passes_policy (an include/exclude filter
over names)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["flatten_dict", "prune_missing", "passes_policy", "convert_kwargs"]


def flatten_dict(d: Mapping[Any, Any], sep: str = ".") -> Dict[str, Any]:
    """Nested mappings to one level with joined keys: {"a": {"b": 1}} -> {"a.b": 1}.

    Lists and other values are kept as they are; an empty nested mapping is kept
    as ``{}`` under its key.  Two paths that join to the same key raise ValueError.
    """
    out: Dict[str, Any] = {}

    def walk(node: Mapping[Any, Any], prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{sep}{k}" if prefix else str(k)
            if isinstance(v, Mapping) and len(v):
                walk(v, key)
            else:
                if key in out:
                    raise ValueError(f"flatten_dict: two paths give the key {key!r}")
                out[key] = v

    walk(d, "")
    return out


def _container_of(source: Any) -> Tuple[Optional[Mapping[Any, Any]], Optional[Any]]:
    """(mapping, None) for a mapping, (None, object) for an object with attributes, else (None, None)."""
    if isinstance(source, Mapping):
        return source, None
    if dataclasses.is_dataclass(source) or hasattr(source, "__dict__") or hasattr(type(source), "__slots__"):
        return None, source
    return None, None


def _source_has(mapping: Optional[Mapping[Any, Any]], obj: Any, key: Any) -> bool:
    if mapping is not None:
        return key in mapping
    if not isinstance(key, str):
        return False
    if dataclasses.is_dataclass(obj):
        return key in {f.name for f in dataclasses.fields(obj)}
    if hasattr(obj, "__dict__") and key in vars(obj):
        return True
    slots = getattr(type(obj), "__slots__", ())
    return key in ((slots,) if isinstance(slots, str) else slots) and hasattr(obj, key)


def _source_get(mapping: Optional[Mapping[Any, Any]], obj: Any, key: Any) -> Any:
    return mapping[key] if mapping is not None else getattr(obj, key)


def prune_missing(
    source: Any,
    dest: Mapping[Any, Any],
    recurse: bool = True,
    path: Sequence[str] = (),
    parent_is_obj: Optional[bool] = None,
    return_missing: bool = True,
) -> Any:
    """Keep only the keys of ``dest`` that ``source`` (a dict or an object) has.

    Returns ``(kept, missing)`` where ``missing`` lists the dotted paths of the
    dropped keys (just ``kept`` when ``return_missing`` is false).  With
    ``recurse``, a dict value is pruned against the matching dict or object in
    ``source``.  When the root ``source`` is an object, an empty dict found in
    it is a free-form field and everything under it is kept (as the original).
    A dict value whose counterpart in ``source`` is neither a dict nor an
    object (e.g. a ``None`` default) is kept as it is.  ``dest`` is not changed.
    (The original raised KeyError when a dropped key held a dict.)
    """
    mapping, obj = _container_of(source)
    if mapping is None and obj is None:
        raise TypeError(f"prune_missing: source must be a mapping or an object, got {type(source).__name__}")
    is_obj = obj is not None
    if parent_is_obj is None:
        parent_is_obj = is_obj
    free_form = parent_is_obj and mapping is not None and len(mapping) == 0
    kept: Dict[Any, Any] = {}
    missing: List[str] = []
    for k, v in dest.items():
        here = [*path, str(k)]
        if free_form:
            kept[k] = v
            continue
        if not _source_has(mapping, obj, k):
            missing.append(".".join(here))
            continue
        sub = _source_get(mapping, obj, k)
        sub_map, sub_obj = _container_of(sub)
        if recurse and isinstance(v, Mapping) and (sub_map is not None or sub_obj is not None):
            kept[k], m = prune_missing(sub, v, recurse, here, parent_is_obj, True)
            missing += m
        else:
            kept[k] = v
    return (kept, missing) if return_missing else kept


def passes_policy(policy: Optional[Mapping[str, Any]], name: str) -> bool:
    """Whether ``name`` passes an include/exclude substring policy.

    ``policy`` is ``{"include": [...], "exclude": [...]}``; None passes every
    name.  A name containing any ``exclude`` term fails; otherwise it passes
    when ``include`` is absent or None, or when it contains an ``include`` term
    (so ``{"include": []}`` passes nothing).  (The original failed every name
    of an exclude-only policy.)  A bare string term is one term, not letters.
    """
    if policy is None:
        return True
    if not isinstance(policy, Mapping):
        raise TypeError(f"passes_policy: policy must be a dict or None, got {type(policy).__name__}")

    def terms(key: str) -> Optional[List[str]]:
        value = policy.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        return list(value)

    exclude = terms("exclude")
    if exclude and any(t in name for t in exclude):
        return False
    include = terms("include")
    if include is None:
        return True
    return any(t in name for t in include)


def convert_kwargs(kwargs: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    """Strip ``prefix`` from the keys of ``kwargs`` that start with it, in place; returns kwargs.

    A prefixed key wins over an unprefixed one of the same name (as the
    original, whatever the order of the keys).
    """
    if not prefix:
        return kwargs
    prefixed = [k for k in kwargs if isinstance(k, str) and k.startswith(prefix)]
    for key in prefixed:
        value = kwargs.pop(key)
        kwargs[key[len(prefix):]] = value
    return kwargs
