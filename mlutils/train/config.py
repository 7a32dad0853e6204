"""What a training run is told and what it tells back: :class:`TrainConfig` (every option, checked when
made) and :class:`TrainResult`."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

from .._torch import require_torch
from .checkpoint import I64

__all__ = ["TrainConfig", "TrainResult"]

#: Metadata keys an export writes itself (TrainConfig.export_metadata may not use them).
EXPORT_KEYS = ("module", "step", "dtype", "format")


def _choice(cfg: Any, name: str, allowed: tuple) -> None:
    v = getattr(cfg, name)
    if v not in allowed:
        raise ValueError(f"TrainConfig.{name} must be one of {', '.join(map(repr, allowed))}; got {v!r}")


def _path_or_none(cfg: Any, name: str) -> None:
    v = getattr(cfg, name)
    if v is not None and not isinstance(v, str) and not (isinstance(v, os.PathLike)
                                                         and isinstance(os.fspath(v), str)):
        raise TypeError(f"TrainConfig.{name} must be a str path or None, got {type(v).__name__} {v!r}")


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
    progress: bool = True               # a progress bar on the global leader (stderr; plain lines if no tty)
    read_commands: bool = True          # read commands from stdin (global leader)
    handle_signals: bool = True         # SIGTERM/SIGINT/SIGUSR1 stop the loop cleanly
    events: List[str] = field(default_factory=list)  # commands to run as if typed first (e.g. "quit@500")
    accumulate_batches: int = 1         # loader batches per step, passed to the engines as micro-batches
    oom: str = "skip"                   # "skip": an out-of-memory step is dropped (3 in a row stop); "raise"
    keep_best: int = 0                  # checkpoints kept for the best evaluations (never rotated away)
    best_metric: str = "loss"           # the eval_fn result's key ("a/b" for nested) that ranks them
    best_mode: str = "min"              # "min" or "max"
    export_dtype: Any = None            # floating-point weights exported in this dtype (torch dtype or name)
    export_on_save: bool = False        # export with every checkpoint
    export_on_quit: bool = False        # export when the loop ends
    export_metadata: Optional[Dict[str, Any]] = None  # more safetensors metadata (e.g. the model config)
    init_from: Optional[str] = None     # start from another run's checkpoint when there is nothing to resume
    init_strict: bool = True            # False: missing/unexpected weights allowed (listed in a warning)
    init_optimizer: bool = False        # take the optimizer state from init_from too
    eval_on: str = "all"                # "all" ranks run eval_fn, or the global "leader" only
    eval_errors: str = "raise"          # "log": an eval_fn error is logged with its traceback, training goes on
    loggers: List[Any] = field(default_factory=list)  # objects with log(metrics, step) and close()
    requeue: Optional[bool] = None      # on the pre-emption signal: save, then `scontrol requeue` (None: under SLURM)
    requeue_signal: str = "SIGUSR1"     # the pre-emption signal (#SBATCH --signal=USR1@90 sends SIGUSR1)

    def __post_init__(self) -> None:
        for name in ("iterations", "save_frequency", "eval_frequency", "keep_last", "log_every",
                     "accumulate_batches", "keep_best"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < I64:
                raise ValueError(f"TrainConfig.{name} must be an int from 0 to 2**63-1, got {v!r}")
        for name in ("log_every", "accumulate_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1")
        for name in ("async_save", "save_at_end", "metrics_stdout", "progress", "read_commands", "handle_signals",
                     "export_on_save", "export_on_quit", "init_strict", "init_optimizer"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"TrainConfig.{name} must be True or False, got {type(v).__name__} {v!r}")
        for name in ("checkpoint_dir", "export_dir", "metrics_file", "init_from"):
            _path_or_none(self, name)
        r = self.resume
        if not (r is None or isinstance(r, (bool, str))
                or (isinstance(r, os.PathLike) and isinstance(os.fspath(r), str))):
            raise TypeError(f"TrainConfig.resume must be 'auto', a checkpoint folder, True, False or None; "
                            f"got {type(r).__name__} {r!r}")
        if not isinstance(self.events, (list, tuple)) or not all(isinstance(e, str) for e in self.events):
            raise TypeError(f"TrainConfig.events must be a list of command strings, got {self.events!r}")
        _choice(self, "oom", ("skip", "raise"))
        _choice(self, "requeue", (None, True, False))
        _choice(self, "requeue_signal", ("SIGTERM", "SIGINT", "SIGUSR1"))
        _choice(self, "best_mode", ("min", "max"))
        _choice(self, "eval_on", ("all", "leader"))
        _choice(self, "eval_errors", ("raise", "log"))
        if not isinstance(self.best_metric, str) or not self.best_metric:
            raise TypeError(f"TrainConfig.best_metric must be a non-empty str, got {self.best_metric!r}")
        md = self.export_metadata
        if md is not None:
            if not isinstance(md, Mapping) or not all(isinstance(k, str) for k in md):
                raise TypeError(f"TrainConfig.export_metadata must be a dict with str keys, got {md!r}")
            taken = sorted(set(md) & set(EXPORT_KEYS))
            if taken:
                raise ValueError(f"TrainConfig.export_metadata may not set {taken}: the export writes them")
        if self.export_dtype is not None:
            export_dtype(self.export_dtype)  # a clear error now, not at the first export
        if not isinstance(self.loggers, (list, tuple)) or not all(
                callable(getattr(lg, "log", None)) and callable(getattr(lg, "close", None)) for lg in self.loggers):
            raise TypeError("TrainConfig.loggers must be a list of objects with log(metrics, step) and close()")


def export_dtype(value: Any) -> Any:
    """The torch floating-point dtype `value` names (a torch.dtype or its name, e.g. "bfloat16")."""
    torch = require_torch("mlutils.train")

    dt = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"TrainConfig.export_dtype must be a floating-point torch dtype or its name "
                         f"(e.g. 'bfloat16'), got {value!r}")
    return dt


@dataclass
class TrainResult:
    """How train() ended: status is 'completed', 'quit', 'signal' or 'requeued' (a pre-emption signal under
    SLURM: the checkpoint is complete on every rank and ``scontrol requeue`` was run)."""

    status: str
    step: int
    signal: Optional[str] = None
    checkpoint: Optional[str] = None
    resumed_from: Optional[str] = None
    last_metrics: Dict[str, Any] = field(default_factory=dict)
    eval_metrics: Optional[Dict[str, Any]] = None
    oom_skipped: int = 0                # steps dropped for running out of memory (TrainConfig.oom="skip")
    best: List[Any] = field(default_factory=list)  # [(metric value, step)], best first (TrainConfig.keep_best)
