"""Activation offload: offloaded gradient checkpointing and saved-tensor offload.

The engine is C/CUDA (``csrc/cuda/offload.cu``): pinned host buffers from a
size-classed, capped pool reused across steps, one device-to-host and one
host-to-device copy stream, and events that order the copies against the
caller's stream (an offload never makes the compute stream wait; a reload is
complete before any kernel queued after it on the caller's stream reads it).
CPU tensors go through the same Python logic with a CPU engine that copies
into pooled host buffers, so everything here also runs without a GPU.

* :func:`offload_checkpoint`: the original's offloaded gradient
  checkpointing, as torch's non-reentrant checkpoint whose saved copy of the
  hidden states lives in host memory (backward reloads it, prefetching the
  previous block's, and recomputes only as far as backward needs).
* :class:`OffloadedCheckpoint`: the original's autograd-function form
  (``mlutils.unsloth``): forward keeps an offloaded copy of the hidden
  states, backward reloads them and reruns the whole function.
* :func:`enable_offloaded_gradient_checkpointing`: installs it as a Hugging
  Face style model's checkpointing function.
* :func:`offload_saved_tensors`: a context manager offloading every tensor
  autograd saves (the shape of ``torch.autograd.graph.save_on_cpu``).

PyTorch is imported when a function needs it, never at import.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import warnings
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

from .. import _core
from ..utils import _torch
from ._cpu import _CpuBackend
from ._cuda import _CudaBackend

__all__ = [
    "OffloadEngine",
    "OffloadHandle",
    "OffloadPoolFullError",
    "get_engine",
    "offload_checkpoint",
    "enable_offloaded_gradient_checkpointing",
    "disable_offloaded_gradient_checkpointing",
    "offload_saved_tensors",
    "compression_error",
    "DEFAULT_MIN_BYTES",
    "DEFAULT_MAX_INFLIGHT",
    "set_pool_limit",
    "set_max_inflight",
]

#: Tensors smaller than this stay on their device (offloading them costs more than it saves).
DEFAULT_MIN_BYTES = 1 << 20
#: Bytes of sources that may wait for their device-to-host copy before
#: ``offload`` waits for the oldest (see OffloadEngine).
DEFAULT_MAX_INFLIGHT = _core.OFFLOAD_DEFAULT_MAX_INFLIGHT

_MODES = {"bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8", "float8": "fp8", "e4m3": "fp8"}

CudaOffloadEngine = _core.CudaOffloadEngine  # the raw-pointer engine: save(ptr, nbytes, mode, scratch, stream)
HostPool = _core.HostPool


class OffloadPoolFullError(MemoryError):
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


# ---------------------------------------------------------------------------
# offloaded gradient checkpointing

_seq = itertools.count(1)
_live_lock = threading.Lock()
_live: "Dict[int, weakref.ref]" = {}  # seq -> handle of a checkpoint waiting for its backward
_live_pruned = [0]  # its size after the last pruning


def _prune(entries: Dict[Any, Any], pruned: int, dead: Callable[[Any], bool]) -> int:
    """Drops the entries `dead` says are finished, once `entries` has grown
    past twice its size after the last pruning (`pruned`), so that pruning
    costs O(1) per entry over time; returns the size to pass next time."""
    if len(entries) <= 2 * pruned + 64:
        return pruned
    for key in [k for k, v in entries.items() if dead(v)]:
        del entries[key]
    return len(entries)


def _register(handle: OffloadHandle) -> None:
    handle.seq = next(_seq)
    with _live_lock:
        _live[handle.seq] = weakref.ref(handle)
        # forwards without a backward leave dead entries
        _live_pruned[0] = _prune(_live, _live_pruned[0], lambda ref: ref() is None or ref().released)


def _unregister_and_prefetch_previous(handle: OffloadHandle) -> None:
    """Forget `handle` and start the reload of the checkpoint saved just before
    it (the one whose backward comes next)."""
    prev = None
    with _live_lock:
        _live.pop(handle.seq, None)
        for seq in sorted(_live, reverse=True):
            h = _live[seq]()
            if h is None or h.released:
                del _live[seq]
                continue
            if seq < handle.seq and h.engine is handle.engine:
                prev = h
                break
    if prev is not None:
        prev.engine._prefetch_if_live(prev)


def _autocast_state(torch: Any) -> List[Tuple[str, bool, Any]]:
    out = []
    for dev in ("cuda", "cpu"):
        try:
            out.append((dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)))
        except (RuntimeError, AttributeError):  # pragma: no cover - older torch
            pass
    return out


@contextlib.contextmanager
def _restored_autocast(torch: Any, state: List[Tuple[str, bool, Any]], cache: bool) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for dev, enabled, dtype in state:
            stack.enter_context(torch.autocast(device_type=dev, enabled=enabled, dtype=dtype, cache_enabled=cache))
        yield


def _has_engine(tensor: Any) -> bool:
    """Whether an engine can offload tensors of `tensor`'s device (the CPU, or
    CUDA in a build with it); elsewhere (meta, ...) they stay where they are."""
    kind = tensor.device.type
    return kind == "cpu" or (kind == "cuda" and _core.cuda_built())


_CHECKPOINT_OPTIONS = {"compress": None, "min_bytes": 0, "preserve_rng_state": True}


def _checkpoint_options(options: Any) -> Dict[str, Any]:
    """OffloadedCheckpoint's options with their defaults filled in and checked
    (TypeError for a non-dict or an unknown key, ValueError for a bad value)."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"OffloadedCheckpoint: options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(_CHECKPOINT_OPTIONS), key=str)
    if unknown:
        raise TypeError(f"OffloadedCheckpoint: unknown option(s) {unknown}; known: {sorted(_CHECKPOINT_OPTIONS)}")
    out = dict(_CHECKPOINT_OPTIONS, **options)
    out["compress"] = _check_compress(out["compress"])
    _check_count(out["min_bytes"], "OffloadedCheckpoint: min_bytes")
    return out


