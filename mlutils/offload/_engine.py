"""The engine interface of activation offload: handles, engines, shared engines.

:class:`OffloadEngine` offloads the tensors of one device through a backend
chosen once, when it is made: ``_CudaBackend`` (``_cuda.py``, the C/CUDA
engine) for a CUDA device, ``_CpuBackend`` (``_cpu.py``, pooled host
buffers) for the CPU.  It checks arguments, decides what is copied and how
(a tensor too small, or one the engine cannot give back as it was, stays
where it is), and keeps the state of each :class:`OffloadHandle` under one
lock.  :func:`get_engine` gives the engine shared by everything that
offloads tensors of a device (offload_checkpoint, offload_saved_tensors).

PyTorch is imported when a function needs it, never at import.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Optional, Protocol, Tuple

from .. import _core
from ..utils import _torch
from ._cpu import _CpuBackend
from ._cuda import _CudaBackend

#: Tensors smaller than this stay on their device (offloading them costs more than it saves).
DEFAULT_MIN_BYTES = 1 << 20
#: Bytes of sources that may wait for their device-to-host copy before
#: ``offload`` waits for the oldest (see OffloadEngine).
DEFAULT_MAX_INFLIGHT = _core.OFFLOAD_DEFAULT_MAX_INFLIGHT

_MODES = {"bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8", "float8": "fp8", "e4m3": "fp8"}

CudaOffloadEngine = _core.CudaOffloadEngine  # the raw-pointer engine: save(ptr, nbytes, mode, scratch, stream)
HostPool = _core.HostPool


class OffloadPoolFullError(_core.MlutilsError, MemoryError):
    """The offload pool's byte cap (``max_bytes``) was reached."""


def _check_compress(compress: Optional[str]) -> Optional[str]:
    if compress is None:
        return None
    if not isinstance(compress, str) or compress.lower() not in _MODES:
        raise ValueError(f"compress must be None, 'bf16' or 'fp8', got {compress!r}")
    return _MODES[compress.lower()]


def _check_bytes_limit(value: Any, what: str) -> None:
    """A byte limit: None (no limit) or an int >= 0; ValueError naming `what` otherwise."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{what} must be None or an int >= 0, got {value!r}")


def _check_count(value: Any, what: str) -> None:
    """A size or count (min_bytes, prefetch): an int >= 0 (not a bool); ValueError naming `what` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")


def _engine_device(torch: Any, device: Any) -> Any:
    """The device an engine is keyed by: "cpu" for any CPU index (CPU tensors
    say "cpu"), a CUDA device with its index, the current one for a bare
    "cuda" (RuntimeError, not torch's AssertionError, where there is none)."""
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda" or device.index is not None:
        return device
    if not _core.cuda_built():
        raise RuntimeError(f"mlutils was built without CUDA: reinstall it with nvcc available "
                           f"(MLUTILS_CUDA=1) to offload CUDA tensors (device {device})")
    if not _cuda_usable(torch):
        raise RuntimeError(f"offload: no CUDA device for {device} (torch.cuda.is_available() is False)")
    return torch.device("cuda", torch.cuda.current_device())


def _mode_for(torch: Any, dtype: Any, compress: Optional[str]) -> int:
    """The engine mode for a tensor of `dtype`: float32 -> bf16 under either
    compression, float16/bfloat16 -> e4m3 under 'fp8', everything else raw."""
    if compress is None:
        return _core.OFFLOAD_RAW
    if dtype == torch.float32:
        return _core.OFFLOAD_F32_BF16
    if compress == "fp8" and dtype == torch.float16:
        return _core.OFFLOAD_F16_E4M3
    if compress == "fp8" and dtype == torch.bfloat16:
        return _core.OFFLOAD_BF16_E4M3
    return _core.OFFLOAD_RAW


