"""Collectives over ``torch.distributed``: :func:`barrier`, :func:`broadcast_object`,
:func:`any_rank`, :func:`all_ranks`, and the failure-carrying helpers under them."""
from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any, Callable, Optional

from .._torch import require_torch
from ._env import _dist_if_initialized, _import_torch_dist, _launcher_env
from ._errors import DistributedError

if TYPE_CHECKING:
    import torch

def _on_cuda(dist, group: Any = None) -> bool:
    backend = str(dist.get_backend(group))
    return backend == "nccl"


def _device(dist, group: Any = None) -> torch.device:
    """Where the tensors of a collective over ``group`` live: the current CUDA device under NCCL, else the CPU."""
    torch = require_torch("a collective")

    return torch.device("cuda", torch.cuda.current_device()) if _on_cuda(dist, group) else torch.device("cpu")


def _group_for(what: str):
    """``torch.distributed`` when collectives must run, None for one process; raises when world>1 but not set up."""
    dist = _dist_if_initialized()
    if dist is not None:
        return dist
    world = _launcher_env().world_size
    if world == 1:
        return None
    _import_torch_dist(what)
    raise DistributedError(
        f"{what}: the environment says {world} processes but torch.distributed is not initialised; "
        "call mlutils.distributed.init_distributed() first")


def barrier() -> None:
    """Wait until every rank gets here (no-op for one process)."""
    dist = _group_for("barrier")
    if dist is None:
        return
    if _on_cuda(dist):
        torch = require_torch("barrier")
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


# A collective whose input is made on one rank (pickled, asked of NCCL, ...) can
# fail there before anything is sent.  That rank must still take part, saying
# that it failed, or every other rank waits out the whole process-group
# timeout (or, worse, pairs with the next collective): so the failure travels
# in the same collectives as the answer and every rank raises at once.

_SENT, _FAILED = 1, 2  # header of _broadcast_bytes: the payload is the bytes / the error's text
_ERROR_TEXT_MAX = 2000


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= _ERROR_TEXT_MAX else text[:_ERROR_TEXT_MAX] + "..."


def _broadcast_bytes(dist, produce: Callable[[], bytes], src: int, group: Any, what: str, failure: str) -> bytes:
    """``produce()`` run on global rank ``src`` only, its bytes returned on every rank of ``group``.

    The source runs ``produce`` first, then broadcasts a header (sent or
    failed, length) and the payload: the bytes, or the text of produce's
    exception.  When produce fails every rank raises :class:`DistributedError`
    ("{what}: rank {src} {failure}: {error}"; on the source the exception is
    chained), and the group stays in step.
    """
    torch = require_torch(what)

    device = _device(dist, group)
    is_src = dist.get_rank() == src
    error: Optional[Exception] = None
    payload = b""
    header = torch.zeros(2, dtype=torch.int64)
    if is_src:
        try:
            payload = bytes(produce())
            header[0] = _SENT
        except Exception as e:  # anything produce raises is reported to every rank
            error = e
            payload = _error_text(e).encode("utf-8", "replace")
            header[0] = _FAILED
        header[1] = len(payload)
    header = header.to(device)
    dist.broadcast(header, src=src, group=group)
    status, length = (int(v) for v in header.tolist())
    if status not in (_SENT, _FAILED) or length < 0:
        raise DistributedError(
            f"{what}: rank {src} sent no header of this call (read {status}, {length}); "
            "do all ranks call the same collectives in the same order?")
    if length:
        if is_src:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        else:
            data = torch.empty(length, dtype=torch.uint8, device=device)
        dist.broadcast(data, src=src, group=group)
        if not is_src:
            payload = data.cpu().numpy().tobytes()
    if status == _FAILED:
        raise DistributedError(f"{what}: rank {src} {failure}: {payload.decode('utf-8', 'replace')}") from error
    return payload


def _agree(dist, group: Any, error: Optional[BaseException], what: str, failure: str,
           exc_type: Optional[type] = None) -> None:
    """Raise on every rank of ``group`` when ``error`` is set on any of them (one all_reduce).

    The message names the lowest failing global rank ("{what}: {failure} on
    rank N"), with this rank's own error when it failed (chained).
    """
    torch = require_torch(what)

    exc_type = exc_type or DistributedError
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([world - rank if error is not None else 0], dtype=torch.int64, device=_device(dist, group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    failed = int(t.item())
    if failed:
        msg = f"{what}: {failure} on rank {world - failed}"
        if error is not None:
            msg += f" (on this rank, {rank}: {_error_text(error)})"
        raise exc_type(msg) from error


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (pickled; identity for one process).

    An object that cannot be pickled raises :class:`DistributedError` on every
    rank at once, naming ``src`` and pickle's error (chained on ``src``).
    """
    if isinstance(src, bool) or not isinstance(src, int):
        raise TypeError(f"broadcast_object: src must be an int rank, got {type(src).__name__}")
    dist = _group_for("broadcast_object")
    world = 1 if dist is None else dist.get_world_size()
    if not 0 <= src < world:
        raise ValueError(f"broadcast_object: src={src} is not a rank of a world of {world}")
    if dist is None:
        return obj
    rank = dist.get_rank()
    payload = _broadcast_bytes(dist, lambda: pickle.dumps(obj), src, None,
                               "broadcast_object", "could not pickle the object")
    if rank == src:
        return obj
    try:
        return pickle.loads(payload)
    except Exception as e:
        raise DistributedError(
            f"broadcast_object: the object from rank {src} could not be unpickled on rank {rank}: "
            f"{_error_text(e)}") from e


def _reduce_flag(flag: Any, what: str, maximum: bool, group: Any = None) -> bool:
    dist = _group_for(what)
    if dist is None:
        return bool(flag)
    torch = require_torch(what)

    error: Optional[Exception] = None
    try:
        value = bool(flag)
    except Exception as e:  # e.g. a tensor or array of several elements: reported to every rank
        error, value = e, False
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # One all_reduce(MAX) of [witness, failure]: any_rank is the MAX of the
    # flags, all_ranks the negation of the MAX of their negations; the failure
    # is world - rank on a failing rank, so its MAX names the lowest of them.
    witness = value if maximum else not value
    t = torch.tensor([1 if witness else 0, world - rank if error is not None else 0],
                     dtype=torch.int32, device=_device(dist, group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    seen, failed = (int(v) for v in t.tolist())
    if failed:
        msg = f"{what}: the flag on rank {world - failed} has no truth value"
        if error is not None:
            msg += f" (on this rank, {rank}: {_error_text(error)})"
        raise DistributedError(msg) from error
    return bool(seen) if maximum else not seen


def any_rank(flag: Any, group: Any = None) -> bool:
    """Logical OR of ``flag`` over all ranks (e.g. "some rank asked to stop"); over `group` when given (a
    gloo group on the CPU keeps the agreement off the GPU: no device sync)."""
    return _reduce_flag(flag, "any_rank", True, group)


def all_ranks(flag: Any, group: Any = None) -> bool:
    """Logical AND of ``flag`` over all ranks (of `group` when given)."""
    return _reduce_flag(flag, "all_ranks", False, group)
