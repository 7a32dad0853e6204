"""set_seed: seed every random number generator a training script uses."""
from __future__ import annotations

import random
import time
from typing import Optional

from .._torch import optional_torch

__all__ = ["set_seed"]


def set_seed(seed: Optional[int] = None) -> int:
    """Seed python's, numpy's and (when installed) torch's RNGs, CUDA included; returns the seed.

    None picks a seed from the clock (nanoseconds, below 2**32).  0 is a seed
    like any other (the original replaced it with the clock).  Seeds must be in
    [0, 2**32) since numpy refuses others.
    """
    if seed is None:
        seed = time.time_ns() % (1 << 32)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"set_seed: seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < (1 << 32):
        raise ValueError(f"set_seed: seed must be in [0, 2**32), got {seed}")
    random.seed(seed)
    import numpy as np

    np.random.seed(seed)
    torch = optional_torch()
    if torch is None:
        return seed
    torch.manual_seed(seed)  # seeds every CUDA device too
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return seed
