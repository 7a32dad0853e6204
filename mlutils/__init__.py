"""mlutils: fast, safe, exact training utilities with a C core.

``import mlutils`` never needs a GPU, a driver or PyTorch.
"""
from typing import TYPE_CHECKING as _TYPE_CHECKING

from ._version import __version__
from . import _core
from ._core import (
    JSONDecodeError,
    MlutilsError,
    PatternError,
    SafetensorsError,
    SamplerStateError,
    TorchFormatError,
    UnsafePickleError,
)
from ._torch import TorchNotInstalledError

__all__ = [
    "__version__",
    "features",
    "cuda_available",
    "cuda_status",
    # every exception mlutils raises derives from MlutilsError and a builtin
    "MlutilsError",
    "JSONDecodeError",
    "SafetensorsError",
    "TorchFormatError",
    "UnsafePickleError",
    "SamplerStateError",
    "PatternError",
    "TorchNotInstalledError",
    "DistributedError",
    "DistributedTimeoutError",
    "NcclUnavailableError",
    "CheckpointError",
    "OutOfMemoryStop",
    "LoggerDependencyError",
    "OffloadPoolFullError",
]

# Exceptions defined in modules that `import mlutils` does not load (they cost
# imports, socket and the training loop's among them): loaded on first access.
_LAZY = {
    "DistributedError": "distributed",
    "DistributedTimeoutError": "distributed",
    "NcclUnavailableError": "distributed",
    "CheckpointError": "train",
    "OutOfMemoryStop": "train",
    "LoggerDependencyError": "train",
    "OffloadPoolFullError": "offload",
}

if _TYPE_CHECKING:
    from .distributed import DistributedError, DistributedTimeoutError, NcclUnavailableError
    from .offload import OffloadPoolFullError
    from .train import CheckpointError, LoggerDependencyError, OutOfMemoryStop


def __getattr__(name: str) -> object:
    """The exceptions of :data:`_LAZY`, imported from their module when first asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))

if _core.__version__ != __version__:  # pragma: no cover - a stale build
    raise ImportError(
        f"mlutils._core was built for version {_core.__version__}, the package is {__version__}: rebuild it"
    )

#: What this build carries (``json``, ``cuda`` when compiled with nvcc, ``asan``
#: for sanitizer builds).  What is usable right now is :func:`cuda_available`.
features = frozenset(_core.build_features)


def cuda_available() -> bool:
    """True when CUDA code was built in and at least one device is usable now."""
    if not _core.cuda_built():
        return False
    return _core.cuda_device_count().count > 0


def cuda_status() -> str:
    """A one-line account of why CUDA is or is not usable."""
    if not _core.cuda_built():
        return "mlutils was built without CUDA"
    devices = _core.cuda_device_count()
    return f"{devices.count} CUDA device(s) usable" if devices.count else devices.reason
