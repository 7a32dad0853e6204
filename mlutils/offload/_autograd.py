"""The autograd-function form of offloaded checkpointing (torch only).

:class:`OffloadedCheckpoint` (and ``Unsloth_Offloaded_Gradient_Checkpointer``,
its form with the original's signature, which ``mlutils.unsloth`` gives)
are defined at module level, as torch's own autograd Functions are; this
module imports torch, so the package imports it when one of its names is
first asked for (``mlutils.offload``'s module ``__getattr__``), and
``import mlutils.offload`` works without torch.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch

from ._checkpoint import _MODIFIED, _PackedInput, _register, _unregister_and_prefetch_previous
from ._engine import _check_compress, _check_count, _has_engine, get_engine

_CHECKPOINT_OPTIONS = {"compress": None, "min_bytes": 0, "preserve_rng_state": True}


def _checkpoint_options(options: Any) -> Dict[str, Any]:
    """OffloadedCheckpoint's options with their defaults filled in and checked
    (TypeError for a non-dict or an unknown key, ValueError for a bad value)."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"OffloadedCheckpoint: options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(_CHECKPOINT_OPTIONS), key=str)
    if unknown:
        raise TypeError(f"OffloadedCheckpoint: unknown option(s) {unknown}; known: {sorted(_CHECKPOINT_OPTIONS)}")
    out = dict(_CHECKPOINT_OPTIONS, **options)
    out["compress"] = _check_compress(out["compress"])
    _check_count(out["min_bytes"], "OffloadedCheckpoint: min_bytes")
    return out


def _autocast_state() -> List[Tuple[str, bool, Any]]:
    out = []
    for dev in ("cuda", "cpu"):
        try:
            out.append((dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)))
        except (RuntimeError, AttributeError):  # pragma: no cover - older torch
            pass
    return out


@contextlib.contextmanager
def _restored_autocast(state: List[Tuple[str, bool, Any]], cache: bool) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for dev, enabled, dtype in state:
            stack.enter_context(torch.autocast(device_type=dev, enabled=enabled, dtype=dtype, cache_enabled=cache))
        yield


def _cuda_devices(tensors: List[Any]) -> List[int]:
    return sorted({t.device.index for t in tensors if t.device.type == "cuda"})


class OffloadedCheckpoint(torch.autograd.Function):
    """forward(ctx, forward_function, options, hidden_states, *args): runs
    forward_function(hidden_states, *args) without a graph, keeping only an
    offloaded copy of hidden_states; backward reloads it, reruns the
    function with gradients (same RNG and autocast state) and backpropagates."""

    @staticmethod
    def forward(ctx: Any, forward_function: Callable, options: Dict[str, Any], hidden_states: Any, *args: Any) -> Any:
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"OffloadedCheckpoint: hidden_states must be a tensor, got {type(hidden_states).__name__}")
        ctx.forward_function = forward_function
        ctx.options = options = _checkpoint_options(options)
        ctx.hs_requires_grad = hidden_states.requires_grad
        tensor_idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        if not ctx.hs_requires_grad and not any(args[i].requires_grad for i in tensor_idx):
            warnings.warn("OffloadedCheckpoint: none of the inputs requires grad, so the function's parameters "
                          "get no gradients from it (offload_checkpoint gives them theirs)", stacklevel=3)
        ctx.tensor_idx = tensor_idx
        ctx.others = [None if i in tensor_idx else a for i, a in enumerate(args)]
        ctx.done = False
        ctx.handle = ctx.packed = None
        if _has_engine(hidden_states):
            eng = get_engine(hidden_states.device)
            ctx.handle = eng.offload(hidden_states, compress=options["compress"], min_bytes=options["min_bytes"])
            _register(ctx.handle)
            ctx.packed = _PackedInput(ctx.handle, hidden_states)  # its version, checked at backward
            ctx.save_for_backward(*[args[i] for i in tensor_idx])
        else:  # no engine for its device (meta, ...): kept as a saved tensor
            ctx.save_for_backward(hidden_states, *[args[i] for i in tensor_idx])
        ctx.autocast = _autocast_state()
        ctx.autocast_cache = torch.is_autocast_cache_enabled()
        ctx.rng = None
        if options["preserve_rng_state"]:
            devs = _cuda_devices([hidden_states] + [args[i] for i in tensor_idx])
            ctx.rng = (torch.get_rng_state(), devs, [torch.cuda.get_rng_state(d) for d in devs])
        with torch.no_grad():
            out = forward_function(hidden_states, *args)
        if ctx.packed is not None and ctx.packed.modified():
            raise RuntimeError(_MODIFIED)  # by the function itself: the copy may have raced it on a GPU
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("offload_checkpoint does not support torch.autograd.grad(); "
                               "use .backward() (or torch.utils.checkpoint with use_reentrant=False)")
        if ctx.done:
            raise RuntimeError("offload_checkpoint: backward ran twice through the same checkpoint; "
                               "retain_graph=True is not supported")
        handle, packed = ctx.handle, ctx.packed
        if packed is not None and packed.modified():
            raise RuntimeError(_MODIFIED)
        saved = ctx.saved_tensors
        ctx.done = True
        if handle is not None:
            hidden = handle.reload()
            ctx.handle = ctx.packed = None
            _unregister_and_prefetch_previous(handle)
            handle.release()
        else:
            hidden, saved = saved[0], saved[1:]
        hidden = hidden.detach().requires_grad_(ctx.hs_requires_grad)
        args = list(ctx.others)
        for i, t in zip(ctx.tensor_idx, saved):
            args[i] = t.detach().requires_grad_(t.requires_grad)
        rng = ctx.rng
        devs = rng[1] if rng is not None else []
        with torch.random.fork_rng(devices=devs, enabled=rng is not None):
            if rng is not None:
                torch.set_rng_state(rng[0])
                for d, s in zip(devs, rng[2]):
                    torch.cuda.set_rng_state(s, d)
            with torch.enable_grad(), _restored_autocast(ctx.autocast, ctx.autocast_cache):
                out = ctx.forward_function(hidden, *args)
        outs = out if isinstance(out, tuple) else (out,)
        tensors, grad_tensors = [], []
        for o, g in zip(outs, grads):
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None:
                tensors.append(o)
                grad_tensors.append(g)
        if tensors:
            torch.autograd.backward(tensors, grad_tensors)
        arg_grads = [None] * len(args)
        for i in ctx.tensor_idx:
            arg_grads[i] = args[i].grad if args[i].requires_grad else None
        ctx.forward_function = None
        return (None, None, hidden.grad if ctx.hs_requires_grad else None, *arg_grads)


class Unsloth_Offloaded_Gradient_Checkpointer(torch.autograd.Function):
    """forward(ctx, forward_function, hidden_states, *args): the original's
    name and signature (``mlutils.unsloth`` gives it under that name):
    OffloadedCheckpoint with the default options."""

    @staticmethod
    def forward(ctx: Any, forward_function: Any, hidden_states: Any, *args: Any) -> Any:
        return OffloadedCheckpoint.forward(ctx, forward_function, dict(_CHECKPOINT_OPTIONS), hidden_states, *args)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        return OffloadedCheckpoint.backward(ctx, *grads)[1:]