def _dense(tensor: Any) -> bool:
    """Whether `tensor`'s elements fill one span of memory without overlap
    (contiguous in some order of its dimensions), starting at data_ptr()."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(tensor.shape, tensor.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _offloadable(torch: Any, tensor: Any) -> bool:
    """Whether the engine can copy `tensor` out and give it back as it was: a
    plain dense tensor (or a parameter).  Sparse, nested and quantized tensors
    and other tensor subclasses stay where they are (a reload would lose
    their layout or type)."""
    return (tensor.layout == torch.strided and not tensor.is_sparse and not tensor.is_nested
            and not tensor.is_quantized and type(tensor) in (torch.Tensor, torch.nn.Parameter))


def _has_engine(tensor: Any) -> bool:
    """Whether an engine can offload tensors of `tensor`'s device (the CPU, or
    CUDA in a build with it); elsewhere (meta, ...) they stay where they are."""
    kind = tensor.device.type
    return kind == "cpu" or (kind == "cuda" and _core.cuda_built())


def _raise_pool_error(e: MemoryError) -> None:
    if "is full" in str(e):
        raise OffloadPoolFullError(str(e)) from e
    raise e


# ---------------------------------------------------------------------------
# handles and engines


class OffloadHandle:
    """An offloaded tensor.  ``reload()`` gives it back (a new tensor of the same
    shape, dtype and device, and the same strides when its elements filled one
    span, as channels_last or transposed tensors do); ``prefetch()`` starts
    that copy early; ``release()``
    (or garbage collection) returns its host buffer to the pool."""

    __slots__ = ("engine", "shape", "stride", "dtype", "device", "nbytes", "mode", "kept", "key", "copied",
                 "prefetched", "reloaded", "seq", "__weakref__")

    def __init__(self, engine: "OffloadEngine", tensor: Any, mode: int, key: Any, kept: Any = None):
        self.engine = engine
        self.shape = None if tensor.is_nested else tuple(tensor.shape)  # a nested tensor (kept) has no sizes
        self.stride: Optional[Tuple[int, ...]] = None  # a dense non-contiguous tensor's strides, kept on reload
        self.dtype = tensor.dtype
        self.device = tensor.device
        self.nbytes = tensor.numel() * tensor.element_size()
        self.mode = mode
        self.key = key          # the engine's handle (int) or the CPU pool's (id, buffer); None when kept
        self.kept = kept        # the tensor itself when it stayed on its device
        self.copied = kept is None  # it was copied out (stays so once released)
        self.prefetched = None  # the reloaded tensor while a prefetch is outstanding
        self.reloaded = False   # reload() handed the tensor back at least once
        self.seq = 0

    @property
    def offloaded(self) -> bool:
        """Whether the tensor was copied out (False: small, it stayed where it was)."""
        return self.copied

    @property
    def released(self) -> bool:
        return self.kept is None and self.key is None

    def prefetch(self) -> None:
        self.engine.prefetch(self)

    def reload(self) -> Any:
        return self.engine.reload(self)

    def release(self) -> None:
        self.engine.release(self)

    def __del__(self) -> None:
        try:
            if self.key is not None:
                self.engine.release(self)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        state = "kept" if self.kept is not None else ("released" if self.key is None else "offloaded")
        return f"OffloadHandle({state}, shape={self.shape}, dtype={self.dtype}, device={self.device})"


class _Backend(Protocol):
    """What OffloadEngine asks of the copies of its device (``_CudaBackend``,
    ``_CpuBackend``); the engine keeps the handles and calls these under its
    lock.  A key is the backend's name for one offloaded copy."""

    def save(self, src: Any, nbytes: int, mode: int) -> Any:
        """Start the copy (packed per `mode`) of dense `src`; its key.  MemoryError when the pool is full."""

    def load(self, key: Any, mode: int, nbytes: int, out: Any) -> None:
        """Start the copy of `key` back into the dense tensor `out`."""

    def wait(self, key: Any) -> None:
        """Order the caller's current stream after the load of `key`."""

    def sync(self, key: Any) -> None:
        """Block until the copies of `key` are done."""

    def release(self, key: Any) -> None:
        """The copy's buffer goes back to the pool (once its copies are done)."""

    def stats(self) -> Dict[str, int]:
        """The pool's counters and ``inflight_waits``."""

    def trim(self) -> int:
        """Free the cached buffers; the bytes freed."""

    def set_max_inflight(self, max_inflight: Optional[int]) -> None:
        """The bound on bytes of sources waiting for their copy (see OffloadEngine)."""


