"""PyTorch, imported where it is used, through this one module.

``import mlutils`` never imports torch.  Code that cannot work without it
calls :func:`require_torch`, code that can do without it calls
:func:`optional_torch`, and code that only asks whether a value is a tensor
calls :func:`loaded_torch`, which never imports anything (no tensor can exist
unless torch was imported).

``MLUTILS_NO_TORCH=1`` makes all three behave as if torch were not
installed.  It is the test suite's switch: ``tests/conftest.py`` also sets
``sys.modules["torch"] = None`` then, which makes any ``import torch`` fail;
the environment variable alone covers the processes a test starts.
"""
from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Optional

from ._core import MlutilsError

__all__ = ["TorchNotInstalledError", "require_torch", "optional_torch", "loaded_torch"]


class TorchNotInstalledError(MlutilsError, ModuleNotFoundError):
    """PyTorch was needed but cannot be imported; the message names what needed it
    and what to do instead (``framework="np"`` gives numpy arrays without it, say)."""


def _hidden() -> bool:
    """True when MLUTILS_NO_TORCH=1 says to behave as if torch were not installed."""
    return os.environ.get("MLUTILS_NO_TORCH") == "1"


def require_torch(what: str, instead: Optional[str] = None) -> ModuleType:
    """The torch module, or :class:`TorchNotInstalledError` saying that ``what`` needs it.

    ``instead`` is the way round it, when there is one ("pass framework='np'
    for numpy arrays"); the message ends with it.
    """
    cause: Optional[ImportError] = None
    if _hidden():
        reason = "MLUTILS_NO_TORCH=1 hides it"
    else:
        try:
            import torch
        except ImportError as exc:
            cause, reason = exc, str(exc)
        else:
            return torch
    advice = "pip install torch" + (f", or {instead}" if instead else "")
    raise TorchNotInstalledError(f"{what} needs PyTorch, which cannot be imported ({reason}): {advice}",
                                 name="torch") from cause


def optional_torch() -> Optional[ModuleType]:
    """The torch module, imported now if need be, or None when it cannot be imported."""
    if _hidden():
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


def loaded_torch() -> Optional[ModuleType]:
    """The torch module if something already imported it, else None; never imports it."""
    if _hidden():
        return None
    return sys.modules.get("torch")
