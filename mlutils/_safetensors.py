"""safetensors reading and writing over the C core.

Files written here are byte-for-byte those the ``safetensors`` library writes
for the same tensors and metadata (tensors ordered by dtype descending then
name, compact JSON, space padding to a multiple of 8; metadata keys sorted,
where the library's order is only fixed for one key).  Reading validates the
header as the library does (its number grammar and limits included: integers
in [0, 2^64-1], header at most 100,000,000 bytes, nesting at most 127; plus:
duplicate keys are an error, and names holding NUL are refused on read and
write, since jansson cannot hold them) and returns
NumPy arrays that point into a private copy-on-write mapping of the file:
writable, zero-copy, and the file itself never changes.

A file cut by another process while it is read raises SafetensorsError,
never SIGBUS: the header, slices (``get_slice``) and copies are read with
pread, and before an array views the mapping the file is checked to still
have every byte it had when opened.  The one hazard left is
``torch.load(mmap=True)``'s: if the file is cut while such arrays are alive,
touching their vanished pages raises SIGBUS.

dtypes on the NumPy side
    BOOL U8 I8 U16 I16 U32 I32 U64 I64 F16 F32 F64 C64 are NumPy's own.
    BF16 and the F8 types are ``ml_dtypes`` types when it is installed, else
    raw-bits views (BF16 as uint16, F8_* as uint8).
    F4, F6_E2M3 and F6_E3M2 pack several elements per byte and load as raw
    uint8 bytes: the header's shape with the last dimension scaled by
    bits/8 (F4: halved, F6: times 3/4) when that is a whole number, else one
    dimension holding all the packed bytes (``get_slice(name).get_shape()``
    and :func:`read_header` give the logical shape).  To write raw bytes as
    any dtype, pass a :class:`RawTensor`.
dtypes on the torch side
    torch's own dtypes; F4 is ``torch.float4_e2m1fn_x2`` whose last dimension
    is half the file's (as the library does); F6 has no torch dtype.
"""
from __future__ import annotations

import logging
import operator
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np

from . import _core
from ._checks import check_durable
from ._core import SafetensorsError
from ._torch import TorchNotInstalledError, loaded_torch, require_torch

if TYPE_CHECKING:
    import torch