class OffloadEngine:
    """Offloads tensors of one device: ``offload`` -> handle, ``prefetch``,
    ``reload``, ``release``.  The copies go through a backend chosen once,
    by the device: the C/CUDA engine on CUDA devices (pinned pool, copy
    streams, events; ``_cuda.py``), pooled host buffers on the CPU
    (``_cpu.py``).  The engine keeps the handles' state under one lock.

    max_bytes caps the host pool (None: no cap; hitting it raises
    :class:`OffloadPoolFullError`); tensors under min_bytes stay on the device.

    max_inflight bounds the device memory held by sources whose copy to the
    host has not finished (CUDA): an offload never makes the compute stream
    wait for its copy, but when the copies queued and not yet done pass
    max_inflight bytes, ``offload`` waits (the calling thread, GIL released)
    for the oldest ones.  Without the bound, a model that makes activations
    faster than the link drains them keeps all of them in torch's caching
    allocator until their copies catch up: it reuses a copied source's memory
    only once the host has seen the copy finish.  None: no bound.
    """

    def __init__(self, device: Any = None, max_bytes: Optional[int] = None, min_bytes: int = 0,
                 max_inflight: Optional[int] = DEFAULT_MAX_INFLIGHT):
        torch = _torch("mlutils.offload")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if _cuda_usable(torch) else torch.device("cpu")
        device = torch.device(device)
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"OffloadEngine: device {device} is neither cuda nor cpu")
        _check_count(min_bytes, "OffloadEngine: min_bytes")
        _check_bytes_limit(max_bytes, "OffloadEngine: max_bytes")
        _check_bytes_limit(max_inflight, "OffloadEngine: max_inflight")
        device = _engine_device(torch, device)
        self.device = device
        self.max_inflight = max_inflight
        self.min_bytes = min_bytes
        self._lock = threading.RLock()  # handles may be released by GC while it is held
        backend = _CudaBackend if device.type == "cuda" else _CpuBackend
        self._backend: _Backend = backend(torch, device, max_bytes, max_inflight, self._lock)

    @property
    def _cuda(self) -> Any:
        """The raw ``_core.CudaOffloadEngine`` of a CUDA engine, None on the CPU
        (for checks that look inside it: the tests, the bench)."""
        return getattr(self._backend, "raw", None)

    @property
    def d2h_stream(self) -> Any:
        """The device-to-host copy stream (CUDA engines only)."""
        return self._backend.d2h_stream  # type: ignore[attr-defined]

    @property
    def h2d_stream(self) -> Any:
        """The host-to-device copy stream (CUDA engines only)."""
        return self._backend.h2d_stream  # type: ignore[attr-defined]

    # -- offload

    def offload(self, tensor: Any, compress: Optional[str] = None, min_bytes: Optional[int] = None) -> OffloadHandle:
        """Start copying `tensor` off its device; returns its handle.  The
        caller's stream never waits for the copy."""
        torch = _torch("mlutils.offload")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"offload: expected a tensor, got {type(tensor).__name__}")
        if tensor.device != self.device:
            raise ValueError(f"offload: tensor on {tensor.device}, engine on {self.device}")
        compress = _check_compress(compress)
        if min_bytes is not None:
            _check_count(min_bytes, "offload: min_bytes")
        limit = self.min_bytes if min_bytes is None else min_bytes
        nbytes = tensor.numel() * tensor.element_size()
        if (not _offloadable(torch, tensor) or nbytes == 0 or nbytes < limit
                or tensor.untyped_storage().nbytes() < nbytes):
            # the last: an expanded (overlapping) tensor holds less memory than its copy would take
            return OffloadHandle(self, tensor, _core.OFFLOAD_RAW, None, kept=tensor)
        mode = _mode_for(torch, tensor.dtype, compress)
        src = tensor.detach()
        stride = None
        if not src.is_contiguous():
            if _dense(src):
                # one span of memory in another order (channels_last, a transpose):
                # copied as it lies, given back with the same strides
                stride = tuple(src.stride())
                src = src.as_strided((src.numel(),), (1,))
            else:
                src = src.contiguous()
        try:
            key = self._backend.save(src, nbytes, mode)
        except MemoryError as e:
            _raise_pool_error(e)
        handle = OffloadHandle(self, tensor, mode, key)
        handle.stride = stride
        return handle

    # -- reload

    def _own(self, handle: Any, what: str) -> None:
        """TypeError unless `handle` is an OffloadHandle; ValueError unless this engine made it
        (its buffer id means nothing to another engine's pool)."""
        if not isinstance(handle, OffloadHandle):
            raise TypeError(f"{what}: expected an OffloadHandle, got {type(handle).__name__}")
        if handle.engine is not self:
            raise ValueError(f"{what}: the handle belongs to another engine (of {handle.engine.device}); "
                             f"call handle.{what}() or that engine's {what}()")

    def prefetch(self, handle: OffloadHandle) -> None:
        """Start the copy back now (on the caller's current stream's device)."""
        torch = _torch("mlutils.offload")
        self._own(handle, "prefetch")
        with self._lock:
            if handle.kept is not None or handle.prefetched is not None:
                return
            if handle.key is None:
                raise ValueError("prefetch: the handle was released")
            if handle.stride is None:
                out = torch.empty(handle.shape, dtype=handle.dtype, device=self.device)
            else:
                out = torch.empty_strided(handle.shape, handle.stride, dtype=handle.dtype, device=self.device)
            self._backend.load(handle.key, handle.mode, handle.nbytes, out)
            handle.prefetched = out

    def _prefetch_if_live(self, handle: OffloadHandle) -> None:
        """prefetch() of a neighbour's handle (the next one backward needs),
        which its owner may release or reload meanwhile, in another thread or
        through garbage collection: nothing then."""
        with self._lock:
            if handle.key is None or handle.reloaded:
                return
            self.prefetch(handle)

    def reload(self, handle: OffloadHandle) -> Any:
        """The tensor back on its device; on CUDA, ready for every kernel queued
        on the caller's current stream from now on."""
        self._own(handle, "reload")
        if handle.kept is not None:
            return handle.kept
        if handle.key is None:
            raise ValueError("reload: the handle was released")
        self.prefetch(handle)
        with self._lock:
            out, handle.prefetched = handle.prefetched, None
            handle.reloaded = True
            if out is None:  # pragma: no cover - a concurrent reload took it
                raise RuntimeError("reload: the handle was reloaded concurrently")
            self._backend.wait(handle.key)
        return out

    def release(self, handle: OffloadHandle) -> None:
        """Forget the offloaded copy (its buffer returns to the pool)."""
        self._own(handle, "release")
        with self._lock:
            handle.kept = None
            handle.prefetched = None
            key, handle.key = handle.key, None
            if key is None:
                return
            self._backend.release(key)

    def stats(self) -> Dict[str, int]:
        """The host pool's counters (bytes reserved, in use, reuses, ...); on
        CUDA also ``inflight_waits``, the copies ``offload`` waited for because
        max_inflight was reached (0 on the CPU, where copies are done when
        offload returns)."""
        with self._lock:
            return self._backend.stats()

    def trim(self) -> int:
        """Free the cached host buffers; returns the bytes freed."""
        with self._lock:
            return self._backend.trim()


