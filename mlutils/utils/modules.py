"""Helpers on torch modules and their state dicts: load_state_dict_non_strict,
gather_attribute, dispatch_attribute and get_module_size."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

from .mappings import flatten_dict

if TYPE_CHECKING:
    import torch

__all__ = ["StateDictReport", "load_state_dict_non_strict", "gather_attribute", "dispatch_attribute",
           "get_module_size"]

# the logger these helpers have always used, whichever module they live in
log = logging.getLogger(__package__)


class StateDictReport(NamedTuple):
    """What :func:`load_state_dict_non_strict` loaded and skipped (sorted key lists)."""

    loaded: List[str]
    missing: List[str]
    unexpected: List[str]
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]  # (key, model shape, given shape)


def load_state_dict_non_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                               logger: Optional[Callable[[str], Any]] = None) -> StateDictReport:
    """Load the entries of ``state_dict`` whose key exists in ``model`` with the same shape.

    Returns a :class:`StateDictReport`; missing, unexpected and mismatched keys
    are logged at WARNING (or passed to ``logger(message)`` when given).  (The
    original printed mismatches and reported nothing back.)
    """
    own = model.state_dict()
    provided, required = set(state_dict), set(own)
    common = provided & required
    mismatched = []
    for k in sorted(common):
        ours = tuple(getattr(own[k], "shape", ()))
        theirs = tuple(getattr(state_dict[k], "shape", ()))
        if ours != theirs:
            mismatched.append((k, ours, theirs))
    loadable = sorted(common - {k for k, _, _ in mismatched})
    report = StateDictReport(loadable, sorted(required - provided), sorted(provided - required), mismatched)
    model.load_state_dict({k: state_dict[k] for k in loadable}, strict=False)
    if report.missing or report.unexpected or report.mismatched:
        text = (
            f"load_state_dict_non_strict: loaded {len(loadable)} of {len(required)} entries; "
            f"missing: {report.missing}, unexpected: {report.unexpected}, "
            "shape mismatches: " + ", ".join(f"{k} {a} vs {b}" for k, a, b in mismatched)
        )
        if logger is not None:
            logger(text)
        else:
            log.warning("%s", text)
    return report


def _named_modules_with(module: torch.nn.Module, attrname: str) -> Iterable[Tuple[str, torch.nn.Module]]:
    for name, m in module.named_modules():
        if hasattr(m, attrname):
            yield name, m


def gather_attribute(module: torch.nn.Module, attrname: str, delete: bool = True, prefix: bool = True) -> Dict[str, Any]:
    """Collect ``attrname`` from every submodule that has it, as ``{"attr.sub.name": value}``.

    Keys are the submodule names (prefixed with ``attrname`` when ``prefix``;
    the root module's key is ``attrname`` itself, or ``""`` without prefix).
    Dict values are flattened into dotted keys.  With ``delete`` the attribute
    is removed from each module after reading.
    """
    ret: Dict[str, Any] = {}
    for name, m in list(_named_modules_with(module, attrname)):
        value = getattr(m, attrname)
        if delete:
            try:
                delattr(m, attrname)
            except AttributeError as e:
                raise AttributeError(f"gather_attribute: cannot delete {attrname!r} of {name or '<root>'}") from e
        key = ".".join(p for p in ((attrname if prefix else ""), name) if p)
        if isinstance(value, Mapping) and len(value):
            for sub, v in flatten_dict(value).items():
                ret[f"{key}.{sub}" if key else sub] = v
        else:
            ret[key] = value
    return ret


def dispatch_attribute(module: torch.nn.Module, attrname: str, value: Any,
                       filter_fn: Optional[Callable[[torch.nn.Module], bool]] = None) -> None:
    """Set ``attrname`` to ``value`` on every submodule that already has it (and passes ``filter_fn``)."""
    for _, m in list(_named_modules_with(module, attrname)):
        if filter_fn is None or filter_fn(m):
            setattr(m, attrname, value)


def _tensor_bytes(t: torch.Tensor) -> int:
    return int(t.nelement()) * int(t.element_size())


def get_module_size(module: torch.nn.Module, recurse: bool = True) -> int:
    """Bytes held by a module's parameters and buffers (each shared tensor counted once)."""
    seen = set()
    size = 0
    for t in list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse)):
        if id(t) in seen:
            continue
        seen.add(id(t))
        size += _tensor_bytes(t)
    return size
