"""Counters every metrics line carries across resumes (``samples``: items consumed over all ranks,
``elapsed``: training seconds) and the out-of-memory skips (``TrainConfig.oom``)."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping

from .._torch import require_torch
from .._core import MlutilsError

__all__ = ["Counters", "OutOfMemoryStop", "is_oom"]


class OutOfMemoryStop(MlutilsError, MemoryError):
    """Three steps in a row ran out of memory: the run stopped, with a checkpoint."""


def is_oom(exc: BaseException) -> bool:
    """True for torch's out-of-memory error (CUDA's, or any device's)."""
    import sys

    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return isinstance(oom, type) and isinstance(exc, oom)


class Counters:
    """samples (this rank's count, summed over the ranks when a line is written), elapsed seconds, OOM skips."""

    def __init__(self, dist: Any) -> None:
        self.dist = dist
        self.world = int(dist.world_size())
        self.samples = 0          # this rank's items so far (the checkpoint keeps each rank's own)
        self.oom_skipped = 0
        self._elapsed_before = 0.0  # seconds of the runs this one resumed
        self._t0 = time.monotonic()

    def start(self) -> None:
        self._t0 = time.monotonic()

    def elapsed(self) -> float:
        return self._elapsed_before + (time.monotonic() - self._t0)

    def stepped(self, batches: List[Any]) -> None:
        from .engine import _batch_len

        self.samples += sum(_batch_len(b) for b in batches)

    def line(self) -> Dict[str, Any]:
        """The counters of a metrics line (a collective over the ranks: every rank writes the line's step)."""
        return {"samples": self._global_samples(), "elapsed": round(self.elapsed(), 3),
                "oom_skipped": self.oom_skipped}

    def _global_samples(self) -> int:
        if self.world <= 1:
            return self.samples
        torch = require_torch("mlutils.train")
        import torch.distributed as tdist

        t = torch.tensor([self.samples], dtype=torch.int64,
                         device="cuda" if tdist.get_backend() == "nccl" else "cpu")
        tdist.all_reduce(t)
        return int(t.item())

    def state(self) -> Dict[str, Any]:
        return {"samples": self.samples, "elapsed": self.elapsed(), "oom_skipped": self.oom_skipped}

    def load(self, loop: Mapping[str, Any]) -> None:
        self.samples = int(loop.get("samples", 0))
        self._elapsed_before = float(loop.get("elapsed", 0.0))
        self.oom_skipped = int(loop.get("oom_skipped", 0))
        self._t0 = time.monotonic()
