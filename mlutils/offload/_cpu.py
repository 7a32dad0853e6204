"""The CPU backend of OffloadEngine: copies into pooled host buffers.

The pool is ``_core.HostPool`` (csrc/core/offload_pool.c over malloc'd
memory); packing under compression is done here with torch ops, in the
layout the CUDA kernels use (csrc/core/offload_layout.h, read through the
``_core.OFFLOAD_E4M3_*`` constants).  A copy is done when ``save`` or
``load`` returns.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from .. import _core


class _CpuBackend:
    """The offloaded copies of a CPU engine: a handle's key is (buffer id,
    the buffer as a uint8 tensor).  The engine serialises calls under `lock`
    (taken here only to give back the buffer of a save that failed)."""

    def __init__(self, torch: Any, device: Any, max_bytes: Optional[int], max_inflight: Optional[int],
                 lock: Any):
        del device, max_inflight  # one CPU; its copies are never in flight
        self.torch = torch
        self.lock = lock
        self.pool = _core.HostPool(max_bytes)

    def save(self, src: Any, nbytes: int, mode: int) -> Tuple[int, Any]:
        """Copy (or pack) the dense tensor `src` of `nbytes` into a pool buffer; its key."""
        torch = self.torch
        flat = src.reshape(-1)
        n = flat.numel()
        size = nbytes if mode == _core.OFFLOAD_RAW else _core.offload_packed_size(mode, n)
        bid, view = self.pool.acquire(size)
        try:
            buf = torch.frombuffer(view, dtype=torch.uint8)
            _pack(torch, flat, buf, mode)
        except BaseException:
            with self.lock:
                self.pool.release(bid)  # the buffer is no handle's: back to the pool
            raise
        return bid, buf

    def load(self, key: Tuple[int, Any], mode: int, nbytes: int, out: Any) -> None:
        """Copy (or expand) the buffer of `key` into the dense tensor `out`."""
        del nbytes  # out says it
        torch = self.torch
        _bid, buf = key
        flat = out.as_strided((out.numel(),), (1,))  # its memory in order (out is dense)
        if mode == _core.OFFLOAD_RAW:
            flat.copy_(buf.view(out.dtype))
        elif mode == _core.OFFLOAD_F32_BF16:
            flat.copy_(buf.view(torch.bfloat16))
        else:
            n = flat.numel()
            amax = _e4m3_amax(torch, buf)[0]
            inv = 1.0 / _e4m3_scale(torch, amax)
            flat.copy_(buf[:n].view(torch.float8_e4m3fn).float() * inv)

    def wait(self, key: Tuple[int, Any]) -> None:
        """Nothing: the copy was done when load returned."""

    def sync(self, key: Tuple[int, Any]) -> None:
        """Nothing: the copy was done when save returned."""

    def release(self, key: Tuple[int, Any]) -> None:
        self.pool.release(key[0])

    def stats(self) -> Dict[str, int]:
        return dict(self.pool.stats(), inflight_waits=0)

    def trim(self) -> int:
        return self.pool.trim()

    def set_max_inflight(self, max_inflight: Optional[int]) -> None:
        """Nothing: no copy is ever in flight."""


def _pack(torch: Any, flat: Any, buf: Any, mode: int) -> None:
    """Copy (or pack, under compression) the flat tensor into the host buffer."""
    n = flat.numel()
    if mode == _core.OFFLOAD_RAW:
        buf.view(flat.dtype).copy_(flat)
    elif mode == _core.OFFLOAD_F32_BF16:
        buf.view(torch.bfloat16).copy_(flat)
    else:
        # the scale comes from the finite values; e4m3 has no infinity, so
        # infinities travel as NaN (non-finite stays non-finite)
        x = flat.float()
        finite = torch.isfinite(x)
        amax = torch.where(finite, x.abs(), torch.zeros_like(x)).max() if n else torch.zeros(())
        _e4m3_amax(torch, buf).copy_(amax.reshape(1))
        q = (x * _e4m3_scale(torch, amax)).clamp(-_core.OFFLOAD_E4M3_MAX, _core.OFFLOAD_E4M3_MAX)
        q = torch.where(torch.isinf(x), torch.full_like(q, float("nan")), q)
        buf[:n].view(torch.float8_e4m3fn).copy_(q.to(torch.float8_e4m3fn))


def _e4m3_amax(torch: Any, buf: Any) -> Any:
    """The float32 amax in a packed e4m3 buffer (a one-element view), where
    csrc/core/offload_layout.h puts it: in the trailer after the payload."""
    at = buf.numel() - _core.OFFLOAD_E4M3_TRAILER + _core.OFFLOAD_E4M3_AMAX_AT
    return buf[at:at + 4].view(torch.float32)


def _e4m3_scale(torch: Any, amax: Any) -> Any:
    """OFFLOAD_E4M3_MAX (448) / amax, or 1 where that is not a finite positive
    number (amax 0, non-finite, or so small that the quotient overflows
    float32: a scale of inf would make 0 * inf = NaN of every zero)."""
    amax = amax.float()
    ok = torch.isfinite(amax) & (amax > 0)
    scale = _core.OFFLOAD_E4M3_MAX / torch.where(ok, amax, torch.ones_like(amax))
    return torch.where(ok & torch.isfinite(scale), scale, torch.ones_like(amax))
