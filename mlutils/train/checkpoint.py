"""Checkpoints: the folder format, the state's snapshot and background writer, the RNG states, and
the bodies of save and resume.

``<checkpoint_dir>/step-<8 digits>/rank-<r>-of-<w>.pt``: one file per rank,
written atomically (temporary file, fsync, rename; the step folder and its
parent fsynced); a checkpoint is complete when every rank's file is there.
Resuming one gives a :class:`ResumePoint`: where the saved run was and what
the loop must do when it gets there."""
from __future__ import annotations

import atexit
import copy
import logging
import os
import random
import re
import shutil
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .._torch import require_torch
from .._core import MlutilsError
from ..io import torch_load, torch_save

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "ResumePoint", "Checkpointer", "find_checkpoints",
           "latest_checkpoint"]

log = logging.getLogger("mlutils.train")

#: Format tag written into every checkpoint file.
CHECKPOINT_FORMAT = "mlutils.train/1"
#: Steps and counts a checkpoint holds are int64: 0 <= n < I64.
I64 = 1 << 63
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_RANK_FILE = re.compile(r"^rank-(\d{5,})-of-(\d{5,})\.pt$")


class CheckpointError(MlutilsError, RuntimeError):
    """A checkpoint could not be written or does not fit this run."""


# ---------------------------------------------------------------- the folder format


