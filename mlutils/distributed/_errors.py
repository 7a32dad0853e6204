"""The exceptions of mlutils.distributed (named there)."""
from __future__ import annotations

from .._core import MlutilsError


class DistributedError(MlutilsError, RuntimeError):
    """A distributed set-up or collective failed (the cause is chained)."""

    __module__ = "mlutils.distributed"


class DistributedTimeoutError(DistributedError, TimeoutError):
    """Ranks did not meet within the timeout given."""

    __module__ = "mlutils.distributed"
