"""The training loop: :class:`TrainConfig`, :class:`TrainResult`, :func:`train` and the loop over epochs
and steps; see the package doc (``mlutils.train``) for what it promises."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

from .. import distributed
from . import wrapped
from .checkpoint import (CHECKPOINT_FORMAT, BestCheckpoints, CheckpointError, Checkpointer, ResumePoint,
                         _is_complete,
                         write_best_pointer, rng_state, set_rng_state)
from .commands import Commands, StdinReader, parse, run_command
from .counters import Counters, OutOfMemoryStop, is_oom
from .export import write_export
from .finetune import init_engines
from .data import DataPosition
from .config import TrainConfig, TrainResult
from .engine import Engine, Engines, MicroBatches
from .evaluation import evaluate
from .output import MetricsOutput, plain
from .signals import StopSignals, requeue, requeue_on

__all__ = ["TrainConfig", "TrainResult", "train"]


def _logger_state(lg: Any) -> Any:
    fn = getattr(lg, "state_dict", None)
    return fn() if callable(fn) else None


def _resume_logger(lg: Any, state: Any, step: int) -> None:
    """Give a logger what it saved (wandb: its run id) and the resumed step (TensorBoard: drop later events)."""
    load = getattr(lg, "load_state_dict", None)
    if state is not None and callable(load):
        load(state)
    fn = getattr(lg, "resume", None)
    if callable(fn):
        fn(step)

log = logging.getLogger("mlutils.train")


class _Loop:
    """One run of train(): the loop over epochs and steps, calling the data position, the commands, the
    checkpointer, the output and the signals, each of which lives in its own module."""

    def __init__(self, loader: Iterable[Any], engines: Engines, eval_fn: Optional[Callable[..., Any]],
                 cfg: TrainConfig) -> None:
        self.engines = engines
        self.eval_fn = eval_fn
        # paths fixed now: a chdir during training (in a step, in eval_fn) must not move the checkpoints
        fixed = {name: os.path.abspath(getattr(cfg, name)) for name in
                 ("checkpoint_dir", "export_dir", "metrics_file", "init_from") if getattr(cfg, name) is not None}
        if isinstance(cfg.resume, (str, os.PathLike)) and cfg.resume != "auto":
            fixed["resume"] = os.path.abspath(cfg.resume)
        self.cfg = dataclasses.replace(cfg, **fixed)
        self.dist = distributed
        self.leader = bool(self.dist.is_global_leader())
        self.data = DataPosition(loader)
        self.ckpt = Checkpointer(self.cfg.checkpoint_dir, self.cfg.keep_last, self.cfg.async_save, self.dist)
        self.out = MetricsOutput(self.leader, self.cfg.metrics_stdout, self.cfg.metrics_file, self.cfg.progress,
                                 self.cfg.loggers)
        self.signals = StopSignals()
        self.commands = Commands(self.dist, self.leader, self.cfg.iterations, self.ckpt.world)
        self.best = BestCheckpoints(self.cfg.keep_best, self.cfg.best_metric, self.cfg.best_mode)
        self.counters = Counters(self.dist)
        self.step = 0
        self.last_metrics: Dict[str, Any] = {}
        self.eval_metrics: Optional[Dict[str, Any]] = None
        self.step_times: List[float] = []
        self.eval_pending_rng: Optional[Mapping[str, Any]] = None  # RNGs before an evaluation a signal cut short
        self.at: Optional[ResumePoint] = None  # the resumed position, until the loop has got there
        self.ooms_in_a_row = 0

    def should_stop(self) -> bool:
        """True when a stop signal arrived on any rank (a collective: call it at the same points on every rank)."""
        if self.ckpt.world == 1:
            return self.signals.name is not None
        return bool(self.dist.any_rank(self.signals.name is not None, group=self.commands.group))

    # ---- checkpoints
    def save(self, sync: bool, explicit: bool = False) -> bool:
        """Checkpoint the current step (asynchronously unless `sync` or the config says otherwise), and
        export with it when TrainConfig.export_on_save says so.

        `explicit`: a command asked for it (said so when there is no checkpoint_dir).  True when a
        checkpoint was written (not when this step's exists already)."""
        if self.cfg.checkpoint_dir is None:
            if explicit and self.leader:
                log.warning("save: no checkpoint_dir configured")
            return False
        if self.ckpt.last_step == self.step and self.eval_pending_rng is None:
            return False
        loop, sampler = self.data.state()
        loop.update(events=[[at, cmd] for at, cmd in self.commands.events],
                    eval_pending=self.eval_pending_rng is not None, best=self.best.state(),
                    loggers=[_logger_state(lg) for lg in self.out.loggers] if self.leader else [],
                    **self.counters.state())
        state = {"format": CHECKPOINT_FORMAT, "step": self.step, "rank": self.ckpt.rank,
                 "world_size": self.ckpt.world, "engines": self.engines.state_dict(self.leader), "loop": loop,
                 "sampler": sampler,
                 "rng": rng_state(self.data.generator) if self.eval_pending_rng is None else self.eval_pending_rng}
        self.ckpt.save(self.step, state, sync, self.best if self.best.k else None,
                       self.engines.save_files if self.engines.has_files() else None)
        if self.cfg.export_on_save:
            self.export()
        return True

    def resume(self) -> None:
        """Load the checkpoint config.resume names; the loop applies its ResumePoint when it gets there.
        Nothing to resume and TrainConfig.init_from set: the engines start from those weights."""
        folder = self.ckpt.find(self.cfg.resume)
        if folder is None:
            if self.cfg.init_from is not None:
                got = init_engines(self.cfg.init_from, self.engines, self.cfg.init_strict, self.cfg.init_optimizer,
                                   self.ckpt.rank, self.ckpt.world)
                log.info("started from the weights in %s%s", got, " and its optimizer state"
                         if self.cfg.init_optimizer else "")
            return
        if self.cfg.init_from is not None and self.leader:
            log.info("resuming %s: TrainConfig.init_from is ignored", folder)
        if wrapped.is_dcp_folder(folder) and not _is_complete(folder):
            self.engines.load_dcp(folder)  # a plain dcp.save folder (torchtitan's, yours): weights and optimizer
            log.info("loaded the torch.distributed.checkpoint folder %s; training starts at step %d", folder,
                     self.engines.global_step)
            return
        state, path = self.ckpt.read(folder)  # every field checked
        loop = state["loop"]
        skip, epoch_rng = self.data.restore(loop, state.get("sampler"), path, self.leader,
                                            self.ckpt.saved_world)  # before the engines
        try:
            self.engines.load_files(folder)
            self.engines.load_state_dict(self.ckpt.replicas(state["engines"], folder))
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        except (RuntimeError, KeyError, ValueError, TypeError, OSError) as exc:
            raise CheckpointError(f"{path} does not fit the engines: {type(exc).__name__}: {exc}") from exc
        self.step = int(state["step"])
        self.commands.events = [(int(at), str(cmd)) for at, cmd in loop["events"]]
        self.best.load(loop.get("best"))
        self.counters.load(loop)
        for lg, st in zip(self.out.loggers, loop.get("loggers") or []):
            _resume_logger(lg, st, self.step)
        for lg in self.out.loggers[len(loop.get("loggers") or []):]:
            _resume_logger(lg, None, self.step)
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

    def export(self) -> None:
        """Write the engines' weights as safetensors (global leader); a failure is logged, training goes on."""
        try:
            write_export(self.engines, self.cfg, self.step, self.leader)
        except (OSError, ValueError, TypeError) as exc:
            # an export is a copy of the weights on the side: its failure (a full disk, a name taken
            # by a folder, weights safetensors cannot hold) is reported, training goes on
            log.error("export at step %d failed: %s: %s", self.step, type(exc).__name__, exc)

    def evaluate(self) -> bool:
        """eval_fn at this step (see mlutils.train.evaluation); True when a stop signal cut it short."""
        return evaluate(self)

    # ---- the loop
    def _boundary(self, stepped: bool = True) -> Optional[str]:
        """After a step: commands, signals, evaluation, saves; 'quit', 'signal', 'completed' or None.
        After a skipped step (`stepped` False) only commands and signals: the step did not move."""
        self.ckpt.saver.check()
        lines, stop = self.commands.gather(self.signals.name is not None)
        outcome: Optional[str] = None
        for line in (self.commands.due(self.step) if stepped else []) + lines:  # all: after 'quit' too
            r = run_command(self, line)
            if r == "signal":  # an evaluation cut short by a signal: stop now (its state is what is saved)
                return "signal"
            if r == "quit":
                outcome = "quit"
        if stop:
            return "signal"
        if outcome is not None or not stepped:
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
            r = run_command(self, line)
            if r in ("quit", "signal") and outcome != "signal":
                outcome = r
        self.out.start_bar(self.step, self.cfg.iterations)
        self.counters.start()
        return outcome

    def run(self) -> TrainResult:
        if self.cfg.handle_signals:
            self.signals.install()
        try:
            status = self._start()
            if status is None:
                status = "completed" if self.step >= self.cfg.iterations else self._epochs()
            if self.cfg.save_at_end or (status == "signal" and requeue_on(self.cfg)):  # a requeue needs it
                self.save(sync=True)
            if self.cfg.export_on_quit:
                self.export()
            self.ckpt.saver.wait()
        except BaseException:
            self._cleanup(failing=True)
            raise
        self._cleanup(failing=False)
        signal_name = self.signals.name if status == "signal" else None
        if status == "signal" and requeue(self):
            status = "requeued"
        if self.leader:
            log.info("training %s at step %d%s", status, self.step, f" ({signal_name})" if signal_name else "")
        return TrainResult(status=status, step=self.step, signal=signal_name, checkpoint=self.ckpt.last_folder,
                           resumed_from=self.at.folder if self.at is not None else None,
                           last_metrics=plain(self.last_metrics), eval_metrics=self.eval_metrics,
                           oom_skipped=self.counters.oom_skipped, best=list(self.best.best))

    def _cleanup(self, failing: bool) -> None:
        """Wait for the write in flight, restore the signal handlers, close the outputs, tell the engines.

        Every part runs whatever the others do.  The first error is raised,
        unless `failing` (an error is already on its way out: the one that
        stopped training stays the one the caller sees; these are logged)."""
        first: Optional[BaseException] = None
        for part in (self.ckpt.close, self.signals.restore, self.out.close_bar, self.out.close_file,
                     self.out.close_loggers, self.engines.quit):
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
        data, at, k = self.data, self.at, self.cfg.accumulate_batches
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
            group: List[Any] = []
            for batch in it:
                got += 1
                if at is not None and at.skip:
                    at.skip -= 1
                    if not at.skip and self._arrived():
                        return "signal"
                    continue
                group.append(batch)
                if len(group) < k:
                    continue
                outcome, group = self._step(group), []
                if outcome is not None:
                    return outcome
            if group:  # the epoch's last step takes the batches that are left
                outcome = self._step(group)
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

    def _step(self, batches: List[Any]) -> Optional[str]:
        """One optimizer step on `batches` (one loader batch, or accumulate_batches of them)."""
        t0 = time.perf_counter()
        batch = batches[0] if self.cfg.accumulate_batches == 1 else MicroBatches(batches)
        self.data.batches += len(batches)  # consumed, stepped on or skipped: a resume skips the same
        try:
            metrics = self.engines.train_step(batch)
        except Exception as exc:
            if self.cfg.oom != "skip" or not is_oom(exc):
                raise
            return self._skip_oom(exc)
        self.ooms_in_a_row = 0
        self.step += 1
        self.counters.stepped(batches)
        self.step_times.append(time.perf_counter() - t0)
        del self.step_times[:-1000]
        self.last_metrics = metrics  # kept on the device: read back only on the steps that log
        loss = None
        if self.step % self.cfg.log_every == 0:
            rec = self.out.emit({"step": self.step, "epoch": self.data.epoch, **metrics, **self.counters.line()},
                                self.step)
            loss = rec.get("loss") if rec is not None else None
        self.out.stepped(loss)
        return self._boundary()

    def _skip_oom(self, exc: BaseException) -> Optional[str]:
        """An out-of-memory step: gradients and caches dropped, the batch skipped; three in a row stop the
        run with a checkpoint."""
        self.engines.recover_from_oom()
        self.counters.oom_skipped += 1
        self.ooms_in_a_row += 1
        log.warning("out of memory in step %d: its batch is skipped (%d in a row, %d in all): %s", self.step + 1,
                    self.ooms_in_a_row, self.counters.oom_skipped, str(exc).splitlines()[0] if str(exc) else "")
        if self.ooms_in_a_row >= 3:
            self.save(sync=True)
            raise OutOfMemoryStop(f"three steps in a row ran out of memory (the last at step {self.step + 1}); "
                                  f"the run stopped with a checkpoint at step {self.step}") from exc
        return self._boundary(stepped=False)


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