def _rank_file(world: int, rank: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.pt"


def _is_complete(path: str) -> bool:
    """True when every rank's file of the checkpoint folder is there."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    worlds = {int(m.group(2)) for m in map(_RANK_FILE.match, names) if m}
    if len(worlds) != 1:
        return False
    w = worlds.pop()
    return all(os.path.isfile(os.path.join(path, _rank_file(w, r))) for r in range(w))


def find_checkpoints(checkpoint_dir: str, complete_only: bool = True) -> List[Tuple[int, str]]:
    """[(step, folder)] of the checkpoints under `checkpoint_dir`, oldest first (complete ones only by default)."""
    try:
        names = os.listdir(checkpoint_dir)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = _STEP_DIR.match(name)
        path = os.path.join(checkpoint_dir, name)
        if m and os.path.isdir(path) and (not complete_only or _is_complete(path)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(checkpoint_dir: str) -> Optional[str]:
    """The newest complete checkpoint folder under `checkpoint_dir`, or None."""
    found = find_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rotate(checkpoint_dir: str, keep_last: int, upto: int, protect: frozenset = frozenset()) -> None:
    """Delete complete checkpoints beyond the newest `keep_last` and partial ones older than the newest complete.

    Only checkpoints up to step `upto` (the one just written) count: newer ones
    (left by a run this one rolled back from) are neither counted nor removed.
    The steps in `protect` (the best ones) are never removed."""
    complete = [(s, p) for s, p in find_checkpoints(checkpoint_dir) if s <= upto]
    if not complete:
        return
    newest = complete[-1][0]
    keep = {p for _s, p in complete[-keep_last:]} if keep_last > 0 else {p for _s, p in complete}
    for step, path in find_checkpoints(checkpoint_dir, complete_only=False):
        if step < newest and path not in keep and step not in protect:
            log.debug("removing checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _count(v: Any) -> bool:
    """An int a checkpoint can hold as a step or a count: 0 <= v < 2**63."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < I64


def _rng_ok(rng: Any) -> bool:
    """True when `rng` (as rng_state() makes it) loads into generators: tried on throwaway ones, so a
    damaged entry is found before anything is restored."""
    torch = require_torch("mlutils.train")

    if not isinstance(rng, Mapping):
        return False
    try:
        v, internal, gauss = rng["python"]
        random.Random().setstate((v, tuple(internal), gauss))
        np.random.RandomState().set_state(tuple(rng["numpy"]))
        torch.Generator().set_state(rng["torch"])
        if rng.get("loader_generator") is not None:
            torch.Generator().set_state(rng["loader_generator"])
        cuda = rng.get("cuda")
        if cuda is not None and not (isinstance(cuda, (list, tuple)) and all(
                isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in cuda)):
            return False
    except Exception:  # noqa: BLE001  (whatever a damaged entry makes the setters raise)
        return False
    return True


def _check_state(state: Any, path: str) -> None:
    """CheckpointError naming what is missing or damaged when `state` is not a whole checkpoint of this
    format: every field the loop reads is checked here, before anything is loaded."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    loop = state.get("loop")
    lp: Mapping[str, Any] = loop if isinstance(loop, Mapping) else {}
    samp = state.get("sampler")
    bad = [name for name, ok in (
        ("engines", isinstance(state.get("engines"), Mapping)),
        ("step", _count(state.get("step"))),
        ("rng", _rng_ok(state.get("rng"))),
        ("loop", isinstance(loop, Mapping)),
        ("loop.epoch", _count(lp.get("epoch"))),
        ("loop.batches_in_epoch", _count(lp.get("batches_in_epoch"))),
        ("loop.events", isinstance(lp.get("events"), (list, tuple))
         and all(isinstance(e, (list, tuple)) and len(e) == 2 and _count(e[0]) and isinstance(e[1], str)
                 for e in lp["events"])),
        ("loop.eval_pending", isinstance(lp.get("eval_pending", False), bool)),
        ("loop.epoch_rng", lp.get("epoch_rng") is None or _rng_ok(lp.get("epoch_rng"))),
        ("loop.samples", _count(lp.get("samples", 0))),
        ("loop.elapsed", isinstance(lp.get("elapsed", 0.0), (int, float)) and not isinstance(lp.get("elapsed"), bool)
         and 0 <= lp.get("elapsed", 0.0) < float("inf")),
        ("loop.oom_skipped", _count(lp.get("oom_skipped", 0))),
        ("loop.loggers", isinstance(lp.get("loggers", []), (list, tuple)) and all(
            e is None or isinstance(e, Mapping) for e in lp.get("loggers", []))),
        ("loop.best", isinstance(lp.get("best", []), (list, tuple)) and all(
            isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], (int, float))
            and not isinstance(e[0], bool) and _count(e[1]) for e in lp.get("best", []))),
        ("sampler", samp is None or (isinstance(samp, Mapping)
                                     and (samp.get("epoch_start") is None
                                          or isinstance(samp.get("epoch_start"), Mapping))
                                     and (samp.get("draws") is None or _count(samp.get("draws"))))),
    ) if not ok]
    if bad:
        raise CheckpointError(f"{path} is a damaged {CHECKPOINT_FORMAT} checkpoint: {', '.join(bad)} "
                              f"missing or of the wrong type or range")


# ---------------------------------------------------------------- snapshots and the background writer


def _view_key(t: Any) -> Optional[Tuple[Any, ...]]:
    """What makes two tensors the same view of the same memory (tied weights), or None when not strided."""
    torch = require_torch("mlutils.train")

    if t.layout != torch.strided:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype)


def _host_copy(obj: Any, cache: Optional[Dict[Any, Any]] = None, key: Tuple[Any, ...] = (),
               memo: Optional[Dict[Any, Any]] = None) -> Any:
    """A deep copy whose tensors are detached CPU copies (the snapshot an asynchronous save writes).

    With `cache` (a dict kept between saves), tensors are copied into the CPU
    buffers of the previous snapshot when shape and dtype match: no new memory
    to fault in, so the copy runs at memory speed.  The caller guarantees that
    the previous snapshot is no longer being written.  Tensors that are the
    same view of the same memory (tied weights) get one copy, shared as in
    the state: the file holds them once, as a synchronous save does."""
    if isinstance(obj, _ATOMS):
        return obj
    torch = require_torch("mlutils.train")

    if memo is None:
        memo = {}
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        ident = _view_key(src)
        if ident is not None and ident in memo:
            return memo[ident]
        buf = cache.get(key) if cache is not None else None
        if (buf is None or buf.shape != src.shape or buf.dtype != src.dtype
                or buf.layout != src.layout or not src.is_contiguous() or src.layout != torch.strided):
            buf = src.to("cpu", copy=True)
            if cache is not None:
                cache[key] = buf
        else:
            buf.copy_(src)
        if ident is not None:
            memo[ident] = buf
        return buf
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, OrderedDict):  # what state_dict() returns, with the module versions in _metadata
        out = OrderedDict((k, _host_copy(v, cache, key + (k,), memo)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(obj, Mapping):
        return {k: _host_copy(v, cache, key + (k,), memo) for k, v in obj.items()}
    if isinstance(obj, list):
        if all(isinstance(v, _ATOMS) for v in obj):
            return list(obj)
        return [_host_copy(v, cache, key + (i,), memo) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        if all(isinstance(v, _ATOMS) for v in obj):  # Python's RNG state: 625 ints, immutable as it is
            return obj
        return tuple(_host_copy(v, cache, key + (i,), memo) for i, v in enumerate(obj))
    return obj


#: Values a snapshot keeps as they are (immutable).
_ATOMS = (int, float, str, bytes, bool, type(None))


def _snapshot(state: Any, cache: Dict[Any, Any]) -> Any:
    """_host_copy on one intra-op thread: a memory-bound copy gains nothing from more, and on a busy
    machine torch's thread pool waiting for descheduled peers made the copy several times slower."""
    torch = require_torch("mlutils.train")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _host_copy(state, cache)
    finally:
        torch.set_num_threads(threads)


class _Saver:
    """Runs checkpoint writes one at a time in a background thread started at the first and kept until
    close() (starting a thread per save would cost the training thread that start, each time); the
    error of a write is raised by the next wait().  The thread is a daemon: a process that ends without
    close() still finishes the writes submitted (an exit handler drains them)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._jobs: List[Optional[Callable[[], None]]] = []  # None: the thread's end
        self._running = False
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def busy(self) -> bool:
        with self._cond:
            return bool(self._jobs) or self._running

    def wait(self) -> None:
        """Wait for the write in flight; raise CheckpointError if it (or an earlier one) failed."""
        with self._cond:
            while self._jobs or self._running:
                self._cond.wait()
        self.check()

    def check(self) -> None:
        """Raise CheckpointError if a finished write failed."""
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint failed: {err}") from err

    def submit(self, fn: Callable[[], None]) -> None:
        """Run fn in the background after the previous write."""
        self.wait()
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mlutils-checkpoint", daemon=True)
                self._thread.start()
                _LIVE_SAVERS.add(self)
            self._jobs.append(fn)
            self._cond.notify_all()

    def close(self) -> None:
        """Wait for the writes, end the thread; raise CheckpointError if a write failed."""
        with self._cond:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._jobs.append(None)
                self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        _LIVE_SAVERS.discard(self)
        self.check()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                fn = self._jobs.pop(0)
                self._running = fn is not None
            if fn is None:
                with self._cond:
                    self._cond.notify_all()
                return
            try:
                fn()
            except BaseException as exc:  # surfaced by the next wait()/check()
                self._error = exc
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()


_LIVE_SAVERS: "weakref.WeakSet[_Saver]" = weakref.WeakSet()


@atexit.register
def _drain_savers() -> None:
    """At exit: the writes still queued are finished (the writer thread is a daemon)."""
    for saver in list(_LIVE_SAVERS):
        try:
            saver.close()
        except BaseException as exc:  # noqa: BLE001  (nothing is left to raise it to)
            log.error("a checkpoint write failed at exit: %s", exc)


# ---------------------------------------------------------------- RNG states


def rng_state(generator: Any = None) -> Dict[str, Any]:
    """Python's, numpy's, torch's CPU and (when initialised) CUDA generator states, and those of
    `generator` (a data loader's own torch.Generator) when given."""
    torch = require_torch("mlutils.train")

    state: Dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if isinstance(generator, torch.Generator):
        state["loader_generator"] = generator.get_state()
    return state


def set_rng_state(state: Mapping[str, Any], generator: Any = None) -> None:
    """Restore what rng_state() captured."""
    torch = require_torch("mlutils.train")

    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    if state.get("loader_generator") is not None and isinstance(generator, torch.Generator):
        generator.set_state(state["loader_generator"])


# ---------------------------------------------------------------- save and resume


@dataclass
class ResumePoint:
    """Where a resumed run picks up: made by :meth:`Checkpointer.read` and the data position, consumed by
    the loop as it gets there.

    ``rng``: the saved RNG states, applied once the loop stands where the
    saved run stood (then None); ``redo_eval``: the saved run's evaluation of
    this step was cut short by a signal, so it runs again there; ``skip``:
    batches to read again and drop first (a loader the loop cannot seek);
    ``epoch_rng``: the RNG states at that epoch's start, to read it again with."""

    folder: str
    step: int
    rng: Optional[Mapping[str, Any]]
    redo_eval: bool = False
    skip: int = 0
    epoch_rng: Optional[Mapping[str, Any]] = None


def _read_checked(path: str, hint: str) -> Dict[str, Any]:
    """A rank file's state, every field checked; CheckpointError naming the file (and `hint`) otherwise."""
    try:
        state = torch_load(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the checkpoint file {path}: {exc}{hint}") from exc
    _check_state(state, path)
    return state


class Checkpointer:
    """This rank's side of the checkpoint folder: writes step folders (in the background unless asked
    otherwise), rotates them, finds and reads the one to resume."""

    def __init__(self, checkpoint_dir: Optional[str], keep_last: int, async_save: bool, dist: Any) -> None:
        self.dir = checkpoint_dir
        self.keep_last = keep_last
        self.async_save = async_save
        self.dist = dist
        self.rank = int(dist.global_rank())
        self.world = int(dist.world_size())
        self.leader = bool(dist.is_global_leader())
        self.saver = _Saver()
        self._cache: Dict[Any, Any] = {}
        self.last_step = -1  # the step of the last checkpoint written or resumed
        self.saved_world = self.world  # the world size of the checkpoint read last
        self.last_folder: Optional[str] = None

    def save(self, step: int, state: Dict[str, Any], sync: bool, best: Optional["BestCheckpoints"] = None,
             files: Optional[Callable[..., Any]] = None) -> None:
        """Write `state` as this rank's file of step `step`: in the background from a host snapshot unless
        `sync` (or the config) says otherwise; a failed write is a CheckpointError (a background one at
        the next check).  `files(folder, background, barrier)` (Engines.save_files), when given, writes
        the engines' own files into the step folder first, on every rank and before the rank file (a
        collective for engines that shard); in the background it returns what is left of those writes
        (callables), run by the writer thread before the rank file: the folder counts as complete only
        once every rank's file follows them."""
        assert self.dir is not None
        ckdir, leader, keep = self.dir, self.leader, self.keep_last
        protect = frozenset(best.steps()) if best is not None else frozenset()
        pointer = best.pointer() if best is not None else None
        self.saver.wait()
        folder = os.path.join(ckdir, f"step-{step:08d}")
        path = os.path.join(folder, _rank_file(self.world, self.rank))
        t0 = time.perf_counter()
        if os.path.isfile(path):
            # saving a step folder again (after resuming an older checkpoint, or an evaluation cut short):
            # the old rank file goes first, so a kill midway never leaves a folder that looks complete
            # while it mixes two writes
            try:
                os.unlink(path)
            except OSError as exc:
                raise CheckpointError(f"writing a checkpoint failed: cannot replace {path}: {exc}") from exc
            _fsync_dir(folder)
        use_async = self.async_save and not sync
        if use_async:  # the previous write is done (wait() above): its buffers can be reused
            # before the engines' files: a background staging of theirs would hold the GIL against it
            state = _snapshot(state, self._cache)
        pending: List[Callable[[], None]] = []  # the rest of the engines' writes, for the writer thread
        if files is not None:
            try:
                os.makedirs(folder, exist_ok=True)
                # every rank's old file is gone before any engine file is rewritten: a barrier before an
                # engine writes here, or the collective a deferred write (dcp.save) starts with
                pending = list(files(folder, use_async, self.dist.barrier) or ())
            except Exception as exc:
                raise CheckpointError(f"writing the engines' files into {folder} failed: {exc}") from exc

        def write() -> None:
            for job in pending:
                job()  # raises what failed the engine's write: this rank's file is not written then
            if pending:
                for sub in os.listdir(folder):  # their folders' entries made durable before the rank file
                    if os.path.isdir(os.path.join(folder, sub)):
                        _fsync_dir(os.path.join(folder, sub))
            os.makedirs(folder, exist_ok=True)
            _fsync_dir(ckdir)
            torch_save(state, path)
            if leader:
                _rotate(ckdir, keep, step, protect)
                write_best_pointer(ckdir, pointer)
                log.info("saved checkpoint %s (step %d)", folder, step)

        if use_async:
            self.saver.submit(write)
            log.debug("checkpoint step %d: snapshot in %.3f s, writing in the background",
                      step, time.perf_counter() - t0)
        else:
            try:
                write()
            except Exception as exc:  # as the background writer reports it
                raise CheckpointError(f"writing a checkpoint failed: {exc}") from exc
            self.dist.barrier()
            if leader:
                _rotate(ckdir, keep, step, protect)
                write_best_pointer(ckdir, pointer)
        self.last_step = step
        self.last_folder = folder

    def close(self) -> None:
        """Wait for the write in flight and end the writer thread; CheckpointError if a write failed."""
        self.saver.close()

    def find(self, resume: Any) -> Optional[str]:
        """The folder TrainConfig.resume names ('auto'/True: the newest complete one, the same on every
        rank), or None for a fresh start."""
        if resume is None or resume is False or self.dir is None and resume in ("auto", True):
            return None
        if resume in ("auto", True):
            path = latest_checkpoint(self.dir) if self.leader else None
            return self.dist.broadcast_object(path, src=0)
        if not isinstance(resume, (str, os.PathLike)):
            raise ValueError(f"TrainConfig.resume must be 'auto', a checkpoint folder, or None; got {resume!r}")
        return os.fspath(resume)

    def read(self, folder: str) -> Tuple[Dict[str, Any], str]:
        """(this rank's checked state, its file) from the step folder; CheckpointError naming the file
        when it is incomplete, unreadable or damaged.  A folder saved by another number of processes gives
        the file of rank ``rank % saved world`` (``saved_world`` tells the caller to re-deal the data)."""
        if not _is_complete(folder):
            raise CheckpointError(f"{folder} is not a complete checkpoint (a rank's file is missing)")
        path = os.path.join(folder, _rank_file(self.world, self.rank))
        self.saved_world = self.world
        if not os.path.exists(path):
            worlds = {int(m.group(2)) for m in map(_RANK_FILE.match, os.listdir(folder)) if m}
            self.saved_world = worlds.pop()  # one world: _is_complete checked it
            path = os.path.join(folder, _rank_file(self.saved_world, self.rank % self.saved_world))
            if self.leader:
                log.warning("%s was saved by %d processes and this run has %d: the model and optimizer are "
                            "resharded, the data position re-dealt", folder, self.saved_world, self.world)
        return _read_checked(path, "; resume from an older checkpoint (TrainConfig.resume=<its folder>) or "
                                   "remove this one"), path

    def replicas(self, engines: Mapping[str, Any], folder: str) -> Dict[str, Any]:
        """`engines` with every replicated engine's pointer (written off the global leader) replaced by the
        state in rank 0's file of the step folder."""
        from .engine import REPLICA

        wanted = [name for name, st in engines.items() if st == REPLICA]
        if not wanted:
            return dict(engines)
        path = os.path.join(folder, _rank_file(self.saved_world, 0))
        leader = _read_checked(path, " (rank 0's file holds the replicated state)")
        out = dict(engines)
        for name in wanted:
            if name not in leader["engines"] or leader["engines"][name] == REPLICA:
                raise CheckpointError(f"{path} holds no state for the replicated engine {name!r}")
            out[name] = leader["engines"][name]
        return out

    def resumed(self, folder: str, step: int) -> None:
        """Count the resumed checkpoint as the last one written; warn about newer ones left alone."""
        later = [p for s, p in find_checkpoints(self.dir) if s > step] \
            if self.leader and self.dir is not None else []
        if later:
            log.warning("resuming step %d while later checkpoints exist (%s): they are kept, and resume='auto' "
                        "would pick %s; remove them to continue this run from its own checkpoints",
                        step, ", ".join(later), later[-1])
        self.last_step = step
        self.last_folder = folder


# ---------------------------------------------------------------- the best checkpoints


def write_best_pointer(ckdir: str, step: Optional[int]) -> None:
    """``<checkpoint_dir>/best``: the folder name of the best checkpoint, replaced atomically."""
    if step is None:
        return
    from .. import _core

    _core.write_file_atomic(os.path.join(ckdir, "best"), f"step-{step:08d}\n".encode(), durable=True)


class BestCheckpoints:
    """The `k` best evaluations by one metric, as [(value, step)] best first; their checkpoints are kept."""

    def __init__(self, k: int, metric: str, mode: str) -> None:
        self.k = k
        self.metric = metric
        self.mode = mode
        self.best: List[Tuple[float, int]] = []

    def value_of(self, result: Optional[Mapping[str, Any]]) -> Optional[float]:
        """The metric in an eval_fn result ("a/b" looks into nested dicts), as a float; None when absent."""
        v: Any = result
        for part in self.metric.split("/"):
            if not isinstance(v, Mapping) or part not in v:
                return None
            v = v[part]
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        return f if f == f else None  # NaN never ranks

    def offer(self, value: float, step: int) -> bool:
        """Rank (value, step); True when it is among the k best now."""
        if self.k <= 0:
            return False
        sign = 1.0 if self.mode == "min" else -1.0
        ranked = sorted([(v, s) for v, s in self.best if s != step] + [(value, step)],
                        key=lambda e: (sign * e[0], e[1]))
        self.best = ranked[:self.k]
        return any(s == step for _v, s in self.best)

    def steps(self) -> List[int]:
        return [s for _v, s in self.best]

    def pointer(self) -> Optional[int]:
        return self.best[0][1] if self.best else None

    def state(self) -> List[List[Any]]:
        return [[v, s] for v, s in self.best]

    def load(self, state: Any) -> None:
        if isinstance(state, (list, tuple)):
            self.best = [(float(v), int(s)) for v, s in state][: max(self.k, 0)]
