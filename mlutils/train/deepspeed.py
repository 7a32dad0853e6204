"""A DeepSpeed engine for the loop: :class:`DeepSpeedEngine` wraps what ``deepspeed.initialize`` returns.

DeepSpeed is imported only inside the methods (it is already imported by
whoever built the engine): importing :mod:`mlutils.train` never imports it.

Steps.  One ``train_step`` is one optimizer step.  Each micro-batch runs
``loss_fn(engine, micro_batch)``, ``engine.backward(loss)`` and
``engine.step()``, so DeepSpeed does its own loss scaling (fp16/bf16),
division by ``gradient_accumulation_steps`` (G), gradient reduction, ZeRO
partitioning, clipping and scheduler stepping.  A plain loader batch is cut
into G micro-batches along dim 0 (fewer when it has fewer items); a
:class:`~mlutils.train.MicroBatches` list (``TrainConfig.accumulate_batches``)
is taken as it is, one micro-batch per loader batch.  The accumulation
boundary is set at the step's last micro-batch
(``set_gradient_accumulation_boundary``): with G micro-batches of equal size
that is where DeepSpeed's own counter puts it and the step is exactly
DeepSpeed's, and with another number (the epoch's last step, which takes the
batches left) the step still ends on an optimizer step, never in the middle
of an accumulation a checkpoint could not hold.  Micro-batches are weighted
by size (the gradient is the mean over the step's items, as in
``TorchEngine``); with G equal ones the weight is 1 and the loss is passed
to DeepSpeed untouched.

Out of memory.  A ``torch.OutOfMemoryError`` in a micro-batch's forward
pass (``loss_fn``) skips the step (``TrainConfig.oom="skip"``): with several
ranks, after each forward pass the ranks agree on whether one of them ran
out of memory (one CPU all-reduce per micro-batch, on a gloo group of its
own under NCCL), before any of them starts the backward pass and its
gradient reductions; then every rank drops the gradients the step's earlier
micro-batches accumulated (under ZeRO-1/2 what DeepSpeed's own step drops
after an fp16 overflow: the parameters' gradients, the reduced partitions,
the offload buffers; under ZeRO-0 with a torch optimizer the parameters'
gradients), DeepSpeed's micro-step counters go back to the step's start,
and the error is raised on every rank for the loop to skip the batch.
Raised as a RuntimeError instead (the step cannot be skipped): an
out-of-memory error in ``engine.backward`` or ``engine.step`` (other ranks
may be inside DeepSpeed's reductions by then), one with several ranks
under ZeRO-3, MoE or model parallelism (their forward passes communicate),
and one with DeepSpeed's fp16/bf16 optimizers of ZeRO-0 or ZenFlow's.

Checkpoints.  DeepSpeed keeps its state (module, fp32 master weights and
optimizer partitions, scheduler, step counters) in files of its own: the
loop calls :meth:`DeepSpeedEngine.save_files` on every rank before writing
its rank files, and a step folder counts as complete only when every rank
file is there, so a DeepSpeed write cut short (DeepSpeed writes each file in
place, without a temporary file or fsync) is never taken for a checkpoint.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .._torch import require_torch
from .checkpoint import CheckpointError
from .engine import MicroBatches, _batch_len, _several_ranks, _split_batch, to_device as _to_device

__all__ = ["DeepSpeedEngine", "CHECKPOINT_TAG"]

log = logging.getLogger("mlutils.train")

#: The tag of the one DeepSpeed checkpoint in ``<step folder>/<engine name>/``.
CHECKPOINT_TAG = "state"


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: str, rank: int, world: int) -> None:
    """Make what DeepSpeed wrote under `folder` durable: the ranks share the files (rank r takes every
    world-th one of the sorted listing), every rank syncs the folders."""
    files: List[str] = []
    dirs: List[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        dirs.append(dirpath)
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames))
    for i, path in enumerate(files):
        if i % world == rank:
            _fsync(path)
    for path in reversed(dirs):
        _fsync(path)
    _fsync(os.path.dirname(os.path.abspath(folder)))


def _zero3_state_dict(module: Any, leader: bool) -> Dict[str, Any]:
    """The full weights of a ZeRO-3 module as CPU tensors named as in its state_dict, one module's
    parameters gathered at a time (a collective: every rank calls it; only `leader` keeps them)."""
    import deepspeed

    out: Dict[str, Any] = {}

    def visit(mod: Any, prefix: str) -> None:
        params = [p for _n, p in mod.named_parameters(recurse=False)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if leader:
                for name, p in mod.named_parameters(recurse=False):
                    out[prefix + name] = p.detach().to("cpu", copy=True).contiguous()
                for name, b in mod.named_buffers(recurse=False):
                    if name not in getattr(mod, "_non_persistent_buffers_set", ()):
                        out[prefix + name] = b.detach().to("cpu", copy=True).contiguous()
        for name, child in mod.named_children():
            visit(child, prefix + name + ".")

    visit(module, "")
    return out


def _zero12(optimizer: Any) -> Any:
    """DeepSpeed's ZeRO-1/2 optimizer module when `optimizer` is one, else None."""
    from deepspeed.runtime.zero import stage_1_and_2

    return stage_1_and_2 if isinstance(optimizer, stage_1_and_2.DeepSpeedZeroOptimizer) else None