def _cuda_devices(torch: Any, tensors: List[Any]) -> List[int]:
    return sorted({t.device.index for t in tensors if t.device.type == "cuda"})


def _function_class() -> Any:
    torch = _torch("mlutils.offload")

    class OffloadedCheckpoint(torch.autograd.Function):
        """forward(ctx, forward_function, options, hidden_states, *args): runs
        forward_function(hidden_states, *args) without a graph, keeping only an
        offloaded copy of hidden_states; backward reloads it, reruns the
        function with gradients (same RNG and autocast state) and backpropagates."""

        @staticmethod
        def forward(ctx: Any, forward_function: Callable, options: Dict[str, Any], hidden_states: Any, *args: Any) -> Any:
            if not isinstance(hidden_states, torch.Tensor):
                raise TypeError(f"OffloadedCheckpoint: hidden_states must be a tensor, got {type(hidden_states).__name__}")
            ctx.forward_function = forward_function
            ctx.options = options = _checkpoint_options(options)
            ctx.hs_requires_grad = hidden_states.requires_grad
            tensor_idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
            if not ctx.hs_requires_grad and not any(args[i].requires_grad for i in tensor_idx):
                warnings.warn("OffloadedCheckpoint: none of the inputs requires grad, so the function's parameters "
                              "get no gradients from it (offload_checkpoint gives them theirs)", stacklevel=3)
            ctx.tensor_idx = tensor_idx
            ctx.others = [None if i in tensor_idx else a for i, a in enumerate(args)]
            ctx.done = False
            ctx.handle = ctx.packed = None
            if _has_engine(hidden_states):
                eng = get_engine(hidden_states.device)
                ctx.handle = eng.offload(hidden_states, compress=options["compress"], min_bytes=options["min_bytes"])
                _register(ctx.handle)
                ctx.packed = _PackedInput(ctx.handle, hidden_states)  # its version, checked at backward
                ctx.save_for_backward(*[args[i] for i in tensor_idx])
            else:  # no engine for its device (meta, ...): kept as a saved tensor
                ctx.save_for_backward(hidden_states, *[args[i] for i in tensor_idx])
            ctx.autocast = _autocast_state(torch)
            ctx.autocast_cache = torch.is_autocast_cache_enabled()
            ctx.rng = None
            if options["preserve_rng_state"]:
                devs = _cuda_devices(torch, [hidden_states] + [args[i] for i in tensor_idx])
                ctx.rng = (torch.get_rng_state(), devs, [torch.cuda.get_rng_state(d) for d in devs])
            with torch.no_grad():
                out = forward_function(hidden_states, *args)
            if ctx.packed is not None and ctx.packed.modified():
                raise RuntimeError(_MODIFIED)  # by the function itself: the copy may have raced it on a GPU
            return out

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            if not torch.autograd._is_checkpoint_valid():
                raise RuntimeError("offload_checkpoint does not support torch.autograd.grad(); "
                                   "use .backward() (or torch.utils.checkpoint with use_reentrant=False)")
            if ctx.done:
                raise RuntimeError("offload_checkpoint: backward ran twice through the same checkpoint; "
                                   "retain_graph=True is not supported")
            handle, packed = ctx.handle, ctx.packed
            if packed is not None and packed.modified():
                raise RuntimeError(_MODIFIED)
            saved = ctx.saved_tensors
            ctx.done = True
            if handle is not None:
                hidden = handle.reload()
                ctx.handle = ctx.packed = None
                _unregister_and_prefetch_previous(handle)
                handle.release()
            else:
                hidden, saved = saved[0], saved[1:]
            hidden = hidden.detach().requires_grad_(ctx.hs_requires_grad)
            args = list(ctx.others)
            for i, t in zip(ctx.tensor_idx, saved):
                args[i] = t.detach().requires_grad_(t.requires_grad)
            rng = ctx.rng
            devs = rng[1] if rng is not None else []
            with torch.random.fork_rng(devices=devs, enabled=rng is not None):
                if rng is not None:
                    torch.set_rng_state(rng[0])
                    for d, s in zip(devs, rng[2]):
                        torch.cuda.set_rng_state(s, d)
                with torch.enable_grad(), _restored_autocast(torch, ctx.autocast, ctx.autocast_cache):
                    out = ctx.forward_function(hidden, *args)
            outs = out if isinstance(out, tuple) else (out,)
            tensors, grad_tensors = [], []
            for o, g in zip(outs, grads):
                if isinstance(o, torch.Tensor) and o.requires_grad and g is not None:
                    tensors.append(o)
                    grad_tensors.append(g)
            if tensors:
                torch.autograd.backward(tensors, grad_tensors)
            arg_grads = [None] * len(args)
            for i in ctx.tensor_idx:
                arg_grads[i] = args[i].grad if args[i].requires_grad else None
            ctx.forward_function = None
            return (None, None, hidden.grad if ctx.hs_requires_grad else None, *arg_grads)

    return OffloadedCheckpoint


