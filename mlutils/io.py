"""JSON helpers (C, over jansson) and state-dict IO.

Same names and contracts as the original helpers:

* :func:`json_stringify` / :func:`json_parse` / :func:`json_read` / :func:`json_write`
* :func:`torch_save` / :func:`torch_load`: safetensors (``.safetensors``,
  ``.safetensor``, ``.sft``) or PyTorch ``.pt`` by suffix, read and written by
  our own C code; torch is only needed for torch tensors.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Tuple, Union

from . import _core
from ._checks import check_durable
from ._safetensors import NUMPY_INSTEAD, load_file, safe_open, save_file  # noqa: F401  (the safetensors library's names)
from ._torch import TorchNotInstalledError, require_torch

__all__ = ["json_stringify", "json_parse", "json_read", "json_write", "torch_save", "torch_load",
           "is_safetensors_path", "Format", "FORMATS", "format_for", "safe_open", "save_file", "load_file", "TorchNotInstalledError"]

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".safetensor", ".sft")

#: The key torch_load puts a safetensors file's tensors under by default.
DEFAULT_MODULE_KEY = "module"

#: safetensors metadata keys ``mlutils convert`` writes (checkpoint entries
#: cannot take names starting with "mlutils."): VALUES_KEY lists, as a JSON
#: array, the metadata keys that hold a checkpoint entry as JSON text;
#: NESTED_KEY holds, as a JSON object of objects, the dicts ``--flatten``
#: flattened into dotted tensor names, so ``unflatten=True`` splits each name
#: exactly where the dicts were.
VALUES_KEY = "mlutils.values"
NESTED_KEY = "mlutils.nested"

PathLike = Union[str, "os.PathLike[str]"]


# json_stringify(data, truncate=False, pretty=False, raw=False) -> str | bytes
# is the C function itself: it is called once per log line, and a Python
# wrapper would add a tenth to the cost of writing a small metrics dict.
# Contract: the text json.dumps(data, ensure_ascii=False) writes (indent=4
# when pretty; bytes when raw); numpy scalars and arrays are written as the
# numbers and lists they hold; with truncate every number with 8 or more
# fractional digits is rounded to 4.  Anything else raises TypeError naming
# the type and where it is (data['a'][3]); integers outside 64 bits raise
# OverflowError.
json_stringify = _core.json_dumps


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
        return _core.json_read_file(path)  # one read, parsed without the GIL
    except FileNotFoundError:
        return default


def json_write(data: Any, path: PathLike, *, durable: bool = True, **kwargs: Any) -> None:
    """Write ``json_stringify(data, **kwargs)`` to ``path`` atomically: a
    temporary file beside it is written and renamed over it, so a crash leaves
    the old file or the new one, never half of one.  ``durable`` (the default)
    also flushes it to disk before the rename (and the folder after), so the
    write survives a power loss; ``durable=False`` skips those fsyncs."""
    check_durable(durable, "json_write")
    kwargs.pop("raw", None)
    text = _core.json_dumps(data, raw=True, **kwargs)
    _core.write_file_atomic(os.fspath(path), text, durable=durable)


# ---------------------------------------------------------------- state dicts


def is_safetensors_path(path: PathLike) -> bool:
    """True when the suffix says safetensors (``.safetensors``, ``.safetensor``, ``.sft``)."""
    return format_for(path) is SAFETENSORS


def _is_tensor(v: Any) -> bool:
    import numpy as np

    if isinstance(v, np.ndarray):
        return not v.dtype.hasobject  # an array of Python objects is no tensor
    t = type(v)
    return t.__module__.startswith("torch") and hasattr(v, "untyped_storage")


def _is_tensor_dict(v: Any) -> bool:
    return isinstance(v, Mapping) and len(v) > 0 and all(isinstance(k, str) and _is_tensor(x) for k, x in v.items())


def _tensor_path(v: Any, where: str, depth: int = 0) -> Optional[str]:
    """Where the first tensor nested in ``v`` is (``where['state'][0]``), or None."""
    if _is_tensor(v):
        return where
    if depth > 64:
        return None
    if isinstance(v, Mapping):
        items: Any = v.items()
    elif isinstance(v, (list, tuple)):
        items = enumerate(v)
    else:
        return None
    for k, x in items:
        found = _tensor_path(x, f"{where}[{k!r}]", depth + 1)
        if found is not None:
            return found
    return None


def _split_checkpoint(data: Mapping[str, Any], module_key: Optional[str]):
    """(tensors key or None, tensors, metadata) the way the original helpers split a checkpoint.

    Metadata never takes the name the tensors come back under: an entry named
    ``"module"`` (torch_load's default ``module_key``) or ``module_key`` is an
    error, since torch_load would have to choose between it and the tensors."""
    if _is_tensor_dict(data):
        return None, data, {}
    if module_key is not None:
        if module_key not in data:
            raise ValueError(f"torch_save: module_key {module_key!r} is not in the checkpoint "
                             f"(keys: {sorted(map(str, data))})")
        key = module_key
        if not _is_tensor_dict(data[key]):
            raise ValueError(f"torch_save: data[{key!r}] is not a dict of tensors")
    else:
        key = next((k for k, v in data.items() if _is_tensor_dict(v)), None)
        if key is None:
            raise ValueError("torch_save: no dict of tensors found in the checkpoint to write as safetensors")
    reserved = {DEFAULT_MODULE_KEY, key}
    metadata = {}
    for k, v in data.items():
        if k == key or v is None:
            continue
        if not isinstance(k, str):
            raise TypeError(f"torch_save: safetensors metadata keys must be str, not {type(k).__name__}")
        if k in reserved:
            raise ValueError(
                f"torch_save: checkpoint entry {k!r} would become safetensors metadata named like the "
                f"tensors: torch_load returns the tensors (data[{key!r}]) under module_key "
                f"({DEFAULT_MODULE_KEY!r} by default), so {k!r} would collide with them; rename the "
                "entry, or save as .pt")
        if _is_tensor(v) or _is_tensor_dict(v):
            raise ValueError(f"torch_save: a safetensors file holds one dict of tensors ({key!r}); "
                             f"{k!r} holds tensors too: save it in its own file, or use .pt")
        nested = _tensor_path(v, k)
        if nested is not None:
            raise ValueError(f"torch_save: checkpoint entry {k!r} holds tensors ({nested}) and "
                             "safetensors metadata is JSON text only: save that entry in a .pt file "
                             f"(e.g. an optimizer state beside the model), leave {k!r} out, or use .pt "
                             "for the whole checkpoint")
        try:
            metadata[k] = v if isinstance(v, str) else json_stringify(v)
        except (TypeError, OverflowError) as exc:
            raise type(exc)(f"torch_save: checkpoint entry {k!r} cannot be safetensors metadata "
                            f"(only JSON values can): {exc}") from exc
    return key, data[key], metadata


def torch_save(data: Any, path: PathLike, module_key: Optional[str] = None, *, durable: bool = True) -> None:
    """Save a state dict or checkpoint; the suffix picks the format.

    safetensors: a flat dict of tensors is written as is; otherwise the tensors
    under ``module_key`` (or the first value that is a dict of tensors) are
    written and every other top-level entry becomes metadata (non-strings as
    JSON text, ``None`` dropped).  Anything else: a ``.pt`` file that
    ``torch.load(weights_only=True)`` reads.  Both writes are atomic; with
    ``durable`` (the default) they are also fsynced (file before the rename,
    folder after) and survive a power loss, and ``durable=False`` skips the
    fsyncs for about the speed of ``torch.save`` / ``safetensors``.
    """
    check_durable(durable, "torch_save")
    path = os.fspath(path)
    format_for(path).save(data, path, module_key=module_key, durable=durable)


def torch_load(
    path: PathLike,
    device: str = "cpu",
    framework: str = "pt",
    unsafe: bool = False,
    load_metadata: bool = True,
    module_key: str = DEFAULT_MODULE_KEY,
    *,
    unflatten: bool = False,
) -> Any:
    """Load what :func:`torch_save` (or ``torch.save`` / ``safetensors``) wrote.

    safetensors: with ``load_metadata`` the result is ``{module_key: tensors,
    **metadata}``, else just the tensors; a metadata key equal to
    ``module_key`` raises :class:`SafetensorsError` (it would replace the
    tensors).  A file ``mlutils convert`` wrote lists its checkpoint entries
    under ``"mlutils.values"``: exactly those are JSON-parsed (a listed value
    that does not parse is a SafetensorsError) and any other metadata stays a
    string; in a file without that list each value is JSON-parsed when it
    parses.  The ``format: pt`` marker and those two keys are dropped.
    ``unflatten=True`` nests the tensors by their dotted names
    (``{"a": {"b": t}}`` for ``"a.b"``), split where ``convert --flatten``
    recorded the dicts (``"mlutils.nested"``) or else at every dot; a name
    that is also a prefix of another (``"a"`` and ``"a.b"``) is a
    SafetensorsError; a ``.pt`` file keeps its own nesting and refuses it.

    ``.pt``: our own restricted unpickler, which accepts only what
    ``torch.load(weights_only=True)`` accepts; ``unsafe=True`` is the explicit
    opt-in that hands the file to ``torch.load(weights_only=False)`` (it warns:
    that can run any code the file holds).

    ``framework="pt"`` (the default) gives torch tensors and needs torch: without
    it both formats raise :class:`TorchNotInstalledError` (an ImportError);
    ``framework="np"`` gives numpy arrays and never imports torch.
    """
    from . import _safetensors

    path = os.fspath(path)
    fw = _safetensors._framework(framework)
    if fw == "pt":
        require_torch("torch_load(framework='pt')", NUMPY_INSTEAD)
    fmt = format_for(path)
    if unflatten and not fmt.flat:
        raise ValueError(f"torch_load: unflatten=True applies to flat formats (safetensors), not {fmt.name}: "
                         "a .pt file keeps its nesting")
    out = fmt.load(path, device=device, framework=fw, unsafe=unsafe,
                   load_metadata=load_metadata, module_key=module_key)
    if unflatten:
        tree = _nested_tree(path, fmt.describe(path)["metadata"] or {})
        if load_metadata:
            out[module_key] = _unflatten(out[module_key], tree, path)
        else:
            out = _unflatten(out, tree, path)
    return out


def _nested_tree(path: str, metadata: Mapping[str, str]) -> Optional[dict]:
    """The NESTED_KEY tree of a file's metadata (validated: objects of objects), or None."""
    from ._safetensors import SafetensorsError

    if NESTED_KEY not in metadata:
        return None
    try:
        tree = json_parse(metadata[NESTED_KEY])
    except ValueError as exc:
        raise SafetensorsError(f"{path!r}: metadata {NESTED_KEY!r} is not JSON: {exc}") from exc
    stack = [tree]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            raise SafetensorsError(f"{path!r}: metadata {NESTED_KEY!r} must be JSON objects of objects")
        stack.extend(node.values())
    return tree


def _split_name(name: str, tree: Optional[Mapping[str, Any]], lengths: dict) -> list:
    """The key path a flattened tensor name stands for: ``name.split(".")``
    without a tree; with one (NESTED_KEY's dicts), at each level the longest
    recorded dict whose name and a dot start what is left, the rest the leaf.
    ``lengths`` caches each dict's key lengths between calls (by id)."""
    if tree is None:
        return name.split(".")
    path, pos = [], 0
    while tree:
        ns = lengths.get(id(tree))
        if ns is None:
            ns = lengths[id(tree)] = sorted({len(k) for k in tree}, reverse=True)
        for n in ns:
            end = pos + n
            if end < len(name) and name[end] == "." and name[pos:end] in tree:
                path.append(name[pos:end])
                tree, pos = tree[name[pos:end]], end + 1
                break
        else:
            break
    path.append(name[pos:])
    return path


def _unflatten(tensors: Mapping[str, Any], tree: Optional[dict], path: str) -> dict:
    """Nested dicts from flat dotted names (see :func:`_split_name`); every dict
    in the tree is made, empty ones included; a clash is a SafetensorsError."""
    from ._safetensors import SafetensorsError

    out: dict = {}
    lengths: dict = {}
    todo = [(tree or {}, out)]
    while todo:
        node, made = todo.pop()
        for k, sub in node.items():
            made[k] = {}
            todo.append((sub, made[k]))
    for name, t in tensors.items():
        keys = _split_name(name, tree, lengths)
        at = out
        for i, k in enumerate(keys):
            if i == len(keys) - 1:
                clash = k in at
            else:
                at = at.setdefault(k, {})
                clash = not isinstance(at, dict)
            if clash:
                raise SafetensorsError(
                    f"{path!r}: unflatten: tensor {name!r} clashes with another name at "
                    f"{'.'.join(keys[:i + 1])!r} (one name is a prefix of the other); load with unflatten=False")
            if i == len(keys) - 1:
                at[k] = t
    return out


# ------------------------------------------------------------ format registry
# One entry per file format: torch_save, torch_load and the command line
# (inspect, convert, verify) dispatch through format_for(path), so a new
# format is one more Format in FORMATS.


def _safetensors_save(data: Any, path: str, module_key: Optional[str] = None, **kwargs: Any) -> None:
    from . import _safetensors

    if not isinstance(data, Mapping):
        raise TypeError(f"torch_save: a safetensors file holds a dict, not {type(data).__name__}")
    _key, tensors, metadata = _split_checkpoint(data, module_key)
    metadata.setdefault("format", "pt")
    _safetensors.save_file(tensors, path, metadata=metadata, **kwargs)


def _safetensors_load(path: str, device: str, framework: str, unsafe: bool, load_metadata: bool,
                      module_key: str) -> Any:
    from . import _safetensors

    tensors = _safetensors.load_file(path, framework=framework, device=device)
    if not load_metadata:
        return tensors
    metadata, _entries = _safetensors.read_header(path)
    metadata = metadata or {}
    if module_key in metadata:
        raise _safetensors.SafetensorsError(
            f"{os.fspath(path)!r}: the metadata has an entry named {module_key!r}, the key torch_load puts the "
            f"tensors under: it would replace them. Pass another module_key, or "
            "load_metadata=False for the tensors alone (safe_open(path).metadata() reads the metadata)")
    out: dict[str, Any] = {module_key: tensors}
    listed = _listed_values(path, metadata)
    for k, v in metadata.items():
        if k in (VALUES_KEY, NESTED_KEY) or (k == "format" and v == "pt" and k not in listed):
            continue
        if k in listed:
            try:
                out[k] = json_parse(v)
            except ValueError as exc:
                raise _safetensors.SafetensorsError(
                    f"{path!r}: metadata {k!r} is listed in {VALUES_KEY!r} but is not JSON text: {exc}") from exc
        elif VALUES_KEY in metadata:
            out[k] = v
        else:  # a file without the list: JSON when it parses, as the original helpers read it
            try:
                out[k] = json_parse(v)
            except ValueError:
                out[k] = v
    return out


def _listed_values(path: str, metadata: Mapping[str, str]) -> frozenset:
    """The metadata keys VALUES_KEY lists (validated), empty without it."""
    from ._safetensors import SafetensorsError

    if VALUES_KEY not in metadata:
        return frozenset()
    try:
        keys = json_parse(metadata[VALUES_KEY])
    except ValueError as exc:
        raise SafetensorsError(f"{path!r}: metadata {VALUES_KEY!r} is not JSON: {exc}") from exc
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise SafetensorsError(f"{path!r}: metadata {VALUES_KEY!r} must be a JSON array of strings")
    missing = [k for k in keys if k not in metadata or k in (VALUES_KEY, NESTED_KEY)]
    if missing:
        raise SafetensorsError(f"{path!r}: metadata {VALUES_KEY!r} lists {missing[0]!r}, "
                               "which the metadata does not hold as an entry")
    return frozenset(keys)


def _safetensors_describe(path: str) -> dict:
    from . import _safetensors

    metadata, entries = _safetensors.read_header(path)
    tensors = [{"name": e["name"], "dtype": e["dtype"], "shape": list(e["shape"]),
                "nbytes": e["data_offsets"][1] - e["data_offsets"][0]} for e in entries]
    return {"format": "safetensors", "tensors": tensors, "metadata": metadata}


def _safetensors_verify(path: str) -> None:
    from . import _safetensors

    _safetensors.verify(path)


def _pt_save(data: Any, path: str, module_key: Optional[str] = None, **kwargs: Any) -> None:
    from . import _ptsave

    _ptsave.save(data, path, **kwargs)


def _pt_load(path: str, device: str, framework: str, unsafe: bool, load_metadata: bool,
             module_key: str) -> Any:
    from . import _ptload

    if unsafe:
        require_torch("torch_load(unsafe=True)")
        return _ptload.load_unsafe(path, device=device)
    return _ptload.load(path, device=device, framework=framework)


def _pt_describe(path: str) -> dict:
    from . import _ptload

    tensors = [{"name": e["name"], "dtype": e["dtype"], "shape": list(e["shape"]), "nbytes": e["nbytes"]}
               for e in _ptload.read_index(path)]
    return {"format": "pt", "tensors": tensors, "metadata": None}


def _pt_verify(path: str) -> None:
    from . import _ptload

    _ptload.verify(path)


@dataclass(frozen=True)
class Format:
    """One file format: the suffixes that select it and what reads and writes it.

    ``save(data, path, module_key=None, **kwargs)`` writes atomically;
    ``load(path, device, framework, unsafe, load_metadata, module_key)`` is
    torch_load's body for the format; ``describe(path)`` gives ``{"format",
    "tensors": [{name, dtype, shape, nbytes}], "metadata"}`` from the validated
    index alone; ``verify(path)`` fully validates an untrusted file.  ``flat``:
    the file holds one flat dict of tensors plus string metadata (torch_load
    returns it under ``module_key``), so a checkpoint is split on the way in.
    """

    name: str
    suffixes: Tuple[str, ...]
    save: Callable[..., None]
    load: Callable[..., Any]
    describe: Callable[[str], dict]
    verify: Callable[[str], None]
    flat: bool = False

    def matches(self, path: PathLike) -> bool:
        return os.fsdecode(path).lower().endswith(self.suffixes)


SAFETENSORS = Format("safetensors", SAFETENSORS_SUFFIXES, _safetensors_save, _safetensors_load,
                     _safetensors_describe, _safetensors_verify, flat=True)
#: PyTorch's zip (or legacy) pickle format; also every suffix no other format claims.
PT = Format("pt", (".pt", ".pth"), _pt_save, _pt_load, _pt_describe, _pt_verify)

#: Every format, the one chosen by suffix first; PT (the last) takes any other suffix.
FORMATS: Tuple[Format, ...] = (SAFETENSORS, PT)


def format_for(path: PathLike) -> Format:
    """The Format a path's suffix selects (case-insensitive); ``.pt`` for any suffix no format claims."""
    for fmt in FORMATS:
        if fmt.matches(path):
            return fmt
    return PT