def _plain_optimizer(optimizer: Any) -> bool:
    """A torch optimizer DeepSpeed steps as it is (ZeRO-0 in fp32): its gradients are the parameters'."""
    torch = require_torch("mlutils.train")

    return isinstance(optimizer, torch.optim.Optimizer)


def _drop_gradients(eng: Any) -> None:
    """Drop the gradients a DeepSpeed engine accumulated since its last optimizer step.  ZeRO-1/2: what its
    step drops after an overflow (the parameters' gradients, the reduced partitions, the offload buffers)
    and its micro-step id, so the next backward pass starts a new accumulation."""
    opt = eng.optimizer
    stage = _zero12(opt)
    if stage is not None:
        opt.zero_grad(set_to_none=True)
        release = getattr(opt, "_release_preflattened_grad_buffers", None)
        if callable(release):
            release()
        if getattr(opt, "cpu_offload", False):
            opt.reset_cpu_buffers()
            if hasattr(opt, "_offload_accumulated_param_ids"):
                opt._offload_accumulated_param_ids = set()
        for store in ("averaged_gradients", "all_grad_tensors"):
            held = getattr(opt, store, None)
            if isinstance(held, dict):
                for k in list(held):
                    held[k] = None
        opt.micro_step_id = getattr(stage, "INITIAL_MICRO_STEP_ID", -1)
    elif callable(getattr(opt, "zero_grad", None)):
        opt.zero_grad(set_to_none=True)
    eng.zero_grad()


def _state_slots(module: Any) -> List[Tuple[str, Any, str, bool]]:
    """(state_dict name, owning module, attribute, is a parameter) for every parameter and persistent buffer
    of `module`, named as in its state_dict (a module reached by two paths is listed under both)."""
    out: List[Tuple[str, Any, str, bool]] = []
    for prefix, mod in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for name, p in mod._parameters.items():
            if p is not None:
                out.append((dot + name, mod, name, True))
        skip = getattr(mod, "_non_persistent_buffers_set", ())
        for name, b in mod._buffers.items():
            if b is not None and name not in skip:
                out.append((dot + name, mod, name, False))
    return out


