"""Engines: what the loop steps.  The :class:`Engine` protocol, :class:`Engines` (several stepped on one
batch) and :class:`TorchEngine` (a plain torch model), with the cutting of a batch into micro-batches."""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Tuple, Union,
                    runtime_checkable)

import numpy as np

from .._torch import require_torch
from . import wrapped
from .checkpoint import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = ["Engine", "Engines", "TorchEngine", "MicroBatches", "LOOP_KEYS"]

#: Keys of the metrics line the loop itself writes (an engine's metric of that name is prefixed).
LOOP_KEYS = ("step", "epoch", "eval")


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


class MicroBatches(list):
    """The loader batches of one step (``TrainConfig.accumulate_batches``): an engine accumulates their
    gradients, weighted by size, into one optimizer step.  An engine that does not know this type gets a
    list of batches."""


#: What a rank file holds for a replicated engine off the global leader: read rank 0's instead.
REPLICA = {"replica_of_rank": 0}


def _replicated(engine: Any) -> bool:
    fn = getattr(engine, "replicated", None)
    return bool(fn()) if callable(fn) else False


def _metrics_of(name: str, engine: Any, metrics: Any) -> Dict[str, Any]:
    """An engine's train_step result as a dict (None: no metrics); TypeError naming the engine otherwise."""
    if type(metrics) is dict:
        return dict(metrics)
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
            for k in LOOP_KEYS:
                if k in out1:
                    out1[f"{name}/{k}"] = out1.pop(k)
            return out1
        out: Dict[str, Any] = {}
        for name, e in self.engines.items():
            out.update({f"{name}/{k}": v for k, v in _metrics_of(name, e, e.train_step(batch)).items()})
        return out

    def state_dict(self, leader: bool = True) -> Dict[str, Any]:
        """{name: engine state}; off the global leader, a replicated engine's (DDP) is only a pointer to the
        leader's file (REPLICA), so the step folder holds one copy of it."""
        return {name: REPLICA if not leader and _replicated(e) else e.state_dict()
                for name, e in self.engines.items()}

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

    def has_files(self) -> bool:
        """True when an engine keeps (part of) its state in files of its own (save_files / load_files)."""
        return any(callable(getattr(e, "save_files", None)) and getattr(e, "has_files", lambda: True)()
                   for e in self.engines.values())

    def save_files(self, folder: str, background: bool = False,
                   before_sync: Optional[Callable[[], None]] = None) -> List[Any]:
        """Every engine with files of its own writes them into ``<folder>/<name>`` (all ranks).  With
        `background`, an engine that can (its ``save_files`` takes ``background``) takes what it must on
        the training thread and returns the rest of its write as a callable: those are returned, for the
        checkpoint's writer thread to run before the rank file (that write, ``dcp.save``, starts with a
        collective).  `before_sync` (a barrier) runs once before the first write made here."""
        jobs: List[Any] = []
        for name, e in self.engines.items():
            fn = getattr(e, "save_files", None)
            if not callable(fn):
                continue
            path = os.path.join(folder, name)
            deferred = background and "background" in inspect.signature(fn).parameters
            if not deferred and before_sync is not None:
                before_sync()
                before_sync = None
            if deferred:
                job = fn(path, background=True)
                if job is not None and not callable(job):
                    raise TypeError(f"engine {name!r} ({type(e).__name__}).save_files(background=True) returned "
                                    f"{type(job).__name__}; it must return a callable (the rest of its write) or None")
                if job is not None:
                    jobs.append(job)
            else:
                fn(path)
        return jobs

    def load_dcp(self, folder: str) -> None:
        """A plain torch.distributed.checkpoint folder (not ours) into the one engine that can take it."""
        able = [(n, e) for n, e in self.engines.items() if callable(getattr(e, "load_dcp", None))]
        if len(able) != 1:
            raise CheckpointError(f"{folder} is a torch.distributed.checkpoint folder: it loads into exactly one "
                                  f"engine with load_dcp (here {[n for n, _ in able]})")
        try:
            able[0][1].load_dcp(folder)
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            raise CheckpointError(f"{folder} does not fit engine {able[0][0]!r}: {type(exc).__name__}: {exc}") from exc

    def load_files(self, folder: str) -> None:
        """Every engine with files of its own reads them from ``<folder>/<name>`` (all ranks)."""
        for name, e in self.engines.items():
            fn = getattr(e, "load_files", None)
            if callable(fn):
                fn(os.path.join(folder, name))

    def recover_from_oom(self) -> None:
        """After an out-of-memory error in a step: every engine that can drops its gradients and caches."""
        for e in self.engines.values():
            fn = getattr(e, "recover_from_oom", None)
            if callable(fn):
                fn()

    def set_loss_scale(self, scale: float) -> List[str]:
        """Set the loss scale of every engine that has one; the names of those that do not."""
        skipped = []
        for name, e in self.engines.items():
            fn = getattr(e, "set_loss_scale", None)
            try:
                if not callable(fn):
                    raise ValueError("no set_loss_scale")
                fn(scale)
            except ValueError:
                skipped.append(name)
        return skipped


