"""The original names of the offloaded gradient checkpointing (``unsloth``).

``Unsloth_Offloaded_Gradient_Checkpointer`` keeps the original contract,
``forward(ctx, forward_function, hidden_states, *args)`` / ``backward``,
running on :mod:`mlutils.offload`'s engine; the monkey patch installs
:func:`mlutils.offload.offload_checkpoint` as the checkpointing function of
Hugging Face models (``transformers`` needed for the patch only).
"""
from __future__ import annotations

import functools
import importlib
from typing import Any

from . import offload as _offload
from .utils import _torch

__all__ = ["Unsloth_Offloaded_Gradient_Checkpointer", "apply_unsloth_offloaded_gradient_checkpoint_monkey_patch"]


def __getattr__(name: str) -> Any:
    if name == "Unsloth_Offloaded_Gradient_Checkpointer":
        _torch("mlutils.unsloth")  # without torch: ImportError naming what needs it
        return _offload.Unsloth_Offloaded_Gradient_Checkpointer  # defined in the torch-only offload/_autograd.py
    raise AttributeError(f"module 'mlutils.unsloth' has no attribute {name!r}")


def apply_unsloth_offloaded_gradient_checkpoint_monkey_patch() -> None:
    """Make every ``transformers.PreTrainedModel.gradient_checkpointing_enable``
    install the offloaded checkpointing (ImportError without transformers)."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as e:
        raise ImportError("apply_unsloth_offloaded_gradient_checkpoint_monkey_patch needs transformers: "
                          "pip install transformers (or call "
                          "mlutils.offload.enable_offloaded_gradient_checkpointing(model))") from e
    cls = transformers.modeling_utils.PreTrainedModel
    if getattr(cls.gradient_checkpointing_enable, "__mlutils_original__", None) is None:
        original = cls.gradient_checkpointing_enable

        @functools.wraps(original)
        def gradient_checkpointing_enable(self: Any, gradient_checkpointing_kwargs: Any = None) -> None:
            original(self, gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
            _offload.install_offloaded_checkpointing(self)

        gradient_checkpointing_enable.__mlutils_original__ = original  # type: ignore[attr-defined]
        cls.gradient_checkpointing_enable = gradient_checkpointing_enable
