"""Activation offload: offloaded gradient checkpointing and saved-tensor offload.

The engine is C/CUDA (``csrc/cuda/offload.cu``): pinned host buffers from a
size-classed, capped pool reused across steps, one device-to-host and one
host-to-device copy stream, and events that order the copies against the
caller's stream (an offload never makes the compute stream wait; a reload is
complete before any kernel queued after it on the caller's stream reads it).
CPU tensors go through the same Python logic with a CPU engine that copies
into pooled host buffers, so everything here also runs without a GPU.

* :func:`offload_checkpoint`: the original's offloaded gradient
  checkpointing, as torch's non-reentrant checkpoint whose saved copy of the
  hidden states lives in host memory (backward reloads it, prefetching the
  previous block's, and recomputes only as far as backward needs).
* :class:`OffloadedCheckpoint`: the original's autograd-function form
  (``mlutils.unsloth``): forward keeps an offloaded copy of the hidden
  states, backward reloads them and reruns the whole function.
* :func:`enable_offloaded_gradient_checkpointing`: installs it as a Hugging
  Face style model's checkpointing function (:func:`install_offloaded_checkpointing`
  on a model whose checkpointing is on already).
* :func:`offload_saved_tensors`: a context manager offloading every tensor
  autograd saves (the shape of ``torch.autograd.graph.save_on_cpu``).

One concept per module; this one only gathers the public names:

* ``_engine``: the engine interface (OffloadEngine, OffloadHandle, the
  engines shared by device), over a backend chosen once per engine:
* ``_cuda``: the C/CUDA engine;  ``_cpu``: pooled host buffers, packing with
  torch ops in the layout the kernels use (``csrc/core/offload_layout.h``);
* ``_checkpoint``: offload_checkpoint, and the registry through which the
  backward of a checkpoint prefetches the one saved before it;
* ``_saved``: offload_saved_tensors;  ``_hf``: Hugging Face style models;
* ``_autograd``: the autograd Functions, the one module that imports torch,
  imported when one of them is first asked for.

PyTorch is imported when a function needs it, never at import.
"""
from __future__ import annotations

from typing import Any

from ..utils import _torch
from ._checkpoint import offload_checkpoint
from ._engine import (
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_MIN_BYTES,
    CudaOffloadEngine,  # noqa: F401 - the raw engines, as before
    HostPool,  # noqa: F401
    OffloadEngine,
    OffloadHandle,
    OffloadPoolFullError,
    compression_error,
    get_engine,
    set_max_inflight,
    set_pool_limit,
)
from ._hf import (
    _HFCheckpointFunc,  # noqa: F401 - models pickled before offload was a package name it here
    disable_offloaded_gradient_checkpointing,
    enable_offloaded_gradient_checkpointing,
    install_offloaded_checkpointing,
)
from ._saved import offload_saved_tensors

__all__ = [
    "OffloadEngine",
    "OffloadHandle",
    "OffloadPoolFullError",
    "get_engine",
    "offload_checkpoint",
    "enable_offloaded_gradient_checkpointing",
    "disable_offloaded_gradient_checkpointing",
    "install_offloaded_checkpointing",
    "offload_saved_tensors",
    "compression_error",
    "DEFAULT_MIN_BYTES",
    "DEFAULT_MAX_INFLIGHT",
    "set_pool_limit",
    "set_max_inflight",
]

#: The names of the torch-only _autograd module, imported on first use:
#: OffloadedCheckpoint, and the original's form that mlutils.unsloth gives.
_AUTOGRAD = ("OffloadedCheckpoint", "Unsloth_Offloaded_Gradient_Checkpointer")


def __getattr__(name: str) -> Any:
    if name in _AUTOGRAD:
        _torch("mlutils.offload")  # without torch: ImportError naming what needs it
        from . import _autograd

        return getattr(_autograd, name)
    raise AttributeError(f"module 'mlutils.offload' has no attribute {name!r}")