def _zero3_load(module: Any, weights: Mapping[str, Any], strict: bool) -> Tuple[List[str], List[str]]:
    """Load `weights` into a ZeRO-3 module: names and shapes checked first (as ``load_state_dict`` does, a
    RuntimeError listing what does not fit), then one module's parameters gathered at a time, written on
    every rank and re-partitioned from rank 0's copy (a collective: every rank calls it with the same
    weights).  Returns (missing, unexpected)."""
    import deepspeed
    torch = require_torch("mlutils.train")

    slots = _state_slots(module)
    known = {key for key, _m, _n, _p in slots}
    missing = [key for key, _m, _n, _p in slots if key not in weights]
    unexpected = [key for key in weights if key not in known]
    errors: List[str] = []
    for key, mod, name, is_param in slots:
        if key not in weights:
            continue
        value = weights[key]
        if not isinstance(value, torch.Tensor):
            errors.append(f"{key}: expected a tensor, got {type(value).__name__}")
            continue
        t = mod._parameters[name] if is_param else mod._buffers[name]
        shape = tuple(getattr(t, "ds_shape", t.shape)) if is_param else tuple(t.shape)
        if tuple(value.shape) != shape:
            errors.append(f"size mismatch for {key}: copying a tensor of shape {tuple(value.shape)}, the shape "
                          f"in the module is {shape}")
    if strict and unexpected:
        errors.insert(0, "Unexpected key(s) in state_dict: " + ", ".join(repr(k) for k in unexpected))
    if strict and missing:
        errors.insert(0, "Missing key(s) in state_dict: " + ", ".join(repr(k) for k in missing))
    if errors:
        raise RuntimeError(f"Error(s) in loading state_dict for {type(module).__name__}:\n\t" + "\n\t".join(errors))
    by_module: Dict[int, Tuple[Any, List[Tuple[str, str, bool]]]] = {}
    for key, mod, name, is_param in slots:
        if key in weights:
            by_module.setdefault(id(mod), (mod, []))[1].append((key, name, is_param))
    for mod, entries in by_module.values():
        params = [mod._parameters[name] for _k, name, is_param in entries if is_param]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=bool(params)):
            with torch.no_grad():
                for key, name, is_param in entries:
                    t = mod._parameters[name] if is_param else mod._buffers[name]
                    t.copy_(weights[key])
    return missing, unexpected


