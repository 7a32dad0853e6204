"""The training loop: :class:`TrainConfig`, :class:`TrainResult`, :func:`train` and the loop over epochs
and steps; see the package doc (``mlutils.train``) for what it promises."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

from .. import distributed
from ..io import torch_save
from .checkpoint import (CHECKPOINT_FORMAT, I64, CheckpointError, Checkpointer, ResumePoint, rng_state,
                         set_rng_state)
from .commands import Commands, StdinReader, parse, report_time
from .data import DataPosition
from .engine import Engine, Engines
from .output import MetricsOutput
from .signals import StopSignals

__all__ = ["TrainConfig", "TrainResult", "train"]

log = logging.getLogger("mlutils.train")


@dataclass
class TrainConfig:
    """How the loop runs; 0 disables a frequency."""

    iterations: int = 1000              # stop when the global step reaches this
    save_frequency: int = 0             # save a checkpoint every N steps (0: only on quit/signal/end)
    eval_frequency: int = 0             # call eval_fn every M steps (0: only on `eval`)
    checkpoint_dir: Optional[str] = None  # None: no checkpoints at all
    keep_last: int = 3                  # complete checkpoints kept (0: all)
    resume: Union[str, bool, None] = "auto"  # "auto": newest complete checkpoint; a step folder; False/None: fresh
    async_save: bool = True             # write periodic/command saves in a background thread
    save_at_end: bool = True            # save when the loop ends (iterations reached, quit, signal)
    export_dir: Optional[str] = None    # where `export` writes (default: checkpoint_dir)
    metrics_stdout: bool = True         # the metrics JSON line on stdout (global leader)
    metrics_file: Optional[str] = None  # and/or appended to this file (lines past a resumed step are dropped)
    log_every: int = 1                  # a metrics line every N steps
    progress: bool = True               # a tqdm bar on the global leader (stderr)
    read_commands: bool = True          # read commands from stdin (global leader)
    handle_signals: bool = True         # SIGTERM/SIGINT/SIGUSR1 stop the loop cleanly
    events: List[str] = field(default_factory=list)  # commands to run as if typed first (e.g. "quit@500")

    def __post_init__(self) -> None:
        for name in ("iterations", "save_frequency", "eval_frequency", "keep_last", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < I64:
                raise ValueError(f"TrainConfig.{name} must be an int from 0 to 2**63-1, got {v!r}")
        if self.log_every < 1:
            raise ValueError("TrainConfig.log_every must be >= 1")
        for name in ("async_save", "save_at_end", "metrics_stdout", "progress", "read_commands", "handle_signals"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"TrainConfig.{name} must be True or False, got {type(v).__name__} {v!r}")
        for name in ("checkpoint_dir", "export_dir", "metrics_file"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str) and not (isinstance(v, os.PathLike)
                                                                 and isinstance(os.fspath(v), str)):
                raise TypeError(f"TrainConfig.{name} must be a str path or None, got {type(v).__name__} {v!r}")
        r = self.resume
        if not (r is None or isinstance(r, (bool, str))
                or (isinstance(r, os.PathLike) and isinstance(os.fspath(r), str))):
            raise TypeError(f"TrainConfig.resume must be 'auto', a checkpoint folder, True, False or None; "
                            f"got {type(r).__name__} {r!r}")
        if not isinstance(self.events, (list, tuple)) or not all(isinstance(e, str) for e in self.events):
            raise TypeError(f"TrainConfig.events must be a list of command strings, got {self.events!r}")


@dataclass
class TrainResult:
    """How train() ended: status is 'completed', 'quit' or 'signal'."""

    status: str
    step: int
    signal: Optional[str] = None
    checkpoint: Optional[str] = None
    resumed_from: Optional[str] = None
    last_metrics: Dict[str, Any] = field(default_factory=dict)
    eval_metrics: Optional[Dict[str, Any]] = None


class _Loop:
    """One run of train(): the loop over epochs and steps, calling the data position, the commands, the
    checkpointer, the output and the signals, each of which lives in its own module."""

    def __init__(self, loader: Iterable[Any], engines: Engines, eval_fn: Optional[Callable[..., Any]],
                 cfg: TrainConfig) -> None:
        self.engines = engines
        self.eval_fn = eval_fn
        # paths fixed now: a chdir during training (in a step, in eval_fn) must not move the checkpoints
        fixed = {name: os.path.abspath(getattr(cfg, name))
                 for name in ("checkpoint_dir", "export_dir", "metrics_file") if getattr(cfg, name) is not None}
        if isinstance(cfg.resume, (str, os.PathLike)) and cfg.resume != "auto":
            fixed["resume"] = os.path.abspath(cfg.resume)
        self.cfg = dataclasses.replace(cfg, **fixed)
        self.dist = distributed
        self.leader = bool(self.dist.is_global_leader())
        self.data = DataPosition(loader)
        self.ckpt = Checkpointer(self.cfg.checkpoint_dir, self.cfg.keep_last, self.cfg.async_save, self.dist)
        self.out = MetricsOutput(self.leader, self.cfg.metrics_stdout, self.cfg.metrics_file, self.cfg.progress)
        self.signals = StopSignals()
        self.commands = Commands(self.dist, self.leader, self.cfg.iterations)
        self.step = 0
        self.last_metrics: Dict[str, Any] = {}
        self.eval_metrics: Optional[Dict[str, Any]] = None
        self.step_times: List[float] = []
        self.eval_pending_rng: Optional[Mapping[str, Any]] = None  # RNGs before an evaluation a signal cut short
        self.at: Optional[ResumePoint] = None  # the resumed position, until the loop has got there

    def should_stop(self) -> bool:
        """True when a stop signal arrived on any rank (a collective: call it at the same points on every rank)."""
        return bool(self.dist.any_rank(self.signals.name is not None))

    # ---- checkpoints
    def save(self, sync: bool, explicit: bool = False) -> None:
        """Checkpoint the current step (asynchronously unless `sync` or the config says otherwise).

        `explicit`: a command asked for it (said so when there is no checkpoint_dir)."""
        if self.cfg.checkpoint_dir is None:
            if explicit and self.leader:
                log.warning("save: no checkpoint_dir configured")
            return
        if self.ckpt.last_step == self.step and self.eval_pending_rng is None:
            return
        loop, sampler = self.data.state()
        loop.update(events=[[at, cmd] for at, cmd in self.commands.events],
                    eval_pending=self.eval_pending_rng is not None)
        state = {"format": CHECKPOINT_FORMAT, "step": self.step, "rank": self.ckpt.rank,
                 "world_size": self.ckpt.world, "engines": self.engines.state_dict(), "loop": loop,
                 "sampler": sampler,
                 "rng": rng_state(self.data.generator) if self.eval_pending_rng is None else self.eval_pending_rng}
        self.ckpt.save(self.step, state, sync)

    def resume(self) -> None:
        """Load the checkpoint config.resume names; the loop applies its ResumePoint when it gets there."""
        folder = self.ckpt.find(self.cfg.resume)
        if folder is None:
            return
        state, path = self.ckpt.read(folder)  # every field checked
        loop = state["loop"]
        skip, epoch_rng = self.data.restore(loop, state.get("sampler"), path, self.leader)  # before the engines
        try:
            self.engines.load_state_dict(state["engines"])
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path} does not fit the engines: {type(exc).__name__}: {exc}") from exc
        self.step = int(state["step"])
        self.commands.events = [(int(at), str(cmd)) for at, cmd in loop["events"]]
        self.at = ResumePoint(folder, self.step, state["rng"], bool(loop.get("eval_pending", False)), skip,
                              epoch_rng)
        self.ckpt.resumed(folder, self.step)
        log.info("resumed from %s at step %d (epoch %d, batch %d of the epoch)",
                 folder, self.step, self.data.epoch, self.data.batches)

    def _arrived(self) -> bool:
        """The loop stands where the resumed run stood: its RNG states are restored, then the evaluation a
        signal cut short there runs again; True if a signal cuts it short again."""
        at = self.at
        if at is None or at.rng is None:
            return False
        set_rng_state(at.rng, self.data.generator)
        at.rng = None
        if not at.redo_eval:
            return False
        at.redo_eval = False
        if self.leader:
            log.info("evaluating step %d again: a signal cut it short before the checkpoint", self.step)
        return self.evaluate()

    # ---- commands
    def run_command(self, line: str) -> Optional[str]:
        """Run one command now: 'quit' when the loop must stop, 'signal' when a signal cut an evaluation short."""
        words = self.commands.parse(line, self.step)
        if words is None:
            return None
        cmd = words[0]
        if cmd == "save":
            self.save(sync=False, explicit=True)
        elif cmd == "export":
            try:
                self.export()
            except (OSError, ValueError, TypeError) as exc:
                # an export is a copy of the weights on the side: its failure (a full disk, a name taken
                # by a folder, weights safetensors cannot hold) is reported, training goes on
                log.error("export at step %d failed: %s: %s", self.step, type(exc).__name__, exc)
        elif cmd in ("eval", "eval_quit"):
            if self.evaluate():
                return "signal"
            return "quit" if cmd == "eval_quit" else None
        elif cmd == "quit":
            return "quit"
        elif cmd == "lr":
            self.engines.set_lr(float(words[1]))
            if self.leader:
                log.info("learning rate set to %s at step %d", words[1], self.step)
        elif cmd == "time":
            if self.leader:
                report_time(self.step_times, self.step, int(words[2]) if len(words) == 3 else self.cfg.iterations)
        elif cmd == "event":
            self.commands.show() if words[1] == "show" else self.commands.clear()
        return None

    def export(self) -> None:
        """Write the engines' weights as safetensors (global leader)."""
        out_dir = self.cfg.export_dir or self.cfg.checkpoint_dir
        if out_dir is None:
            if self.leader:
                log.warning("export: no export_dir or checkpoint_dir configured")
            return
        tensors = self.engines.export()
        if self.leader:
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, f"export-{self.step:08d}.safetensors")
            torch_save({"module": tensors, "step": self.step}, path)
            log.info("exported %d tensors to %s", len(tensors), path)

    def evaluate(self) -> bool:
        """Run eval_fn(step, should_stop) and log its metrics as a JSON line {"step", "eval": {...}}.

        Returns True when a stop signal came during it (a collective: every
        rank evaluates at the same points).  Such an evaluation may be cut
        short: its line says ``"interrupted": true``, and the checkpoint the
        loop then writes holds the RNG states from before it and asks the
        resumed run to evaluate this step again first, so the resumed run
        continues exactly as an uninterrupted one."""
        if self.eval_fn is None:
            if self.leader:
                log.warning("eval: no eval_fn given to train()")
            return False
        rng_before = rng_state(self.data.generator)
        result = self.eval_fn(self.step, self.should_stop)
        if result is not None and not isinstance(result, Mapping):
            raise TypeError(f"eval_fn returned {type(result).__name__} {result!r}; it must return a mapping of "
                            f"metrics (or None)")
        interrupted = self.should_stop()
        if interrupted:
            self.eval_pending_rng = rng_before
        if result is not None:
            self.eval_metrics = dict(result)
            record: Dict[str, Any] = {"step": self.step, "eval": self.eval_metrics}
            if interrupted:
                record["interrupted"] = True
            self.out.emit(record, self.step)
        return interrupted

    # ---- the loop
    def _boundary(self) -> Optional[str]:
        """After a step: commands, signals, evaluation, saves; 'quit', 'signal', 'completed' or None."""
        self.ckpt.saver.check()
        lines, stop = self.commands.gather(self.signals.name is not None)
        outcome: Optional[str] = None
        for line in self.commands.due(self.step) + lines:  # all: a command after 'quit' still runs
            r = self.run_command(line)
            if r == "signal":  # an evaluation cut short by a signal: stop now (its state is what is saved)
                return "signal"
            if r == "quit":
                outcome = "quit"
        if stop:
            return "signal"
        if outcome is not None:
            return outcome
        c = self.cfg
        # evaluate before the periodic save: the checkpoint then holds the RNG states the next step starts
        # from (an eval_fn may draw from them), and a kill during the evaluation resumes before it
        if c.eval_frequency and self.step % c.eval_frequency == 0 and self.evaluate():
            return "signal"
        if c.save_frequency and self.step % c.save_frequency == 0 and self.step < c.iterations:
            self.save(sync=False)
        if self.step >= c.iterations:
            return "completed"
        return None

    def _start(self) -> Optional[str]:
        """Before the first step: make the folders, resume, open the outputs, run TrainConfig.events;
        'quit' or 'signal' when one of them ends the run before it starts."""
        if self.cfg.read_commands and self.leader:
            self.commands.reader = StdinReader()
        _make_folders(self.cfg, self.leader)
        self.resume()
        if self.step == 0:
            self.step = self.engines.global_step
        self.out.open(self.step, self.cfg.iterations)  # before any command: an evaluation at the start is logged
        outcome: Optional[str] = None
        if self.step >= self.cfg.iterations and self.at is not None:
            # no step left: the saved RNG states are restored all the same (what the script draws after
            # train() matches an uninterrupted run), and an evaluation a signal cut short runs again
            if self._arrived():
                outcome = "signal"
        for line in self.cfg.events:
            at = parse(line, self.cfg.iterations)[1]
            if at is not None and at == self.step and self.at is not None:
                continue  # the run that wrote this checkpoint ran it before saving
            r = self.run_command(line)
            if r in ("quit", "signal") and outcome != "signal":
                outcome = r
        self.out.start_bar(self.step, self.cfg.iterations)
        return outcome

    def run(self) -> TrainResult:
        if self.cfg.handle_signals:
            self.signals.install()
        try:
            status = self._start()
            if status is None:
                status = "completed" if self.step >= self.cfg.iterations else self._epochs()
            if self.cfg.save_at_end:
                self.save(sync=True)
            self.ckpt.saver.wait()
        except BaseException:
            self._cleanup(failing=True)
            raise
        self._cleanup(failing=False)
        signal_name = self.signals.name if status == "signal" else None
        if self.leader:
            log.info("training %s at step %d%s", status, self.step, f" ({signal_name})" if signal_name else "")
        return TrainResult(status=status, step=self.step, signal=signal_name, checkpoint=self.ckpt.last_folder,
                           resumed_from=self.at.folder if self.at is not None else None,
                           last_metrics=self.last_metrics, eval_metrics=self.eval_metrics)

    def _cleanup(self, failing: bool) -> None:
        """Wait for the write in flight, restore the signal handlers, close the outputs, tell the engines.

        Every part runs whatever the others do.  The first error is raised,
        unless `failing` (an error is already on its way out: the one that
        stopped training stays the one the caller sees; these are logged)."""
        first: Optional[BaseException] = None
        for part in (self.ckpt.saver.wait, self.signals.restore, self.out.close_bar, self.out.close_file,
                     self.engines.quit):
            try:
                part()
            except BaseException as exc:  # noqa: PERF203  (each part must run)
                if failing:
                    log.error("while stopping after an error: %s: %s", type(exc).__name__, exc)
                elif first is None:
                    first = exc
        if first is not None:
            raise first

    def _epochs(self) -> str:
        data, at = self.data, self.at
        while True:
            data.begin_epoch()
            # iter(DataLoader) draws a seed from torch's RNG: a mid-epoch resume restores the RNGs after
            # that draw (the saved run had made it before the save), an epoch-boundary resume before it
            if at is not None and at.rng is not None and data.batches == 0:
                if self._arrived():
                    return "signal"
            elif at is not None and at.skip and at.epoch_rng is not None:
                # a loader that cannot seek is read again from the start of the epoch: with the RNG states
                # it started from, it draws the same order (torch's RandomSampler) and worker seeds
                set_rng_state(at.epoch_rng, data.generator)
            if getattr(data.loader, "num_workers", 0) and self.ckpt.saver.busy():
                # workers are forked now: no writer thread may hold a lock (a stream's, logging's) across it
                self.ckpt.saver.wait()
            it = data.iterate()
            if at is not None and not at.skip and self._arrived():
                return "signal"
            got = 0
            for batch in it:
                got += 1
                if at is not None and at.skip:
                    at.skip -= 1
                    if not at.skip and self._arrived():
                        return "signal"
                    continue
                outcome = self._step(batch)
                if outcome is not None:
                    return outcome
            if at is not None and at.skip:  # the epoch ended before the resumed position (no len())
                data.past_end(at.folder, self.leader)
                at.skip = 0
                if self._arrived():
                    return "signal"
                continue
            if got == 0 and data.batches == 0:
                raise ValueError("the data loader yielded no batch in a whole epoch: nothing to train on")
            data.next_epoch()

    def _step(self, batch: Any) -> Optional[str]:
        t0 = time.perf_counter()
        metrics = self.engines.train_step(batch)
        self.step += 1
        self.data.batches += 1
        self.step_times.append(time.perf_counter() - t0)
        del self.step_times[:-1000]
        self.last_metrics = dict(metrics)
        if self.step % self.cfg.log_every == 0:
            self.out.emit({"step": self.step, "epoch": self.data.epoch, **metrics}, self.step)
        self.out.stepped(metrics)
        return self._boundary()


def _make_folders(cfg: TrainConfig, leader: bool) -> None:
    """Create checkpoint_dir and export_dir now (global leader): one that cannot be a folder fails before
    training, not at the first save or export."""
    if not leader:
        return
    for name in ("checkpoint_dir", "export_dir"):
        folder = getattr(cfg, name)
        if folder is None:
            continue
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"TrainConfig.{name} {folder!r} cannot be used as a folder: {exc}") from exc


def train(train_dl: Iterable[Any], engines: Union[Engine, Engines, Mapping[str, Engine]],
          eval_fn: Optional[Callable[[int, Callable[[], bool]], Optional[Mapping[str, Any]]]] = None,
          config: Optional[TrainConfig] = None) -> TrainResult:
    """Train until config.iterations (or quit / a stop signal); saves, evaluates, obeys commands; see the module doc.

    ``eval_fn(step, should_stop)`` returns a dict of metrics (or None); it
    should return early when ``should_stop()`` is true (a collective when
    distributed: call it at the same points on every rank)."""
    cfg = config if config is not None else TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, not {type(cfg).__name__}")
    eng = engines if isinstance(engines, Engines) else Engines(engines)
    return _Loop(train_dl, eng, eval_fn, cfg).run()
