"""Commands: lines read from standard input without blocking (the global leader), shared with every rank,
parsed with every argument range-checked, scheduled as ``<command>@<step>`` events, and run."""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any, List, Optional, Sequence, Tuple

from .checkpoint import I64

__all__ = ["COMMANDS", "StdinReader", "Commands", "parse"]

log = logging.getLogger("mlutils.train")

#: The commands the loop understands (each may be scheduled as ``<command>@<step>``).
COMMANDS = ("save", "export", "eval", "quit", "eval_quit", "lr", "loss_scale", "time", "event")
_DIGITS = re.compile(r"^[0-9]+$")


class StdinReader:
    """Command lines from standard input without blocking: select() on fd 0 and os.read, no thread.

    A thread blocked in ``sys.stdin.readline()`` would hold the stream's lock
    across the fork of DataLoader workers, which close ``sys.stdin`` when they
    start: they would wait for that lock forever.  Reading the raw descriptor
    from the loop avoids both the thread and the lock.  EOF, a closed or
    unreadable stdin end the reading; training goes on.

    A stdin that is always ready (a file, ``/dev/zero``, ``yes save |``) is
    read one slice per poll (``MAX_READ`` bytes), at most ``MAX_LINES`` lines
    are handed out per poll (the rest wait for the next), and a line longer
    than ``MAX_LINE`` bytes is dropped with a warning: the step goes on and
    memory stays bounded whatever arrives."""

    MAX_READ = 1 << 16
    MAX_LINE = 4096
    MAX_LINES = 256

    def __init__(self) -> None:
        self._buf = b""
        self._lines: List[str] = []
        self._dropping = False  # inside an overlong line: discard up to its end
        self._tty: Optional[bool] = None
        self._fd: Optional[int] = None
        try:
            import select  # noqa: F401

            if sys.stdin is not None:
                self._fd = sys.stdin.fileno()
                os.fstat(self._fd)
        except (ImportError, OSError, ValueError, AttributeError) as exc:
            log.debug("no commands: stdin is not readable (%s)", exc)
            self._fd = None

    def _foreground(self) -> bool:
        """False while stdin is a terminal this process is in the background of (``train.py &``): reading
        it then would stop the process (SIGTTIN).  Input typed meanwhile is the shell's."""
        if self._tty is None:
            self._tty = os.isatty(self._fd) if self._fd is not None else False
        if not self._tty:
            return True
        try:
            return os.tcgetpgrp(self._fd) == os.getpgrp()
        except OSError:  # a terminal that is not our controlling one: no SIGTTIN, read it
            return True

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").strip()
        if text:
            self._lines.append(text)

    def _too_long(self) -> None:
        log.warning("a command line longer than %d bytes was dropped (too long)", self.MAX_LINE)

    def _feed(self, chunk: bytes) -> None:
        buf = self._buf + chunk
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            if self._dropping:
                self._dropping = False
            elif end - start > self.MAX_LINE:
                self._too_long()
            else:
                self._line(buf[start:end])
            start = end + 1
        rest = buf[start:]
        if self._dropping:
            rest = b""
        elif len(rest) > self.MAX_LINE:
            self._too_long()
            self._dropping, rest = True, b""
        self._buf = rest

    def poll(self) -> List[str]:
        """The complete lines that arrived since the last call (never blocks, bounded work per call)."""
        import select

        if len(self._lines) < self.MAX_LINES and self._fd is not None and self._foreground():
            try:
                ready, _, _ = select.select([self._fd], [], [], 0)
                chunk = os.read(self._fd, self.MAX_READ) if ready else None
            except (OSError, ValueError) as exc:
                log.debug("stdin unreadable (%s): no more commands", exc)
                chunk = b""
            if chunk == b"":
                log.debug("stdin reached EOF: no more commands")
                self._fd = None
                if not self._dropping:
                    self._line(self._buf)
                self._buf, self._dropping = b"", False
            elif chunk:
                self._feed(chunk)
        out, self._lines = self._lines[:self.MAX_LINES], self._lines[self.MAX_LINES:]
        return out


