"""A training loop over a data loader and engines: commands, signals, rotating atomic checkpoints, exact resume.

``train(train_dl, engines, eval_fn, config)`` loops epochs endlessly until
``config.iterations`` steps are done.  It knows no model and no config
module: an *engine* (see :class:`Engine`) steps itself on a batch and returns
its metrics; :class:`TorchEngine` is one for a plain torch model.

Output.  The loop's product is one JSON line of metrics per step (floats
truncated by :func:`mlutils.io.json_stringify`), written by the global leader
to standard output (``TrainConfig.metrics_stdout``, through ``tqdm.write`` so
the bar stays intact) and/or appended to ``TrainConfig.metrics_file``.
Everything else (replies to commands, saves, resumes) goes to the
``mlutils.train`` logger at INFO; ``train`` does not configure logging.

Commands, one per line on standard input (read by the global leader at each
step boundary without blocking: ``select`` on the descriptor; shared with
every rank):
``save``, ``export``, ``eval``, ``quit``, ``eval_quit``, ``lr <rate>``,
``time [to <step>]``, ``<command>@<step>``, ``event show``, ``event clear``.
Every command of a boundary runs, ``quit`` stops after them.  Standard input
is read in bounded slices (see :class:`_StdinReader`): a flood cannot stall a step.

Signals.  SIGTERM, SIGINT and SIGUSR1 only set a flag; at the next step
boundary (or when ``eval_fn`` asks ``should_stop()``) all ranks agree, save a
checkpoint and ``train`` returns normally with ``status="signal"``; the
previous handlers are restored when it returns.  A second SIGINT raises
KeyboardInterrupt at once.

Checkpoints.  ``<checkpoint_dir>/step-<8 digits>/rank-<r>-of-<w>.pt``, one file
per rank written atomically (temporary file, fsync, rename) by
:func:`mlutils.io.torch_save`; a checkpoint is complete when every rank's
file is there, so a kill at any moment leaves the previous complete one, and
``resume="auto"`` picks the newest complete one.  Each holds the engines'
states, the step counters, every RNG state (python, numpy, torch CPU and
CUDA, the loader's own generator) and the data position: the sampler's state
at the start of the epoch and the number of batches the loop consumed since,
so a resume is exact even when DataLoader workers had prefetched ahead.  An
mlutils sampler the loop can seek (``sampler=``, ``batch_sampler=`` a sampler
or ``sampler.batches(n)``) is moved to the batch reached; anything else (a
batch sampler of the user's, torch's shuffling) is read again from the epoch
start with that start's RNG states and the consumed batches are skipped.  ``keep_last`` complete
checkpoints are kept (only those up to the one just written count: after
resuming an older checkpoint, newer ones are left alone).  With
``async_save`` the step waits only for a copy of the state in host memory;
the write runs in a background thread (one at a time; an error is raised at
the next step boundary).  The final save is synchronous.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Tuple, Union,
                    runtime_checkable)

import numpy as np

from . import _core
from .io import json_stringify, torch_load, torch_save

__all__ = ["Engine", "Engines", "TorchEngine", "TrainConfig", "TrainResult", "train",
           "find_checkpoints", "latest_checkpoint", "CheckpointError", "COMMANDS"]

log = logging.getLogger(__name__)

#: Format tag written into every checkpoint file.
CHECKPOINT_FORMAT = "mlutils.train/1"
#: The commands the loop understands (each may be scheduled as ``<command>@<step>``).
COMMANDS = ("save", "export", "eval", "quit", "eval_quit", "lr", "time", "event")
_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_RANK_FILE = re.compile(r"^rank-(\d{5,})-of-(\d{5,})\.pt$")
_DIGITS = re.compile(r"^[0-9]+$")
#: Steps and counts a checkpoint holds are int64: 0 <= n < _I64.
_I64 = 1 << 63
#: Keys of the metrics line the loop itself writes.
_LOOP_KEYS = ("step", "epoch", "eval")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit this run."""


# ---------------------------------------------------------------- distributed


class _OneProcess:
    """The mlutils.distributed names this module uses, for one process (used when that module is absent)."""

    @staticmethod
    def global_rank() -> int:
        return 0

    @staticmethod
    def world_size() -> int:
        return 1

    @staticmethod
    def is_global_leader() -> bool:
        return True

    @staticmethod
    def barrier() -> None:
        pass

    @staticmethod
    def broadcast_object(obj: Any, src: int = 0) -> Any:
        return obj

    @staticmethod
    def any_rank(flag: bool) -> bool:
        return bool(flag)

    @staticmethod
    def all_ranks(flag: bool) -> bool:
        return bool(flag)


def _dist() -> Any:
    """mlutils.distributed when it is there, else the one-process stand-in."""
    try:
        from . import distributed  # type: ignore[attr-defined]
    except ImportError:
        return _OneProcess
    return distributed


# ---------------------------------------------------------------- engines


@runtime_checkable
class Engine(Protocol):
    """What the loop needs from a trainable thing."""

    @property
    def global_step(self) -> int:
        """Optimizer steps done so far (restored by load_state_dict)."""

    def train_step(self, batch: Any) -> Mapping[str, Any]:
        """One optimizer step on `batch`; returns its metrics (numbers), or None for none."""

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly (tensors, numbers, strings, containers)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a state_dict()."""

    def export(self) -> Dict[str, Any]:
        """The weights to export: a flat dict name -> tensor."""

    def set_lr(self, lr: float) -> None:
        """Set the learning rate from now on."""

    def quit(self) -> None:
        """Called once when the loop ends."""


def _metrics_of(name: str, engine: Any, metrics: Any) -> Dict[str, Any]:
    """An engine's train_step result as a dict (None: no metrics); TypeError naming the engine otherwise."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"engine {name!r} ({type(engine).__name__}).train_step returned {type(metrics).__name__} "
                        f"{metrics!r}; it must return a mapping of metrics (or None)")
    return dict(metrics)


