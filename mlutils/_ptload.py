"""Reading PyTorch ``.pt``/``.pth`` checkpoints without running pickle code.

The file is parsed in C (zip or legacy format) by a restricted unpickler that
accepts only what ``torch.load(weights_only=True)`` accepts; tensors are NumPy
arrays over the file's private mapping (or copies when the record is
deflated, misaligned, big-endian or legacy), turned into torch tensors when
torch is importable and ``framework="pt"``.  A tensor saved as a conjugate
or negative view (torch's ``conj``/``neg`` bits, in the rebuild's metadata
dict) comes back with those bits set as torch.load sets them; as a NumPy
array it is a copy with them applied (NumPy has no such bits).

Everything but tensor bytes (end records, central directory, local headers,
data.pkl, small records, legacy pickles) is read with pread and checked
against the size fstat reported, so a file truncated by another process
during the load raises TorchFormatError, never SIGBUS.  The one hazard left
is the same as ``torch.load(mmap=True)``'s: with ``mmap=True`` (the default)
tensors view the file's pages, and if the file is cut while they are alive,
touching the vanished pages raises SIGBUS.  ``mmap=False`` copies the tensor
bytes with pread and has no such hazard.

Zip records whose bytes overlap are refused (TorchFormatError naming both
records), never copied: so tensors viewing the mapping never alias across
storages, as torch.load's tensors do not.  The pickle's work and memory are
bounded by its size (a data.pkl that expands far beyond it is refused), and
every check a load makes, verify() makes too.
"""
from __future__ import annotations

import logging
import os
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Union

import numpy as np

from . import _core
from ._core import TorchFormatError, UnsafePickleError
from ._torch import optional_torch, require_torch

if TYPE_CHECKING:
    import torch

__all__ = ["load", "load_unsafe", "read_index", "verify", "TorchFormatError", "UnsafePickleError"]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]



class _Hooks(NamedTuple):
    """What _core._pt_load calls to build torch values (read there by name).

    ``tensor`` and ``device`` are called with keyword arguments only (csrc/py/ptload.c names them
    in one table each); ``dtype`` and ``size`` with their one value."""

    # tensor(*, storage, key, name (dtype name), offset, shape, stride, requires_grad, is_parameter,
    # conj, neg): conj and neg (0/1) are torch's conjugate and negative bits (the values are the
    # view's elements conjugated / negated; the reader has checked that the dtype takes them)
    tensor: Callable[..., Any]
    dtype: Callable[[str], Any]  # torch dtype name -> value
    size: Callable[[tuple], Any]  # shape tuple -> value (torch.Size)
    # device(*, type, index): torch.device's arguments in the pickle: type "cuda" (or "cuda:1"),
    # index an int or None when the pickle gave none
    device: Callable[..., Any]

# The torch dtype table lives in C (csrc/core/torch_dtypes.c), shared with the reader and writer.
_DTYPES = {row.name: row for row in _core.torch_dtypes()}
_RAW = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8", 16: "<c16"}


def numpy_dtype(name: str) -> np.dtype:
    """NumPy dtype for a torch dtype name: native, ml_dtypes when installed, else a same-size unsigned view."""
    row = _DTYPES[name]
    if row.numpy is not None:
        return np.dtype(row.numpy)
    if row.ml_dtypes is not None:
        try:
            import ml_dtypes

            return np.dtype(getattr(ml_dtypes, row.ml_dtypes))
        except (ImportError, AttributeError):
            pass
    return np.dtype(_RAW[row.itemsize])


def _np_array(storage: np.ndarray, name: str, offset: int, shape: tuple, stride: tuple) -> np.ndarray:
    dt = numpy_dtype(name)
    isz = dt.itemsize
    if 0 in shape:  # an empty view may start anywhere (torch loads it); it has no bytes to view
        offset = 0
    return np.ndarray(shape, dtype=dt, buffer=storage, offset=offset * isz,
                      strides=tuple(s * isz for s in stride))


