"""Fine-tuning: the engines start from another run's weights (``TrainConfig.init_from``) when this run
has nothing to resume: a checkpoint folder (its newest complete step), a step folder, or a ``.pt`` /
``.safetensors`` file of weights.  Model weights only by default; the optimizer too on request."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Mapping

from .._torch import require_torch
from ..io import torch_load
from .checkpoint import (_RANK_FILE, _STEP_DIR, CHECKPOINT_FORMAT, CheckpointError, _check_state, _is_complete,
                         _rank_file, latest_checkpoint)
from .engine import Engines

__all__ = ["init_engines"]

log = logging.getLogger("mlutils.train")


def _checkpoint_file(path: str, rank: int, world: int) -> str:
    """The rank file to read from a checkpoint folder or step folder: this rank's when the world sizes
    match, else rank 0's (weights are the same on every rank of a replicated run)."""
    folder = path
    if not _STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        newest = latest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"TrainConfig.init_from {path!r}: no complete checkpoint there")
        folder = newest
    if not _is_complete(folder):
        raise CheckpointError(f"TrainConfig.init_from {folder!r} is not a complete checkpoint")
    mine = os.path.join(folder, _rank_file(world, rank))
    if os.path.isfile(mine):
        return mine
    names = sorted(n for n in os.listdir(folder) if _RANK_FILE.match(n))
    return os.path.join(folder, names[0])


def _weights_of(data: Any, path: str) -> Dict[str, Any]:
    """The flat name -> tensor dict of a weights file (a safetensors export, a state dict, {"module": ...})."""
    torch = require_torch("mlutils.train")

    if isinstance(data, Mapping):
        if data and all(isinstance(v, torch.Tensor) for v in data.values()):
            return dict(data)
        for key in ("module", "model", "state_dict"):
            inner = data.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
    raise CheckpointError(f"TrainConfig.init_from {path!r} holds no dict of tensors (a state dict, an export "
                          f"or a checkpoint folder)")


def _load_weights(name: str, engine: Any, weights: Mapping[str, Any], strict: bool, path: str) -> None:
    fn = getattr(engine, "load_weights", None)
    if not callable(fn):
        raise CheckpointError(f"engine {name!r} ({type(engine).__name__}) has no load_weights(weights, strict): "
                              f"it cannot start from the weights in {path}")
    try:
        missing, unexpected = fn(weights, strict)
    except RuntimeError as exc:
        raise CheckpointError(f"TrainConfig.init_from {path}: the weights do not fit engine {name!r}: {exc}; "
                              f"init_strict=False allows missing and unexpected keys") from exc
    if missing or unexpected:
        log.warning("init_from %s (engine %r): missing keys %s, unexpected keys %s", path, name,
                    sorted(missing), sorted(unexpected))


def init_engines(path: str, engines: Engines, strict: bool, optimizer: bool, rank: int, world: int) -> str:
    """Load `path` into the engines (weights, and the optimizer when asked); returns the file read."""
    if os.path.isdir(path):
        file = _checkpoint_file(path, rank, world)
    elif os.path.isfile(path):
        file = path
    else:
        raise CheckpointError(f"TrainConfig.init_from {path!r} does not exist")
    try:
        data = torch_load(file)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read TrainConfig.init_from {file}: {exc}") from exc
    if isinstance(data, dict) and data.get("format") == CHECKPOINT_FORMAT:
        _check_state(data, file)
        states = data["engines"]
        for name, engine in engines.engines.items():
            if name not in states:
                raise CheckpointError(f"TrainConfig.init_from {file} has no state for engine {name!r} "
                                      f"(it has {sorted(states)})")
            state = states[name]
            weights = state.get("model") if isinstance(state, Mapping) else None
            if isinstance(weights, Mapping):
                _load_weights(name, engine, weights, strict, file)
            elif not optimizer:
                raise CheckpointError(f"TrainConfig.init_from {file}: engine {name!r}'s state holds no 'model' "
                                      f"weights; init_optimizer=True loads its whole state")
            if optimizer:
                _load_optimizer(name, engine, state, file)
        return file
    if optimizer:
        raise CheckpointError(f"TrainConfig.init_optimizer: {file} is a weights file without optimizer state")
    weights = _weights_of(data, file)
    if len(engines.engines) == 1:
        name, engine = next(iter(engines.engines.items()))
        _load_weights(name, engine, weights, strict, file)
        return file
    for name, engine in engines.engines.items():  # several engines: exported as '<name>.<key>'
        prefix = name + "."
        _load_weights(name, engine, {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)},
                      strict, file)
    return file


def _load_optimizer(name: str, engine: Any, state: Any, path: str) -> None:
    fn = getattr(engine, "load_optimizer", None)
    try:
        if callable(fn):
            fn(state)
        else:
            engine.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"TrainConfig.init_from {path}: the optimizer state does not fit engine {name!r}: "
                              f"{type(exc).__name__}: {exc}") from exc
