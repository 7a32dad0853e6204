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

Layout: ``engine`` (the Engine protocol, Engines, TorchEngine), ``deepspeed``
(DeepSpeedEngine, importing DeepSpeed only when one is made), ``checkpoint``
(folder format, snapshots, RNG states, save and read, :class:`ResumePoint`),
``data`` (the sampler behind a loader and the epoch position), ``commands``
(stdin, parsing, events), ``signals``, ``output`` (metrics lines, progress
bar), ``loggers`` (experiment trackers: the Logger protocol, TensorBoard,
Weights & Biases; tensorboard and wandb imported only when one is made) and
``loop`` (TrainConfig, TrainResult, train); this package re-exports the
public names.
"""
from __future__ import annotations

from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, ResumePoint, find_checkpoints, latest_checkpoint
from .commands import COMMANDS
from .config import TrainConfig, TrainResult
from .counters import OutOfMemoryStop
from .deepspeed import DeepSpeedEngine  # imports deepspeed only when one is made
from .engine import Engine, Engines, MicroBatches, TorchEngine
from .loggers import Logger, LoggerDependencyError, TensorBoardLogger, WandbLogger, flatten
from .loop import train

__all__ = ["Engine", "Engines", "TorchEngine", "DeepSpeedEngine", "MicroBatches", "TrainConfig", "TrainResult",
           "train", "find_checkpoints", "latest_checkpoint", "CheckpointError", "OutOfMemoryStop", "ResumePoint",
           "COMMANDS", "CHECKPOINT_FORMAT", "Logger", "TensorBoardLogger", "WandbLogger", "LoggerDependencyError",
           "flatten"]