def _resolve_flags(a: np.ndarray, name: str, conj: int, neg: int) -> np.ndarray:
    """A new array of ``a``'s values (dtype ``name``) conjugated and/or negated, bit for bit as torch's resolve_conj/resolve_neg."""
    out = np.array(a, order="C")  # a copy: views of the same storage keep their own values
    if name.startswith(("int", "uint")):  # the reader allows neg on signed ints and uint8: wraps, as torch
        np.negative(out, out=out)
        return out
    # floating point and complex (also bfloat16 and complex32 as raw bits): flip sign bits
    unit = _DTYPES[name].itemsize // (2 if name.startswith("complex") else 1)
    bits = out.reshape(-1).view(np.dtype(f"<u{unit}"))  # a view: out is a fresh C-ordered array
    sign = bits.dtype.type(1 << (8 * unit - 1))
    if neg:
        bits ^= sign
    if conj:  # the imaginary halves
        bits[1::2] ^= sign
    return out


class _NumpyHooks:
    """Builds NumPy values (framework "np", or "pt" without torch)."""

    def __init__(self) -> None:
        self.hooks = _Hooks(tensor=self.tensor, dtype=self.dtype, size=tuple, device=self.device)

    @staticmethod
    def tensor(storage: np.ndarray, key: str, name: str, offset: int, shape: tuple, stride: tuple,
               requires_grad: int, is_parameter: int, conj: int, neg: int) -> np.ndarray:
        a = _np_array(storage, name, offset, shape, stride)
        return _resolve_flags(a, name, conj, neg) if conj or neg else a

    @staticmethod
    def dtype(name: str) -> Any:
        """A torch dtype value as a NumPy dtype where NumPy (or ml_dtypes) has one, else its torch name."""
        dt = numpy_dtype(name)
        return dt if _DTYPES[name].numpy is not None or dt.name == name else name

    @staticmethod
    def device(*, type: str, index: Any) -> str:  # noqa: A002 (torch.device's own name)
        return type if index is None else f"{type}:{index}"


class _TorchHooks:
    """Builds torch values: one uint8 tensor per storage, tensors are strided views of it."""

    def __init__(self, torch: ModuleType, device: str) -> None:
        self.torch = torch
        self.device = torch.device(device)
        self.bases: dict[str, Any] = {}
        self.hooks = _Hooks(tensor=self.tensor, dtype=self.dtype, size=torch.Size, device=self.make_device)

    def tensor(self, storage: np.ndarray, key: str, name: str, offset: int, shape: tuple, stride: tuple,
               requires_grad: int, is_parameter: int, conj: int, neg: int) -> Any:
        torch = self.torch
        base = self.bases.get(key)
        if base is None:
            base = torch.from_numpy(storage)
            if self.device.type != "cpu":
                base = base.to(self.device)
            self.bases[key] = base
        dt = getattr(torch, name)
        isz = _DTYPES[name].itemsize
        n = base.numel() - base.numel() % isz
        if n == 0:
            flat = torch.empty(0, dtype=dt, device=base.device)
        else:
            flat = (base if n == base.numel() else base[:n]).view(dt)
        t = flat.as_strided(shape, stride, offset)
        try:
            if conj or neg:  # torch's lazy bits on this view alone, as torch.load sets them
                flags = {"conj": True} if conj else {}
                if neg:
                    flags["neg"] = True
                torch._utils.set_tensor_metadata(t, flags)
            if is_parameter:
                return torch.nn.Parameter(t, requires_grad=bool(requires_grad))
            if requires_grad:
                t.requires_grad_(True)
        except RuntimeError as e:  # e.g. requires_grad on an integer tensor
            raise TorchFormatError(f"tensor over storage {key!r}: {e}") from e
        return t

    def dtype(self, name: str) -> torch.dtype:
        return getattr(self.torch, name)

    def make_device(self, *, type: str, index: Any) -> torch.device:  # noqa: A002 (torch.device's own name)
        # torch.device("cuda:1") parses the index out of type; given index=None it refuses that
        return self.torch.device(type) if index is None else self.torch.device(type, index)


def load(path: PathLike, device: str = "cpu", framework: str = "pt", *, mmap: bool = True) -> Any:
    """Load a torch.save file safely (weights-only rules): torch tensors for "pt" (NumPy without torch), arrays for "np"; mmap=False copies tensor bytes.

    Values are those of torch.load(weights_only=True), or TorchFormatError / UnsafePickleError
    (nothing else) where torch would fail or differ; zip records that overlap are refused, not copied.
    """
    if framework not in ("pt", "np"):
        raise ValueError(f"framework must be 'pt' or 'np', not {framework!r}")
    mode = "mmap" if mmap else "copy"
    torch = optional_torch() if framework == "pt" else None
    if torch is None:
        if framework == "pt":
            log.info("torch is not installed: loading %s as NumPy arrays", path)
        if str(device) != "cpu":
            raise ValueError(f"device {device!r} needs torch (NumPy arrays live on the CPU)")
        return _core._pt_load(os.fspath(path), mode, _NumpyHooks().hooks)
    return _core._pt_load(os.fspath(path), mode, _TorchHooks(torch, device).hooks)


