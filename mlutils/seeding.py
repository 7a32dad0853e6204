"""Per-item seeding: random augmentation that comes out the same whatever loads the item.

Random augmentation in DataLoader workers draws from each worker's global
generators, seeded once per worker: an item's draws then depend on which
worker loaded it and on what that worker loaded before, so they change with
``num_workers``, with scheduling and across a resume (fresh workers restart
their streams at the resumed batch).  Here every item is loaded right after
seeding Python's ``random``, NumPy's global generator (``np.random.seed``)
and torch's CPU generator from ``(seed, epoch, index)``: an item's draws
depend on nothing else.

* :class:`SeededItems` wraps a map-style dataset; its keys are
  ``(epoch, index)`` pairs.
* :class:`Keyed` wraps an mlutils sampler for ``DataLoader(sampler=...)``
  (or, around a ``BatchedOrderedSampler``, ``batch_sampler=...``) and yields
  those keys; ``sampler.batches(n, keyed=True)`` yields batches of them.
  The epoch travels with each key, so it reaches the workers exactly,
  persistent ones included.

The mixing: NumPy's ``SeedSequence`` over fixed-width words (a tag, then
``seed``, ``epoch`` and ``index`` as two 32-bit words each) gives ten 32-bit
words: four seed ``random``, four ``np.random`` and two (64 bits) torch, so
nearby keys get unrelated streams and the three generators (two of them the
same Mersenne Twister) never share a key.
"""
from __future__ import annotations

import functools
import random
import sys
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Tuple

import numpy as np

from ._torch import optional_torch
from .sampler import BatchedOrderedSampler, _Base, _dataset_base, _int_arg, _seed_arg, _Sharded

if TYPE_CHECKING:
    import torch

__all__ = ["SeededItems", "Keyed", "seed_item"]

_M32 = 0xFFFFFFFF
_TAG = 0x6D6C7531  # "mlu1": the version of this derivation; another one would take another tag
_KEYS_HELP = "give the DataLoader Keyed(sampler) or sampler.batches(n, keyed=True)"


@functools.lru_cache(maxsize=None)
def _torch_generator() -> Optional[torch.Generator]:
    """torch's default CPU generator, or None without torch (or with MLUTILS_NO_TORCH=1)."""
    torch = optional_torch()
    return None if torch is None else torch.default_generator


def _in_worker() -> bool:
    """True in a DataLoader worker process."""
    data = sys.modules.get("torch.utils.data")  # a worker has imported it; no import here otherwise
    return data is not None and data.get_worker_info() is not None


def _u64(value: Any, name: str, limit: int = 64) -> int:
    v = _int_arg(value, name)
    if v < 0 or v >> limit:
        raise ValueError(f"{name} must be in [0, 2**{limit}), got {v}")
    return v


def _words(seed: int, epoch: int, index: int) -> np.ndarray:
    """Ten uint32 words mixed from (seed, epoch, index), each in [0, 2**64)."""
    entropy = np.array([_TAG, seed & _M32, seed >> 32, epoch & _M32, epoch >> 32, index & _M32, index >> 32],
                       dtype=np.uint32)
    return np.random.SeedSequence(entropy).generate_state(10, np.uint32)


def _seed_globals(seed: int, epoch: int, index: int) -> None:
    w = _words(seed, epoch, index)
    random.seed(int.from_bytes(w[:4].tobytes(), "little"))
    np.random.seed(w[4:8])
    gen = _torch_generator()
    if gen is not None:
        # the CPU generator only: torch.manual_seed would seed (or queue seeding) every CUDA device too
        gen.manual_seed(int(w[8]) | int(w[9]) << 32)


def seed_item(seed: int, epoch: int, index: int) -> None:
    """Seed ``random``, ``np.random`` and torch's CPU generator (when torch is there) from (seed, epoch, index)."""
    _seed_globals(_seed_arg(seed), _u64(epoch, "epoch"), _u64(index, "index", 63))


class _Saved:
    """The global generators' states, taken now and put back by restore()."""

    __slots__ = ("py", "np", "torch")

    def __init__(self) -> None:
        self.py = random.getstate()
        self.np = np.random.get_state()
        gen = _torch_generator()
        self.torch = None if gen is None else gen.get_state()

    def restore(self) -> None:
        random.setstate(self.py)
        np.random.set_state(self.np)
        if self.torch is not None:
            _torch_generator().set_state(self.torch)


