"""The loop's output: one JSON line of metrics per logged step from the global leader, on stdout (through
the progress bar's writer) and/or appended to the metrics file, and the progress bar.  A stdout, a bar or a
metrics file that cannot be written is dropped with one warning: output never stops training."""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TextIO

import numpy as np

from .._torch import require_torch
from .. import _core
from ..io import json_stringify

__all__ = ["MetricsOutput", "plain"]

log = logging.getLogger("mlutils.train")


def plain(obj: Any) -> Any:
    """`obj` with what JSON cannot hold made plain: tensors and numpy values as numbers or lists, ints past
    64 bits as floats, other objects as their str (a metrics line must never stop training)."""
    t = type(obj)
    if t is float or t is str or t is bool or obj is None:
        return obj
    if t is dict:
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (bool, float, str)):
        return obj
    if isinstance(obj, int):
        return obj if -(1 << 63) <= obj < (1 << 63) else float(obj)
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return plain(obj.item())
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if "torch" in sys.modules:
        torch = require_torch("mlutils.train")

        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu()
            return plain(t.item() if t.numel() == 1 else t.tolist())
    return str(obj)


class MetricsOutput:
    """Metrics lines and the progress bar of the global leader (other ranks write nothing)."""

    def __init__(self, leader: bool, to_stdout: bool, path: Optional[str], progress: bool,
                 loggers: Sequence[Any] = ()) -> None:
        self.leader = leader
        self.loggers: List[Any] = list(loggers) if leader else []
        self.to_stdout = to_stdout
        self.path = path
        self.progress = progress
        self.fh: Any = None
        self.bar: Any = None
        self._stdout_dead = False

    def open(self, step: int, total: int) -> None:
        """Open the metrics file (cut back to `step` on resume, emptied on a fresh start)."""
        path = self.path
        if not self.leader or path is None:
            return
        if step > 0 and os.path.exists(path):
            # drop lines past the resumed step: the log reads as one uninterrupted run
            from ..io import json_parse
            keep = []
            with open(path, encoding="utf-8", errors="replace") as f:  # a torn line may end mid-character
                for line in f:
                    try:
                        rec = json_parse(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            # replaced atomically: a failure or a kill while rewriting leaves the old log whole
            _core.write_file_atomic(path, "".join(keep).encode("utf-8"), durable=True)
        elif step == 0 and os.path.exists(path):
            open(path, "w").close()
        self.fh = open(path, "a", encoding="utf-8")

    def start_bar(self, step: int, total: int) -> None:
        """A tqdm bar on a terminal; plain progress lines when stderr is a file or a pipe (a batch job's log)."""
        if not (self.leader and self.progress):
            return
        err = sys.stderr
        try:
            tty = err is not None and err.isatty()
        except (OSError, ValueError):
            tty = False
        if not tty:
            self.bar = PlainProgress(total, step, err)
            return
        from tqdm import tqdm
        self._bar_call(lambda: setattr(self, "bar", tqdm(total=total, initial=step, dynamic_ncols=True,
                                                         file=err, leave=False)))

    def emit(self, record: Mapping[str, Any], step: int) -> Optional[Dict[str, Any]]:
        """Write one metrics line; the record as written (plain numbers; None on the other ranks)."""
        if not self.leader:
            return None
        rec = plain(record)
        line = json_stringify(rec, truncate=True)
        for lg in list(self.loggers):
            try:
                lg.log({k: v for k, v in rec.items() if k != "step"}, step)
            except Exception as exc:  # noqa: BLE001  (a tracker's failure never stops training)
                self.loggers.remove(lg)
                log.warning("logger %s dropped at step %d: %s: %s", type(lg).__name__, step, type(exc).__name__,
                            exc)
                try:
                    lg.close()
                except Exception:  # noqa: BLE001
                    pass
        if self.fh is not None:
            try:
                self.fh.write(line + "\n")
                self.fh.flush()
            except (OSError, ValueError) as exc:  # a full disk, a quota, /dev/full: training goes on
                self._drop_file(exc, step)
        if self.to_stdout and not self._stdout_dead:
            out = sys.stdout
            try:
                if out is None:
                    raise ValueError("sys.stdout is None (standard output was closed)")
                if self.bar is not None and not self.bar.disable:
                    self.bar.write(line, file=out)
                else:
                    out.write(line + "\n")
                out.flush()
            except (OSError, ValueError) as exc:  # `| head`, a closed stdout: training goes on
                self._stdout_dead = True
                log.warning("metrics on stdout stopped: %s: %s%s", type(exc).__name__, exc,
                            "" if self.fh is not None else " (no metrics_file: the metrics are not kept)")
        return rec

    def stepped(self, loss: Any = None) -> None:
        """Move the bar one step; `loss` (a number, given on the steps that read it back) is shown."""
        if self.bar is None:
            return
        self._bar_call(lambda: self.bar.update(1))
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            self._bar_call(lambda: self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False))

    def close_loggers(self) -> None:
        """Close every logger; one that fails to is reported."""
        loggers, self.loggers = self.loggers, []
        for lg in loggers:
            try:
                lg.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("logger %s failed to close: %s: %s", type(lg).__name__, type(exc).__name__, exc)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def close_file(self) -> None:
        if self.fh is not None:
            self.fh.close()

    def _drop_file(self, exc: BaseException, step: int) -> None:
        """Stop the metrics_file copy after a failed write, with one warning naming the file."""
        fh, self.fh = self.fh, None
        log.warning("metrics_file %s stopped at step %d: %s: %s%s", self.path, step, type(exc).__name__,
                    exc.strerror if isinstance(exc, OSError) and exc.strerror else exc,
                    "" if self.to_stdout and not self._stdout_dead else " (metrics are not kept from now on)")
        try:
            fh.close()
        except (OSError, ValueError):
            pass  # the buffered line that failed fails again: it is dropped

    def _bar_call(self, fn: Callable[[], Any]) -> None:
        """Run fn on the progress bar; a bar that cannot write (stderr or stdout closed, a broken pipe: tqdm
        flushes both) is dropped with a warning, training goes on."""
        try:
            fn()
        except (OSError, ValueError) as exc:
            log.warning("progress bar stopped: %s: %s", type(exc).__name__, exc)
            bar, self.bar = self.bar, None
            if bar is not None:
                bar.disable = True  # close() must not write either


class PlainProgress:
    """Progress as plain lines, for a stderr that is not a terminal: a line when another 5% of the run is
    done or a minute has passed, never carriage-return redraws into a log file."""

    disable = False

    def __init__(self, total: int, step: int, stream: Optional[TextIO], every: float = 60.0) -> None:
        self.total = max(int(total), 1)
        self.n = int(step)
        self.stream = stream
        self.every = every
        self.postfix = ""
        self._last_n = self.n
        self._last_t = time.monotonic()
        self._t0 = self._last_t
        self._n0 = self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if (self.n - self._last_n) * 20 >= self.total or now - self._last_t >= self.every or self.n >= self.total:
            rate = (now - self._t0) / max(self.n - self._n0, 1)
            self._print(f"step {self.n}/{self.total} ({100.0 * self.n / self.total:.0f}%), {rate:.3f} s/step"
                        + (f", {self.postfix}" if self.postfix else ""))
            self._last_n, self._last_t = self.n, now

    def set_postfix(self, refresh: bool = False, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kw.items())

    def write(self, line: str, file: Any = None) -> None:
        out = file if file is not None else sys.stdout
        out.write(line + "\n")

    def close(self) -> None:
        pass

    def _print(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()