def load_unsafe(path: PathLike, device: str = "cpu") -> Any:
    """Load any pickle with torch.load(weights_only=False): this runs code from the file; trusted files only."""
    warnings.warn(
        f"load_unsafe({os.fspath(path)!r}) runs torch.load(weights_only=False): the file can execute arbitrary code",
        stacklevel=2,
    )
    torch = require_torch("load_unsafe")
    return torch.load(os.fspath(path), map_location=device, weights_only=False)


class _TensorInfo(NamedTuple):
    key: str
    dtype: str
    shape: tuple
    nbytes: int


class _IndexedTensor(_TensorInfo):
    """A tensor as read_index/verify see it.  It takes the Python attributes of a tensor
    (``t.note = "x"`` before torch.save) as a loaded torch tensor would: each is first set on
    an empty torch tensor of the same dtype (and kind) when torch is importable, so that
    verify() refuses exactly what a load would refuse."""

    def __setattr__(self, attr: str, value: Any) -> None:
        torch = optional_torch()
        if torch is not None:
            rg, is_param = self.__dict__.get("_flags", (0, 0))
            probe = torch.empty(0, dtype=getattr(torch, self.dtype))
            if is_param:
                probe = torch.nn.Parameter(probe, requires_grad=bool(rg))
            setattr(probe, attr, value)
        self.__dict__[attr] = value


def _index_hooks() -> _Hooks:
    def tensor(storage: Any, key: str, name: str, offset: int, shape: tuple, stride: tuple,
               requires_grad: int, is_parameter: int, conj: int, neg: int) -> _TensorInfo:
        numel = 1
        for s in shape:
            numel *= s
        info = _IndexedTensor(key, name, tuple(shape), numel * _DTYPES[name].itemsize)
        info.__dict__["_flags"] = (requires_grad, is_parameter)
        return info

    return _Hooks(tensor=tensor, dtype=str, size=tuple, device=_NumpyHooks.device)


def _walk(root: Any) -> list:
    """Tensors of the object with dotted paths, depth first in container order.  Iterative (no
    recursion limit) over one iterator per open container, so memory grows with the depth, not
    with the number of items; a path is spelled only for a tensor.  A container reached twice
    (shared through the pickle memo, or holding itself) is listed under its first path only, so a
    crafted DAG cannot make the walk exponential."""
    out: list = []

    def entry(info: _TensorInfo, node: Any) -> None:
        keys = []
        while node is not None:
            node, k = node
            keys.append(str(k))
        out.append({"name": ".".join(reversed(keys)), "dtype": info.dtype, "shape": list(info.shape),
                    "nbytes": info.nbytes, "storage": info.key})

    def children(obj: Any) -> Any:
        return iter(obj.items()) if isinstance(obj, dict) else enumerate(obj)

    if isinstance(root, _TensorInfo):
        entry(root, None)
        return out
    if not isinstance(root, (dict, list, tuple)):
        return out
    seen = {id(root)}
    stack: list = [(children(root), None)]
    while stack:
        it, node = stack[-1]
        for k, v in it:
            if isinstance(v, _TensorInfo):
                entry(v, (node, k))
            elif isinstance(v, (dict, list, tuple)) and len(v) and id(v) not in seen:
                seen.add(id(v))
                stack.append((children(v), (node, k)))
                break
        else:
            stack.pop()
    return out


def read_index(path: PathLike) -> list[dict]:
    """One dict per tensor {"name", "dtype" (torch name, e.g. "float32"), "shape", "nbytes", "storage"}; reads no tensor data."""
    return _walk(_core._pt_load(os.fspath(path), "index", _index_hooks()))


def verify(path: PathLike) -> None:
    """Validate an untrusted file completely (zip, pickle allowlist, sizes, bounds, deflate streams, CRC-32 unless 0, the storage offsets torch computes from .format_version); raise on any problem."""
    _core._pt_load(os.fspath(path), "verify", _index_hooks())
