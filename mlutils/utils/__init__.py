"""Helpers that need no dedicated module (same names as the original utils).

Nothing here imports torch at import time: functions that need it import it
when called (through :mod:`mlutils._torch`) and raise
:class:`~mlutils.TorchNotInstalledError` (an ImportError) saying so when it is
missing.  ``MLUTILS_NO_TORCH=1`` makes them behave as if torch were not installed.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

from .. import _core
from .._torch import loaded_torch, optional_torch, require_torch

if TYPE_CHECKING:
    import torch

__all__ = [
    "truncate_json",
    "md5_hash",
    "prune_missing",
    "clamp",
    "timer",
    "flatten_dict",
    "set_seed",
    "coerce_dtype",
    "tree_map",
    "to_device",
    "coalese",
    "coalesce",
    "passes_policy",
    "convert_kwargs",
    "StateDictReport",
    "load_state_dict_non_strict",
    "gather_attribute",
    "dispatch_attribute",
    "resize_weight",
    "get_devices",
    "get_device_properties",
    "get_module_size",
    "get_model_offload_policy",
    "offload_model",
]

log = logging.getLogger(__name__)

T = TypeVar("T", str, bytes)


def truncate_json(x: T) -> T:
    """Round every JSON number with 8 or more fractional digits to 4 digits.

    Takes and returns ``str`` or ``bytes``.  Only number tokens change: text
    inside JSON strings is left alone (the original's regex rewrote it too).
    """
    return _core.truncate_json(x)


# mlutils.offload and mlutils.unsloth import this name from here.
_torch = require_torch


# ---------------------------------------------------------------------------
# hashing


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


# ---------------------------------------------------------------------------
# small helpers


def clamp(n: Any, lo: Any, hi: Any) -> Any:
    """n limited to [lo, hi]; ValueError when lo > hi."""
    if lo > hi:
        raise ValueError(f"clamp: lo ({lo!r}) is above hi ({hi!r})")
    return max(lo, min(n, hi))


class timer:
    """Measure elapsed wall time; a context manager and a decorator.

    On exit the elapsed seconds go to ``callback(elapsed)`` when one is given,
    and a line ``"<msg> <seconds>s"`` is logged at INFO on ``mlutils.utils``
    (the original printed it; pass ``print_fn=print`` for that).  The last
    measurement stays in ``.elapsed``.  Decorate with ``@timer`` or
    ``@timer("msg", callback)``.
    """

    def __init__(
        self,
        msg: Union[str, Callable[..., Any]] = "Elapsed time:",
        callback: Optional[Callable[[float], Any]] = None,
        print_fn: Optional[Callable[[str], Any]] = None,
    ) -> None:
        self._fn: Optional[Callable[..., Any]] = None
        if callable(msg):  # used bare: @timer
            self._fn = msg
            functools.update_wrapper(self, msg)
            msg = f"{getattr(msg, '__qualname__', 'function')}:"
        self.msg = msg
        self.callback = callback
        self.print_fn = print_fn
        self.start: Optional[float] = None
        self.elapsed: Optional[float] = None

    def __enter__(self) -> "timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.start is not None
        self.elapsed = time.perf_counter() - self.start
        line = f"{self.msg} {self.elapsed:.9f}s"
        if self.print_fn is not None:
            self.print_fn(line)
        else:
            log.info("%s", line)
        if self.callback is not None:
            self.callback(self.elapsed)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """As ``@timer("msg")`` it wraps a function; as ``@timer`` it is the timed function."""
        if self._fn is not None:
            with timer(self.msg, self.callback, self.print_fn):
                return self._fn(*args, **kwargs)
        if len(args) != 1 or kwargs or not callable(args[0]):
            raise TypeError("timer(...) decorates one function")
        fn = args[0]

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with timer(self.msg, self.callback, self.print_fn):
                return fn(*args, **kwargs)

        return wrapped


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


# ---------------------------------------------------------------------------
# RNG and dtypes


def set_seed(seed: Optional[int] = None) -> int:
    """Seed python's, numpy's and (when installed) torch's RNGs, CUDA included; returns the seed.

    None picks a seed from the clock (nanoseconds, below 2**32).  0 is a seed
    like any other (the original replaced it with the clock).  Seeds must be in
    [0, 2**32) since numpy refuses others.
    """
    if seed is None:
        seed = time.time_ns() % (1 << 32)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"set_seed: seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < (1 << 32):
        raise ValueError(f"set_seed: seed must be in [0, 2**32), got {seed}")
    random.seed(seed)
    import numpy as np

    np.random.seed(seed)
    torch = optional_torch()
    if torch is None:
        return seed
    torch.manual_seed(seed)  # seeds every CUDA device too
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return seed


_DTYPE_ALIASES = {
    "half": "float16",
    "fp16": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "float": "float32",
    "fp32": "float32",
    "f32": "float32",
    "single": "float32",
    "double": "float64",
    "fp64": "float64",
    "f64": "float64",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "float8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "i8": "int8",
    "u8": "uint8",
    "i16": "int16",
    "short": "int16",
    "i32": "int32",
    "int": "int32",
    "i64": "int64",
    "long": "int64",
}


def coerce_dtype(s: Union[str, torch.dtype]) -> torch.dtype:
    """A torch dtype from a name ("float16", "bf16", "fp32", "int8", "torch.half", ...); dtypes pass through.

    Unknown names raise ValueError naming them (the original quietly gave
    float32); anything else that is not a dtype raises TypeError.
    """
    torch = require_torch("coerce_dtype")
    if isinstance(s, torch.dtype):
        return s
    if not isinstance(s, str):
        raise TypeError(f"coerce_dtype: expected a dtype or its name, got {type(s).__name__}")
    name = s.strip().lower()
    if name.startswith("torch."):
        name = name[len("torch."):]
    name = _DTYPE_ALIASES.get(name, name)
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"coerce_dtype: unknown dtype name {s!r}")
    return dtype


# ---------------------------------------------------------------------------
# nested containers of tensors


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def tree_map(fn: Callable[[torch.Tensor], Any], x: Any) -> Any:
    """Apply ``fn`` to every tensor in nested lists, tuples and dicts; other leaves are kept.

    Containers keep their type: tuples stay tuples (the original returned a
    generator), namedtuples stay the same namedtuple, OrderedDict and
    defaultdict stay what they were.  Without torch nothing is a tensor.
    """
    torch = loaded_torch()
    tensor_type = torch.Tensor if torch is not None else None

    def walk(v: Any) -> Any:
        if tensor_type is not None and isinstance(v, tensor_type):
            return fn(v)
        if isinstance(v, list):
            return type(v)(walk(i) for i in v) if type(v) is not list else [walk(i) for i in v]
        if _is_namedtuple(v):
            return type(v)(*(walk(i) for i in v))
        if isinstance(v, tuple):
            return type(v)(walk(i) for i in v)
        if isinstance(v, dict):
            items = [(k, walk(i)) for k, i in v.items()]
            if type(v) is dict:
                return dict(items)
            if isinstance(v, collections.defaultdict):
                return type(v)(v.default_factory, items)
            return type(v)(items)
        return v

    return walk(x)


def to_device(x: Any, *args: Any, **kwargs: Any) -> Any:
    """Every tensor in nested lists, tuples and dicts moved with ``tensor.to(*args, **kwargs)``."""
    return tree_map(lambda t: t.to(*args, **kwargs), x)


# ---------------------------------------------------------------------------
# modules and state dicts


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


def resize_weight(weight: torch.Tensor, target: int, dim: int = 0, random: bool = True) -> torch.Tensor:
    """``weight`` trimmed or extended to ``target`` entries along ``dim`` (a new tensor when it changes).

    New entries are drawn from a normal distribution with the mean and standard
    deviation of the existing weight when ``random`` (zeros for integer
    weights and weights of fewer than two elements), else zeros; same dtype
    and device.  (The
    original drew from uniform [0, 1), whose mean is 0.5, and ignored ``dim``.)
    """
    torch = require_torch("resize_weight")
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValueError(f"resize_weight: target must be an int >= 0, got {target!r}")
    if not -weight.dim() <= dim < weight.dim():
        raise ValueError(f"resize_weight: dim {dim} out of range for a {weight.dim()}-d weight")
    current = weight.shape[dim]
    if target == current:
        return weight
    if target < current:
        return weight.narrow(dim, 0, target).clone()
    shape = list(weight.shape)
    shape[dim] = target - current
    extra = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
    if random and weight.numel() > 1 and weight.is_floating_point():
        w = weight.detach().float()
        std, mean = torch.std_mean(w)
        extra.copy_(torch.randn(shape, device=weight.device, dtype=w.dtype) * std + mean)
    return torch.cat([weight.detach(), extra], dim=dim)


# ---------------------------------------------------------------------------
# devices and offloading


def get_devices() -> List[str]:
    """Usable device names: ``cuda:0`` .. ``cuda:N-1`` then ``cpu`` (just ``cpu`` without torch or CUDA)."""
    torch = optional_torch()
    if torch is None:
        return ["cpu"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] + ["cpu"]


def _cpu_memory() -> Tuple[int, int]:
    """(available, total) bytes of host memory."""
    try:
        info: Dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        total = info["MemTotal"]
        return info.get("MemAvailable", info.get("MemFree", total)), total
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        raise OSError("get_device_properties: cannot read the host's memory size") from None


def get_device_properties(device: Union[str, torch.device]) -> Dict[str, Any]:
    """``{"name", "total", "free", "props"}`` for a device name: bytes of memory in all and free now."""
    name = str(device)
    if name.startswith("cuda"):
        torch = require_torch("get_device_properties")
        if not torch.cuda.is_available():
            raise ValueError(f"get_device_properties: {name} requested but CUDA is not available")
        props = torch.cuda.get_device_properties(name)
        free, total = torch.cuda.mem_get_info(name)
        return {"name": name, "total": int(total), "free": int(free), "props": props}
    if name == "cpu" or name.startswith("cpu:"):
        free, total = _cpu_memory()
        return {"name": name, "total": total, "free": free, "props": None}
    raise ValueError(f"get_device_properties: unsupported device {name!r} (cuda:N or cpu)")


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


def _device_entry(spec: Any) -> Dict[str, Any]:
    """A policy device (a name, or a dict with "name" and optionally "free"/"total") as a working dict."""
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"offload policy: device entry {dict(spec)!r} has no 'name'")
        entry = dict(spec)
        entry["name"] = str(entry["name"])
        if "free" not in entry:
            entry.update({k: v for k, v in get_device_properties(entry["name"]).items() if k not in entry})
        entry.setdefault("total", entry["free"])
        entry.setdefault("props", None)
    else:
        entry = get_device_properties(spec)
    if isinstance(entry["free"], bool) or not isinstance(entry["free"], int) or entry["free"] < 0:
        raise ValueError(f"offload policy: free memory of {entry['name']} must be an int >= 0, got {entry['free']!r}")
    entry["modules"] = []
    return entry


def _cap(limit: Any, total_size: int, index: int) -> Optional[int]:
    """A device's budget from a policy limit: ints are bytes, floats a fraction of the model; <= 0 / None: none."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise ValueError(f"offload policy: limits[{index}] must be a number of bytes or a fraction, got {limit!r}")
    if isinstance(limit, float) and not math.isfinite(limit):
        raise ValueError(f"offload policy: limits[{index}] is {limit!r}")
    if limit <= 0:
        return None
    if isinstance(limit, float):
        return int(math.floor(total_size * limit))
    return int(limit)


def _fmt_bytes(n: int) -> str:
    return f"{n} bytes ({n / (1 << 20):.2f} MiB)"


def _placement_units(module: torch.nn.Module, policy: Mapping[str, Any]) -> List[Tuple[str, int]]:
    """(name, bytes) of the modules to place, in model order.

    A unit is a leaf module, or a parent's own parameters and buffers (moved
    without its children).  Units holding nothing and names the policy
    filters out are left alone.
    """
    units = []
    for name, m in module.named_modules():
        leaf = not any(True for _ in m.children())
        size = get_module_size(m, recurse=leaf)
        if size and passes_policy(policy, name):
            units.append((name, size))
    return units


def get_model_offload_policy(module: torch.nn.Module, policy: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
    """Assign a model's leaf modules to devices within memory budgets; the devices that got modules.

    ``policy`` keys (all optional):

    * ``devices`` (or ``device``): device names, or dicts ``{"name", "free"}``
      giving the free bytes (no query, handy for planning); default
      :func:`get_devices` (CUDA devices, then ``cpu``).
    * ``limits``: one per device: an ``int`` is bytes, a ``float`` a fraction
      of the size of the modules being placed; 0, negative or None is no cap.
      A cap never raises a device above its free memory.
    * ``assign``: one list of name substrings per device; matching modules go
      to that device first while they fit, the rest join the others.
    * ``include`` / ``exclude``: which module names take part
      (:func:`passes_policy`; default every module).

    Remaining modules fill the devices in model order, moving to the next
    device when one is full (so the default device list spills onto ``cpu``).
    A module that fits nowhere raises ValueError naming it, its size and each
    device's budget (the original asserted).  Returns a list of dicts
    ``{"name", "free" (left), "total", "modules": [names]}``.
    """
    if policy is None:
        policy = {}
    elif not isinstance(policy, Mapping):
        raise TypeError(f"offload policy must be a dict or None, got {type(policy).__name__}")
    if "devices" in policy and "device" in policy:
        raise ValueError("offload policy: give 'devices' or 'device', not both")
    specs = policy.get("devices", policy.get("device"))
    if specs is None:
        specs = get_devices()
    elif isinstance(specs, (str, Mapping)):
        specs = [specs]
    devices = [_device_entry(s) for s in specs]
    if not devices:
        raise ValueError("offload policy: no devices")
    limits = list(policy.get("limits") or [])
    assign = list(policy.get("assign") or [])
    for key, values in (("limits", limits), ("assign", assign)):
        if len(values) > len(devices):
            raise ValueError(f"offload policy: {len(values)} {key} for {len(devices)} devices")

    units = _placement_units(module, policy)
    total_size = sum(size for _, size in units)

    for i, limit in enumerate(limits):
        cap = _cap(limit, total_size, i)
        if cap is not None and cap < devices[i]["free"]:
            devices[i]["free"] = cap
    budgets = [d["free"] for d in devices]

    placed = set()
    for i, patterns in enumerate(assign):
        if not patterns:
            continue
        if isinstance(patterns, str):
            patterns = [patterns]
        device = devices[i]
        for name, size in units:
            if name in placed or not passes_policy({"include": list(patterns)}, name):
                continue
            if size <= device["free"]:
                device["modules"].append(name)
                device["free"] -= size
                placed.add(name)
            else:
                log.info("offload: %s (%s) assigned to %s does not fit there; placing it with the rest",
                         name, _fmt_bytes(size), device["name"])

    d = 0
    for name, size in units:
        if name in placed:
            continue
        while d < len(devices) and size > devices[d]["free"]:
            log.info("offload: %s is full, moving on from %s (%s)", devices[d]["name"], name, _fmt_bytes(size))
            d += 1
        if d == len(devices):
            budget = ", ".join(
                f"{dev['name']}: {_fmt_bytes(b)} budget, {_fmt_bytes(dev['free'])} left" for dev, b in zip(devices, budgets)
            )
            raise ValueError(
                f"offload policy cannot place module {name!r} of {_fmt_bytes(size)} "
                f"(model part being placed: {_fmt_bytes(total_size)}); devices: {budget}. "
                "Raise the limits or add a device such as 'cpu'."
            )
        devices[d]["modules"].append(name)
        devices[d]["free"] -= size
        placed.add(name)

    return [dev for dev in devices if dev["modules"]]


def _move_tensors(x: Any, device: Union[str, torch.device]) -> Any:
    return tree_map(lambda t: t.to(device), x)


def _first_tensor_device(x: Any) -> Optional[torch.device]:
    found: List[torch.device] = []

    def grab(t: torch.Tensor) -> torch.Tensor:
        if not found:
            found.append(t.device)
        return t

    tree_map(grab, x)
    return found[0] if found else None


def offload_model(model: torch.nn.Module, policy: Optional[Mapping[str, Any]] = None) -> torch.nn.Module:
    """Move a model's modules to the devices :func:`get_model_offload_policy` picks; returns the model.

    Each placed module gets hooks that move its tensor inputs to its device
    and its outputs back to the device its first tensor input came from, so
    parents that mix the outputs of children on different devices keep
    working.  A parent placed for its own parameters moves only those (its
    children go where they were placed, with their own hooks).  The
    plan is kept in ``model.offload_plan`` as ``{module name: device}``.
    """
    plan = get_model_offload_policy(model, policy=policy)
    for handle in getattr(model, "_mlutils_offload_hooks", ()):  # offloading again replaces the hooks
        handle.remove()
    handles: List[Any] = []
    where: Dict[str, str] = {}
    for device in plan:
        for name in device["modules"]:
            where[name] = device["name"]
    for name, device in where.items():
        m = model.get_submodule(name)
        leaf = not any(True for _ in m.children())
        if leaf:
            m.to(device)
        else:
            m._apply(lambda t, device=device: t.to(device), recurse=False)

        def pre_hook(mod: torch.nn.Module, args: Any, kwargs: Any, device: str = device) -> Any:
            mod._mlutils_input_device = _first_tensor_device((args, kwargs))
            return _move_tensors(args, device), _move_tensors(kwargs, device)

        def post_hook(mod: torch.nn.Module, args: Any, output: Any) -> Any:
            back = getattr(mod, "_mlutils_input_device", None)
            return output if back is None else _move_tensors(output, back)

        handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(post_hook))
    model._mlutils_offload_hooks = handles
    model.offload_plan = where
    return model