class Engines:
    """A named collection of engines stepped on the same batch; metrics are prefixed by name when there are several."""

    def __init__(self, engines: Union[Engine, Mapping[str, Engine]]) -> None:
        if isinstance(engines, Engines):
            engines = engines.engines
        if not isinstance(engines, Mapping):
            engines = {"model": engines}
        if not engines:
            raise ValueError("Engines needs at least one engine")
        for name, e in engines.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"engine names must be non-empty strings without '.', got {name!r}")
            missing = [m for m in ("train_step", "state_dict", "load_state_dict", "export", "set_lr", "quit")
                       if not callable(getattr(e, m, None))]
            if missing or not hasattr(e, "global_step"):
                raise TypeError(f"engine {name!r} ({type(e).__name__}) lacks {missing or ['global_step']} "
                                f"of the mlutils.train.Engine protocol")
        self.engines: Dict[str, Engine] = dict(engines)

    @property
    def global_step(self) -> int:
        """The smallest global step of the engines."""
        return min(int(e.global_step) for e in self.engines.values())

    def train_step(self, batch: Any) -> Dict[str, Any]:
        """Step every engine on `batch`; their metrics, prefixed by name when there are several.

        With one engine, a metric named like one of the loop's own keys
        (``step``, ``epoch``, ``eval``) is prefixed by the engine's name too,
        so that it does not replace the loop's value in the metrics line."""
        if len(self.engines) == 1:
            name, engine = next(iter(self.engines.items()))
            out1 = _metrics_of(name, engine, engine.train_step(batch))
            for k in _LOOP_KEYS:
                if k in out1:
                    out1[f"{name}/{k}"] = out1.pop(k)
            return out1
        out: Dict[str, Any] = {}
        for name, e in self.engines.items():
            out.update({f"{name}/{k}": v for k, v in _metrics_of(name, e, e.train_step(batch)).items()})
        return out

    def state_dict(self) -> Dict[str, Any]:
        """{name: engine state}."""
        return {name: e.state_dict() for name, e in self.engines.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load every engine's state; CheckpointError when an engine is missing from `state`."""
        missing = sorted(set(self.engines) - set(state))
        if missing:
            raise CheckpointError(f"the checkpoint has no state for engine(s) {missing} (it has {sorted(state)})")
        for name, e in self.engines.items():
            e.load_state_dict(state[name])

    def export(self) -> Dict[str, Any]:
        """The engines' weights, flat; keys prefixed with '<name>.' when there are several."""
        if len(self.engines) == 1:
            return dict(next(iter(self.engines.values())).export())
        return {f"{name}.{k}": v for name, e in self.engines.items() for k, v in e.export().items()}

    def set_lr(self, lr: float) -> None:
        """Set every engine's learning rate."""
        for e in self.engines.values():
            e.set_lr(lr)

    def quit(self) -> None:
        """Tell every engine the loop ended."""
        for e in self.engines.values():
            e.quit()


def _batch_len(batch: Any) -> int:
    """The batch size: dim 0 of the first tensor or array (containers followed) that has a dimension, else 0.

    Values without one (a 0-dim tensor such as a per-batch temperature,
    numbers, strings) do not count."""
    shape = getattr(batch, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) > 0 else 0
    if isinstance(batch, Mapping):
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        return 0
    for v in values:
        n = _batch_len(v)
        if n > 0:
            return n
    return 0


def _split_batch(batch: Any, parts: int, n: Optional[int] = None) -> List[Any]:
    """`batch` cut into `parts` micro-batches along dim 0 of every tensor/array of `n` rows (the batch size;
    containers followed).  Values without that batch dimension (0-dim tensors, tensors of another length,
    numbers, strings) are passed whole to every micro-batch."""
    import torch

    if n is None:
        n = _batch_len(batch)
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        if batch.ndim == 0 or int(batch.shape[0]) != n:
            return [batch] * parts
        if n < parts:
            raise ValueError(f"a batch of {n} cannot be split into {parts} micro-batches")
        bounds = [n * i // parts for i in range(parts + 1)]
        return [batch[bounds[i]:bounds[i + 1]] for i in range(parts)]
    if isinstance(batch, Mapping):
        cols = {k: _split_batch(v, parts, n) for k, v in batch.items()}
        return [{k: cols[k][i] for k in batch} for i in range(parts)]
    if isinstance(batch, (list, tuple)):
        cols2 = [_split_batch(v, parts, n) for v in batch]
        return [type(batch)(c[i] for c in cols2) if not hasattr(batch, "_fields")
                else type(batch)(*(c[i] for c in cols2)) for i in range(parts)]
    return [batch] * parts


class TorchEngine:
    """An engine for a plain torch model: loss_fn(model, batch) -> loss or (loss, metrics).

    ``accumulate`` splits each batch into that many micro-batches (gradients
    summed, weighted by size; a batch of fewer items into one per item);
    ``clip_grad_norm`` clips the global norm; ``amp_dtype`` runs the forward
    pass under autocast (``torch.float16`` adds a GradScaler); ``scheduler``
    steps after every optimizer step."""

    def __init__(self, model: Any, optimizer: Any, loss_fn: Callable[[Any, Any], Any], scheduler: Any = None, *,
                 accumulate: int = 1, clip_grad_norm: Optional[float] = None, amp_dtype: Any = None,
                 device: Any = None) -> None:
        import torch

        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate must be an int >= 1, got {accumulate!r}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.scheduler = scheduler
        self.accumulate = accumulate
        self.clip_grad_norm = clip_grad_norm
        self.amp_dtype = amp_dtype
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.scaler = (torch.amp.GradScaler(self.device.type) if amp_dtype == torch.float16 else None)
        self._step = 0

    @property
    def global_step(self) -> int:
        """Optimizer steps done."""
        return self._step

    def _to_device(self, batch: Any) -> Any:
        import torch

        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, Mapping):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
            return type(batch)(self._to_device(v) for v in batch)
        return batch

    def _forward(self, batch: Any) -> Tuple[Any, Dict[str, Any]]:
        import torch

        if self.amp_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                out = self.loss_fn(self.model, batch)
        else:
            out = self.loss_fn(self.model, batch)
        if isinstance(out, tuple):
            loss, metrics = out
            return loss, dict(metrics)
        return out, {}

    def train_step(self, batch: Any) -> Dict[str, Any]:
        """Forward, backward (accumulated), clip, optimizer and scheduler step; returns loss, lr and the loss_fn's metrics."""
        import torch

        self.model.train()
        n = self._batch_size(batch)
        pieces = min(self.accumulate, n) if n > 0 else 1  # a short last batch: fewer; nothing to split: one
        parts = _split_batch(batch, pieces, n) if pieces > 1 else [batch]
        sizes = [self._batch_size(p) for p in parts]
        total = sum(sizes) or len(parts)
        loss_sum = 0.0
        extra: Dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        for part, size in zip(parts, sizes):
            loss, metrics = self._forward(self._to_device(part))
            w = (size / total) if sum(sizes) else 1.0 / len(parts)
            scaled = loss * w
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += float(loss.detach()) * w
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + float(v) * w
        out: Dict[str, Any] = {"loss": loss_sum}
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
            out["grad_norm"] = float(norm)
        out["lr"] = float(self.optimizer.param_groups[0]["lr"])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self._step += 1
        out.update(extra)
        return out

    @staticmethod
    def _batch_size(batch: Any) -> int:
        return _batch_len(batch)

    def state_dict(self) -> Dict[str, Any]:
        """Model, optimizer, scheduler, scaler and the step."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "global_step": self._step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a state_dict()."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self._step = int(state["global_step"])

    def export(self) -> Dict[str, Any]:
        """The model's state dict as contiguous CPU copies (no shared memory, ready for safetensors)."""
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.model.state_dict().items()}

    def set_lr(self, lr: float) -> None:
        """Every param group's lr (and the scheduler's base lrs, so the schedule keeps the new scale)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            if "initial_lr" in g:
                g["initial_lr"] = lr
        if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr] * len(self.scheduler.base_lrs)

    def quit(self) -> None:
        """Nothing to release."""


# ---------------------------------------------------------------- config and result


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
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < _I64:
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


# ---------------------------------------------------------------- checkpoint files


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


def _rotate(checkpoint_dir: str, keep_last: int, upto: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last` and partial ones older than the newest complete.

    Only checkpoints up to step `upto` (the one just written) count: newer ones
    (left by a run this one rolled back from) are neither counted nor removed."""
    complete = [(s, p) for s, p in find_checkpoints(checkpoint_dir) if s <= upto]
    if not complete:
        return
    newest = complete[-1][0]
    keep = {p for _s, p in complete[-keep_last:]} if keep_last > 0 else {p for _s, p in complete}
    for step, path in find_checkpoints(checkpoint_dir, complete_only=False):
        if step < newest and path not in keep:
            log.debug("removing checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _count(v: Any) -> bool:
    """An int a checkpoint can hold as a step or a count: 0 <= v < 2**63."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _I64


def _rng_ok(rng: Any) -> bool:
    """True when `rng` (as _rng_state() makes it) loads into generators: tried on throwaway ones, so a
    damaged entry is found before anything is restored."""
    import torch

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
        ("sampler", samp is None or (isinstance(samp, Mapping)
                                     and (samp.get("epoch_start") is None
                                          or isinstance(samp.get("epoch_start"), Mapping))
                                     and (samp.get("draws") is None or _count(samp.get("draws"))))),
    ) if not ok]
    if bad:
        raise CheckpointError(f"{path} is a damaged {CHECKPOINT_FORMAT} checkpoint: {', '.join(bad)} "
                              f"missing or of the wrong type or range")


def _view_key(t: Any) -> Optional[Tuple[Any, ...]]:
    """What makes two tensors the same view of the same memory (tied weights), or None when not strided."""
    import torch

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
    import torch

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
        return [_host_copy(v, cache, key + (i,), memo) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_host_copy(v, cache, key + (i,), memo) for i, v in enumerate(obj))
    return obj


def _snapshot(state: Any, cache: Dict[Any, Any]) -> Any:
    """_host_copy on one intra-op thread: a memory-bound copy gains nothing from more, and on a busy
    machine torch's thread pool waiting for descheduled peers made the copy several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _host_copy(state, cache)
    finally:
        torch.set_num_threads(threads)


class _Saver:
    """Writes one checkpoint at a time in a background thread; the error of a write is raised by the next wait()."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Wait for the write in flight; raise CheckpointError if it (or an earlier one) failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def check(self) -> None:
        """Raise CheckpointError if a finished write failed."""
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint failed: {err}") from err

    def submit(self, fn: Callable[[], None]) -> None:
        """Run fn in the background after the previous write."""
        self.wait()

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # surfaced by the next wait()/check()
                self._error = exc

        self._thread = threading.Thread(target=run, name="mlutils-checkpoint", daemon=False)
        self._thread.start()


# ---------------------------------------------------------------- RNG states


def _rng_state(generator: Any = None) -> Dict[str, Any]:
    """Python's, numpy's, torch's CPU and (when initialised) CUDA generator states, and those of
    `generator` (a data loader's own torch.Generator) when given."""
    import torch

    state: Dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if isinstance(generator, torch.Generator):
        state["loader_generator"] = generator.get_state()
    return state


def _set_rng_state(state: Mapping[str, Any], generator: Any = None) -> None:
    """Restore what _rng_state() captured."""
    import torch

    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    if state.get("loader_generator") is not None and isinstance(generator, torch.Generator):
        generator.set_state(state["loader_generator"])


# ---------------------------------------------------------------- commands


class _StdinReader:
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


_USAGE = ("commands: save | export | eval | quit | eval_quit | lr <rate> | time [to <step>] | "
          "<command>@<step> | event show | event clear")


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


def _parse(line: str, last: int = _I64 - 1) -> Tuple[Optional[Tuple[str, ...]], Optional[int], Optional[str]]:
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
    elif cmd == "time" and (not args or (len(args) == 2 and args[0] == "to")):
        if args:
            _n, err = _step_arg(args[1], line, last)
            if err is not None:
                return None, None, err
    elif cmd == "event" and len(args) == 1 and args[0] in ("show", "clear") and at is None:
        pass
    else:
        return None, None, f"unknown command {_short(line)}; {_USAGE}"
    return words, at, None


# ---------------------------------------------------------------- the loop


_SAMPLER_METHODS = ("state_dict", "load_state_dict", "take", "set_epoch", "remaining")


def _is_sampler(obj: Any) -> bool:
    """True for an mlutils-style sampler: one whose position can be saved, loaded and moved."""
    return obj is not None and all(callable(getattr(obj, m, None)) for m in _SAMPLER_METHODS)


def _find_sampler(obj: Any) -> Any:
    """The mlutils sampler `obj` is or holds (following ``.sampler`` attributes), or None."""
    for _ in range(8):
        if obj is None or _is_sampler(obj):
            return obj
        obj = getattr(obj, "sampler", None)
    return None


@dataclass(frozen=True)
class _DataSource:
    """How the loop finds its place in a loader's epoch.

    ``sampler``: the mlutils sampler feeding the loader (None: none found);
    ``draws``: sampler draws per batch when the loop can seek the sampler
    to a batch exactly, None when the epoch must be read again from its
    start (``replay``) and the consumed batches skipped; ``drop_last``: a
    short final batch of the epoch is not yielded."""

    sampler: Any = None
    draws: Optional[int] = None
    drop_last: bool = False

    @property
    def replay(self) -> bool:
        return self.draws is None


def _data_source(loader: Any) -> _DataSource:
    """Where the loader's batches come from: an mlutils sampler the loop can seek (``sampler=``,
    ``batch_sampler=`` a sampler or ``sampler.batches(n)``), one it cannot seek (inside a batch sampler of
    the user's), or none."""
    from .sampler import Batches

    bs = getattr(loader, "batch_sampler", None)
    if bs is None:  # batch_size=None: one sampler draw per item, no batching
        s = getattr(loader, "sampler", None)
        if _is_sampler(s):
            return _DataSource(s, 1)
        return _DataSource(_find_sampler(s))
    if _is_sampler(bs):  # a sampler of batches (BatchedOrderedSampler) as the batch_sampler
        return _DataSource(bs, 1)
    inner = getattr(bs, "sampler", None)
    if _is_sampler(inner):
        size = getattr(bs, "batch_size", None)
        if isinstance(bs, Batches) or _is_torch_batch_sampler(bs):
            if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
                return _DataSource(inner, size, bool(getattr(bs, "drop_last", False)))
    return _DataSource(_find_sampler(bs) or _find_sampler(getattr(loader, "sampler", None)))


def _is_torch_batch_sampler(bs: Any) -> bool:
    """torch's own BatchSampler (what ``DataLoader(sampler=..., batch_size=n)`` builds), not a subclass that
    may batch differently."""
    if "torch" not in sys.modules:
        return False
    from torch.utils.data import BatchSampler

    return type(bs) is BatchSampler


def _loader_len(loader: Any) -> Optional[int]:
    """Batches in one epoch of `loader` when it can tell (len()), else None."""
    try:
        n = len(loader)
    except Exception:  # noqa: BLE001  (no len, or an IterableDataset's len that raises)
        return None
    return n if isinstance(n, int) and n >= 0 else None


def _plain(obj: Any) -> Any:
    """`obj` with what JSON cannot hold made plain: tensors and numpy values as numbers or lists, ints past
    64 bits as floats, other objects as their str (a metrics line must never stop training)."""
    if obj is None or isinstance(obj, (bool, float, str)):
        return obj
    if isinstance(obj, int):
        return obj if -(1 << 63) <= obj < (1 << 63) else float(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if "torch" in sys.modules:
        import torch

        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu()
            return _plain(t.item() if t.numel() == 1 else t.tolist())
    return str(obj)


class _Loop:
    def __init__(self, loader: Iterable[Any], engines: Engines, eval_fn: Optional[Callable[..., Any]],
                 cfg: TrainConfig) -> None:
        self.loader = loader
        self.engines = engines
        self.eval_fn = eval_fn
        # paths fixed now: a chdir during training (in a step, in eval_fn) must not move the checkpoints
        fixed = {name: os.path.abspath(getattr(cfg, name))
                 for name in ("checkpoint_dir", "export_dir", "metrics_file") if getattr(cfg, name) is not None}
        if isinstance(cfg.resume, (str, os.PathLike)) and cfg.resume != "auto":
            fixed["resume"] = os.path.abspath(cfg.resume)
        self.cfg = dataclasses.replace(cfg, **fixed)
        self.dist = _dist()
        self.rank = int(self.dist.global_rank())
        self.world = int(self.dist.world_size())
        self.leader = bool(self.dist.is_global_leader())
        self.source = _data_source(loader)
        self.generator = getattr(loader, "generator", None)  # a DataLoader's own torch.Generator
        self.sampler = self.source.sampler
        self.saver = _Saver()
        self.signal_name: Optional[str] = None
        self._sigint_count = 0
        self.events: List[Tuple[int, str]] = []
        self.epoch = 0
        self.batches_in_epoch = 0
        self.epoch_start_state: Optional[Dict[str, Any]] = None
        self.step = 0
        self.bar: Any = None
        self.metrics_fh: Any = None
        self._stdout_dead = False
        self.last_metrics: Dict[str, Any] = {}
        self.eval_metrics: Optional[Dict[str, Any]] = None
        self.last_saved_step = -1
        self.last_checkpoint: Optional[str] = None
        self.step_times: List[float] = []
        self.pending_rng: Optional[Mapping[str, Any]] = None
        self.eval_pending_rng: Optional[Mapping[str, Any]] = None  # RNGs before an evaluation a signal cut short
        self.redo_eval = False  # the checkpoint resumed asks for its step's evaluation again
        self.resumed_from: Optional[str] = None
        self._held: List[str] = []
        self._skip = 0
        self.epoch_rng: Optional[Mapping[str, Any]] = None  # RNG states at this epoch's iter(loader) (no sampler)
        self.skip_epoch_rng: Optional[Mapping[str, Any]] = None  # those of the resumed epoch, to read it again
        self._snapshot_cache: Dict[Any, Any] = {}
        self.reader: Optional[_StdinReader] = None

    # ---- signals
    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            self._sigint_count += 1
            if self._sigint_count > 1:
                raise KeyboardInterrupt
        if self.signal_name is None:
            self.signal_name = name

    def _install_signals(self) -> Dict[int, Any]:
        previous: Dict[int, Any] = {}
        if not self.cfg.handle_signals or threading.current_thread() is not threading.main_thread():
            return previous
        for name in _STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            if signal.getsignal(sig) is None:
                # a handler set outside Python (a host embedding it) could not be put back: leave it alone
                log.warning("%s has a handler not set from Python: left in place, it does not stop training "
                            "cleanly", name)
                continue
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    def should_stop(self) -> bool:
        """True when a stop signal arrived on any rank (a collective: call it at the same points on every rank)."""
        return bool(self.dist.any_rank(self.signal_name is not None))

    # ---- output
    def _emit(self, record: Mapping[str, Any]) -> None:
        if not self.leader:
            return
        line = json_stringify(_plain(record), truncate=True)
        if self.metrics_fh is not None:
            try:
                self.metrics_fh.write(line + "\n")
                self.metrics_fh.flush()
            except (OSError, ValueError) as exc:  # a full disk, a quota, /dev/full: training goes on
                self._drop_metrics_file(exc)
        if self.cfg.metrics_stdout and not self._stdout_dead:
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
                            "" if self.metrics_fh is not None else " (no metrics_file: the metrics are not kept)")

    def _drop_metrics_file(self, exc: BaseException) -> None:
        """Stop the metrics_file copy after a failed write, with one warning naming the file."""
        fh, self.metrics_fh = self.metrics_fh, None
        log.warning("metrics_file %s stopped at step %d: %s: %s%s", self.cfg.metrics_file, self.step,
                    type(exc).__name__, exc.strerror if isinstance(exc, OSError) and exc.strerror else exc,
                    "" if self.cfg.metrics_stdout and not self._stdout_dead else
                    " (metrics are not kept from now on)")
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

    def _open_metrics(self) -> None:
        path = self.cfg.metrics_file
        if not self.leader or path is None:
            return
        if self.step > 0 and os.path.exists(path):
            # drop lines past the resumed step: the log reads as one uninterrupted run
            from .io import json_parse
            keep = []
            with open(path, encoding="utf-8", errors="replace") as f:  # a torn line may end mid-character
                for line in f:
                    try:
                        rec = json_parse(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= self.step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            # replaced atomically: a failure or a kill while rewriting leaves the old log whole
            _core.write_file_atomic(path, "".join(keep).encode("utf-8"), durable=True)
        elif self.step == 0 and os.path.exists(path):
            open(path, "w").close()
        self.metrics_fh = open(path, "a", encoding="utf-8")

    # ---- checkpoints
    def _state(self) -> Dict[str, Any]:
        s = self.sampler
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world,
            "engines": self.engines.state_dict(),
            "loop": {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                     "events": [[at, cmd] for at, cmd in self.events],
                     "eval_pending": self.eval_pending_rng is not None,
                     "epoch_rng": self.epoch_rng},
            "sampler": None if s is None else {
                "epoch_start": self.epoch_start_state,
                "draws": None if self.source.replay else self.batches_in_epoch * int(self.source.draws or 0)},
            "rng": _rng_state(self.generator) if self.eval_pending_rng is None else self.eval_pending_rng,
        }

    def save(self, sync: bool, explicit: bool = False) -> None:
        """Checkpoint the current step (asynchronously unless `sync` or the config says otherwise).

        `explicit`: a command asked for it (said so when there is no checkpoint_dir)."""
        ckdir = self.cfg.checkpoint_dir
        if ckdir is None and explicit and self.leader:
            log.warning("save: no checkpoint_dir configured")
        if ckdir is None or (self.last_saved_step == self.step and self.eval_pending_rng is None):
            return
        self.saver.wait()
        folder = os.path.join(ckdir, f"step-{self.step:08d}")
        path = os.path.join(folder, _rank_file(self.world, self.rank))
        step, leader, keep = self.step, self.leader, self.cfg.keep_last
        t0 = time.perf_counter()
        state = self._state()
        use_async = self.cfg.async_save and not sync
        if use_async:  # the previous write is done (wait() above): its buffers can be reused
            state = _snapshot(state, self._snapshot_cache)

        def write() -> None:
            os.makedirs(folder, exist_ok=True)
            _fsync_dir(ckdir)
            torch_save(state, path)
            if leader:
                _rotate(ckdir, keep, step)
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
                _rotate(ckdir, keep, step)
        self.last_saved_step = step
        self.last_checkpoint = folder

    def _make_checkpoint_dir(self) -> None:
        """Create checkpoint_dir and export_dir now (global leader): one that cannot be a folder fails before
        training, not at the first save or export."""
        if not self.leader:
            return
        for name in ("checkpoint_dir", "export_dir"):
            folder = getattr(self.cfg, name)
            if folder is None:
                continue
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise CheckpointError(f"TrainConfig.{name} {folder!r} cannot be used as a folder: {exc}") from exc

    def _resume_path(self) -> Optional[str]:
        r = self.cfg.resume
        if r is None or r is False or self.cfg.checkpoint_dir is None and r in ("auto", True):
            return None
        if r in ("auto", True):
            path = latest_checkpoint(self.cfg.checkpoint_dir) if self.leader else None
            return self.dist.broadcast_object(path, src=0)
        if not isinstance(r, (str, os.PathLike)):
            raise ValueError(f"TrainConfig.resume must be 'auto', a checkpoint folder, or None; got {r!r}")
        return os.fspath(r)

    def resume(self) -> None:
        """Load the checkpoint config.resume names (RNG states are applied once the data iterator exists)."""
        folder = self._resume_path()
        if folder is None:
            return
        if not _is_complete(folder):
            raise CheckpointError(f"{folder} is not a complete checkpoint (a rank's file is missing)")
        path = os.path.join(folder, _rank_file(self.world, self.rank))
        if not os.path.exists(path):
            have = sorted(n for n in os.listdir(folder) if _RANK_FILE.match(n))
            raise CheckpointError(f"{folder} was saved by another number of processes ({have}); "
                                  f"this run has {self.world}")
        try:
            state = torch_load(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read the checkpoint file {path}: {exc}; resume from an older "
                                  f"checkpoint (TrainConfig.resume=<its folder>) or remove this one") from exc
        _check_state(state, path)
        loop = state["loop"]
        self.epoch = int(loop["epoch"])
        self.batches_in_epoch = int(loop["batches_in_epoch"])
        self._resume_data(state.get("sampler"), loop.get("epoch_rng"), path)  # checked before the engines load
        try:
            self.engines.load_state_dict(state["engines"])
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path} does not fit the engines: {type(exc).__name__}: {exc}") from exc
        self.step = int(state["step"])
        self.events = [(int(at), str(cmd)) for at, cmd in loop["events"]]
        self.redo_eval = bool(loop.get("eval_pending", False))
        self.pending_rng = state["rng"]
        later = [p for s, p in find_checkpoints(self.cfg.checkpoint_dir) if s > self.step] \
            if self.leader and self.cfg.checkpoint_dir is not None else []
        if later:
            log.warning("resuming step %d while later checkpoints exist (%s): they are kept, and resume='auto' "
                        "would pick %s; remove them to continue this run from its own checkpoints",
                        self.step, ", ".join(later), later[-1])
        self.last_saved_step = self.step
        self.last_checkpoint = folder
        self.resumed_from = folder
        log.info("resumed from %s at step %d (epoch %d, batch %d of the epoch)",
                 folder, self.step, self.epoch, self.batches_in_epoch)

    def _resume_data(self, samp: Optional[Mapping[str, Any]], epoch_rng: Any, path: str) -> None:
        """Put the data where the saved run was: the sampler moved to the batch the loop reached (not where
        prefetching workers were), or, when it cannot be seeked, the epoch read again from its start with
        that start's RNG states and the consumed batches skipped.  A position the epoch does not have (the
        data changed) is warned about and the next epoch starts."""
        start = samp.get("epoch_start") if samp is not None else None
        if self.sampler is not None and start is not None:
            try:
                self.sampler.load_state_dict(start)
            except (ValueError, TypeError, KeyError, OverflowError) as exc:
                raise CheckpointError(f"{path}: its sampler state does not fit this data loader's sampler: "
                                      f"{type(exc).__name__}: {exc}") from exc
            self.epoch_start_state = dict(start)
        elif self.sampler is not None and self.batches_in_epoch and self.leader:
            log.warning("%s holds no sampler state: the sampler starts afresh and the position is found by "
                        "reading the epoch again", path)
        draws = samp.get("draws") if samp is not None else None
        if self.sampler is not None and start is not None and not self.source.replay and draws is not None:
            left = int(draws)
            while left > 0:
                got = self.sampler.take(min(left, 1 << 20))
                if len(got) == 0:
                    break
                left -= len(got)
            if left > 0:
                self._past_epoch_end(path)
            elif self._sampler_exhausted():  # saved after the epoch's last batch: the next epoch starts
                self.epoch += 1
                self.batches_in_epoch = 0
            return
        if not self.batches_in_epoch:
            return
        n = _loader_len(self.loader)
        if n is not None and self.batches_in_epoch > n:
            self._past_epoch_end(path)
            return
        self._skip = self.batches_in_epoch
        self.skip_epoch_rng = epoch_rng
        if self.leader:
            log.info("the data loader cannot be seeked: reading its epoch %d again and skipping %d batches to "
                     "the resumed position", self.epoch, self._skip)

    def _past_epoch_end(self, path: str) -> None:
        """The resumed position lies past the end of this loader's epoch: the next epoch starts."""
        if self.leader:
            log.warning("%s was saved at batch %d of epoch %d, which this data loader's epoch does not reach "
                        "(the data changed?): training goes on from the start of epoch %d",
                        path, self.batches_in_epoch, self.epoch, self.epoch + 1)
        self.epoch += 1
        self.batches_in_epoch = 0
        self._skip = 0
        self.skip_epoch_rng = None
        if self.sampler is not None:
            if not self._sampler_exhausted():
                self.sampler.set_epoch(int(getattr(self.sampler, "epoch", 0)) + 1)
            self.epoch_start_state = None  # taken afresh when the next epoch starts

    # ---- commands
    def _gather_commands(self) -> Tuple[List[str], bool]:
        """(command lines every rank runs now, stop requested by a signal on any rank): one collective per step."""
        if self.reader is not None:
            self._held.extend(self.reader.poll())
        if not self.dist.any_rank(self.signal_name is not None or bool(self._held)):
            return [], False
        lines = self.dist.broadcast_object(self._held if self.leader else None, src=0) or []
        self._held = []
        stop = bool(self.dist.any_rank(self.signal_name is not None))
        return list(lines), stop

    def _run_command(self, line: str) -> Optional[str]:
        """Run one command now: 'quit' when the loop must stop, 'signal' when a signal cut an evaluation short."""
        words, at, err = _parse(line, self.cfg.iterations)
        if err is not None or words is None:
            if self.leader:
                log.warning("%s", err)
            return None
        if at is not None:
            if at < self.step:
                if self.leader:
                    log.warning("%r: step %d is already past (now at step %d); ignored", line, at, self.step)
                return None
            if at > self.step:
                if (at, " ".join(words)) not in self.events:
                    self.events.append((at, " ".join(words)))
                self.events.sort(key=lambda e: e[0])
                if self.leader:
                    log.info("scheduled %r at step %d", " ".join(words), at)
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
        elif cmd == "eval":
            if self.evaluate():
                return "signal"
        elif cmd == "quit":
            return "quit"
        elif cmd == "eval_quit":
            return "signal" if self.evaluate() else "quit"
        elif cmd == "lr":
            self.engines.set_lr(float(words[1]))
            if self.leader:
                log.info("learning rate set to %s at step %d", words[1], self.step)
        elif cmd == "time":
            target = int(words[2]) if len(words) == 3 else self.cfg.iterations
            self._report_time(target)
        elif cmd == "event" and words[1] == "show":
            if self.leader:
                log.info("events: %s", ", ".join(f"{c}@{s}" for s, c in self.events) or "none")
        elif cmd == "event" and words[1] == "clear":
            self.events.clear()
            if self.leader:
                log.info("events cleared")
        return None

    def _report_time(self, target: int) -> None:
        if not self.leader:
            return
        recent = self.step_times[-100:]
        if not recent:
            log.info("time: no step timed yet")
            return
        per = sum(recent) / len(recent)
        left = max(target - self.step, 0)
        try:
            when = time.localtime(time.time() + per * left)
            at = ("beyond the calendar" if when.tm_year > 9999 else
                  time.strftime("%H:%M:%S" if per * left < 86400 else "%Y-%m-%d %H:%M:%S", when))
        except (OverflowError, OSError, ValueError):  # beyond what the clock can show
            at = "beyond the calendar"
        log.info("time: %.3f s/step; step %d -> %d in about %.0f s (%s)", per, self.step, target, per * left, at)

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
        rng_before = _rng_state(self.generator)
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
            self._emit(record)
        return interrupted

    # ---- the loop
    def _boundary(self) -> Optional[str]:
        """After a step: commands, signals, evaluation, saves; 'quit', 'signal', 'completed' or None."""
        self.saver.check()
        lines, stop = self._gather_commands()
        due = [cmd for at, cmd in self.events if at == self.step]
        if due:
            self.events = [(at, cmd) for at, cmd in self.events if at != self.step]
        outcome: Optional[str] = None
        for line in due + lines:  # all of them: a command after 'quit' at the same boundary still runs
            r = self._run_command(line)
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

    def _sampler_exhausted(self) -> bool:
        """True when the sampler cannot give the loader another batch this epoch."""
        left = self.sampler.remaining()
        draws = self.source.draws or 1
        return left == 0 or (draws > 1 and self.source.drop_last and left < draws)

    def _epoch_start(self) -> None:
        """Move an exhausted sampler to its next epoch and remember its state there."""
        s = self.sampler
        if s is None:
            return
        if self.epoch_start_state is None or self.batches_in_epoch == 0:
            if self._sampler_exhausted():
                s.set_epoch(s.epoch + 1)
            self.epoch_start_state = s.state_dict()

    def run(self) -> TrainResult:
        previous = self._install_signals()
        status = "completed"
        try:
            if self.cfg.read_commands and self.leader:
                self.reader = _StdinReader()
            self._make_checkpoint_dir()
            self.resume()
            if self.step == 0:
                self.step = self.engines.global_step
            self._open_metrics()  # before any command: an evaluation at the start is logged there too
            start_outcome: Optional[str] = None
            if self.step >= self.cfg.iterations and self.resumed_from is not None:
                # no step left: the saved RNG states are restored all the same (what the script draws after
                # train() matches an uninterrupted run), and an evaluation a signal cut short runs again
                if self._at_resumed_position():
                    start_outcome = "signal"
            for line in self.cfg.events:
                at = _parse(line, self.cfg.iterations)[1]
                if at is not None and at == self.step and self.resumed_from is not None:
                    continue  # the run that wrote this checkpoint ran it before saving
                r = self._run_command(line)
                if r in ("quit", "signal") and start_outcome != "signal":
                    start_outcome = r
            if self.leader and self.cfg.progress:
                from tqdm import tqdm
                self._bar_call(lambda: setattr(self, "bar", tqdm(total=self.cfg.iterations, initial=self.step,
                                                                 dynamic_ncols=True, file=sys.stderr,
                                                                 leave=False)))
            if start_outcome is not None:
                status = start_outcome
            else:
                status = "completed" if self.step >= self.cfg.iterations else self._epochs()
            if self.cfg.save_at_end:
                self.save(sync=True)
            self.saver.wait()
        except BaseException:
            self._cleanup(previous, failing=True)
            raise
        self._cleanup(previous, failing=False)
        if self.leader:
            log.info("training %s at step %d%s", status, self.step,
                     f" ({self.signal_name})" if status == "signal" else "")
        return TrainResult(status=status, step=self.step,
                           signal=self.signal_name if status == "signal" else None,
                           checkpoint=self.last_checkpoint, resumed_from=self.resumed_from,
                           last_metrics=self.last_metrics, eval_metrics=self.eval_metrics)

    def _cleanup(self, previous: Dict[int, Any], failing: bool) -> None:
        """Wait for the write in flight, restore the signal handlers, close the outputs, tell the engines.

        Every part runs whatever the others do.  The first error is raised,
        unless `failing` (an error is already on its way out: the one that
        stopped training stays the one the caller sees; these are logged)."""
        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        parts = (self.saver.wait, restore,
                 lambda: self.bar.close() if self.bar is not None else None,
                 lambda: self.metrics_fh.close() if self.metrics_fh is not None else None,
                 self.engines.quit)
        first: Optional[BaseException] = None
        for part in parts:
            try:
                part()
            except BaseException as exc:  # noqa: PERF203  (each part must run)
                if failing:
                    log.error("while stopping after an error: %s: %s", type(exc).__name__, exc)
                elif first is None:
                    first = exc
        if first is not None:
            raise first

    def _redo_eval(self) -> bool:
        """The evaluation a signal cut short in the run that wrote the resumed checkpoint, run again where
        that run ran it (the RNG states just restored are those from before it); True if cut short again."""
        if not self.redo_eval:
            return False
        self.redo_eval = False
        if self.leader:
            log.info("evaluating step %d again: a signal cut it short before the checkpoint", self.step)
        return self.evaluate()

    def _at_resumed_position(self) -> bool:
        """The resumed run is where the saved one stopped: the RNG states it saved are restored now,
        then the evaluation a signal cut short there runs again; True if a signal cuts it short again."""
        if self.pending_rng is not None:
            _set_rng_state(self.pending_rng, self.generator)
            self.pending_rng = None
        return self._redo_eval()

    def _seed_draw_of_reused_iterator(self) -> None:
        """A DataLoader with persistent workers builds its iterator once, drawing the workers' base seed
        from torch's RNG, and later epochs reuse it without that draw; a resumed process builds a new one
        and draws.  The draw is made here for a reused iterator too, so both runs draw the same at every
        epoch start (the shuffle order, and everything drawn after, then match)."""
        ld = self.loader
        if not (getattr(ld, "persistent_workers", False) and getattr(ld, "num_workers", 0)
                and getattr(ld, "_iterator", None) is not None):
            return
        import torch

        gen = self.generator if isinstance(self.generator, torch.Generator) else None
        torch.empty((), dtype=torch.int64).random_(generator=gen)

    def _epochs(self) -> str:
        while True:
            self._epoch_start()
            # iter(DataLoader) draws a seed from torch's RNG: a mid-epoch resume restores the RNGs after
            # that draw (the saved run had made it before the save), an epoch-boundary resume before it
            if self.pending_rng is not None and self.batches_in_epoch == 0:
                if self._at_resumed_position():
                    return "signal"
            elif self._skip and self.skip_epoch_rng is not None:
                # a loader that cannot seek is read again from the start of the epoch: with the RNG states
                # it started from, it draws the same order (torch's RandomSampler) and worker seeds
                _set_rng_state(self.skip_epoch_rng, self.generator)
            self.skip_epoch_rng = None
            if getattr(self.loader, "num_workers", 0) and self.saver.busy():
                # workers are forked now: no writer thread may hold a lock (a stream's, logging's) across it
                self.saver.wait()
            self.epoch_rng = _rng_state(self.generator) if self.source.replay else None
            self._seed_draw_of_reused_iterator()
            it = iter(self.loader)
            if self.pending_rng is not None and not self._skip:
                if self._at_resumed_position():
                    return "signal"
            got = 0
            for batch in it:
                got += 1
                if self._skip:
                    self._skip -= 1
                    if not self._skip and self.pending_rng is not None and self._at_resumed_position():
                        return "signal"
                    continue
                t0 = time.perf_counter()
                metrics = self.engines.train_step(batch)
                self.step += 1
                self.batches_in_epoch += 1
                self.step_times.append(time.perf_counter() - t0)
                del self.step_times[:-1000]
                self.last_metrics = dict(metrics)
                if self.step % self.cfg.log_every == 0:
                    self._emit({"step": self.step, "epoch": self.epoch, **metrics})
                if self.bar is not None:
                    self._bar_call(lambda: self.bar.update(1))
                    loss = _plain(metrics.get("loss"))
                    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
                        self._bar_call(lambda: self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False))
                outcome = self._boundary()
                if outcome is not None:
                    return outcome
            if self._skip:  # the epoch ended before the resumed position (a loader without len())
                self._past_epoch_end(self.resumed_from or "the checkpoint")
                if self.pending_rng is not None and self._at_resumed_position():
                    return "signal"
                continue
            if got == 0 and self.batches_in_epoch == 0:
                raise ValueError("the data loader yielded no batch in a whole epoch: nothing to train on")
            self.epoch += 1
            self.batches_in_epoch = 0


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
