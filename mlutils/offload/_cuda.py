"""The CUDA backend of OffloadEngine: the C/CUDA engine of csrc/cuda/offload.cu.

``_core.CudaOffloadEngine`` owns the pinned pool, one device-to-host and one
host-to-device copy stream, the events that order them against the caller's
stream, and the packing kernels (csrc/core/offload_layout.h); it works on raw
pointers.  This side gives it tensors' pointers, allocates the scratch the
kernels pack into, and keeps sources, scratch and reload targets from
torch's caching allocator (``record_stream``) until the copy streams are
done with them.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from .. import _core


class _CudaBackend:
    """The offloaded copies of one CUDA device: a handle's key is the C
    engine's handle (an int).  The engine serialises calls under `lock`
    (taken here only to release the handle of a save that failed)."""

    def __init__(self, torch: Any, device: Any, max_bytes: Optional[int], max_inflight: Optional[int],
                 lock: Any):
        if not _core.cuda_built():
            raise RuntimeError("mlutils was built without CUDA: reinstall it with nvcc available "
                               "(MLUTILS_CUDA=1) to offload CUDA tensors")
        self.torch = torch
        self.device = device
        self.lock = lock
        self.raw = _core.CudaOffloadEngine(device.index, max_bytes)
        self.raw.window(max_inflight=max_inflight)
        d2h, h2d = self.raw.streams()
        self.d2h_stream = torch.cuda.ExternalStream(d2h, device=device)
        self.h2d_stream = torch.cuda.ExternalStream(h2d, device=device)

    def _scratch(self, mode: int, numel: int) -> Any:
        """Device memory for the packed form of `numel` elements (None when raw)."""
        if mode == _core.OFFLOAD_RAW:
            return None
        packed = _core.offload_packed_size(mode, numel)
        return self.torch.empty(packed, dtype=self.torch.uint8, device=self.device)

    def save(self, src: Any, nbytes: int, mode: int) -> int:
        """Queue the copy (and packing) of the dense tensor `src` of `nbytes`
        after the caller's current stream; its key."""
        stream = self.torch.cuda.current_stream(self.device)
        scratch = self._scratch(mode, src.numel())
        handle = self.raw.save(src.data_ptr(), nbytes, mode,
                               scratch.data_ptr() if scratch is not None else 0, stream.cuda_stream)
        try:
            # the caching allocator must not hand these to anyone before the copy stream is done
            src.record_stream(self.d2h_stream)
            if scratch is not None:
                scratch.record_stream(self.d2h_stream)
        except BaseException:
            with self.lock:
                self.raw.release(handle)  # no handle owns it yet
            raise
        return handle

    def load(self, key: int, mode: int, nbytes: int, out: Any) -> None:
        """Queue the copy (and expanding) of `key` into the dense tensor `out`."""
        stream = self.torch.cuda.current_stream(self.device)
        scratch = self._scratch(mode, out.numel())
        self.raw.load(key, out.data_ptr(), nbytes,
                      scratch.data_ptr() if scratch is not None else 0, stream.cuda_stream)
        out.record_stream(self.h2d_stream)
        if scratch is not None:
            scratch.record_stream(self.h2d_stream)

    def wait(self, key: int) -> None:
        """Make the caller's current stream wait for the load of `key`."""
        self.raw.wait(key, self.torch.cuda.current_stream(self.device).cuda_stream)

    def sync(self, key: int) -> None:
        """Block until the copies of `key` are done."""
        self.raw.sync(key)

    def release(self, key: int) -> None:
        self.raw.release(key)

    def stats(self) -> Dict[str, int]:
        return dict(self.raw.stats(), inflight_waits=self.raw.window()["waits"])

    def trim(self) -> int:
        return self.raw.trim()

    def set_max_inflight(self, max_inflight: Optional[int]) -> None:
        self.raw.window(max_inflight=max_inflight)
