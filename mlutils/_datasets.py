"""The datasets that go with the samplers (re-exported by mlutils.sampler): IndexedTensorDataset,
which gathers a whole batch at a time, and collate_batch, the collate_fn for it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

import numpy as np

from ._torch import optional_torch, require_torch

if TYPE_CHECKING:
    import torch


def _dataset_base() -> type:
    """torch.utils.data.Dataset when torch is importable (and MLUTILS_NO_TORCH != 1), else object."""
    if optional_torch() is None:
        return object
    from torch.utils.data import Dataset

    return Dataset


class IndexedTensorDataset(_dataset_base()):  # type: ignore[misc]
    """Tensors (torch or numpy) sharing their first dimension, fetched a whole batch at a time.

    ``ds[i]`` is the tuple of the tensors' rows ``i``; ``ds.__getitems__(idx)``
    (which a DataLoader calls with each batch of a ``batch_sampler``) gathers
    the rows of every tensor at once (``torch.index_select`` / ``np.take``)
    and returns the tuple of batch tensors.  Negative indices are refused.  Use it
    with ``collate_fn=collate_batch`` (the batch is already collated)::

        ds = IndexedTensorDataset(x, y)
        loader = DataLoader(ds, batch_sampler=sampler.batches(256), collate_fn=collate_batch)
    """

    def __init__(self, *tensors: Union[np.ndarray, torch.Tensor]) -> None:
        if not tensors:
            raise ValueError("IndexedTensorDataset needs at least one tensor")
        n = None
        for k, t in enumerate(tensors):
            shape = getattr(t, "shape", None)
            if shape is None or len(shape) == 0:
                raise ValueError(f"tensor {k} must have a first dimension, got {type(t).__name__}")
            if n is None:
                n = int(shape[0])
            elif int(shape[0]) != n:
                raise ValueError(f"tensors disagree on the first dimension: {n} and {int(shape[0])} (tensor {k})")
        self.tensors = tuple(tensors)
        self._n = int(n or 0)
        self._has_numpy = any(isinstance(t, np.ndarray) for t in tensors)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple:
        return tuple(t[i] for t in self.tensors)

    def __getitems__(self, indices: Any) -> tuple:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"batch indices must be one-dimensional, got shape {idx.shape}")
        # torch.index_select refuses indices outside [0, n) itself; np.take would wrap negative ones
        if self._has_numpy and idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self._n):
            raise IndexError(f"batch index out of range for a dataset of {self._n} items")
        out = []
        tidx = None
        for t in self.tensors:
            if isinstance(t, np.ndarray):
                out.append(np.take(t, idx, axis=0))
            else:
                torch = require_torch("IndexedTensorDataset of torch tensors")
                if tidx is None:
                    tidx = torch.from_numpy(idx)
                # index_select gathers whole rows: about 3x faster than t[tidx] (advanced indexing)
                out.append(torch.index_select(t, 0, tidx))
        return tuple(out)


def collate_batch(batch: Any) -> Any:
    """The collate_fn for a batch that ``__getitems__`` already assembled: returns it unchanged."""
    return batch
