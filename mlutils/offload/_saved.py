"""Offload of every tensor autograd saves: :func:`offload_saved_tensors`.

Saved-tensor hooks (the shape of ``torch.autograd.graph.save_on_cpu``) that
offload each saved tensor through the shared engine of its device and, at
each unpack, reload it and start the reloads of the next ones backward will
need.

PyTorch is imported when a function needs it, never at import.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Dict, Iterator, Optional, Tuple

from ..utils import _torch
from ._checkpoint import _PackedInput, _prune
from ._engine import (DEFAULT_MIN_BYTES, OffloadHandle, _check_compress, _check_count, _has_engine, _offloadable,
                      get_engine)

_MODIFIED_SAVED = ("offload_saved_tensors: a tensor saved for backward was modified by an inplace operation "
                   "after it was offloaded (autograd would refuse it too); clone it before modifying it")


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