class DeepSpeedEngine:
    """An engine for a DeepSpeed engine (what ``deepspeed.initialize`` returns):
    ``loss_fn(engine, batch) -> loss`` or ``(loss, metrics)``, calling
    ``engine(...)`` as the model.

    Precision, loss scaling, clipping, ZeRO stages 0-3 and the scheduler are
    DeepSpeed's, from its config.  ``train_step`` returns ``loss`` (a
    detached tensor, the size-weighted mean over the step's micro-batches),
    ``lr`` (the first param group's, as used by this step) and the
    ``loss_fn``'s metrics.  State lives in DeepSpeed's checkpoint files
    (:meth:`save_files` / :meth:`load_files`); :meth:`state_dict` holds the
    step, the learning rates and the ``lr`` command's value."""

    def __init__(self, engine: Any, loss_fn: Callable[[Any, Any], Any]) -> None:
        import deepspeed

        if not isinstance(engine, deepspeed.DeepSpeedEngine):
            raise TypeError(f"DeepSpeedEngine wraps the engine deepspeed.initialize returns, got "
                            f"{type(engine).__name__}")
        if isinstance(engine, deepspeed.PipelineEngine):
            raise TypeError("a DeepSpeed PipelineEngine steps itself with train_batch(): it cannot be stepped "
                            "micro-batch by micro-batch")
        if engine.optimizer is None:
            raise ValueError("the DeepSpeed engine has no optimizer (give deepspeed.initialize an optimizer or "
                             "an \"optimizer\" section in its config)")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.engine = engine
        self.loss_fn = loss_fn
        managed = getattr(engine, "managed_gradient_accumulation", None)
        # managed (the default): DeepSpeed steps at its accumulation boundary, which this engine sets;
        # unmanaged (managed_gradient_accumulation false): every engine.step() is a boundary
        self._managed = not callable(managed) or bool(managed())
        self._lr: Optional[float] = None  # the last set_lr, kept in state_dict (DeepSpeed's schedulers do not)
        self._checked = False
        self._agree: Optional[Tuple[Any]] = None  # the group the ranks agree on an OOM skip over (made at step 1)
        self._oom_policy: Optional[Tuple[Optional[str], Optional[str]]] = None  # (no agreement, no drop): why

    @property
    def global_step(self) -> int:
        """Optimizer steps done (DeepSpeed's ``global_steps``, restored by its checkpoint)."""
        return int(self.engine.global_steps)

    # ---- steps

    def _micro_batches(self, batch: Any, gas: int) -> List[Any]:
        if isinstance(batch, MicroBatches):
            parts = list(batch)
        else:
            n = _batch_len(batch)
            pieces = min(gas, n) if n > 0 else 1
            parts = _split_batch(batch, pieces, n) if pieces > 1 else [batch]
        if not self._checked:
            self._checked = True
            micro = getattr(self.engine, "train_micro_batch_size_per_gpu", None)
            if isinstance(batch, MicroBatches) and len(parts) != gas:
                log.warning("DeepSpeedEngine: %d micro-batches per step (TrainConfig.accumulate_batches) while "
                            "DeepSpeed's gradient_accumulation_steps is %d: each step is still one optimizer "
                            "step over its micro-batches, but DeepSpeed's sample counters assume %d",
                            len(parts), gas, gas)
            elif (not isinstance(batch, MicroBatches) and gas > 1 and callable(micro)
                  and _batch_len(batch) == int(micro())):
                log.warning("DeepSpeedEngine: a loader batch of %d items (train_micro_batch_size_per_gpu) is cut "
                            "into %d micro-batches (gradient_accumulation_steps); to accumulate loader batches "
                            "instead, set TrainConfig.accumulate_batches=%d", _batch_len(batch), gas, gas)
        return parts

    def _forward(self, batch: Any) -> Tuple[Any, Dict[str, Any]]:
        out = self.loss_fn(self.engine, batch)
        if isinstance(out, tuple):
            loss, metrics = out
            return loss, dict(metrics)
        return out, {}

    def train_step(self, batch: Any) -> Dict[str, Any]:
        """One optimizer step: forward, ``engine.backward`` and ``engine.step`` on each micro-batch, the
        accumulation boundary at the last; returns loss (on the device), lr and the loss_fn's metrics.

        A ``torch.OutOfMemoryError`` in a forward pass (on any rank) drops
        the step's gradients on every rank and is raised on every rank (the
        loop skips the batch, ``TrainConfig.oom="skip"``); see the module
        doc for the out-of-memory errors that are raised as RuntimeError."""
        torch = require_torch("mlutils.train")

        eng = self.engine
        eng.train()
        gas = int(eng.gradient_accumulation_steps())
        parts = self._micro_batches(batch, gas)
        sizes = [_batch_len(p) for p in parts]
        total = sum(sizes)
        last = len(parts) - 1
        no_agreement, no_drop = self._oom_handling()
        several = _several_ranks()
        agree = no_agreement is None and several
        if agree and self._agree is None:  # made once, by every rank at its first step (new_group is a collective)
            from .. import distributed
            from .commands import cpu_group

            self._agree = (cpu_group(distributed.world_size()),)
        start_micro = int(eng.micro_steps)
        out: Dict[str, Any] = {"lr": float(eng.optimizer.param_groups[0]["lr"])}  # this step's, before the scheduler
        loss_sum: Any = 0.0
        extra: Dict[str, Any] = {}
        for i, (part, size) in enumerate(zip(parts, sizes)):
            if self._managed:
                eng.set_gradient_accumulation_boundary(i == last)
            oom: Optional[BaseException] = None
            try:
                loss, metrics = self._forward(_to_device(part, eng.device))
            except torch.OutOfMemoryError as exc:
                oom = exc
            if agree:
                # every rank is here, between this micro-batch's forward and backward passes: no gradient
                # reduction has started, so all of them can leave the step together
                from .. import distributed

                if distributed.any_rank(oom is not None, group=self._agree[0]) and oom is None:  # type: ignore[index]
                    oom = torch.OutOfMemoryError(f"another rank ran out of memory in micro-batch {i + 1} of "
                                                 f"{len(parts)} of this step")
            if oom is not None:
                where = f"micro-batch {i + 1} of {len(parts)}"
                why = no_drop or (no_agreement if several else None)
                if why is not None:
                    raise RuntimeError(f"out of memory in a DeepSpeed step ({where}): the step cannot be skipped, "
                                       f"{why}") from oom
                self._drop_step(start_micro)
                raise oom
            # DeepSpeed divides by G: scaled by G * size / total, each micro-batch weighs its share of
            # the step's items (exactly 1, the loss untouched, for G micro-batches of equal size)
            num, den = (gas * size, total) if total else (gas, len(parts))
            try:
                eng.backward(loss if num == den else loss * (num / den))
                if self._managed or i == last:
                    eng.step()
            except torch.OutOfMemoryError as exc:
                raise RuntimeError(f"out of memory in DeepSpeed's backward pass or optimizer step (micro-batch "
                                   f"{i + 1} of {len(parts)}): the other ranks may be inside its gradient "
                                   f"reductions, so the step cannot be skipped") from exc
            w = size / total if total else 1.0 / len(parts)
            loss_sum = loss_sum + loss.detach() * w
            for k, v in metrics.items():
                v = v.detach() if isinstance(v, torch.Tensor) else v
                extra[k] = extra.get(k, 0.0) + v * w
        out["loss"] = loss_sum
        out.update(extra)
        return out

    def _oom_handling(self) -> Tuple[Optional[str], Optional[str]]:
        """(why the ranks cannot agree on an out-of-memory step, why its gradients cannot be dropped), each
        None when they can; looked up once."""
        if self._oom_policy is None:
            eng = self.engine
            no_agreement: Optional[str] = None
            if eng.zero_optimization_partition_weights():
                no_agreement = "ZeRO-3 gathers parameters inside the forward pass"
            elif getattr(eng, "has_moe_layers", False):
                no_agreement = "MoE layers exchange tokens inside the forward pass"
            elif getattr(eng, "mpu", None) is not None:
                no_agreement = "model parallelism communicates inside the forward pass"
            no_drop: Optional[str] = None
            if _zero12(eng.optimizer) is None and not _plain_optimizer(eng.optimizer):
                no_drop = (f"this engine cannot drop the gradients DeepSpeed's {type(eng.optimizer).__name__} "
                           f"accumulated (it can with ZeRO-1/2 and with a torch optimizer under ZeRO-0)")
            elif getattr(eng, "zenflow", False):
                no_drop = "this engine cannot drop the gradients ZenFlow's selective updates hold"
            self._oom_policy = (no_agreement, no_drop)
        return self._oom_policy

    def _drop_step(self, micro_steps: int) -> None:
        """Drop what the step's micro-batches accumulated and put DeepSpeed's micro-step counters back to
        the step's start (`micro_steps`), so the next step starts at an accumulation boundary."""
        eng = self.engine
        _drop_gradients(eng)
        eng.micro_steps = micro_steps
        if hasattr(eng, "_unmanaged_backward_count"):
            eng._unmanaged_backward_count = 0
        if self._managed:
            eng.set_gradient_accumulation_boundary(True)  # where a completed step leaves it

    def recover_from_oom(self) -> None:
        """After an out-of-memory error in a step: drop the gradients and the accelerator's cache."""
        _drop_gradients(self.engine)
        from deepspeed.accelerator import get_accelerator

        get_accelerator().empty_cache()

    # ---- fine-tuning and the loss scale

    def load_weights(self, weights: Mapping[str, Any], strict: bool = True) -> Tuple[List[str], List[str]]:
        """Load the module's weights (named as in its own state_dict) on every rank and start DeepSpeed's
        fp32 master weights from them (fine-tuning); returns (missing keys, unexpected keys), raises a
        RuntimeError naming them when `strict` (and for a shape that does not fit).

        ZeRO 0-2: the module's ``load_state_dict`` on every rank, then the
        optimizer's ``refresh_fp32_params`` (what DeepSpeed's
        ``load_checkpoint(load_module_only=True)`` does), and under fp16/bf16
        with ZeRO-1/2 each parameter's fp32 master fragment set from the
        given weight itself, so fp32 weights keep their precision.  ZeRO-3:
        one module's parameters gathered at a time (a collective: every rank
        calls it with the same weights) and re-partitioned, then the fp32
        partitions refreshed from them.  Call it before the first step: the
        optimizer's moments are left as they are."""
        torch = require_torch("mlutils.train")

        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping of name -> tensor, got {type(weights).__name__}")
        eng = self.engine
        if eng.zero_optimization_partition_weights():
            missing, unexpected = _zero3_load(eng.module, weights, bool(strict))
        else:
            result = eng.module.load_state_dict(weights, strict=bool(strict))
            missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        refresh = getattr(eng.optimizer, "refresh_fp32_params", None)
        if callable(refresh):
            refresh()
        if not eng.zero_optimization_partition_weights():
            from deepspeed.utils import safe_set_full_fp32_param

            for name, p in eng.module.named_parameters():
                value = weights.get(name)
                if (hasattr(p, "_hp_mapping") and isinstance(value, torch.Tensor)
                        and value.is_floating_point() and value.dtype != p.dtype
                        and torch.finfo(value.dtype).bits > torch.finfo(p.dtype).bits):
                    # the master fragment from the weight itself, not from its 16-bit copy
                    safe_set_full_fp32_param(p, value.to(p.device, torch.float32))
        return missing, unexpected

    def set_loss_scale(self, scale: float) -> None:
        """Set DeepSpeed's fp16 loss scale (the dynamic scaler goes on from it; a static one keeps it);
        ValueError when the engine has no loss scaler (bf16 and fp32 train without one)."""
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"the loss scale must be a finite number > 0, got {scale!r}")
        eng = self.engine
        grad_scaler = getattr(eng, "torch_autocast_z0_gradscaler", None)
        if grad_scaler is not None:  # torch autocast under ZeRO-0: a torch GradScaler
            if getattr(grad_scaler, "_scale", None) is None:
                grad_scaler._init_scale = scale
            else:
                grad_scaler.update(new_scale=scale)
            return
        if not eng.fp16_enabled():
            raise ValueError("this DeepSpeed engine has no loss scaler: its config does not enable fp16 (bf16 "
                             "and fp32 train without loss scaling)")
        opt = eng.optimizer
        config = getattr(opt, "loss_scale_config", None)  # the fp16 optimizers of ZeRO-0
        if config is not None and hasattr(config, "cur_scale"):
            config.cur_scale = scale
        else:
            scaler = getattr(opt, "loss_scaler", None)  # ZeRO 1-3
            if scaler is None or not hasattr(scaler, "cur_scale"):
                raise ValueError(f"the DeepSpeed optimizer {type(opt).__name__} has no loss scaler this engine "
                                 f"can set")
            scaler.cur_scale = scale
        if getattr(opt, "custom_loss_scaler", False):  # a scale set with override_loss_scale wins: this one now
            opt.external_loss_scale = scale

    # ---- the learning rate

    def _set_schedule(self, lr: float) -> bool:
        """Move the scheduler's peak to `lr` (so that it keeps it); False when it has none this knows."""
        torch = require_torch("mlutils.train")

        sched = self.engine.lr_scheduler
        if sched is None:
            return True
        n = len(self.engine.optimizer.param_groups)
        from deepspeed.runtime import lr_schedules

        cosine = getattr(lr_schedules, "WarmupCosineLR", None)  # DeepSpeed 0.14 may lack it
        if isinstance(sched, torch.optim.lr_scheduler.LRScheduler):
            sched.base_lrs = [lr] * len(sched.base_lrs)
        elif isinstance(sched, lr_schedules.WarmupLR):  # and WarmupDecayLR
            sched.max_lrs = [lr] * n
            sched.delta_lrs = [big - small for big, small in zip(sched.max_lrs, sched.min_lrs)]
        elif cosine is not None and isinstance(sched, cosine):
            sched.org_lrs = [lr] * n
        else:
            return False
        return True

    def set_lr(self, lr: float) -> None:
        """Every param group's lr in DeepSpeed's optimizer, and the scheduler's peak (torch schedulers'
        base lrs, WarmupLR's and WarmupDecayLR's max lr, WarmupCosineLR's lr) so the schedule keeps the new
        scale.  OneCycle and LRRangeTest set the lr from their own bounds at each step: a warning says so."""
        lr = float(lr)
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
            if "initial_lr" in g:
                g["initial_lr"] = lr
        if not self._set_schedule(lr):
            log.warning("lr: the DeepSpeed scheduler %s sets the learning rate from its own bounds at each step; "
                        "%s holds only until its next step", type(self.engine.lr_scheduler).__name__, lr)
        self._lr = lr

    # ---- state

    def state_dict(self) -> Dict[str, Any]:
        """The step, the param groups' learning rates and the ``lr`` command's value; the rest is in
        DeepSpeed's files (:meth:`save_files`)."""
        return {"global_step": self.global_step, "lrs": [float(g["lr"]) for g in self.engine.optimizer.param_groups],
                "lr_set": self._lr}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """After :meth:`load_files`: check that DeepSpeed's files are of the same step, put back the
        learning rates (DeepSpeed's schedulers do not save their bounds)."""
        step = int(state["global_step"])
        if step != self.global_step:
            raise CheckpointError(f"DeepSpeed's checkpoint files are of step {self.global_step}, the rank file of "
                                  f"step {step}: load_files(<step folder>/<engine>) must come first")
        groups = self.engine.optimizer.param_groups
        lrs = list(state["lrs"])
        if len(lrs) != len(groups):
            raise CheckpointError(f"the checkpoint has learning rates for {len(lrs)} param groups, the optimizer "
                                  f"has {len(groups)}")
        lr_set = state.get("lr_set")
        if lr_set is not None:
            self._set_schedule(float(lr_set))
        self._lr = None if lr_set is None else float(lr_set)
        for g, lr in zip(groups, lrs):
            g["lr"] = float(lr)

    def has_files(self) -> bool:
        """True: DeepSpeed's state is in its checkpoint files."""
        return True

    def save_files(self, folder: str) -> None:
        """``engine.save_checkpoint(folder, tag="state")`` on every rank (a collective), without DeepSpeed's
        ``latest`` file, then fsynced.

        ``<folder>/state/`` gets ``mp_rank_00_model_states.pt`` (module,
        scheduler, counters; written by one rank) and one
        ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank (ZeRO
        partitions); ``<folder>`` gets DeepSpeed's ``zero_to_fp32.py``
        (``python zero_to_fp32.py <folder> <out> --tag state`` makes full fp32
        weights).  DeepSpeed writes each file in place (no temporary file, no
        fsync): what an earlier attempt left in `folder` is removed first, and
        every file is fsynced here before the loop writes its rank files, the
        marks of a complete checkpoint.  A decoupled (asynchronous) DeepSpeed
        checkpoint writer is waited for."""
        from .. import distributed

        eng = self.engine
        node_local = bool(getattr(eng, "use_node_local_storage", lambda: False)())
        rank = distributed.local_rank() if node_local else distributed.global_rank()
        world = distributed.local_world_size() if node_local else distributed.world_size()
        if rank == 0 and os.path.lexists(folder):
            # a write of this step cut short before; the other ranks write only after save_checkpoint's barrier
            shutil.rmtree(folder)
        eng.save_checkpoint(folder, tag=CHECKPOINT_TAG, save_latest=False)
        ckpt_engine = getattr(eng, "checkpoint_engine", None)
        if ckpt_engine is not None and getattr(ckpt_engine, "is_decoupled", lambda: False)():
            commit = getattr(eng, "_commit_decoupled_checkpoint", None)
            if not callable(commit):
                raise CheckpointError("the DeepSpeed checkpoint writer is decoupled and this DeepSpeed has no "
                                      "way to wait for it")
            commit()
        _fsync_tree(folder, rank, max(world, 1))

    def load_files(self, folder: str) -> None:
        """``engine.load_checkpoint(folder, tag="state")`` on every rank: module, optimizer, scheduler and
        step; CheckpointError when `folder` holds no DeepSpeed checkpoint."""
        tag_dir = os.path.join(folder, CHECKPOINT_TAG)
        if not os.path.isdir(tag_dir):
            raise CheckpointError(f"{folder} holds no DeepSpeed checkpoint (no {CHECKPOINT_TAG}/ folder)")
        path, _client = self.engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {tag_dir}")

    # ---- weights

    def export(self) -> Dict[str, Any]:
        """The module's weights as contiguous CPU copies named as in its state_dict (no ``module.``
        prefix): with ZeRO 0-2 its state_dict on every rank; with ZeRO-3 gathered one module at a time (a
        collective), returned on the global leader and empty elsewhere.  These are the weights the model
        computes with (16-bit under fp16/bf16; the fp32 master weights are in the checkpoint files)."""
        from .. import distributed

        eng = self.engine
        if eng.zero_optimization_partition_weights():
            return _zero3_state_dict(eng.module, distributed.is_global_leader())
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in eng.module.state_dict().items()}

    def quit(self) -> None:
        """Nothing to release: the DeepSpeed engine stays usable (its ``destroy()`` is the caller's)."""