# ---------------------------------------------------------------------------
# the engines shared by device


def _cuda_usable(torch: Any) -> bool:
    return bool(torch.cuda.is_available())


_engines: Dict[str, OffloadEngine] = {}
_engines_lock = threading.Lock()
_pool_limit: Optional[int] = None
_max_inflight: Optional[int] = DEFAULT_MAX_INFLIGHT


def get_engine(device: Any) -> OffloadEngine:
    """The shared engine of `device` (one per device, created on first use)."""
    torch = _torch("mlutils.offload")
    device = _engine_device(torch, torch.device(device))
    key = str(device)
    with _engines_lock:
        eng = _engines.get(key)
        if eng is None:
            eng = OffloadEngine(device, max_bytes=_pool_limit, max_inflight=_max_inflight)
            _engines[key] = eng
        return eng


def set_pool_limit(max_bytes: Optional[int]) -> None:
    """Cap the host pool of every engine created from now on (None: no cap)."""
    global _pool_limit
    _check_bytes_limit(max_bytes, "max_bytes")
    with _engines_lock:
        _pool_limit = max_bytes
        _engines.clear()


def set_max_inflight(max_inflight: Optional[int]) -> None:
    """Bound the copies in flight of every shared engine (get_engine), those
    made already included: see OffloadEngine (None: no bound)."""
    global _max_inflight
    _check_bytes_limit(max_inflight, "max_inflight")
    with _engines_lock:
        _max_inflight = max_inflight
        for eng in _engines.values():
            eng.max_inflight = max_inflight
            eng._backend.set_max_inflight(max_inflight)


def compression_error(tensor: Any, compress: str) -> Dict[str, float]:
    """The error of offloading `tensor` with `compress` (the same rounding as the
    CUDA kernels, done here with torch ops): max and RMS absolute error, and the
    RMS error relative to the tensor's RMS."""
    torch = _torch("mlutils.offload")  # a clear ImportError without torch
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"compression_error: expected a tensor, got {type(tensor).__name__}")
    eng = OffloadEngine("cpu")
    x = tensor.detach().cpu()
    h = eng.offload(x, compress=compress)
    y = h.reload()
    h.release()
    if x.numel() == 0:  # nothing to round
        return {"max_abs": 0.0, "rms_abs": 0.0, "rms_rel": 0.0}
    d = (y.double() - x.double())
    rms = x.double().pow(2).mean().sqrt().item()
    out = {"max_abs": d.abs().max().item(), "rms_abs": d.pow(2).mean().sqrt().item()}
    out["rms_rel"] = out["rms_abs"] / rms if rms else 0.0
    return out