@functools.lru_cache(maxsize=None)
def _checkpoint_class() -> Any:
    return _function_class()


def __getattr__(name: str) -> Any:
    if name == "OffloadedCheckpoint":
        return _checkpoint_class()
    raise AttributeError(f"module 'mlutils.offload' has no attribute {name!r}")


def _kwargs_call(fn: Callable, nargs: int, keys: Tuple[str, ...]) -> Callable:
    """fn taking (hidden, *args, *kwarg values) as fn(hidden, *args, **kwargs)."""
    def call(hidden: Any, *rest: Any) -> Any:
        return fn(hidden, *rest[:nargs], **dict(zip(keys, rest[nargs:])))
    return call


class _PackedInput:
    """A saved tensor as the hooks packed it: its offloaded copy, and what
    tells whether the tensor was modified in place since (autograd skips its
    own version check for tensors saved through hooks; on a GPU the copy may
    even race the modification).

    The version is read through a probe: a detached alias of the tensor (which
    shares its version counter) whose memory is swapped for an empty tensor
    (``.data`` keeps the counter), so it sees every later in-place change,
    also one made before the tensor's last Python reference went away or
    through another view, without keeping the tensor's memory alive."""

    __slots__ = ("handle", "probe", "version", "uses", "out", "__weakref__")

    def __init__(self, handle: OffloadHandle, tensor: Any):
        self.handle = handle
        self.uses = 1  # saves sharing this copy whose unpack is still to come (offload_saved_tensors)
        self.out: Any = None  # the reloaded tensor while some of them are still to unpack it
        self.version = tensor._version
        probe = tensor.detach()
        probe.data = probe.new_empty(0)
        self.probe = probe

    def modified(self) -> bool:
        return self.probe._version != self.version


_MODIFIED = ("offload_checkpoint: hidden_states was modified by an inplace operation after it was "
             "offloaded (the offloaded copy would not match it); clone it before modifying it")
_MODIFIED_SAVED = ("offload_saved_tensors: a tensor saved for backward was modified by an inplace operation "
                   "after it was offloaded (autograd would refuse it too); clone it before modifying it")


