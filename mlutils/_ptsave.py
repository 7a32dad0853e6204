"""Writing PyTorch ``.pt`` files (torch.save's zip format) without needing torch.

The archive is byte for byte what ``torch.save`` (torch >= 2.7 on Linux)
writes for the same object and file name: same records in the same order,
names, 64-byte alignment, zip64 rules, CRCs and ``.data/serialization_id``.
So ``torch.load`` reads it with ``weights_only=True``, with ``mmap=True`` and
with torch's computed storage offsets.  Accepted values: dicts, ``collections.OrderedDict`` (attributes such
as a state dict's ``_metadata`` included), lists, tuples, str, int, float,
bool, None, NumPy scalars (written as Python values), NumPy arrays and torch
tensors (written as CPU tensors; storage sharing is kept; a conjugate or
negative view with the flag dict torch writes, ``{'conj': True}`` /
``{'neg': True}``, unless the reader would refuse it: a negative view of a
dtype torch cannot negate, such as bool, is a ValueError).

Older readers (torch 2.1-2.6) load these files too.  They find every record
by name through the zip directory, so the numeric ``data/`` order (older
writers used lexicographic order) does not matter to them; they read only
``data.pkl``, ``version`` (``3``, within every reader's supported range),
``byteorder`` and ``data/<key>`` (size checked against numel x element
size), and ignore ``.format_version``, ``.storage_alignment`` and
``.data/serialization_id``.  ``.format_version`` changes how a reader works
only in torch >= 2.7 with ``calculate_storage_offsets`` on, and the layout
reproduces torch's exactly for that case.  With ``mmap=True`` (2.1+) each
record is used at its local header's offset + 30 + name + extra, which is
64-byte aligned here.  The pickle uses only protocol-2 opcodes and the
globals weights_only has accepted since 1.13 (``_rebuild_tensor_v2``, the
legacy ``torch.*Storage`` classes, ``collections.OrderedDict``), except for
dtypes that only exist in newer torch (float8, uint16/32/64, ...), which
need ``_rebuild_tensor_v3`` as torch itself writes them.  Checked by
tests/test_ptsave_compat.py with an emulation of those readers.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Tuple, Union

from . import _core
from ._checks import check_durable
from ._torch import loaded_torch, require_torch

if TYPE_CHECKING:
    import torch

__all__ = ["save", "save_bytes"]

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

_ZIP64_LIMIT = 0xFFFFFFFF


class _ParameterDescription(NamedTuple):
    """A ``torch.nn.Parameter`` as the C writer pickles it: ``_rebuild_parameter(data, requires_grad, ...)``."""

    data: Any
    requires_grad: bool
    kind = "param"


class _TensorDescription(NamedTuple):
    """A plain tensor as the C writer pickles it (what torch.save records); read by field name."""

    dtype: str  # torch dtype name without "torch."
    size: Tuple[int, ...]
    stride: Tuple[int, ...]
    storage_offset: int
    requires_grad: bool
    storage_id: int  # identity of the untyped storage (shared storages are written once)
    storage: Any
    nbytes: int
    metadata: Optional[dict]
    kind = "tensor"


class _StorageBytes(NamedTuple):
    """Where a storage's bytes are on the CPU; ``owner`` keeps them alive."""

    owner: Any
    address: int
    nbytes: int


def _describe(t: torch.Tensor) -> Union[_TensorDescription, _ParameterDescription]:
    """How the C writer should pickle torch tensor ``t`` (what torch.save records)."""
    torch = require_torch("saving torch tensors")

    if isinstance(t, torch.nn.Parameter):
        if type(t) is not torch.nn.Parameter or torch._utils._get_obj_state(t):
            raise TypeError(f"{type(t).__qualname__} with Python attributes cannot be saved")
        return _ParameterDescription(data=t.data, requires_grad=bool(t.requires_grad))
    if type(t) is not torch.Tensor:
        raise TypeError(f"tensor subclass {type(t).__module__}.{type(t).__qualname__} cannot be saved")
    if t.layout is not torch.strided:
        raise TypeError(f"tensors with layout {t.layout} cannot be saved")
    if t.is_quantized or t.is_nested:
        raise TypeError("quantized and nested tensors cannot be saved")
    if t.device.type == "meta":
        raise TypeError("meta tensors have no data to save")
    if torch._utils._get_obj_state(t):
        raise TypeError("a tensor with Python attributes cannot be saved")
    storage = t.untyped_storage()
    metadata = torch._utils.get_tensor_metadata(t) or None
    return _TensorDescription(
        dtype=str(t.dtype)[len("torch."):], size=tuple(t.shape), stride=t.stride(),
        storage_offset=t.storage_offset(), requires_grad=bool(t.requires_grad),
        storage_id=storage._cdata, storage=storage, nbytes=storage.nbytes(), metadata=metadata)


def _storage_bytes(storage: torch.UntypedStorage) -> _StorageBytes:
    """Where the bytes of ``storage`` are on the CPU (copied there first if need be)."""
    if storage.device.type != "cpu":
        storage = storage.cpu()
    return _StorageBytes(owner=storage, address=storage.data_ptr(), nbytes=storage.nbytes())


def _tensor_type() -> Optional[type]:
    # Without torch imported there can be no torch tensor in the object.
    torch = loaded_torch()
    return getattr(torch, "Tensor", None) if torch is not None else None


def archive_name(path: PathLike) -> str:
    """The record folder torch.save uses for ``path``: its basename without the last extension."""
    name = os.fsdecode(os.fspath(path))
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        return "archive"
    start = max(name.rfind("/"), name.rfind("\\")) + 1
    base = name[start:]
    dot = base.rfind(".")
    if dot >= 0:
        base = base[:dot]
    return base or "archive"


def _write(obj: Any, path: Optional[Union[str, bytes]], archive: str, zip64_limit: int,
           durable: bool = True) -> Optional[bytes]:
    return _core._ptsave_write(obj, path, archive, _tensor_type(), _describe, _storage_bytes,
                               zip64_limit, durable=durable)


def save(obj: Any, path: PathLike, *, durable: bool = True, _zip64_limit: int = _ZIP64_LIMIT) -> None:
    """Write ``obj`` to ``path`` as torch.save would, atomically (temp file, rename).

    ``durable`` (the default) also fsyncs the file before the rename and the
    folder after it, so the save survives a power loss; ``durable=False``
    skips both (still atomic: a crash leaves the old file or the new one).
    """
    check_durable(durable, "save")
    fspath = os.fspath(path)  # an OSError names the file as given, as open() does
    _write(obj, fspath, archive_name(fspath), _zip64_limit, durable)


def save_bytes(obj: Any, *, _zip64_limit: int = _ZIP64_LIMIT) -> bytes:
    """The bytes ``torch.save(obj, io.BytesIO())`` would produce (archive name ``archive``)."""
    data = _write(obj, None, "archive", _zip64_limit)
    assert data is not None
    return data
