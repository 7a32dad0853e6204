"""mlutils: fast, safe, exact training utilities with a C core.

``import mlutils`` never needs a GPU, a driver or PyTorch.
"""
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

__all__ = [
    "__version__",
    "features",
    "cuda_available",
    "MlutilsError",
    "JSONDecodeError",
    "SafetensorsError",
    "TorchFormatError",
    "UnsafePickleError",
    "SamplerStateError",
    "PatternError",
]

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