class _InputOffload:
    """The saved-tensor hooks offload_checkpoint puts around torch's checkpoint.

    torch.utils.checkpoint (use_reentrant=False) saves its inputs for the
    recomputation as saved tensors, before it installs its own hooks for the
    function's saved tensors; so these hooks see exactly the inputs, and
    offload `hidden_states` among them.  The recomputation unpacks it: the
    reload, and the prefetch of the checkpoint saved before this one (whose
    backward comes next)."""

    __slots__ = ("hidden", "compress", "min_bytes", "packed")

    def __init__(self, hidden: Any, compress: Optional[str], min_bytes: int):
        self.hidden = hidden
        self.compress = compress
        self.min_bytes = min_bytes
        self.packed: Optional[_PackedInput] = None

    def pack(self, tensor: Any) -> Any:
        if tensor is not self.hidden:
            return tensor
        self.hidden = None  # once: the same tensor passed twice is kept the second time
        if not _has_engine(tensor):
            return tensor  # no engine for it: kept, as offload_saved_tensors does
        handle = get_engine(tensor.device).offload(tensor, compress=self.compress, min_bytes=self.min_bytes)
        if not handle.offloaded:
            return tensor
        _register(handle)
        self.packed = _PackedInput(handle, tensor)
        return self.packed

    @staticmethod
    def unpack(packed: Any) -> Any:
        if not isinstance(packed, _PackedInput):
            return packed
        if packed.modified():
            raise RuntimeError(_MODIFIED)
        out = packed.handle.reload()
        _unregister_and_prefetch_previous(packed.handle)
        return out


