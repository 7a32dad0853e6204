"""Experiment trackers for the loop's metrics lines: the :class:`Logger` protocol, :func:`flatten`, and loggers
for TensorBoard (:class:`TensorBoardLogger`) and Weights & Biases (:class:`WandbLogger`).

The loop calls, on the global leader only, ``logger.log(line, step)`` for every metrics line (each logged
step and each evaluation: ``{"step": 10, "epoch": 0, "loss": 0.5}``, ``{"step": 10, "eval": {"loss": 0.4}}``)
and ``logger.close()`` when it ends.  Two optional hooks serve a resume, both called before the first
``log`` of the resumed run, in this order:

* ``state_dict() -> dict`` / ``load_state_dict(state)``: the logger's own state, kept in the global
  leader's rank file of each checkpoint (plain strings: ``torch.load(weights_only=True)`` reads it);
  :class:`WandbLogger` keeps its run id there, to continue the same run;
* ``resume(step)``: the checkpoint's step; :class:`TensorBoardLogger` drops what a crashed run logged
  after it.

tensorboard and wandb are imported when a logger is constructed, never by ``import mlutils.train``; a
missing one is a :class:`LoggerDependencyError` naming the pip extra.
"""
from __future__ import annotations

import logging
import numbers
import os
import re
import secrets
import string
import sys
from typing import Any, Dict, List, Mapping, Optional, Protocol, Set, Union, runtime_checkable

import numpy as np

from .._core import MlutilsError

__all__ = ["Logger", "flatten", "TensorBoardLogger", "WandbLogger", "LoggerDependencyError"]

log = logging.getLogger("mlutils.train")

Number = Union[int, float]


class LoggerDependencyError(MlutilsError, ImportError):
    """A logger's package (torch, tensorboard, wandb) cannot be imported; the message names the pip extra."""


@runtime_checkable
class Logger(Protocol):
    """What the loop needs from an experiment tracker (optional hooks: ``state_dict``/``load_state_dict``,
    ``resume(step)``; see the module's docstring)."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record one metrics line at `step` (its own ``step`` key included, which :func:`flatten` drops)."""

    def close(self) -> None:
        """Flush and release; called once when the loop ends."""


# ---------------------------------------------------------------------------
# metrics


