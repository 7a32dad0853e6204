"""The default process group: :func:`init_distributed`, :func:`cleanup_distributed`, :func:`ddp_model`."""
from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Union

from .._torch import optional_torch
from ._collectives import _on_cuda, barrier
from ._env import _dist_if_initialized, _import_torch_dist, _int_var, _launcher_env, _slurm_master, local_rank
from ._errors import DistributedError, DistributedTimeoutError

if TYPE_CHECKING:
    import torch

_STATE: Dict[str, Any] = {"ran": False, "backend": None}


def _as_timedelta(timeout: Union[float, int, timedelta, None]) -> Optional[timedelta]:
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be seconds (float) or a timedelta, got {type(timeout).__name__}")
    else:
        seconds = float(timeout)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
    return timedelta(seconds=seconds)


def _cuda_usable(torch: ModuleType) -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - a broken driver counts as no CUDA
        return False


def _set_device(torch: ModuleType) -> None:
    if _cuda_usable(torch):
        count = torch.cuda.device_count()
        lr = local_rank()
        if lr >= count:
            raise DistributedError(
                f"local rank {lr} has no CUDA device: this node shows {count} device(s) "
                "(start at most that many processes per node, or set CUDA_VISIBLE_DEVICES)")
        torch.cuda.set_device(lr)


def init_distributed(fn: Optional[Callable] = None, *args: Any,
                     timeout: Union[float, timedelta, None] = None, **kwargs: Any) -> Any:
    """Initialise ``torch.distributed`` from the launcher's environment.

    Without ``fn``: one process with no MASTER_ADDR is a no-op (the collectives
    here are then identities); otherwise the default process group is made with
    NCCL when CUDA is usable (after ``torch.cuda.set_device(local_rank())``),
    gloo on CPU, through ``env://`` (MASTER_ADDR, MASTER_PORT; under SLURM the
    unset ones are first set as :func:`fix_unset_envs` does).  Already
    initialised: nothing is done.  ``timeout`` (seconds or timedelta) bounds the
    rendezvous and every later collective; a rank that never arrives raises
    :class:`DistributedTimeoutError`.

    With ``fn`` (e.g. ``deepspeed.init_distributed``): set the CUDA device to
    the local rank and return ``fn(*args, **kwargs)``; a given ``timeout`` is
    passed on as ``timeout=timedelta``.
    """
    td = _as_timedelta(timeout)
    if fn is not None:
        if not callable(fn):
            raise TypeError(f"init_distributed: fn must be callable, got {type(fn).__name__}")
        torch = optional_torch()
        if torch is not None:
            _set_device(torch)
        if td is not None:
            kwargs["timeout"] = td
        result = fn(*args, **kwargs)
        _STATE["ran"] = True
        return result

    if _dist_if_initialized() is not None:
        _STATE["ran"] = True
        return None
    env = _launcher_env()
    launcher, rank, world = env.launcher, env.rank, env.world_size
    os.environ.update(_slurm_master(world))
    master_addr = os.environ.get("MASTER_ADDR", "").strip()
    if world == 1 and not master_addr:
        _STATE["ran"] = True
        return None
    torch, dist = _import_torch_dist("init_distributed")
    if not master_addr or not os.environ.get("MASTER_PORT", "").strip():
        raise DistributedError(
            f"init_distributed: {world} processes ({launcher}) but MASTER_ADDR/MASTER_PORT are not set; "
            "torchrun sets them; under SLURM they come from SLURM_JOB_NODELIST and SLURM_JOB_ID, "
            "else export them in the job script, e.g. "
            "MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1) MASTER_PORT=29500")
    port = _int_var("MASTER_PORT", 0, 65535)
    if port == 0 and world > 1:
        raise ValueError(
            f"environment variable MASTER_PORT=0 lets rank 0 listen on any port, which the other {world - 1} "
            "rank(s) cannot know: set the same fixed port (e.g. 29500) on every rank")
    _set_device(torch)
    backend = "nccl" if _cuda_usable(torch) else "gloo"
    extra = {} if td is None else {"timeout": td}
    where = f"{master_addr}:{port}"
    start = time.monotonic()
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, **extra)
    except Exception as e:  # torch raises DistStoreError, RuntimeError, ValueError ...
        elapsed = time.monotonic() - start
        # torch appends a C++ stack trace to some messages: keep its first line.
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        timed_out = "timed out" in text.lower() or "timeout" in text.lower() or (
            td is not None and elapsed >= 0.9 * td.total_seconds())
        if timed_out:
            limit = f"{td.total_seconds():g} s" if td is not None else "the default timeout"
            raise DistributedTimeoutError(
                f"init_distributed: rank {rank} of {world} did not meet the other ranks at {where} "
                f"within the timeout of {limit} (waited {elapsed:.1f} s; is every rank started "
                f"with the same MASTER_ADDR/MASTER_PORT?): {text}") from e
        raise DistributedError(
            f"init_distributed: {backend} process group for rank {rank} of {world} at {where} failed: {text}") from e
    _STATE["ran"] = True
    _STATE["backend"] = backend
    return None


def distributed_initialized() -> bool:
    """True when ``torch.distributed`` has a default process group now."""
    return _dist_if_initialized() is not None


def cleanup_distributed() -> None:
    """Barrier, then destroy the default process group; safe to call twice or after a failed init."""
    dist = _dist_if_initialized()
    if dist is None:
        return
    try:
        barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _STATE["backend"] = None


def ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """Wrap in DistributedDataParallel when initialised with more than one process, else return ``model``."""
    dist = _dist_if_initialized()
    if dist is None or dist.get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if _on_cuda(dist):
        kwargs.setdefault("device_ids", [local_rank()])
    return DistributedDataParallel(model, **kwargs)