def offload_checkpoint(function: Callable, hidden_states: Any, *args: Any,
                       min_bytes: int = 0, compress: Optional[str] = None,
                       preserve_rng_state: bool = True, use_reentrant: Any = None, **kwargs: Any) -> Any:
    """function(hidden_states, *args, **kwargs), keeping only an offloaded copy of
    hidden_states for the backward pass, which recomputes the function.

    Built on torch.utils.checkpoint's non-reentrant form: the recomputation
    stops as soon as the last tensor backward needs is made (the function's
    last layers are not rerun), RNG and autocast state are restored,
    torch.autograd.grad and retain_graph work, and parameters get gradients
    even when no input requires grad.  Only the checkpoint's saved copy of
    hidden_states moves: it goes to host memory on the forward and comes back,
    prefetched by the backward of the checkpoint after it, for the
    recomputation.  `use_reentrant` is accepted (and ignored) so that this can
    stand in for torch.utils.checkpoint.checkpoint.
    """
    torch = _torch("mlutils.offload_checkpoint")
    del use_reentrant
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"offload_checkpoint: hidden_states must be a tensor, got {type(hidden_states).__name__}")
    compress = _check_compress(compress)
    _check_count(min_bytes, "offload_checkpoint: min_bytes")
    if not torch.is_grad_enabled():
        return function(hidden_states, *args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    # kwargs travel as positional args: checkpoint would take context_fn,
    # determinism_check or debug for itself
    keys = tuple(kwargs)
    fn = _kwargs_call(function, len(args), keys) if keys else function
    hooks = _InputOffload(hidden_states, compress, min_bytes)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        out = checkpoint(fn, hidden_states, *args, *(kwargs[k] for k in keys), use_reentrant=False,
                         preserve_rng_state=preserve_rng_state)
    if hooks.packed is not None and hooks.packed.modified():
        raise RuntimeError(_MODIFIED)  # by the function itself: the copy may have raced it on a GPU
    return out


# ---------------------------------------------------------------------------
# Hugging Face style models


class _HFCheckpointFunc:
    """The ``_gradient_checkpointing_func`` installed on a model's layers:
    offload_checkpoint with the model's min_bytes and compress.  A class at
    module level (not a closure) so that a model holding it still pickles
    (torch.save(model), spawning workers), as with transformers' own
    ``functools.partial(checkpoint, ...)``."""

    mlutils_offload = True

    def __init__(self, min_bytes: int, compress: Optional[str]):
        self.min_bytes = min_bytes
        self.compress = compress

    def __call__(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("use_reentrant", None)
        kwargs.setdefault("preserve_rng_state", True)
        if not args:
            raise TypeError("offloaded gradient checkpointing: the layer got no hidden states")
        return offload_checkpoint(function, *args, min_bytes=self.min_bytes, compress=self.compress, **kwargs)

    def __repr__(self) -> str:
        return f"mlutils.offload checkpointing (min_bytes={self.min_bytes}, compress={self.compress!r})"


def _hf_checkpoint_func(min_bytes: int, compress: Optional[str]) -> Callable:
    return _HFCheckpointFunc(min_bytes, compress)


def enable_offloaded_gradient_checkpointing(model: Any, min_bytes: int = 0, compress: Optional[str] = None) -> Any:
    """Make `model` (a Hugging Face style model) checkpoint its layers with
    :func:`offload_checkpoint`; returns the model.

    Uses ``model.gradient_checkpointing_enable`` and installs our function on
    every submodule that has ``gradient_checkpointing`` (via
    ``_set_gradient_checkpointing(..., gradient_checkpointing_func=...)`` when the
    model has it).  TypeError when the model has no gradient checkpointing.
    """
    _torch("mlutils.offload.enable_offloaded_gradient_checkpointing")
    compress = _check_compress(compress)
    _check_count(min_bytes, "enable_offloaded_gradient_checkpointing: min_bytes")
    if not getattr(model, "supports_gradient_checkpointing", True) or not (
            hasattr(model, "gradient_checkpointing_enable") or hasattr(model, "_set_gradient_checkpointing")):
        raise TypeError(f"{type(model).__name__} has no gradient checkpointing "
                        "(no gradient_checkpointing_enable / _set_gradient_checkpointing, "
                        "or supports_gradient_checkpointing is False)")
    func = _hf_checkpoint_func(min_bytes, compress)
    if hasattr(model, "gradient_checkpointing_enable"):
        with _no_checkpointing_is_a_type_error(model):
            try:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            except TypeError:  # older signature without kwargs
                model.gradient_checkpointing_enable()
    _install(model, func)
    model.mlutils_offloaded_checkpointing = True
    return model


def _install(model: Any, func: Optional[Callable] = None) -> None:
    """Install `func` (default: offload_checkpoint) as the checkpointing function of model's layers."""
    func = func if func is not None else _hf_checkpoint_func(0, None)
    if hasattr(model, "_set_gradient_checkpointing"):
        try:
            model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=func)
        except TypeError:  # an older signature: the loop below does it
            pass
    found = 0
    for module in model.modules() if hasattr(model, "modules") else [model]:
        if hasattr(module, "gradient_checkpointing"):
            module._gradient_checkpointing_func = func
            module.gradient_checkpointing = True
            found += 1
    if not found:
        raise TypeError(f"{type(model).__name__} has no module with a gradient_checkpointing attribute: "
                        "nothing to install offloaded checkpointing on")
    model.mlutils_offloaded_checkpointing = True


def _checkpointing_modules(model: Any) -> List[Any]:
    """model's modules (itself included) with a ``gradient_checkpointing`` attribute."""
    modules = model.modules() if callable(getattr(model, "modules", None)) else [model]
    return [m for m in modules if hasattr(m, "gradient_checkpointing")]


@contextlib.contextmanager
def _no_checkpointing_is_a_type_error(model: Any) -> Iterator[None]:
    """Hugging Face's gradient_checkpointing_enable/_disable raise ValueError
    for a model none of whose modules has gradient checkpointing: our TypeError
    for that case (their error chained), their ValueError otherwise."""
    try:
        yield
    except ValueError as e:
        if _checkpointing_modules(model):
            raise
        raise TypeError(f"{type(model).__name__} has no gradient checkpointing "
                        f"(no module with a gradient_checkpointing attribute): {e}") from e


def disable_offloaded_gradient_checkpointing(model: Any) -> Any:
    """Turn gradient checkpointing off again; returns the model.  TypeError
    when the model has no gradient checkpointing to turn off."""
    if not hasattr(model, "gradient_checkpointing_disable") and not _checkpointing_modules(model):
        raise TypeError(f"{type(model).__name__} has no gradient checkpointing "
                        "(no gradient_checkpointing_disable, no module with a gradient_checkpointing attribute)")
    if hasattr(model, "gradient_checkpointing_disable"):
        with _no_checkpointing_is_a_type_error(model):
            model.gradient_checkpointing_disable()
    for module in model.modules() if hasattr(model, "modules") else [model]:
        if getattr(getattr(module, "_gradient_checkpointing_func", None), "mlutils_offload", False):
            module.gradient_checkpointing = False
    model.mlutils_offloaded_checkpointing = False
    return model


# ---------------------------------------------------------------------------
# every saved tensor


class _SavedTensorOffload:
    """The pack/unpack hooks of offload_saved_tensors: handles by pack order,
    and a prefetch of the next ones (in backward order) at each unpack.

    A tensor saved several times (the input of separate q/k/v projections, of
    x * x) is offloaded once: its saves share the copy, and the tensor reloaded
    at the first of their unpacks until the last.

    A block may run a whole training loop: the handles of graphs already
    backwarded or freed are dropped from `order` (and `shared`) as it grows
    (amortised), so it holds about as many as are waiting for a backward."""

    def __init__(self, torch: Any, min_bytes: int, compress: Optional[str], prefetch: int):
        self.torch = torch
        self.min_bytes = min_bytes
        self.compress = compress
        self.prefetch_depth = prefetch
        self.order: Dict[int, "weakref.ref"] = {}  # pack number -> handle
        # id(tensor) -> (tensor, its version, its _PackedInput), all weak: the copy a later save shares
        self.shared: Dict[int, Tuple["weakref.ref", int, "weakref.ref"]] = {}
        self.packed = 0  # handles packed so far
        self.pruned = 0  # len(order) after the last pruning
        self.shared_pruned = 0  # len(shared) after the last pruning
        self.lock = threading.Lock()  # unpack may run in autograd's device threads

    def pack(self, tensor: Any) -> Any:
        torch = self.torch
        if (not _has_engine(tensor) or not _offloadable(torch, tensor)
                or tensor.numel() * tensor.element_size() < self.min_bytes or _is_parameter(torch, tensor)):
            return tensor
        with self.lock:
            entry = self.shared.get(id(tensor))
            if entry is not None:
                same, version, shared = entry[0](), entry[1], entry[2]()
                if (same is tensor and version == tensor._version and shared is not None
                        and not shared.handle.released):
                    shared.uses += 1  # saved again, unchanged: one copy for both
                    return shared
        handle = get_engine(tensor.device).offload(tensor, compress=self.compress, min_bytes=self.min_bytes)
        if not handle.offloaded:
            return tensor
        packed = _PackedInput(handle, tensor)
        with self.lock:
            handle.seq = self.packed
            self.packed += 1
            self.order[handle.seq] = weakref.ref(handle)
            self.shared[id(tensor)] = (weakref.ref(tensor), tensor._version, weakref.ref(packed))
            self.pruned = _prune(self.order, self.pruned, lambda ref: _done(ref()))
            self.shared_pruned = _prune(self.shared, self.shared_pruned, lambda e: e[0]() is None or e[2]() is None)
        return packed

    def unpack(self, packed: Any) -> Any:
        if not isinstance(packed, _PackedInput):
            return packed
        if packed.modified():
            raise RuntimeError(_MODIFIED_SAVED)
        with self.lock:
            out = packed.out
        if out is None:
            out = packed.handle.reload()
        with self.lock:
            packed.uses -= 1  # below 0 in a second backward (retain_graph): each reloads
            packed.out = out if packed.uses > 0 else None
        handle = packed.handle
        # start the next reloads in backward order: the nearest earlier saved
        # tensors that are neither reloaded nor on their way yet
        started, k = 0, handle.seq - 1
        while started < self.prefetch_depth and k >= 0 and k >= handle.seq - 8 - self.prefetch_depth:
            ref = self.order.get(k)
            h = ref() if ref is not None else None
            if not _done(h) and h.prefetched is None:
                h.engine._prefetch_if_live(h)
                started += 1
            k -= 1
        return out


def _done(handle: Optional[OffloadHandle]) -> bool:
    """A handle no backward will prefetch: gone, released or reloaded already."""
    return handle is None or handle.released or handle.reloaded


def _is_parameter(torch: Any, tensor: Any) -> bool:
    """A parameter, or a view of one (the weight.t() a linear saves): those stay on the device."""
    t = tensor
    while t is not None:
        if isinstance(t, torch.nn.Parameter):
            return True
        t = t._base
    return False


@contextlib.contextmanager
def offload_saved_tensors(min_bytes: int = DEFAULT_MIN_BYTES, compress: Optional[str] = None,
                          prefetch: int = 1) -> Iterator[None]:
    """Within this block, every tensor autograd saves for backward (of at least
    min_bytes, parameters excepted) is offloaded through the engine and
    reloaded when backward needs it, with the next `prefetch` ones started
    early.  Host buffers return to the pool when the graph is freed.

    A prefetched tensor is on the device while the node before it in backward
    runs: prefetch=1 overlaps each reload with compute and peaks up to one
    saved tensor above ``save_on_cpu``; prefetch=0 reloads on demand, as
    ``save_on_cpu`` does, and holds no more saved tensors on the device."""
    torch = _torch("mlutils.offload.offload_saved_tensors")
    compress = _check_compress(compress)
    _check_count(min_bytes, "offload_saved_tensors: min_bytes")
    _check_count(prefetch, "offload_saved_tensors: prefetch")
    hooks = _SavedTensorOffload(torch, min_bytes, compress, prefetch)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        yield