def _number(value: Any) -> Optional[Number]:
    """`value` as a Python int or float, or None when it is not a single real number."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value if -(1 << 63) <= value < (1 << 63) else float(value)  # JSON and protobuf hold int64
    if isinstance(value, float):
        return value
    if isinstance(value, (np.generic, np.ndarray)):
        if value.size != 1 or value.dtype.kind not in "biuf":
            return None
        return _number(value.item())
    torch = sys.modules.get("torch")  # a tensor exists only if torch is imported
    if torch is not None and isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        return _number(value.detach().cpu().item())
    if isinstance(value, numbers.Real):  # Fraction and the like
        return float(value)
    return None


def _flatten_into(out: Dict[str, Number], metrics: Mapping[Any, Any], prefix: str, sep: str,
                  skipped: Optional[List[str]]) -> None:
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten_into(out, value, name + sep, sep, skipped)
            continue
        number = _number(value)
        if number is not None:
            out[name] = number
        elif skipped is not None:
            skipped.append(name)


def flatten(metrics: Mapping[str, Any], sep: str = "/", skipped: Optional[List[str]] = None) -> Dict[str, Number]:
    """The numbers of a metrics line as one flat dict: nested keys joined by `sep` (``eval/loss``), the
    top-level ``step`` left out (it is ``log``'s step argument).

    Numbers come out as Python ints and floats: bools as 0/1, numpy scalars and one-element arrays or
    tensors through ``.item()``, ints beyond 64 bits as floats; NaN and infinities are kept.  Anything
    else (text, None, lists, larger arrays, complex numbers) is left out, its key appended to `skipped`
    when a list is given.  Keys are made text with ``str``."""
    out: Dict[str, Number] = {}
    _flatten_into(out, {k: v for k, v in metrics.items() if k != "step"}, "", sep, skipped)
    return out


class _SkipReport:
    """Says once per key that a metric is not a number and is not logged."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.seen: Set[str] = set()

    def flatten(self, metrics: Mapping[str, Any], step: int) -> Dict[str, Number]:
        skipped: List[str] = []
        flat = flatten(metrics, skipped=skipped)
        new = [k for k in skipped if k not in self.seen]
        if new:
            self.seen.update(new)
            log.warning("%s: %s at step %d not a number: not logged (said once per key)", self.owner,
                        ", ".join(repr(k) for k in new), step)
        return flat


def _require(module: str, what: str, extra: str) -> Any:
    """Import `module` for `what`, or LoggerDependencyError naming ``pip install 'mlutils[extra]'``."""
    import importlib

    try:
        if module == "torch" and os.environ.get("MLUTILS_NO_TORCH") == "1":
            raise ImportError("MLUTILS_NO_TORCH=1 hides it")
        return importlib.import_module(module)
    except ImportError as exc:
        raise LoggerDependencyError(f"{what} needs {extra}, which cannot be imported ({exc}): "
                                    f"pip install 'mlutils[{extra}]'", name=module) from exc


# ---------------------------------------------------------------------------
# TensorBoard


class TensorBoardLogger:
    """Scalars into TensorBoard event files in `log_dir`, through torch's ``SummaryWriter`` (opened at the
    first log or resume; `writer_kwargs` go to it: ``flush_secs``, ``max_queue``, ``filename_suffix``).

    `log_dir` holds one training run, as ``metrics_file`` does: a resumed run must write where the
    interrupted one did, so it is required.  Each event file this logger opens starts with a restart
    mark (TensorBoard's ``purge_step``): at ``step + 1`` after :meth:`resume`, else at the first step
    logged.  TensorBoard's Python readers (``EventAccumulator``, ``tensorboard --load_fast=false``) then
    drop the events of earlier files from that step on, in every tag: what a crashed run logged after
    its checkpoint, or an older run in the same folder.  The default ``tensorboard`` (its Rust data
    server) ignores the mark; it replaces a tag's points from the first step logged again, so a tag
    shows the resumed run's values once the resumed run has logged it."""

    def __init__(self, log_dir: Union[str, "os.PathLike[str]"], **writer_kwargs: Any) -> None:
        _require("torch", "TensorBoardLogger", "torch")
        tb = _require("torch.utils.tensorboard", "TensorBoardLogger", "tensorboard")
        self._writer_class = tb.SummaryWriter
        self.log_dir = os.fspath(log_dir)
        self._purge_step: Optional[int] = writer_kwargs.pop("purge_step", None)
        self.writer_kwargs = writer_kwargs
        self.writer: Any = None  # the open SummaryWriter, owned by self
        self._closed = False
        self._skips = _SkipReport("TensorBoardLogger")

    def _open(self, step: int) -> Any:
        """The writer; a new one's file starts with a restart mark at the resumed step + 1, else at `step`."""
        if self._closed:
            raise RuntimeError(f"TensorBoardLogger({self.log_dir!r}) is closed")
        if self.writer is None:
            purge = self._purge_step if self._purge_step is not None else step
            self.writer = self._writer_class(log_dir=self.log_dir, purge_step=purge, **self.writer_kwargs)
            self._purge_step = None  # the next file (after close and resume) gets its own mark
        return self.writer

    def resume(self, step: int) -> None:
        """The run continues after `step`: readers drop what earlier runs logged past it."""
        step = int(step)
        if step < 0:
            raise ValueError(f"TensorBoardLogger.resume: step must be >= 0, got {step}")
        if self._closed:
            raise RuntimeError(f"TensorBoardLogger({self.log_dir!r}) is closed")
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self._purge_step = step + 1
        self._open(step + 1)  # the mark is written now, even if nothing is logged after it

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """One scalar per number of the line (:func:`flatten`), at `step`."""
        step = int(step)
        flat = self._skips.flatten(metrics, step)
        writer = self._open(step)
        for tag, value in flat.items():
            writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        """Write what the writer holds to the event file now (it does every ``flush_secs``, 120 s)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file (again: nothing)."""
        self._closed = True
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()


# ---------------------------------------------------------------------------
# Weights & Biases

_ID_ALPHABET = string.ascii_lowercase + string.digits
_BAD_ID = re.compile(r"[:;,#?/'\x00-\x1f\x7f]|^\s|\s$")  # what W&B refuses in a run id (and control characters)


def _new_run_id() -> str:
    """A run id in W&B's own format (8 of [a-z0-9]), chosen before the run starts so that a checkpoint
    written before the first log already names it."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


class WandbLogger:
    """Metrics into a W&B run made by ``wandb.init(**init_kwargs)`` (``project``, ``name``, ``config``,
    ``dir``, ``mode``...) at the first log, or at :meth:`start`.

    Each line goes to ``run.log(flatten(line), step=step)``: W&B's step is the training step, and the
    training line and the evaluation line of a step fill one row.  :meth:`state_dict` holds the run id
    (chosen at construction unless ``id=`` is given); after :meth:`load_state_dict` the run starts as
    ``wandb.init(id=<that id>, resume="allow")`` (a ``resume=`` of `init_kwargs` is kept), so a resumed
    training run continues the same W&B run.  W&B ignores a step below the run's last one (with its own
    warning): steps a crashed run had logged past its checkpoint keep that run's values online.  In
    offline mode each process writes its own ``offline-run-*`` folder with the same id;
    ``wandb sync`` uploads them in order."""

    def __init__(self, **init_kwargs: Any) -> None:
        self._wandb = _require("wandb", "WandbLogger", "wandb")
        self.init_kwargs = dict(init_kwargs)
        given = self.init_kwargs.get("id")
        self.run_id: str = _checked_id(given, "the id= argument") if given is not None else _new_run_id()
        self.run: Any = None  # the wandb Run once started, owned by self
        self._resumed = False
        self._closed = False
        self._skips = _SkipReport("WandbLogger")

    def state_dict(self) -> Dict[str, str]:
        """{"run_id": ...}: what a resumed training run needs to continue this W&B run."""
        return {"run_id": self.run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the run a :meth:`state_dict` names (before the run starts; again with the same id:
        nothing).  ValueError for a state without a valid ``run_id``."""
        if not isinstance(state, Mapping) or "run_id" not in state:
            raise ValueError(f"WandbLogger.load_state_dict: expected {{'run_id': str}}, got {state!r}")
        run_id = _checked_id(state["run_id"], "the state's run_id")
        if self.run is not None:
            if run_id != self.run.id:
                raise RuntimeError(f"WandbLogger.load_state_dict: the run {self.run.id!r} has already started; "
                                   f"it cannot become run {run_id!r} (load the state before the first log "
                                   f"or start())")
            return
        if self.init_kwargs.get("id") not in (None, run_id):
            log.warning("WandbLogger: the checkpoint's run %r is resumed, not the id=%r given",
                        run_id, self.init_kwargs["id"])
        self.run_id = run_id
        self._resumed = True

    def start(self, state: Optional[Mapping[str, Any]] = None) -> Any:
        """Start the W&B run now (after ``load_state_dict(state)`` when `state` is given); returns the run.
        Starting early makes a setup error (no API key, say) show before training."""
        if self._closed:
            raise RuntimeError("WandbLogger is closed")
        if state is not None:
            self.load_state_dict(state)
        if self.run is None:
            kwargs = dict(self.init_kwargs, id=self.run_id)
            if self._resumed:
                # the run exists (or was logged offline): continue it; fork/rewind applied to its first start
                kwargs.pop("fork_from", None)
                kwargs.pop("resume_from", None)
                if kwargs.get("resume") is None:
                    kwargs["resume"] = "allow"
            run = self._wandb.init(**kwargs)
            if run.id != self.run_id:  # reinit="return_previous" hands back a run already active
                log.warning("WandbLogger: wandb.init returned the active run %r, not %r: logging to it",
                            run.id, self.run_id)
                self.run_id = run.id
            self.run = run
        return self.run

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """The line's numbers (:func:`flatten`) as one ``run.log`` at `step`."""
        if self._closed:
            raise RuntimeError("WandbLogger is closed")
        flat = self._skips.flatten(metrics, step)
        if flat:
            self.start().log(flat, step=int(step))

    def close(self) -> None:
        """Finish the run (again, or never started: nothing)."""
        self._closed = True
        if self.run is not None:
            run, self.run = self.run, None
            run.finish()


def _checked_id(run_id: Any, what: str) -> str:
    if not isinstance(run_id, str) or not run_id or len(run_id) > 128 or _BAD_ID.search(run_id):
        raise ValueError(f"WandbLogger: {what} must be a W&B run id (1 to 128 characters, none of "
                         f":;,#?/' or control characters, no space at either end), got {run_id!r}")
    return run_id
