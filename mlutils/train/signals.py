"""Stop signals: SIGTERM, SIGINT and SIGUSR1 only set a flag while the loop runs; the handlers that were
there before, Python's and those set outside Python (``faulthandler.register``, a host embedding Python),
are put back when it returns."""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Dict, Optional, Tuple

from .. import _core

__all__ = ["StopSignals", "STOP_SIGNALS", "requeue", "requeue_on"]

log = logging.getLogger("mlutils.train")

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class StopSignals:
    """The loop's stop signals: ``name`` is the first one received (None before); a second SIGINT raises
    KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.name: Optional[str] = None
        self._sigint_count = 0
        # signal -> (the Python-level handler, the raw sigaction): both are put back, as the Python-level
        # one alone would drop a handler installed in C behind Python's back (faulthandler's)
        self._previous: Dict[int, Tuple[Any, bytes]] = {}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            self._sigint_count += 1
            if self._sigint_count > 1:
                raise KeyboardInterrupt
        if self.name is None:
            self.name = name

    def install(self) -> None:
        """Take the stop signals (main thread only: elsewhere Python cannot set handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            if signal.getsignal(sig) is None:
                # a handler Python did not set and cannot name: left alone, as Python could not restore
                # its own view of it either
                log.warning("%s has a handler not set from Python: left in place, it does not stop training "
                            "cleanly", name)
                continue
            raw = _core.sigaction_save(sig)
            self._previous[sig] = (signal.signal(sig, self._on_signal), raw)

    def restore(self) -> None:
        """Put back every handler install() replaced, the raw sigaction last."""
        previous, self._previous = self._previous, {}
        for sig, (handler, raw) in previous.items():
            signal.signal(sig, handler)
            _core.sigaction_restore(sig, raw)


# ---------------------------------------------------------------- requeue on pre-emption (SLURM)


def requeue_on(cfg: Any) -> bool:
    """TrainConfig.requeue, its default (None) meaning: on inside a SLURM job."""
    return cfg.requeue if cfg.requeue is not None else bool(os.environ.get("SLURM_JOB_ID"))


def requeue(loop: Any) -> bool:
    """After a stop by the pre-emption signal with TrainConfig.requeue (default: under SLURM): the
    checkpoint is complete on every rank (the final save is synchronous, with a barrier); the global
    leader asks SLURM to requeue the job.  True when it did."""
    if not requeue_on(loop.cfg):
        return False
    preempted = loop.signals.name == loop.cfg.requeue_signal
    if loop.ckpt.world > 1:
        preempted = bool(loop.dist.any_rank(preempted))
    if not preempted:
        return False
    if not loop.leader:
        return True
    job = os.environ.get("SLURM_JOB_ID", "")
    if not job.isdigit():
        log.error("requeue: SLURM_JOB_ID is %r, not a job number: the job is not requeued", job)
        return False
    try:
        import subprocess

        subprocess.run(["scontrol", "requeue", job], check=True, timeout=120, capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        log.error("requeue: `scontrol requeue %s` failed: %s", job, str(detail).strip())
        return False
    log.info("requeued SLURM job %s after the checkpoint of step %d", job, loop.step)
    return True
