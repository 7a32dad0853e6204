"""Offloaded gradient checkpointing: :func:`offload_checkpoint`.

torch's non-reentrant checkpoint whose saved copy of the hidden states
lives in host memory: saved-tensor hooks around it (``_InputOffload``)
offload that one input and reload it for the recomputation.  Also here, as
the other forms (the autograd Function of ``_autograd.py``, the hooks of
``_saved.py``) use them too: the registry of checkpoints waiting for their
backward, through which the backward of one prefetches the one saved just
before it, and ``_PackedInput``, an offloaded saved tensor with the probe
that tells whether it was modified in place since.

PyTorch is imported when a function needs it, never at import.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

from ..utils import _torch
from ._engine import OffloadHandle, _check_compress, _check_count, _has_engine, get_engine

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


# ---------------------------------------------------------------------------
# an offloaded saved tensor


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


# ---------------------------------------------------------------------------
# offload_checkpoint


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


def _kwargs_call(fn: Callable, nargs: int, keys: Tuple[str, ...]) -> Callable:
    """fn taking (hidden, *args, *kwarg values) as fn(hidden, *args, **kwargs)."""
    def call(hidden: Any, *rest: Any) -> Any:
        return fn(hidden, *rest[:nargs], **dict(zip(keys, rest[nargs:])))
    return call