__all__ = [
    "RawTensor",
    "SafetensorsError",
    "TorchNotInstalledError",
    "load",
    "load_file",
    "read_header",
    "safe_open",
    "save",
    "save_file",
    "verify",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
#: What save_file takes for each name: a NumPy array, a torch tensor or a RawTensor.
Tensor = Union[np.ndarray, "torch.Tensor", "RawTensor"]

# The dtype table lives in C (csrc/core/safetensors.c, joined with the torch
# dtype table of csrc/core/torch_dtypes.c); every map here is built from it.
_ROWS = _core.safetensors_dtypes()
#: (name, bits) in the format's declaration order.
DTYPES: Tuple[Tuple[str, int], ...] = tuple((r.name, r.bits) for r in _ROWS)
_BITS = dict(DTYPES)
_SUBBYTE = frozenset(name for name, bits in DTYPES if bits % 8)
# NumPy's own types.
_NATIVE = {r.name: np.dtype(r.numpy) for r in _ROWS if r.numpy is not None}
# ml_dtypes names of the types NumPy lacks.
_ML_NAMES = {r.name: r.ml_dtypes for r in _ROWS if r.ml_dtypes is not None}
# Same-size raw views: what the file holds, bit for bit (sub-byte types: the packed bytes).
_RAW = {r.name: _NATIVE[r.name] if r.name in _NATIVE else np.dtype(f"<u{r.bits // 8}" if r.bits % 8 == 0 else "u1")
        for r in _ROWS}
_TORCH_NAMES = {r.name: r.torch for r in _ROWS if r.torch is not None}


class RawTensor(NamedTuple):
    """Raw little-endian bytes written as ``dtype`` (a format code such as
    ``"F6_E2M3"`` or ``"BF16"``) with the logical ``shape``."""

    dtype: str
    shape: Tuple[int, ...]
    data: Any  # any C-contiguous buffer holding exactly the packed bytes


def _np_table() -> Dict[str, np.dtype]:
    """The NumPy dtype each format code loads as."""
    table = dict(_RAW)
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes is a test dependency
        return table
    for code, name in _ML_NAMES.items():
        dt = getattr(ml_dtypes, name, None)
        if dt is not None:
            table[code] = np.dtype(dt)
    return table


_np_table_cache: Optional[Dict[str, np.dtype]] = None
_np_code_cache: Optional[Dict[np.dtype, str]] = None


def _np_dtypes() -> Tuple[Dict[str, np.dtype], Dict[np.dtype, str]]:
    global _np_table_cache, _np_code_cache
    if _np_table_cache is None:
        table = _np_table()
        codes = {dt: code for code, dt in _NATIVE.items()}
        for code in _ML_NAMES:
            if table[code] != _RAW[code]:
                codes[table[code]] = code
        _np_table_cache, _np_code_cache = table, codes
    assert _np_code_cache is not None
    return _np_table_cache, _np_code_cache


#: What to do instead when torch tensors were asked for without torch.
NUMPY_INSTEAD = "pass framework='np' for numpy arrays"


def _framework(framework: str) -> str:
    if framework in ("np", "numpy"):
        return "np"
    if framework in ("pt", "torch"):
        return "pt"
    raise ValueError(f"framework must be 'np' or 'pt' ('numpy'/'torch'), not {framework!r}")


# ---------------------------------------------------------------- writing

def _is_torch_tensor(x: Any) -> bool:
    torch = loaded_torch()  # no tensor can exist unless torch was imported
    return torch is not None and isinstance(x, torch.Tensor)


def _torch_bounds(t: torch.Tensor, esize: int) -> Tuple[int, int]:
    """[start, stop) bytes a torch tensor touches."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        ext = (size - 1) * stride
        lo += min(0, ext)
        hi += max(0, ext)
    return t.data_ptr() + lo * esize, t.data_ptr() + (hi + 1) * esize


def _np_bounds(a: np.ndarray) -> Tuple[int, int]:
    if a.size == 0:
        p = a.__array_interface__["data"][0]
        return p, p
    lo, hi = np.lib.array_utils.byte_bounds(a) if hasattr(np.lib, "array_utils") else np.byte_bounds(a)
    return lo, hi


def _np_root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


class _Area(NamedTuple):
    start: int
    stop: int
    name: str
    complete: bool


def _areas(tensors: Mapping[str, Any]) -> Dict[Any, List[_Area]]:
    """Memory areas of every tensor, grouped by device (the key)."""
    groups: Dict[Any, List[_Area]] = {}
    for name, t in tensors.items():
        if isinstance(t, RawTensor):
            continue
        if isinstance(t, np.ndarray):
            start, stop = _np_bounds(t)
            root = _np_root(t)
            rstart, rstop = _np_bounds(root)
            complete = t.flags.c_contiguous and (start, stop) == (rstart, rstop) and root.flags.c_contiguous
            key: Any = "numpy"
        else:
            if t.layout != _torch_strided():
                raise SafetensorsError(f"tensor {name!r} is not dense (layout {t.layout}): cannot be saved")
            if t.device.type == "meta":
                raise SafetensorsError(f"tensor {name!r} is on the meta device: it holds no data")
            storage = t.untyped_storage()
            if storage.data_ptr() == 0 or storage.nbytes() == 0:
                continue
            start, stop = _torch_bounds(t, t.element_size())
            complete = t.data_ptr() == storage.data_ptr() and t.numel() * t.element_size() == storage.nbytes()
            key = ("torch", str(t.device))
        groups.setdefault(key, []).append(_Area(start, stop, name, complete))
    return groups


def _torch_strided() -> torch.layout:
    torch = require_torch("saving torch tensors")

    return torch.strided


def _shared_groups(tensors: Mapping[str, Any]) -> List[List[_Area]]:
    """Groups (two or more names) of tensors whose memory overlaps."""
    out: List[List[_Area]] = []
    for areas in _areas(tensors).values():
        areas = sorted(a for a in areas if a.stop > a.start)
        cur: List[_Area] = []
        stop = -1
        for a in areas:
            if cur and a.start < stop:
                cur.append(a)
                stop = max(stop, a.stop)
            else:
                if len(cur) > 1:
                    out.append(cur)
                cur, stop = [a], a.stop
        if len(cur) > 1:
            out.append(cur)
    return out


def _dedupe(tensors: Mapping[str, Any], metadata: Optional[Dict[str, str]], dedupe: bool
            ) -> Tuple[Mapping[str, Any], Optional[Dict[str, str]]]:
    groups = _shared_groups(tensors)
    if not groups:
        return tensors, metadata
    if not dedupe:
        names = "; ".join(", ".join(repr(a.name) for a in sorted(g, key=lambda a: a.name)) for g in groups)
        raise SafetensorsError(
            f"some tensors share memory ({names}): a file would store the data twice and lose the tie. "
            "Pass dedupe=True to keep one name per storage (the dropped names are recorded in the "
            "metadata as {dropped: kept}), or save clones (tensor.clone() / array.copy())."
        )
    kept = dict(tensors)
    meta = dict(metadata) if metadata is not None else {}
    for g in groups:
        complete = sorted(a.name for a in g if a.complete)
        if not complete:
            raise SafetensorsError(
                f"tensors {sorted(a.name for a in g)} share memory but none covers the whole storage: "
                "cannot choose one to keep; save clones instead"
            )
        keep = complete[0]
        for a in sorted(g, key=lambda a: a.name):
            if a.name != keep:
                meta.setdefault(a.name, keep)
                del kept[a.name]
                log.debug("safetensors: %r shares memory with %r, not written", a.name, keep)
    return kept, meta


class _Entry(NamedTuple):
    """One tensor for _core.st_serialize, which reads these fields by name."""

    name: str
    dtype: str  # safetensors dtype ("F32", "BF16", ...)
    shape: Tuple[int, ...]
    data: Any  # a C-contiguous buffer of the tensor's bytes


def _np_entry(name: str, a: np.ndarray, codes: Dict[np.dtype, str]) -> _Entry:
    dt = a.dtype
    if dt.byteorder == ">" or (dt.byteorder == "=" and sys.byteorder == "big"):
        a = a.astype(dt.newbyteorder("<"))
        dt = a.dtype
    code = codes.get(dt)
    if code is None:
        raise TypeError(
            f"tensor {name!r}: NumPy dtype {dt} has no safetensors equivalent "
            "(wrap raw bytes in RawTensor to write F4/F6 or other packed types)"
        )
    shape = tuple(a.shape)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return _Entry(name=name, dtype=code, shape=shape, data=a.reshape(-1).view(np.uint8))


def _torch_entry(name: str, t: torch.Tensor, codes: Dict[torch.dtype, str]) -> _Entry:
    torch = require_torch("saving torch tensors")

    code = codes.get(t.dtype)
    if code is None:
        raise TypeError(f"tensor {name!r}: torch dtype {t.dtype} has no safetensors equivalent")
    t = t.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    shape = tuple(t.shape)
    if code == "F4":
        if not shape:
            raise SafetensorsError(f"tensor {name!r}: a float4_e2m1fn_x2 scalar cannot be saved")
        shape = shape[:-1] + (shape[-1] * 2,)
    # Contiguous means dense, but a size-1 or empty dimension may carry any
    # stride (t[::2][:1], x.expand(1)): restride to the plain flat view.
    flat = t.as_strided((t.numel(),), (1,))
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return _Entry(name=name, dtype=code, shape=shape, data=flat.numpy())


def _torch_codes() -> Dict[torch.dtype, str]:
    torch = require_torch("saving torch tensors")

    out = {}
    for code, tname in _TORCH_NAMES.items():
        dt = getattr(torch, tname, None)
        if dt is not None:
            out[dt] = code
    return out


def _entries(tensors: Mapping[str, Any], metadata: Optional[Mapping[str, str]], dedupe: bool):
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of names to arrays or tensors, not {type(tensors).__name__}")
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping of str to str, not {type(metadata).__name__}")
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map str to str: key {k!r} has a {type(v).__name__} value")
        metadata = dict(metadata)
    checked: Dict[str, Any] = {}
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, not {type(name).__name__}")
        if name == "__metadata__":
            raise SafetensorsError("'__metadata__' is reserved for the header's metadata and cannot name a tensor")
        if isinstance(t, np.generic):
            t = np.asarray(t)
        if not isinstance(t, (RawTensor, np.ndarray)) and not _is_torch_tensor(t):
            raise TypeError(f"tensor {name!r}: expected a NumPy array or torch tensor, not {type(t).__name__}")
        checked[name] = t
    tensors, metadata = _dedupe(checked, metadata, dedupe)
    _, np_codes = _np_dtypes()
    torch_codes: Optional[Dict[Any, str]] = None
    entries = []
    for name, t in tensors.items():
        if isinstance(t, RawTensor):
            if not isinstance(t.dtype, str) or t.dtype not in _BITS:
                raise ValueError(f"tensor {name!r}: unknown safetensors dtype {t.dtype!r}")
            entries.append(_Entry(name=name, dtype=t.dtype, shape=_raw_shape(name, t.shape), data=t.data))
        elif isinstance(t, np.ndarray):
            entries.append(_np_entry(name, t, np_codes))
        else:
            if torch_codes is None:
                torch_codes = _torch_codes()
            entries.append(_torch_entry(name, t, torch_codes))
    return entries, metadata


def _raw_shape(name: str, shape: Any) -> Tuple[int, ...]:
    """A RawTensor's shape as ints in [0, 2**64): no float truncated, no bool taken for 0/1."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"tensor {name!r}: shape must be a sequence of ints, not {type(shape).__name__}") from None
    out = []
    for d in dims:
        if isinstance(d, (bool, np.bool_)):
            raise TypeError(f"tensor {name!r}: shape {dims!r} holds a bool, not an int")
        try:
            v = operator.index(d)
        except TypeError:
            raise TypeError(f"tensor {name!r}: shape {dims!r} holds a {type(d).__name__}, not an int") from None
        if v < 0 or v >= 1 << 64:
            raise SafetensorsError(f"tensor {name!r}: shape {dims!r} has a dimension outside [0, 2**64)")
        out.append(v)
    return tuple(out)


def save_file(tensors: Mapping[str, Tensor], path: PathLike, metadata: Optional[Mapping[str, str]] = None,
              *, dedupe: bool = False, durable: bool = True) -> None:
    """Write ``tensors`` (NumPy arrays / torch tensors on any device) to
    ``path`` atomically, byte-identical to the ``safetensors`` library.

    ``durable`` (the default) fsyncs the file before renaming it over
    ``path`` and the folder after, so the save survives a power loss;
    ``durable=False`` skips both, as the library does (still atomic: a crash
    or kill leaves the old file or the new one, never half of one).

    Tensors that share memory raise :class:`SafetensorsError` unless
    ``dedupe``: then one name per storage is kept (the alphabetically smallest
    that covers the whole storage, as ``safetensors.torch.save_model`` does)
    and each dropped name is recorded in the metadata as ``{dropped: kept}``.
    """
    check_durable(durable, "save_file")
    entries, meta = _entries(tensors, metadata, dedupe)
    _core.st_serialize(entries, meta, os.fspath(path), durable=durable)


def save(tensors: Mapping[str, Tensor], metadata: Optional[Mapping[str, str]] = None, *, dedupe: bool = False) -> bytes:
    """The bytes :func:`save_file` would write."""
    entries, meta = _entries(tensors, metadata, dedupe)
    return _core.st_serialize(entries, meta)


# ---------------------------------------------------------------- reading

def _torch_dtype(code: str, name: str, error: Callable[[str], Exception]) -> torch.dtype:
    torch = require_torch("reading safetensors with framework='pt'", NUMPY_INSTEAD)

    tname = _TORCH_NAMES.get(code)
    dt = getattr(torch, tname, None) if tname else None
    if dt is None:
        raise error(f"tensor {name!r}: dtype {code} has no torch equivalent in torch {torch.__version__}")
    return dt


def _to_torch(arr: np.ndarray, code: str, shape: Tuple[int, ...], name: str, device: str,
              error: Callable[[str], Exception]) -> torch.Tensor:
    """arr as a torch tensor of the file's dtype on device; error(text): the exception naming the file."""
    torch = require_torch("reading safetensors with framework='pt'", NUMPY_INSTEAD)

    dt = _torch_dtype(code, name, error)
    if code == "F4" and (not shape or shape[-1] % 2):
        raise error(
            f"tensor {name!r}: F4 shape {list(shape)} has an odd last dimension: torch's float4_e2m1fn_x2 holds pairs"
        )
    t = torch.from_numpy(arr)
    if t.dtype != dt:
        t = t.view(dt)
    if device != "cpu":
        t = t.to(device)
    return t


class _Reader:
    """Shared reading logic over one SafetensorsMap."""

    def __init__(self, m: Any, framework: str, device: str = "cpu") -> None:
        self.map = m
        self.framework = _framework(framework)
        if self.framework == "pt":
            require_torch("reading safetensors with framework='pt'", NUMPY_INSTEAD)
        self.device = str(device)
        if self.framework == "np" and self.device != "cpu":
            raise ValueError(f"NumPy arrays live on the CPU: device {device!r} needs framework='pt'")
        self.entries = m.entries()
        self.index = {e.name: i for i, e in enumerate(self.entries)}
        self.table = _np_dtypes()[0] if self.framework == "np" else _RAW

    def raw(self, i: int, check: bool = True) -> np.ndarray:
        """A zero-copy array (the torch path copies misaligned tensors); check=False: the caller
        called map.check() (the file has not shrunk) itself."""
        return self.map.array(i, self.table[self.entries[i].dtype], self.framework == "pt", check)

    def convert(self, arr: np.ndarray, i: int) -> Any:
        if self.framework == "np":
            return arr
        e = self.entries[i]
        return _to_torch(arr, e.dtype, e.shape, e.name, self.device, self.map.error)

    def tensor(self, i: int) -> Any:
        return self.convert(self.raw(i), i)

    def all(self) -> Dict[str, Any]:
        self.map.check()  # once, not per tensor: a file cut before now is an error, not SIGBUS
        return {e.name: self.convert(self.raw(i, False), i) for i, e in enumerate(self.entries)}


def load_file(path: PathLike, framework: str = "np", device: str = "cpu") -> Dict[str, Any]:
    """Every tensor of the file, in offset order: NumPy arrays over a private
    mapping ("np"), or torch tensors ("pt"/"torch") moved to ``device``
    (without torch, "pt" raises :class:`TorchNotInstalledError`)."""
    m = _core.st_open(os.fspath(path))
    try:
        return _Reader(m, framework, device).all()
    finally:
        m.close()  # the arrays keep the mapping, not the file descriptor


def load(data: bytes, framework: str = "np") -> Dict[str, Any]:
    """Like :func:`load_file` over the bytes of a file (copied once)."""
    return _Reader(_core.st_from_bytes(data), framework).all()


_ROW_CHUNK = 16 << 20  # bytes of rows a sparse selection reads at a time


def _rows_applicable(idx: Tuple[Any, ...], ndim: int) -> bool:
    """Whether idx is (first-axis key, basic items...): the first key an int,
    a slice, or a list/array of ints or bools (one dimension for bools)."""
    if ndim == 0 or not idx or not all(_basic_index(i) for i in idx[1:]):
        return False
    k = idx[0]
    if k is None or k is Ellipsis:
        return False
    if _basic_index(k):
        return True
    try:
        a = np.asarray(k)
    except Exception:  # noqa: BLE001 - anything NumPy cannot take: the general path decides
        return False
    return a.dtype.kind in "iu" or (a.dtype == np.bool_ and a.ndim == 1)


def _basic_index(i: Any) -> bool:
    """An index item NumPy applies as a view (no element read): int, slice, None, Ellipsis."""
    if i is None or i is Ellipsis or isinstance(i, slice):
        return True
    return isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_))


