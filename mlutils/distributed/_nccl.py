"""The NCCL communicator (libnccl.so.2 loaded at run time by the C core)."""
from __future__ import annotations

import os
import time
from datetime import timedelta
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple, Union

from .._core import nccl_dtypes as _nccl_dtypes, nccl_ops as _nccl_ops
from .._torch import optional_torch, require_torch
from ._collectives import _agree, _broadcast_bytes
from ._env import _import_torch_dist
from ._errors import DistributedError, DistributedTimeoutError
from ._init import _as_timedelta, _cuda_usable

if TYPE_CHECKING:
    import torch


class NcclUnavailableError(DistributedError, ImportError):
    """libnccl.so.2 could not be loaded (the message lists every place tried)."""

    __module__ = "mlutils.distributed"


#: Reductions by name, as NCCL numbers them (ncclRedOp_t; the C core's enum).
NCCL_OPS = dict(_nccl_ops)
#: Data types by name, as NCCL numbers them (ncclDataType_t; the C core's enum).
NCCL_DTYPES = dict(_nccl_dtypes)


def _nccl_wheel_dirs() -> list:
    """lib folders of installed nvidia-nccl-cu* wheels (``nvidia/nccl/lib`` and the like)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        for sub in ("nccl/lib", "cu13/lib", "cu12/lib"):
            d = os.path.join(base, sub)
            if os.path.isdir(d):
                dirs.append(d)
    return dirs


def nccl_library() -> Tuple[str, int]:
    """Load libnccl.so.2 once and return ``(path, version_code)``.

    Looks at $MLUTILS_NCCL_PATH (only there when set), an NCCL this process
    already loaded (PyTorch's), the nvidia-nccl pip wheels, the CUDA install
    ($CUDA_HOME, $CUDA_PATH, /usr/local/cuda) and the system library path;
    NCCL 2.18 or later.  Raises :class:`NcclUnavailableError` naming every
    place tried and what to install.
    """
    from .. import _core
    from . import _nccl_wheel_dirs as wheel_dirs  # the package's name, which a caller may replace

    try:
        lib = _core.nccl_load(wheel_dirs())
    except ImportError as e:
        raise NcclUnavailableError(str(e)) from None
    return lib.path, lib.version


def _torch_dtype_code(torch: ModuleType, dtype: torch.dtype) -> int:
    name = str(dtype).replace("torch.", "")
    code = NCCL_DTYPES.get(name)
    if code is None:
        raise TypeError(f"NCCL has no data type for {dtype} (supported: {', '.join(NCCL_DTYPES)})")
    return code


def _op_code(op: Any) -> int:
    name = getattr(op, "name", op)  # accepts torch.distributed.ReduceOp members too
    if isinstance(name, str) and name.lower() in NCCL_OPS:
        return NCCL_OPS[name.lower()]
    raise ValueError(f"unknown reduction {op!r}: use one of {', '.join(NCCL_OPS)}")


class Communicator:
    """An NCCL communicator driven from Python, on the caller's current CUDA stream.

    Made with :meth:`from_process_group` (the unique id is created on the
    group's first rank and sent to the others over that torch.distributed
    group) or :meth:`from_unique_id`.  Tensor methods take contiguous CUDA
    tensors on this communicator's device and enqueue on
    ``torch.cuda.current_stream()`` unless ``stream`` (a torch stream or a
    raw ``cudaStream_t`` int) is given; :attr:`handle` takes raw device
    pointers.  Every failure carries NCCL's own error text.  With ``timeout``
    the communicator is non-blocking and each call (and :meth:`synchronize`)
    gives up after that many seconds, aborting the communicator.
    """

    __module__ = "mlutils.distributed"

    def __init__(self, handle: Any, timeout: Optional[float], device: Optional[int]):
        self._handle = handle
        self.timeout = timeout
        self.device = device

    # ---- construction
    @staticmethod
    def unique_id() -> bytes:
        """A new 128-byte NCCL unique id (ncclGetUniqueId; needs no GPU)."""
        from .. import _core

        nccl_library()
        return _call(_core.nccl_unique_id)

    @staticmethod
    def exchange_unique_id(group: Any = None) -> bytes:
        """Make an id on the group's first rank and return it on every rank of ``group``."""
        _torch, dist = _import_torch_dist("Communicator")
        what = "Communicator.exchange_unique_id"
        if not dist.is_initialized():
            raise DistributedError(f"{what}: torch.distributed is not initialised; "
                                   "call mlutils.distributed.init_distributed() first")
        if group is not None and dist.get_rank(group) < 0:
            raise DistributedError(f"{what}: rank {dist.get_rank()} is not in the group; "
                                   "call it on the group's ranks only")
        src = 0 if group is None else dist.get_global_rank(group, 0)
        # NCCL is needed on every rank: one rank without it stops all of them,
        # with the same exception everywhere (so they take the same branch).
        error: Optional[Exception] = None
        try:
            nccl_library()
        except Exception as e:
            error = e
        _agree(dist, group, error, what, "NCCL could not be loaded", NcclUnavailableError)
        uid = _broadcast_bytes(dist, Communicator.unique_id, src, group, what, "could not make the NCCL unique id")
        if len(uid) != 128:
            raise DistributedError(f"{what}: the NCCL unique id received from rank {src} is {len(uid)} bytes, not 128")
        return uid

    @classmethod
    def from_process_group(cls, group: Any = None, timeout: Union[float, timedelta, None] = None) -> "Communicator":
        """One communicator over the ranks of a torch.distributed ``group`` (default: the world)."""
        _torch, dist = _import_torch_dist("Communicator")
        _as_timedelta(timeout)  # a bad timeout is refused before any rank waits for another
        uid = cls.exchange_unique_id(group)
        return cls.from_unique_id(uid, dist.get_rank(group), dist.get_world_size(group), timeout=timeout)

    @classmethod
    def from_unique_id(cls, uid: bytes, rank: int, size: int,
                       timeout: Union[float, timedelta, None] = None) -> "Communicator":
        """Join the communicator ``uid`` as ``rank`` of ``size`` on the current CUDA device."""
        from .. import _core

        td = _as_timedelta(timeout)
        nccl_library()
        device = None
        torch = optional_torch()
        if torch is not None and _cuda_usable(torch):
            device = torch.cuda.current_device()
        handle = _call(_core.nccl_comm_init, size, uid, rank, td.total_seconds() if td else 0.0)
        return cls(handle, None if td is None else td.total_seconds(), device)

    # ---- properties
    @property
    def handle(self) -> Any:
        """The raw communicator: methods take device pointers, counts, NCCL dtype/op codes, streams."""
        return self._handle

    @property
    def rank(self) -> int:
        return self._handle.rank

    @property
    def size(self) -> int:
        return self._handle.size

    # ---- helpers
    def _stream(self, stream: Any) -> int:
        if stream is None:
            torch = require_torch("Communicator")
            return int(torch.cuda.current_stream().cuda_stream)
        if isinstance(stream, int):
            return stream
        return int(stream.cuda_stream)

    def _check(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if not getattr(t, "is_cuda", False):
                raise ValueError(f"NCCL needs CUDA tensors, got one on {getattr(t, 'device', type(t).__name__)}")
            if not t.is_contiguous():
                raise ValueError("NCCL needs contiguous tensors")
            if self.device is not None and t.device.index != self.device:
                raise ValueError(f"tensor on cuda:{t.device.index}, the communicator is on cuda:{self.device}")
        if len({t.dtype for t in tensors}) > 1:
            raise TypeError(f"tensors of different dtypes: {[str(t.dtype) for t in tensors]}")

    def _dtype(self, t: torch.Tensor) -> int:
        torch = require_torch("Communicator")
        return _torch_dtype_code(torch, t.dtype)

    # ---- collectives (tensors)
    def all_reduce(self, tensor: torch.Tensor, op: Any = "sum", out: Optional[torch.Tensor] = None,
                   stream: Any = None) -> torch.Tensor:
        """Reduce ``tensor`` over ranks into ``out`` (default: in place); returns the result tensor."""
        out = tensor if out is None else out
        self._check(tensor, out)
        if out.numel() != tensor.numel():
            raise ValueError(f"out has {out.numel()} elements, tensor {tensor.numel()}")
        _call(self._handle.all_reduce, tensor.data_ptr(), out.data_ptr(), tensor.numel(),
              self._dtype(tensor), _op_code(op), self._stream(stream))
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0, stream: Any = None) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` into ``tensor`` on every rank (in place)."""
        self._check(tensor)
        _call(self._handle.broadcast, tensor.data_ptr(), tensor.data_ptr(), tensor.numel(),
              self._dtype(tensor), src, self._stream(stream))
        return tensor

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, stream: Any = None) -> torch.Tensor:
        """Every rank's ``input`` one after another into ``output`` (size * input.numel() elements)."""
        self._check(output, input)
        if output.numel() != input.numel() * self.size:
            raise ValueError(f"all_gather output needs {input.numel() * self.size} elements, has {output.numel()}")
        _call(self._handle.all_gather, input.data_ptr(), output.data_ptr(), input.numel(),
              self._dtype(input), self._stream(stream))
        return output

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: Any = "sum",
                       stream: Any = None) -> torch.Tensor:
        """Reduce ``input`` over ranks; rank r keeps block r in ``output`` (input.numel() / size elements)."""
        self._check(output, input)
        if input.numel() != output.numel() * self.size:
            raise ValueError(f"reduce_scatter input needs {output.numel() * self.size} elements, has {input.numel()}")
        _call(self._handle.reduce_scatter, input.data_ptr(), output.data_ptr(), output.numel(),
              self._dtype(input), _op_code(op), self._stream(stream))
        return output

    def send(self, tensor: torch.Tensor, peer: int, stream: Any = None) -> None:
        """Send ``tensor`` to rank ``peer`` (pair with its :meth:`recv`)."""
        self._check(tensor)
        _call(self._handle.send, tensor.data_ptr(), tensor.numel(), self._dtype(tensor), peer, self._stream(stream))

    def recv(self, tensor: torch.Tensor, peer: int, stream: Any = None) -> torch.Tensor:
        """Receive into ``tensor`` from rank ``peer``."""
        self._check(tensor)
        _call(self._handle.recv, tensor.data_ptr(), tensor.numel(), self._dtype(tensor), peer, self._stream(stream))
        return tensor

    def group_start(self) -> None:
        """ncclGroupStart: the following calls are issued together at :meth:`group_end`."""
        _call(self._handle.group_start)

    def group_end(self) -> None:
        _call(self._handle.group_end)

    def barrier(self, stream: Any = None) -> None:
        """All ranks meet: a one-element all_reduce, then wait for it."""
        torch = require_torch("Communicator.barrier")

        t = torch.zeros(1, dtype=torch.float32, device=torch.device("cuda", self.device or 0))
        self.all_reduce(t, stream=stream)
        self.synchronize(stream)

    def synchronize(self, stream: Any = None, timeout: Union[float, timedelta, None] = None) -> None:
        """Wait for the work queued on ``stream``; with a timeout (or the communicator's), poll and abort when late."""
        torch = require_torch("Communicator.synchronize")

        td = _as_timedelta(timeout)
        limit = td.total_seconds() if td is not None else self.timeout
        s = torch.cuda.current_stream() if stream is None else (
            torch.cuda.ExternalStream(stream) if isinstance(stream, int) else stream)
        if limit is None:
            s.synchronize()
            self.check()
            return
        deadline = time.monotonic() + limit
        while not s.query():
            self.check()
            if time.monotonic() > deadline:
                self.abort()
                raise DistributedTimeoutError(
                    f"NCCL work did not finish within the timeout of {limit:g} s; the communicator was aborted")
            time.sleep(0.0005)
        self.check()

    def check(self) -> None:
        """Raise when NCCL reports an asynchronous error on this communicator."""
        code, text = _call(self._handle.async_error)
        if code not in (0, 7):
            raise DistributedError(f"NCCL communicator error: {text}")

    def abort(self) -> None:
        """ncclCommAbort: stop now (pending work is dropped); safe to call again."""
        _call(self._handle.abort)

    def destroy(self) -> None:
        """ncclCommDestroy after pending work; safe to call again."""
        _call(self._handle.destroy)

    @property
    def closed(self) -> bool:
        return bool(self._handle.closed)

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.destroy()
        else:
            self.abort()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Communicator rank {self.rank} of {self.size}, cuda:{self.device}, {state}>"


def _call(fn: Callable, *args: Any) -> Any:
    """Call into the C core, turning its TimeoutError/RuntimeError into ours (NCCL's text kept)."""
    try:
        return fn(*args)
    except TimeoutError as e:
        raise DistributedTimeoutError(str(e)) from e
    except ImportError as e:
        raise NcclUnavailableError(str(e)) from e
    except RuntimeError as e:
        raise DistributedError(str(e)) from e