def _key(key: Any) -> Tuple[int, int]:
    try:
        epoch, index = key
    except (TypeError, ValueError):
        raise TypeError(f"SeededItems takes (epoch, index) keys, got {key!r}: {_KEYS_HELP}") from None
    return _u64(epoch, "epoch"), _u64(index, "index", 63)


class SeededItems(_dataset_base()):  # type: ignore[misc]
    """`dataset` keyed by ``(epoch, index)``: ``dataset[index]`` loaded right after seeding from (seed, epoch, index).

    ``random``, ``np.random`` and torch's CPU generator are seeded before each
    item, so its random draws depend on ``(seed, epoch, index)`` alone: not
    on the worker that loads it, ``num_workers``, the world size or a resume.
    Feed it keys with :class:`Keyed` or ``sampler.batches(n, keyed=True)``;
    a bare index is a TypeError.

    `restore`: whether the generators' states are put back after loading.
    ``None`` (default): in the main process yes (``num_workers=0``: the
    training loop's own draws, which its checkpoints save, are not
    disturbed), in a DataLoader worker no (the worker's generators simply
    carry the last item's streams; a ``collate_fn`` drawing there draws from
    them).  Items are always loaded one by one with ``dataset[index]``:
    ``__getitems__`` loads a batch's items in a list (the default
    ``collate_fn`` applies), saving and restoring the states once per batch;
    the wrapped dataset's own ``__getitems__`` is not used, since one call
    for the batch cannot give each item its own streams."""

    def __init__(self, dataset: Any, seed: int = 0, *, restore: Optional[bool] = None) -> None:
        self.dataset = dataset
        self._seed = _seed_arg(seed)
        self.restore = None if restore is None else bool(restore)

    @property
    def seed(self) -> int:
        """The seed (mod 2**64) mixed into every item's."""
        return self._seed

    def __len__(self) -> int:
        return len(self.dataset)

    def _restores(self) -> bool:
        return not _in_worker() if self.restore is None else self.restore

    def __getitem__(self, key: Any) -> Any:
        epoch, index = _key(key)
        saved = _Saved() if self._restores() else None
        try:
            _seed_globals(self._seed, epoch, index)
            return self.dataset[index]
        finally:
            if saved is not None:
                saved.restore()

    def __getitems__(self, keys: Any) -> List[Any]:
        """The items of a batch of keys, in a list; each loaded as ``self[key]`` is."""
        keys = [_key(k) for k in keys]
        saved = _Saved() if self._restores() else None
        try:
            out = []
            for epoch, index in keys:
                _seed_globals(self._seed, epoch, index)
                out.append(self.dataset[index])
            return out
        finally:
            if saved is not None:
                saved.restore()

    def __repr__(self) -> str:
        return f"SeededItems({self.dataset!r}, seed={self._seed})"


class Keyed(_Base):  # type: ignore[misc,valid-type]
    """An mlutils sampler whose draws carry their epoch: ``(epoch, index)`` keys for :class:`SeededItems`.

    ``DataLoader(SeededItems(ds), sampler=Keyed(sampler))``; around a
    ``BatchedOrderedSampler`` each draw is a batch, a list of keys, for
    ``batch_sampler=``.  The epoch is the sampler's when the index is drawn
    (a PoolSampler's round).  The wrapped sampler is ``.sampler``; position,
    state and length are its own: ``state_dict``, ``load_state_dict``,
    ``set_epoch``, ``take`` (its plain int64 draws), ``remaining``, ``index``,
    ``epoch`` and ``len()`` are forwarded to it unchanged."""

    def __init__(self, sampler: Any) -> None:
        if not isinstance(sampler, _Sharded):
            hint = ": use sampler.batches(n, keyed=True)" if type(sampler).__name__ == "Batches" else ""
            raise TypeError(f"Keyed wraps an mlutils sampler, not {type(sampler).__name__}{hint}")
        self.sampler = sampler

    def __iter__(self) -> Iterator[Any]:
        epoch, draws = self.sampler._epoch_draws()
        if isinstance(self.sampler, BatchedOrderedSampler):
            return ([(epoch, i) for i in batch] for batch in draws)
        return ((epoch, i) for i in draws)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def take(self, n: int) -> Any:
        return self.sampler.take(n)

    def remaining(self) -> int:
        return self.sampler.remaining()

    def index(self) -> int:
        return self.sampler.index()

    def state_dict(self) -> Any:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.sampler.load_state_dict(state)

    get_state = state_dict
    set_state = load_state_dict

    def __repr__(self) -> str:
        return f"Keyed({self.sampler!r})"