_USAGE = ("commands: save | export | eval | quit | eval_quit | lr <rate> | loss_scale <scale> | "
          "time [to <step>] | <command>@<step> | event [show] | event clear")


def _step_arg(text: str, line: str, last: int) -> Tuple[Optional[int], Optional[str]]:
    """(step, None) for a step number 0..last written in decimal digits, else (None, why not)."""
    text = text.strip()
    if not _DIGITS.match(text):
        return None, f"bad step in {_short(line)}: {_short(text)} is not a whole number >= 0"
    if len(text.lstrip("0")) > len(str(last)) or int(text) > last:
        return None, f"bad step in {_short(line)}: past the last step ({last}, TrainConfig.iterations)"
    return int(text), None


def _short(text: str, limit: int = 60) -> str:
    """repr(text), cut to about `limit` characters (a command line can be 4 KiB of digits)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def parse(line: str, last: int = I64 - 1) -> Tuple[Optional[Tuple[str, ...]], Optional[int], Optional[str]]:
    """(command words, scheduled step or None, error message or None) for one command line.

    Every argument is range-checked here: a step (``@S``, ``time to S``) is
    0..`last` (the run's iterations), a learning rate a finite number >= 0."""
    text = line.strip()
    at: Optional[int] = None
    if "@" in text:
        text, _, step_text = text.rpartition("@")
        text = text.strip()
        at, err = _step_arg(step_text, line, last)
        if err is not None:
            return None, None, err
    words = tuple(text.split())
    if not words:
        return None, None, f"empty command {_short(line)}; {_USAGE}"
    cmd, args = words[0], words[1:]
    if cmd in ("save", "export", "eval", "quit", "eval_quit") and not args:
        pass
    elif cmd == "lr" and len(args) == 1:
        try:
            rate = float(args[0])
        except ValueError:
            return None, None, f"lr needs a number, got {_short(args[0])}"
        if not rate >= 0 or rate == float("inf"):
            return None, None, f"lr must be a finite number >= 0, got {_short(args[0])}"
    elif cmd == "loss_scale" and len(args) == 1:
        try:
            scale = float(args[0])
        except ValueError:
            return None, None, f"loss_scale needs a number, got {_short(args[0])}"
        if not 0 < scale < float("inf"):
            return None, None, f"loss_scale must be a finite number > 0, got {_short(args[0])}"
    elif cmd == "time" and (not args or (len(args) == 2 and args[0] == "to")):
        if args:
            _n, err = _step_arg(args[1], line, last)
            if err is not None:
                return None, None, err
    elif cmd == "event" and (not args or (len(args) == 1 and args[0] in ("show", "clear"))) and at is None:
        if not args:
            words = ("event", "show")  # the bare command shows, as the original's did
    else:
        return None, None, f"unknown command {_short(line)}; {_USAGE}"
    return words, at, None


def cpu_group(world: int) -> Any:
    """A gloo group over every rank when the default group is NCCL (so the per-step agreement on commands
    and signals is a small CPU all-reduce, not a device sync); None otherwise (the default group is used)."""
    if world <= 1:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "nccl":
        return None
    return dist.new_group(backend="gloo")


class Commands:
    """The command lines of a run: read from stdin (global leader), shared with every rank at each step
    boundary, and the events scheduled for later steps."""

    def __init__(self, dist: Any, leader: bool, last_step: int, world: int = 2) -> None:
        self.dist = dist
        self.world = world  # 1: no collectives
        self.group = cpu_group(world)  # the per-step agreement runs on the CPU
        self.leader = leader
        self.last_step = last_step
        self.reader: Optional[StdinReader] = None  # set by the loop when it reads stdin
        self.events: List[Tuple[int, str]] = []
        self._held: List[str] = []

    def gather(self, signalled: bool) -> Tuple[List[str], bool]:
        """(command lines every rank runs now, stop requested by a signal on any rank): one collective per step."""
        if self.reader is not None:
            self._held.extend(self.reader.poll())
        if self.world == 1:
            lines, self._held = self._held, []
            return lines, signalled
        if not self.dist.any_rank(signalled or bool(self._held), group=self.group):
            return [], False
        lines = self.dist.broadcast_object(self._held if self.leader else None, src=0) or []
        self._held = []
        stop = bool(self.dist.any_rank(signalled, group=self.group))
        return list(lines), stop

    def due(self, step: int) -> List[str]:
        """The events scheduled for `step`, taken off the schedule."""
        due = [cmd for at, cmd in self.events if at == step]
        if due:
            self.events = [(at, cmd) for at, cmd in self.events if at != step]
        return due

    def parse(self, line: str, step: int) -> Optional[Tuple[str, ...]]:
        """The words of a command to run now; None when it is bad (warned), past, or scheduled for later."""
        words, at, err = parse(line, self.last_step)
        if err is not None or words is None:
            if self.leader:
                log.warning("%s", err)
            return None
        if at is not None:
            if at < step:
                if self.leader:
                    log.warning("%r: step %d is already past (now at step %d); ignored", line, at, step)
                return None
            if at > step:
                if (at, " ".join(words)) not in self.events:
                    self.events.append((at, " ".join(words)))
                self.events.sort(key=lambda e: e[0])
                if self.leader:
                    log.info("scheduled %r at step %d", " ".join(words), at)
                return None
        return words

    def show(self) -> None:
        if self.leader:
            log.info("events: %s", ", ".join(f"{c}@{s}" for s, c in self.events) or "none")

    def clear(self) -> None:
        self.events.clear()
        if self.leader:
            log.info("events cleared")


def report_time(step_times: Sequence[float], step: int, target: int) -> None:
    """Log the mean time of the last 100 steps and when step `target` will be reached."""
    recent = step_times[-100:]
    if not recent:
        log.info("time: no step timed yet")
        return
    per = sum(recent) / len(recent)
    left = max(target - step, 0)
    try:
        when = time.localtime(time.time() + per * left)
        at = ("beyond the calendar" if when.tm_year > 9999 else
              time.strftime("%H:%M:%S" if per * left < 86400 else "%Y-%m-%d %H:%M:%S", when))
    except (OverflowError, OSError, ValueError):  # beyond what the clock can show
        at = "beyond the calendar"
    log.info("time: %.3f s/step; step %d -> %d in about %.0f s (%s)", per, step, target, per * left, at)


def run_command(loop: Any, line: str) -> Optional[str]:
    """Run one command line on `loop` now: 'quit' when the loop must stop, 'signal' when a signal cut an
    evaluation short, else None (a bad line is one warning)."""
    words = loop.commands.parse(line, loop.step)
    if words is None:
        return None
    cmd = words[0]
    if cmd == "save":
        loop.save(sync=False, explicit=True)
    elif cmd == "export":  # a checkpoint with it, as the original's export did
        if not (loop.save(sync=False) and loop.cfg.export_on_save):  # export_on_save exported with it
            loop.export()
    elif cmd in ("eval", "eval_quit"):
        if loop.evaluate():
            return "signal"
        return "quit" if cmd == "eval_quit" else None
    elif cmd == "quit":
        return "quit"
    elif cmd == "lr":
        loop.engines.set_lr(float(words[1]))
        if loop.leader:
            log.info("learning rate set to %s at step %d", words[1], loop.step)
    elif cmd == "loss_scale":
        without = loop.engines.set_loss_scale(float(words[1]))
        if loop.leader:
            if without:
                log.warning("loss_scale: engine(s) %s have no loss scale (no float16 GradScaler)", without)
            if len(without) < len(loop.engines.engines):
                log.info("loss scale set to %s at step %d", words[1], loop.step)
    elif cmd == "time":
        if loop.leader:
            report_time(loop.step_times, loop.step, int(words[2]) if len(words) == 3 else loop.cfg.iterations)
    elif cmd == "event":
        loop.commands.show() if words[1] == "show" else loop.commands.clear()
    return None
