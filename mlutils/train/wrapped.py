"""Model and optimizer state across the wrappers users grow into: a plain module, DDP, FSDP1, FSDP2
(``fully_shard``) and ``torch.compile``, all through ``torch.distributed.checkpoint.state_dict``
(``get_state_dict`` / ``set_state_dict``), the one API torch offers for every wrapper.  Sharded state
(DTensors, FSDP1) goes to a ``torch.distributed.checkpoint`` (DCP) folder, each rank writing its own
shards; replicated state (DDP) is written by the global leader only."""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

from .._torch import require_torch

__all__ = ["kind", "model_optim_state", "load_model_optim_state", "save_sharded", "background_saves", "ShardedSaver", "load_sharded",
           "full_weights", "clip_grad_norm"]


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor
        return False
    return isinstance(t, DTensor)


def kind(model: Any) -> str:
    """'fsdp1', 'fsdp2' (DTensor parameters: fully_shard, or tensor parallel), 'ddp', 'compiled' or 'plain'."""
    torch = require_torch("mlutils.train")

    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover  (torch built without distributed)
        FullyShardedDataParallel = ()  # type: ignore[assignment,misc]
    if isinstance(model, FullyShardedDataParallel):
        return "fsdp1"
    if any(_is_dtensor(p) for p in model.parameters()):
        return "fsdp2"
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        return "ddp"
    return "compiled" if inner is not model else "plain"


def model_optim_state(model: Any, optimizer: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model, optimizer) state dicts with the model's own names (no ``module.`` or ``_orig_mod.``), as
    ``get_state_dict`` gives them (sharded when the model is)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def load_model_optim_state(model: Any, optimizer: Any, model_state: Dict[str, Any], optim_state: Dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def save_sharded(model: Any, optimizer: Any, folder: str) -> None:
    """Each rank writes its shards of model and optimizer into the DCP folder `folder` (a collective)."""
    import torch.distributed.checkpoint as dcp

    msd, osd = model_optim_state(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=folder)


def background_saves() -> bool:
    """True when this torch stages DCP saves in the background (``DefaultStager``, torch 2.9 and later)."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa: F401
    except ImportError:
        return False
    import torch

    return hasattr(torch, "accelerator")


class ShardedSaver:
    """Background saves of a sharded model and optimizer: the state is staged into host buffers kept
    between saves by DCP's ``DefaultStager``, in its own thread (the device-to-host copy leaves the
    training thread too; FSDP1's ShardedTensors by DCP's ``BlockingAsyncStager``, on the training
    thread), and written by ``dcp.save`` in the caller's writer thread, its collectives on
    a gloo group of their own so they never interleave with the training's.  This is what
    ``dcp.async_save`` does, without starting a thread for each save.

    :meth:`save` returns the write to run off the training thread (it returns once every rank's part
    and DCP's ``.metadata`` are on disk: DCP's last collective follows them); :meth:`settle` waits until
    the staged copy is taken, after which the model and optimizer may change again."""

    def __init__(self) -> None:
        self._stager: Any = None
        self._group: Any = None
        self._staging: Any = None

    def save(self, model: Any, optimizer: Any, folder: str) -> Callable[[], None]:
        torch = require_torch("mlutils.train")
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from concurrent.futures import Future

        from torch.distributed.checkpoint.staging import BlockingAsyncStager, DefaultStager, StagingOptions

        self.settle()
        if self._group is None and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # a collective: every rank saves at the same step
        device = torch.accelerator.is_available() and any(p.device.type != "cpu" for p in model.parameters())
        if self._stager is None:
            if kind(model) == "fsdp1":
                # FSDP1's ShardedTensors are staged by the blocking stager only (DefaultStager cannot copy
                # them): the copy runs on the training thread, the write still in the background
                self._stager = BlockingAsyncStager(cache_staged_state_dict=bool(device and torch.cuda.is_available()))
            else:
                self._stager = DefaultStager(StagingOptions(use_pinned_memory=device and torch.cuda.is_available(),
                                                            use_shared_memory=False, use_async_staging=True,
                                                            use_non_blocking_copy=device))
        msd, osd = model_optim_state(model, optimizer)
        if device:
            # DefaultStager copies on a stream of its own, which does not wait for the kernels still queued
            # on the training's stream (the last optimizer step): make it wait for them, on the device
            stream = getattr(self._stager, "_staging_stream", None)
            if stream is not None:
                stream.wait_stream(torch.accelerator.current_stream())
            else:
                torch.accelerator.synchronize()
        staged = self._stager.stage({"model": msd, "optimizer": osd})  # a Future when staged in the background
        if isinstance(staged, Future):
            self._staging = staged
        group = self._group

        def write() -> None:
            state = staged.result() if isinstance(staged, Future) else staged
            dcp.save(state, checkpoint_id=folder, process_group=group)

        return write

    def settle(self) -> None:
        """Wait until the state being saved is copied out (the model and optimizer may change after).  A
        failed copy is not raised here: the write raises it, for the checkpointer to report."""
        from concurrent.futures import wait

        staging, self._staging = self._staging, None
        if staging is not None:
            wait([staging])

    def close(self) -> None:
        """Release the staging buffers and thread (after the last write completed)."""
        self.settle()
        if self._stager is not None:
            self._stager.close()
            self._stager = None


def load_sharded(model: Any, optimizer: Any, folder: str, partial: bool = False) -> None:
    """Load a DCP folder (ours or one written by plain ``dcp.save`` of ``{"model": ..., "optimizer": ...}``)
    into this rank's shards, resharding as DCP does when the world size differs; `partial`: a folder
    without the optimizer (or with fewer keys) loads what it has."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    msd, osd = model_optim_state(model, optimizer)
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=folder, planner=DefaultLoadPlanner(allow_partial_load=partial))
    load_model_optim_state(model, optimizer, state["model"], state["optimizer"])


def is_dcp_folder(folder: str) -> bool:
    """True for a torch.distributed.checkpoint folder (its ``.metadata`` file)."""
    import os

    return os.path.isfile(os.path.join(folder, ".metadata"))


def full_weights(model: Any) -> Dict[str, Any]:
    """The model's full weights as contiguous CPU tensors with its own names; gathered (a collective for a
    sharded model), given to the global leader only (other ranks get an empty dict then)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload gathers to the leader only; it is for device tensors (on CPU tensors FSDP1 crashes with it)
    offload = kind(model) in ("fsdp1", "fsdp2") and any(p.device.type != "cpu" for p in model.parameters())
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def clip_grad_norm(model: Any, max_norm: float) -> Any:
    """Clip the global gradient norm and return it, the same on every rank: FSDP1 by its own method, DTensor
    gradients (FSDP2) by torch's clipping over DTensors, the norm made a full tensor."""
    torch = require_torch("mlutils.train")

    if kind(model) == "fsdp1":
        return model.clip_grad_norm_(max_norm).detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if _is_dtensor(norm):
        norm = norm.full_tensor()
    return norm.detach()
