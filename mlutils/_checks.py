"""Checks of arguments that several public functions take alike."""
from __future__ import annotations

__all__ = ["check_durable"]


def check_durable(durable: object, caller: str) -> bool:
    """``durable`` when it is True or False; TypeError naming ``caller`` otherwise.

    Every atomic writer (json_write, torch_save, the .pt and safetensors
    writers) takes ``durable``; a truthy stand-in such as ``"no"``, ``1`` or
    ``numpy.bool_(True)`` is refused before anything is written, not read as
    a flag.
    """
    if not isinstance(durable, bool):
        raise TypeError(f"{caller}: durable must be True or False, not {type(durable).__name__} {durable!r}")
    return durable