class _Slice:
    """A tensor not read yet: index it to read only that part."""

    def __init__(self, reader: _Reader, i: int) -> None:
        self._reader = reader
        self._i = i

    def get_shape(self) -> List[int]:
        return list(self._reader.entries[self._i].shape)

    def get_dtype(self) -> str:
        return self._reader.entries[self._i].dtype

    def __getitem__(self, index: Any) -> Any:
        # Reads with pread (a file cut by another process is then a
        # SafetensorsError, never SIGBUS) and copies the selection out of what
        # it read; nothing is read through the mapping.  A selection that spans
        # far more bytes than it keeps (rows picked out of a large table, a
        # column) is read row by row in bounded chunks.
        r = self._reader
        full = r.map.array(self._i, r.table[self.get_dtype()], False)  # a view: no bytes read yet
        idx = index if isinstance(index, tuple) else (index,)
        basic = all(_basic_index(i) for i in idx)
        if not basic or full.size == 0:
            if full.size and _rows_applicable(idx, full.ndim):
                return r.convert(self._by_rows(full, idx[0], idx[1:]), self._i)
            whole = np.ndarray(full.shape, full.dtype, r.map.read(self._i, 0, full.nbytes))
            return r.convert(np.array(whole[index], copy=True, order="C"), self._i)
        if not any(i is Ellipsis for i in idx):
            idx += (Ellipsis,)  # integers then give a 0-d view, not an element read from the mapping
        sel = full[idx]
        if sel.size == 0:
            return r.convert(np.empty(sel.shape, sel.dtype), self._i)
        first = sel.__array_interface__["data"][0] - full.__array_interface__["data"][0]
        lo = first + sum(s * (n - 1) for s, n in zip(sel.strides, sel.shape) if s < 0)
        hi = first + sum(s * (n - 1) for s, n in zip(sel.strides, sel.shape) if s > 0) + sel.itemsize
        if hi - lo > 4 * sel.nbytes + _ROW_CHUNK and _rows_applicable(idx, full.ndim):
            return r.convert(self._by_rows(full, idx[0], idx[1:]), self._i)
        part = np.ndarray(sel.shape, sel.dtype, r.map.read(self._i, lo, hi), first - lo, sel.strides)
        if not (part.flags.c_contiguous and part.nbytes == hi - lo):  # else the bytes read are the result
            part = np.array(part, copy=True, order="C")
        return r.convert(part, self._i)

    def _by_rows(self, full: np.ndarray, key0: Any, rest: Tuple[Any, ...]) -> np.ndarray:
        """full[(key0,) + rest], reading only the rows key0 picks, at most
        _ROW_CHUNK bytes of them at a time (rest is basic indexing)."""
        r = self._reader
        rows = np.arange(full.shape[0])[key0]  # NumPy's own rules (and IndexError) for the first axis
        flat = rows.reshape(-1)
        uniq = np.unique(flat)
        row_bytes = full.nbytes // full.shape[0]
        per = max(1, _ROW_CHUNK // row_bytes)
        pieces = []
        for b in range(0, len(uniq), per):
            batch = uniq[b:b + per]
            buf = np.empty((len(batch),) + full.shape[1:], full.dtype)
            raw = buf.reshape(-1).view(np.uint8)
            # one read per run of consecutive rows
            breaks = np.flatnonzero(np.diff(batch) != 1) + 1
            for run in np.split(np.arange(len(batch)), breaks):
                a, n = int(batch[run[0]]), len(run)
                raw[run[0] * row_bytes:(run[0] + n) * row_bytes] = r.map.read(self._i, a * row_bytes,
                                                                              (a + n) * row_bytes)
            pieces.append(np.array(buf[(slice(None),) + rest], copy=True))
        sub = np.concatenate(pieces, axis=0)
        out = sub[np.searchsorted(uniq, flat)]
        return np.ascontiguousarray(out.reshape(rows.shape + sub.shape[1:]))

    def __repr__(self) -> str:
        return f"<safetensors slice {self._reader.entries[self._i].name!r} {self.get_dtype()} {self.get_shape()}>"


class safe_open:
    """``with safe_open(path, framework="np", device="cpu") as f``: a lazy
    view of a file; only the tensors (or slices) asked for are read."""

    def __init__(self, filename: PathLike, framework: str = "np", device: str = "cpu") -> None:
        self._map = _core.st_open(os.fspath(filename))  # kept after close(): its errors name the file
        self._reader: Optional[_Reader] = _Reader(self._map, framework, device)

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the file; tensors already returned stay valid."""
        if self._reader is not None:
            self._reader.map.close()
        self._reader = None

    def _r(self) -> _Reader:
        if self._reader is None:
            raise self._map.error("the file is closed")
        return self._reader

    def _at(self, name: str) -> int:
        r = self._r()
        try:
            return r.index[name]
        except KeyError:
            raise r.map.error(f"no tensor named {name!r} in the file") from None

    def keys(self) -> List[str]:
        """Tensor names, sorted."""
        return sorted(self._r().index)

    def offset_keys(self) -> List[str]:
        """Tensor names in file (offset) order."""
        return [e.name for e in self._r().entries]

    def metadata(self) -> Optional[Dict[str, str]]:
        """The ``__metadata__`` dict, or None when the file has none."""
        return self._r().map.metadata()

    def get_tensor(self, name: str) -> Any:
        return self._r().tensor(self._at(name))

    def get_slice(self, name: str) -> _Slice:
        return _Slice(self._r(), self._at(name))


# ---------------------------------------------------------------- inspection

def read_header(path: PathLike) -> Tuple[Optional[Dict[str, str]], List[Dict[str, Any]]]:
    """Validated header: (metadata or None, entries in offset order, each
    ``{"name", "dtype", "shape", "data_offsets"}``)."""
    m = _core.st_open(os.fspath(path))
    m.close()
    entries = [
        {"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
        for e in m.entries()
    ]
    return m.metadata(), entries


def verify(path: PathLike) -> None:
    """Raise :class:`SafetensorsError` unless ``path`` is a valid safetensors file."""
    _core.st_open(os.fspath(path)).close()