def to_device(batch: Any, device: Any) -> Any:
    """`batch` with its tensors moved to `device` (containers followed, named tuples left whole)."""
    torch = require_torch("mlutils.train")

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


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
    torch = require_torch("mlutils.train")

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


def _several_ranks() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
        torch = require_torch("mlutils.train")

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
        self._wrapper: Optional[str] = None
        self._agree: Optional[Tuple[Any]] = None  # the group the ranks agree on an OOM skip over (gloo on CPU)
        self._saver: Optional[wrapped.ShardedSaver] = None  # background sharded saves, made at the first
        self._buffers: Optional[bool] = None  # the model has buffers (a forward pass may change them)

    @property
    def global_step(self) -> int:
        """Optimizer steps done."""
        return self._step

    def _to_device(self, batch: Any) -> Any:
        return to_device(batch, self.device)

    def _forward(self, batch: Any) -> Tuple[Any, Dict[str, Any]]:
        torch = require_torch("mlutils.train")

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
        """Forward, backward (accumulated), clip, optimizer and scheduler step; returns loss, lr and the
        loss_fn's metrics.

        `batch` is one loader batch (cut into ``accumulate`` micro-batches) or
        a :class:`MicroBatches` list of them (``TrainConfig.accumulate_batches``),
        each weighted by its size.  The loss and the metrics stay on the
        device, summed there: nothing is read back to the host here (the loop
        reads them on the steps it logs).  Under DDP or FSDP every micro-batch
        but the last runs in ``model.no_sync()``: one gradient reduction per
        step."""
        torch = require_torch("mlutils.train")

        if self._buffers is None:
            self._buffers = any(True for _ in self.model.buffers())
        if self._buffers:  # a forward pass may change them (batch norm): the snapshot in flight comes first
            self._settle()
        self.model.train()
        if isinstance(batch, MicroBatches):
            parts = list(batch)
        else:
            n = self._batch_size(batch)
            pieces = min(self.accumulate, n) if n > 0 else 1  # a short last batch: fewer; nothing to split: one
            parts = _split_batch(batch, pieces, n) if pieces > 1 else [batch]
        sizes = [self._batch_size(p) for p in parts]
        total = sum(sizes)
        loss_sum: Any = 0.0
        extra: Dict[str, Any] = {}
        self.optimizer.zero_grad(set_to_none=True)
        no_sync = getattr(self.model, "no_sync", None)
        oom: Optional[BaseException] = None
        try:
            for i, (part, size) in enumerate(zip(parts, sizes)):
                w = (size / total) if total else 1.0 / len(parts)
                quiet = callable(no_sync) and i < len(parts) - 1
                with no_sync() if quiet else contextlib.nullcontext():  # type: ignore[misc]
                    loss, metrics = self._forward(self._to_device(part))
                    scaled = loss * w
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                loss_sum = loss_sum + loss.detach() * w
                for k, v in metrics.items():
                    v = v.detach() if isinstance(v, torch.Tensor) else v
                    extra[k] = extra.get(k, 0.0) + v * w
        except torch.OutOfMemoryError as exc:
            oom = exc
        if _several_ranks():
            # every rank skips the step when one ran out of memory, before any optimizer steps
            from .. import distributed
            from .commands import cpu_group

            if self._agree is None:  # made once, by every rank at its first step (new_group is a collective)
                self._agree = (cpu_group(distributed.world_size()),)
            if distributed.any_rank(oom is not None, group=self._agree[0]) and oom is None:
                oom = torch.OutOfMemoryError("another rank ran out of memory in this step")
        if oom is not None:
            self.optimizer.zero_grad(set_to_none=True)
            raise oom
        out: Dict[str, Any] = {"loss": loss_sum}
        self._settle()  # a background save's copy of the state is taken before the optimizer changes it
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad_norm is not None:
            out["grad_norm"] = wrapped.clip_grad_norm(self.model, self.clip_grad_norm)
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

    def load_weights(self, weights: Mapping[str, Any], strict: bool = True) -> Tuple[List[str], List[str]]:
        """Load model weights only (fine-tuning); (missing keys, unexpected keys) when not `strict`."""
        self._settle()
        result = self.model.load_state_dict(weights, strict=strict)
        return list(result.missing_keys), list(result.unexpected_keys)

    def load_optimizer(self, state: Mapping[str, Any]) -> None:
        """Load the optimizer's state from a state_dict() of this engine (fine-tuning)."""
        self._settle()
        self.optimizer.load_state_dict(state["optimizer"])

    def recover_from_oom(self) -> None:
        """After an out-of-memory error in a step: drop the gradients and the allocator's cache."""
        torch = require_torch("mlutils.train")

        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def set_loss_scale(self, scale: float) -> None:
        """Set the GradScaler's scale (float16 training); ValueError without one."""
        if self.scaler is None:
            raise ValueError("this engine has no GradScaler (amp_dtype is not torch.float16)")
        if getattr(self.scaler, "_scale", None) is None:
            self.scaler._init_scale = float(scale)  # taken when the first loss is scaled
        else:
            self.scaler.update(new_scale=float(scale))

    @staticmethod
    def _batch_size(batch: Any) -> int:
        return _batch_len(batch)

    def _kind(self) -> str:
        if self._wrapper is None:  # the wrapping is done before training: looked up once
            self._wrapper = wrapped.kind(self.model)
        return self._wrapper

    def has_files(self) -> bool:
        """A sharded model (FSDP1, FSDP2) keeps model and optimizer in a DCP folder of the step."""
        return self._kind() in ("fsdp1", "fsdp2")

    def replicated(self) -> bool:
        """DDP: every rank holds the same model and optimizer, written once (by the global leader)."""
        return self._kind() == "ddp"

    def _settle(self) -> None:
        """Wait until a background save has its copy of the model and optimizer (they may change after)."""
        if self._saver is not None:
            self._saver.settle()

    def save_files(self, folder: str, background: bool = False) -> Any:
        """Sharded state: each rank's shards into the DCP folder `folder` (a collective).  With `background`
        the state is staged into host memory off the training thread and the write (``dcp.save`` of the
        staged copy) is returned as a callable for the checkpoint's writer thread; the next step waits only
        for the staged copy, just before the optimizer changes the state (before the forward pass when the
        model has buffers)."""
        if not self.has_files():
            return None
        if not background or not wrapped.background_saves():  # a torch without DCP's DefaultStager: in place
            self._settle()
            wrapped.save_sharded(self.model, self.optimizer, folder)
            return None
        if self._saver is None:
            self._saver = wrapped.ShardedSaver()
        return self._saver.save(self.model, self.optimizer, folder)

    def load_files(self, folder: str) -> None:
        if self.has_files():
            self._settle()
            wrapped.load_sharded(self.model, self.optimizer, folder)

    def load_dcp(self, folder: str) -> None:
        """Model (and optimizer, when the folder has it) from a DCP folder written by plain ``dcp.save`` of
        ``{"model": ..., "optimizer": ...}``, whatever wraps the model."""
        self._settle()
        wrapped.load_sharded(self.model, self.optimizer, folder, partial=True)

    def state_dict(self) -> Dict[str, Any]:
        """Model, optimizer (with the model's own names under a wrapper; in the DCP folder when sharded),
        scheduler, scaler and the step."""
        k = self._kind()
        out: Dict[str, Any] = {}
        if k == "plain":
            out.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
        elif k in ("ddp", "compiled"):
            out["model"], out["optimizer"] = wrapped.model_optim_state(self.model, self.optimizer)
        out.update(scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
                   scaler=self.scaler.state_dict() if self.scaler is not None else None, global_step=self._step)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a state_dict() (a sharded model's files are loaded by load_files first)."""
        self._settle()
        k = self._kind()
        if k == "plain":
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        elif k in ("ddp", "compiled"):
            wrapped.load_model_optim_state(self.model, self.optimizer, dict(state["model"]), dict(state["optimizer"]))
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self._step = int(state["global_step"])

    def export(self) -> Dict[str, Any]:
        """The model's weights as contiguous CPU copies with the model's own names (no ``module.``,
        ``_orig_mod.`` or FSDP prefixes), gathered to the global leader for a sharded model."""
        if self._kind() == "plain":
            return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.model.state_dict().items()}
        return wrapped.full_weights(self.model)

    def set_lr(self, lr: float) -> None:
        """Every param group's lr (and the scheduler's base lrs, so the schedule keeps the new scale)."""
        self._settle()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            if "initial_lr" in g:
                g["initial_lr"] = lr
        if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr] * len(self.scheduler.base_lrs)

    def quit(self) -> None:
        """Release the staging buffers of background sharded saves (the loop has waited for the writes)."""
        if self._saver is not None:
            self._saver.close()
            self._saver = None
