"""Offloaded checkpointing for Hugging Face style models.

:func:`enable_offloaded_gradient_checkpointing` turns a model's gradient
checkpointing on and installs :func:`offload_checkpoint` as the
checkpointing function of its layers; :func:`disable_offloaded_gradient_checkpointing`
turns it off; :func:`install_offloaded_checkpointing` only installs it, on a
model whose checkpointing is on.  ``transformers`` is not needed: any model with
``gradient_checkpointing_enable`` / ``_set_gradient_checkpointing`` or
modules with a ``gradient_checkpointing`` attribute will do.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Optional

from ..utils import _torch
from ._checkpoint import offload_checkpoint
from ._engine import _check_compress, _check_count

class _HFCheckpointFunc:
    """The ``_gradient_checkpointing_func`` installed on a model's layers:
    offload_checkpoint with the model's min_bytes and compress.  A class at
    module level (not a closure) so that a model holding it still pickles
    (torch.save(model), spawning workers), as with transformers' own
    ``functools.partial(checkpoint, ...)``."""

    mlutils_offload = True

    def __init__(self, min_bytes: int, compress: Optional[str]):
        self.min_bytes = min_bytes
        self.compress = compress

    def __call__(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("use_reentrant", None)
        kwargs.setdefault("preserve_rng_state", True)
        if not args:
            raise TypeError("offloaded gradient checkpointing: the layer got no hidden states")
        return offload_checkpoint(function, *args, min_bytes=self.min_bytes, compress=self.compress, **kwargs)

    def __repr__(self) -> str:
        return f"mlutils.offload checkpointing (min_bytes={self.min_bytes}, compress={self.compress!r})"


def _hf_checkpoint_func(min_bytes: int, compress: Optional[str]) -> Callable:
    return _HFCheckpointFunc(min_bytes, compress)


def enable_offloaded_gradient_checkpointing(model: Any, min_bytes: int = 0, compress: Optional[str] = None) -> Any:
    """Make `model` (a Hugging Face style model) checkpoint its layers with
    :func:`offload_checkpoint`; returns the model.

    Uses ``model.gradient_checkpointing_enable`` and installs our function on
    every submodule that has ``gradient_checkpointing`` (via
    ``_set_gradient_checkpointing(..., gradient_checkpointing_func=...)`` when the
    model has it).  TypeError when the model has no gradient checkpointing.
    """
    _torch("mlutils.offload.enable_offloaded_gradient_checkpointing")
    compress = _check_compress(compress)
    _check_count(min_bytes, "enable_offloaded_gradient_checkpointing: min_bytes")
    if not getattr(model, "supports_gradient_checkpointing", True) or not (
            hasattr(model, "gradient_checkpointing_enable") or hasattr(model, "_set_gradient_checkpointing")):
        raise TypeError(f"{type(model).__name__} has no gradient checkpointing "
                        "(no gradient_checkpointing_enable / _set_gradient_checkpointing, "
                        "or supports_gradient_checkpointing is False)")
    func = _hf_checkpoint_func(min_bytes, compress)
    if hasattr(model, "gradient_checkpointing_enable"):
        with _no_checkpointing_is_a_type_error(model):
            try:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            except TypeError:  # older signature without kwargs
                model.gradient_checkpointing_enable()
    _install(model, func)
    model.mlutils_offloaded_checkpointing = True
    return model


def install_offloaded_checkpointing(model: Any, min_bytes: int = 0, compress: Optional[str] = None) -> Any:
    """Install :func:`offload_checkpoint` as the checkpointing function of the
    layers of `model`, whose gradient checkpointing is on already; returns the
    model.  What enable_offloaded_gradient_checkpointing does once it has
    turned checkpointing on, for code that turns it on itself (such as the
    ``gradient_checkpointing_enable`` that mlutils.unsloth's monkey patch
    wraps).  TypeError when no module of the model has ``gradient_checkpointing``."""
    compress = _check_compress(compress)
    _check_count(min_bytes, "install_offloaded_checkpointing: min_bytes")
    _install(model, _hf_checkpoint_func(min_bytes, compress))
    return model


def _install(model: Any, func: Callable) -> None:
    """Install `func` as the checkpointing function of model's layers."""
    if hasattr(model, "_set_gradient_checkpointing"):
        try:
            model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=func)
        except TypeError:  # an older signature: the loop below does it
            pass
    found = 0
    for module in model.modules() if hasattr(model, "modules") else [model]:
        if hasattr(module, "gradient_checkpointing"):
            module._gradient_checkpointing_func = func
            module.gradient_checkpointing = True
            found += 1
    if not found:
        raise TypeError(f"{type(model).__name__} has no module with a gradient_checkpointing attribute: "
                        "nothing to install offloaded checkpointing on")
    model.mlutils_offloaded_checkpointing = True


def _checkpointing_modules(model: Any) -> List[Any]:
    """model's modules (itself included) with a ``gradient_checkpointing`` attribute."""
    modules = model.modules() if callable(getattr(model, "modules", None)) else [model]
    return [m for m in modules if hasattr(m, "gradient_checkpointing")]


@contextlib.contextmanager
def _no_checkpointing_is_a_type_error(model: Any) -> Iterator[None]:
    """Hugging Face's gradient_checkpointing_enable/_disable raise ValueError
    for a model none of whose modules has gradient checkpointing: our TypeError
    for that case (their error chained), their ValueError otherwise."""
    try:
        yield
    except ValueError as e:
        if _checkpointing_modules(model):
            raise
        raise TypeError(f"{type(model).__name__} has no gradient checkpointing "
                        f"(no module with a gradient_checkpointing attribute): {e}") from e


def disable_offloaded_gradient_checkpointing(model: Any) -> Any:
    """Turn gradient checkpointing off again; returns the model.  TypeError
    when the model has no gradient checkpointing to turn off."""
    if not hasattr(model, "gradient_checkpointing_disable") and not _checkpointing_modules(model):
        raise TypeError(f"{type(model).__name__} has no gradient checkpointing "
                        "(no gradient_checkpointing_disable, no module with a gradient_checkpointing attribute)")
    if hasattr(model, "gradient_checkpointing_disable"):
        with _no_checkpointing_is_a_type_error(model):
            model.gradient_checkpointing_disable()
    for module in model.modules() if hasattr(model, "modules") else [model]:
        if getattr(getattr(module, "_gradient_checkpointing_func", None), "mlutils_offload", False):
            module.gradient_checkpointing = False
    model.mlutils_offloaded_checkpointing = False
    return model
