"""Samplers with exact resume, seeds, ranks and constant-size state.

The four samplers of the original utilities keep their names, arguments and
behaviour (``PoolSampler``, ``OrderedSampler``, ``BatchedOrderedSampler``,
``RandomSampler``); on top of that:

* **Exact resume.**  ``state_dict()`` / ``load_state_dict()`` (``get_state`` /
  ``set_state`` are aliases) capture everything in a small JSON-serialisable
  dict carrying ``kind`` and ``version``.  A restored sampler yields exactly
  what the original would have yielded.
* **Seeds and epochs.**  The order of epoch ``e`` is a keyed bijection of
  ``[0, n)`` chosen by ``(seed, e)``; nothing uses Python's, numpy's or
  torch's global generators, so a seed gives the same order everywhere.
  ``set_epoch(e)`` moves to the start of epoch ``e`` (a no-op when the sampler
  is already in epoch ``e``, so a resumed epoch is not restarted).  The
  default seed is 0, as in ``DistributedSampler``: every rank must use the
  same seed, or the shards overlap; pass another seed for another order.
* **Ranks.**  ``rank`` / ``world_size`` (default: the ``RANK`` and
  ``WORLD_SIZE`` environment variables) deal the epoch's order round-robin
  like ``torch.utils.data.DistributedSampler``: rank ``r`` gets positions
  ``r, r + W, r + 2W, ...``; every rank gets the same count, padding by
  repeating from the start of the epoch, or dropping the uneven tail with
  ``drop_last``.
* **Elastic resume.**  A state records the global progress through the
  epoch's order (``consumed = base + index * world_size`` positions).  Loaded
  by the same world size, each rank continues exactly where it stood.  Loaded
  by another world size, the rest of the epoch (positions ``consumed`` to
  ``n``) is dealt among the new ranks, padded or dropped as above; every new
  rank must then load the same state.  In synchronous training all ranks
  save at the same step, so any rank's state will do.  When ranks saved at
  different positions, pass all their states to :func:`resume_state`: it
  returns the earliest one, so no item is skipped and the items the ranks
  ahead had already drawn beyond the slowest rank are drawn again.
* **Fast paths.**  Iteration runs in C (a C iterator yielding ints);
  ``take(n)`` returns the next draws as an int64 array.  ``take`` stays in
  the current epoch (an empty array at its end); ``iter()`` and
  ``set_epoch`` move to the next one.
* **Threads.**  One sampler can be shared by threads: ``take``, iteration,
  ``sample``, ``set_epoch``, ``state_dict`` and ``load_state_dict`` move or
  read the position in one step (``take`` reserves its range with the GIL
  held, then computes the draws without it), so threads drawing together
  get every draw of the epoch exactly once.
* **Batches.**  ``sampler.batches(batch_size)`` yields the draws as int64
  index arrays (``take(batch_size)`` each) for ``DataLoader(batch_sampler=...)``;
  :class:`IndexedTensorDataset` fetches such a batch in one gather per tensor.
  ``batches(batch_size, keyed=True)`` yields ``(epoch, index)`` pairs instead,
  the keys of :class:`mlutils.seeding.SeededItems` (exact random augmentation).
* **torch.**  When torch is importable (and ``MLUTILS_NO_TORCH`` is not
  ``1``) the samplers are ``torch.utils.data.Sampler`` instances, usable as
  ``DataLoader(sampler=...)`` or, for ``BatchedOrderedSampler``,
  ``DataLoader(batch_sampler=...)``.  A DataLoader with workers prefetches:
  the sampler (which runs in the main process) is then ahead of the batches
  the training loop consumed by the prefetched ones.

The generator (C core, ``csrc/core/sampler.h``)
------------------------------------------------
``mix64`` is the SplitMix64 finaliser; the stream of ``(seed, stream, epoch)``
starts at ``s0 = mix64(mix64(mix64(seed) ^ stream) + epoch)`` and round key
``i`` is the high 32 bits of the ``(i+1)``-th SplitMix64 output from ``s0``.

The bijection: a balanced Feistel network (12 rounds when ``n <= 65536``,
6 above) on ``[0, 4**h)``, ``4**h``
the smallest power of four ``>= n``, with ``h``-bit halves; each round xors
one half with ``hash32(other half ^ key_i)`` (a 32-bit multiply-xorshift
avalanche hash) masked to ``h`` bits.  Cycle walking (re-applying the network
while the result is ``>= n``) turns it into a bijection of ``[0, n)``; since
``4**h < 4n`` a walk is short (about two passes on average).  The state of a
random sampler is therefore ``(seed, epoch, position)``: O(1), whatever ``n``.
"""
from __future__ import annotations

import functools
import logging
import math
import operator
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._core import SamplerStateError
from ._datasets import IndexedTensorDataset, _dataset_base, collate_batch  # _dataset_base: for seeding.py
from ._torch import optional_torch

__all__ = [
    "PoolSampler",
    "OrderedSampler",
    "BatchedOrderedSampler",
    "RandomSampler",
    "SamplerStateError",
    "resume_state",
    "IndexedTensorDataset",
    "collate_batch",
    "STATE_VERSION",
]

log = logging.getLogger(__name__)

#: Version of the state dicts written by this module; newer ones are refused.
STATE_VERSION = 1
_U64 = (1 << 64) - 1
# stream ids: one per kind, so that equal seeds give unrelated orders across kinds
_STREAMS = {"OrderedSampler": 0, "RandomSampler": 1, "PoolSampler": 2, "BatchedOrderedSampler": 3}


def _sampler_base() -> type:
    """torch.utils.data.Sampler when torch is importable (and MLUTILS_NO_TORCH != 1), else object."""
    if optional_torch() is None:
        return object
    from torch.utils.data import Sampler

    return Sampler


_Base: Any = _sampler_base()


def _int_arg(value: Any, name: str) -> int:
    """value as an int; ValueError naming `name` when it is not an integer."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _length_arg(value: Any, name: str = "length") -> int:
    n = _int_arg(value, name)
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    if n > (1 << 63) - 1:
        raise ValueError(f"{name} must be below 2**63, got {n}")
    return n


def _source_length(value: Any) -> int:
    """The length of a sampler's data: an int, or len() of a sized data source (torch's habit).

    ValueError naming the problem for a bool, a string, a negative or huge
    length or an object without ``__len__``."""
    if isinstance(value, bool):
        raise ValueError(f"length must be an integer or a sized data source, got the bool {value!r}")
    if isinstance(value, (str, bytes, bytearray)):
        raise ValueError(f"length must be an integer or a sized data source, got a {type(value).__name__} "
                         f"({value!r}): convert it with int() if it is a number")
    try:
        n = operator.index(value)
    except TypeError:
        try:
            n = len(value)
        except TypeError:
            raise ValueError(f"length must be an integer or a sized data source (with __len__), "
                             f"got {type(value).__name__}") from None
        except (ValueError, OverflowError) as exc:  # __len__ returned a negative or huge number
            raise ValueError(f"length of the data source ({type(value).__name__}) is invalid: {exc}") from None
        return _length_arg(n, f"len() of the data source ({type(value).__name__})")
    return _length_arg(n)


def _env_int(var: str, default: int) -> int:
    raw = os.environ.get(var)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {var}={raw!r} is not an integer") from None


def _ranks(rank: Optional[int], world_size: Optional[int]) -> tuple:
    """(rank, world_size) from the arguments or the launcher's RANK / WORLD_SIZE."""
    world = _env_int("WORLD_SIZE", 1) if world_size is None else _int_arg(world_size, "world_size")
    r = _env_int("RANK", 0) if rank is None else _int_arg(rank, "rank")
    if world < 1 or world > (1 << 31):
        raise ValueError(f"world_size must be in [1, 2**31], got {world}")
    if r < 0 or r >= world:
        raise ValueError(f"rank must be in [0, world_size={world}), got {r}")
    return r, world


def _seed_arg(seed: Any) -> int:
    return _int_arg(seed, "seed") & _U64


def _state_int(state: Mapping[str, Any], key: str) -> int:
    if key not in state:
        raise SamplerStateError(f"sampler state has no {key!r}")
    v = state[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > _U64:
        raise SamplerStateError(f"sampler state field {key!r} must be an int in [0, 2**64), got {v!r}")
    return v


def _state_bool(state: Mapping[str, Any], key: str) -> bool:
    v = state.get(key)
    if not isinstance(v, bool):
        raise SamplerStateError(f"sampler state field {key!r} must be a bool, got {v!r}")
    return v


def _check_header(state: Any, kind: str) -> None:
    if not isinstance(state, Mapping):
        raise SamplerStateError(f"a sampler state is a dict, not {type(state).__name__}")
    got = state.get("kind")
    if got != kind:
        raise SamplerStateError(f"sampler state is of kind {got!r}, this sampler is a {kind}")
    version = state.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SamplerStateError(f"sampler state has no valid version: {version!r}")
    if version > STATE_VERSION:
        raise SamplerStateError(
            f"sampler state version {version} is newer than this mlutils reads ({STATE_VERSION})")


class _Sharded(_Base):  # type: ignore[misc,valid-type]
    """Shared machinery: a C cursor walking one rank's share of each epoch."""

    _kind = ""

    def _setup(self, n: int, *, seed: int, shuffle: bool, drop_last: bool,
               rank: Optional[int], world_size: Optional[int], eager: bool = False,
               offsets: Optional[np.ndarray] = None) -> None:
        self._rank, self._world = _ranks(rank, world_size)
        self._n = n
        self._drop_last = bool(drop_last)
        self._shuffle = bool(shuffle)
        self._eager = eager
        self._offsets = offsets
        self._cursor = self._new_cursor(_seed_arg(seed))

    def _new_cursor(self, seed: int) -> Any:
        return _core.SamplerCursor(self._n, seed=seed, stream=_STREAMS[self._kind],
                                   shuffle=self._shuffle, drop_last=self._drop_last,
                                   world_size=self._world, rank=self._rank,
                                   eager=self._eager, offsets=self._offsets)

    # ---- epochs and positions
    @property
    def seed(self) -> int:
        """The seed (mod 2**64) of the order."""
        return self._cursor.seed

    @property
    def epoch(self) -> int:
        """The current epoch (for PoolSampler: the round)."""
        return self._cursor.epoch

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def drop_last(self) -> bool:
        return self._drop_last

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`; a no-op when already in it (keeps a resumed position)."""
        e = _int_arg(epoch, "epoch")
        if e < 0 or e > _U64:
            raise ValueError(f"epoch must be in [0, 2**64), got {e}")
        self._cursor.set_epoch(e)  # check and move in one step (threads)

    def index(self) -> int:
        """Draws this rank made so far in the current epoch (since the resume point after an elastic resume)."""
        return self._cursor.index

    def remaining(self) -> int:
        """Draws this rank has left in the current epoch."""
        pos = self._cursor.position()
        return pos.count - pos.index

    def __len__(self) -> int:
        """Draws per rank in a full epoch (the length itself with one rank)."""
        n, w = self._n, self._world
        return n // w if self._drop_last else -(-n // w)

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch; an exhausted sampler starts the next epoch."""
        return self._cursor.restart()  # check and move in one step (threads)

    def _epoch_draws(self) -> Tuple[int, Iterator[Any]]:
        """(epoch, draws): what iter() covers, every draw made in that epoch (see mlutils.seeding.Keyed)."""
        c = self._cursor.restart()
        e = c.epoch
        return e, iter(functools.partial(c.next_in, e), None)

    def take(self, n: int) -> Any:
        """The next `n` draws of the current epoch (fewer at its end) as an int64 array, advancing as iteration does."""
        return self._cursor.take(_length_arg(n, "n"))

    def batches(self, batch_size: int, drop_last: bool = False, keyed: bool = False) -> "Batches":
        """This sampler's draws in int64 index arrays of `batch_size`: ``DataLoader(batch_sampler=...)``.

        The batches are ``take(batch_size)`` calls, so they hold exactly the
        draws iteration would give, and the sampler's position is the batch
        iterator's: a ``state_dict()`` taken after ``k`` batches resumes at
        batch ``k + 1``.  With ``drop_last`` a short final batch is not
        yielded (its draws are consumed).  With ``keyed`` a batch is a list
        of ``(epoch, index)`` pairs instead, the keys of
        :class:`mlutils.seeding.SeededItems`."""
        return Batches(self, batch_size, drop_last, keyed)

    def _batch_left(self) -> int:
        """Draws the next batch iteration covers (starting the next epoch when this one is done)."""
        c = self._cursor
        if c.index >= c.count:
            c.seek(c.epoch + 1, 0, 0)
        return c.count - c.index

    # ---- state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly: a small JSON-serialisable dict."""
        # one read of the position: consistent while other threads draw
        pos = self._cursor.position()
        seed, epoch, base, index, consumed = pos.seed, pos.epoch, pos.base, pos.index, pos.consumed
        state: Dict[str, Any] = {
            "kind": self._kind,
            "version": STATE_VERSION,
            "length": self._n,
            "seed": seed,
            "epoch": epoch,
            "world_size": self._world,
            "rank": self._rank,
            "drop_last": self._drop_last,
            "base": base,
            "index": index,
            "consumed": consumed,
        }
        state.update(self._extra_state())
        return state

    def _extra_state(self) -> Dict[str, Any]:
        return {}

    def _check_extra(self, state: Mapping[str, Any]) -> None:
        pass

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` (same kind and length); another world size continues the epoch's rest.

        Raises SamplerStateError (a ValueError) for a state of another kind,
        length or a newer version, or with malformed fields."""
        _check_header(state, self._kind)
        length = _state_int(state, "length")
        if length != self._n:
            raise SamplerStateError(
                f"sampler state is for length {length}, this {self._kind} has length {self._n}")
        self._check_extra(state)
        seed = _state_int(state, "seed")
        epoch = _state_int(state, "epoch")
        world = _state_int(state, "world_size")
        base = _state_int(state, "base")
        index = _state_int(state, "index")
        drop_last = _state_bool(state, "drop_last")
        if world < 1:
            raise SamplerStateError("sampler state field 'world_size' must be >= 1")
        if base > length:
            raise SamplerStateError(f"sampler state field 'base' ({base}) is past the length {length}")
        cursor = self._new_cursor(seed)
        try:
            if world == self._world and drop_last == self._drop_last:
                cursor.seek(epoch, base, index)
            else:
                consumed = min(base + index * world, length)
                log.debug("%s: resuming a %d-rank state on %d ranks at global position %d",
                          self._kind, world, self._world, consumed)
                cursor.seek(epoch, consumed, 0)
        except ValueError as exc:
            raise SamplerStateError(f"sampler state does not fit this {self._kind}: {exc}") from exc
        self._ready(cursor)
        self._cursor = cursor  # published whole: other threads see the old or the new one

    def _ready(self, cursor: Any) -> None:
        """Last touches to a loaded cursor before other threads can see it."""

    def get_state(self) -> Dict[str, Any]:
        """Alias of state_dict() (the original's name)."""
        return self.state_dict()

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Alias of load_state_dict() (the original's name)."""
        self.load_state_dict(state)

    def __repr__(self) -> str:
        return (f"{self._kind}(length={self._n}, epoch={self.epoch}, index={self.index()}, "
                f"rank={self._rank}, world_size={self._world})")


class OrderedSampler(_Sharded):
    """Yields 0..length-1 in order (this rank's share); an exhausted sampler restarts on the next iter().

    `length` is an int or a sized data source (its ``len()``)."""

    _kind = "OrderedSampler"

    def __init__(self, length: Any, *, rank: Optional[int] = None, world_size: Optional[int] = None,
                 drop_last: bool = False) -> None:
        self._setup(_source_length(length), seed=0, shuffle=False, drop_last=drop_last,
                    rank=rank, world_size=world_size)

    @property
    def length(self) -> int:
        return self._n


class RandomSampler(_Sharded):
    """Yields a random permutation of 0..length-1 (this rank's share), a fresh one each epoch, in O(1) memory.

    `length` is an int or, as for torch's ``RandomSampler(data_source)``, a
    sized data source (its ``len()``)."""

    _kind = "RandomSampler"

    def __init__(self, length: Any, *, seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None, drop_last: bool = False) -> None:
        self._setup(_source_length(length), seed=seed, shuffle=True, drop_last=drop_last,
                    rank=rank, world_size=world_size)

    @property
    def length(self) -> int:
        return self._n


class PoolSampler(_Sharded):
    """A bag of indices 0..len(pool)-1 drawn without replacement, refilled when empty; sample() is O(1).

    Round ``r`` draws in the order of the keyed bijection of ``(seed, r)``,
    which is what drawing uniformly from what is left amounts to.  With
    ranks, each rank draws from its share of every round."""

    _kind = "PoolSampler"

    def __init__(self, pool: Sequence[Any] = [], keep_all: bool = False, shuffle: bool = False, *,  # noqa: B006
                 seed: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None,
                 drop_last: bool = False) -> None:
        try:
            n = len(pool)
        except TypeError:
            raise ValueError(f"pool must be a sized sequence, got {type(pool).__name__}") from None
        self._setup(_length_arg(n, "len(pool)"), seed=seed, shuffle=True, drop_last=drop_last,
                    rank=rank, world_size=world_size, eager=True)
        self.keep_all = bool(keep_all)
        self.global_pool = pool if keep_all else None
        # the original's `shuffle` reordered the refilled bag: no visible effect on the draws
        self.shuffle = bool(shuffle)

    @property
    def length(self) -> int:
        return self._n

    def sample(self, pool: Optional[Sequence[Any]] = None) -> Any:
        """Draw one index uniformly from what is left (refilling when empty); pool[index] when a pool is given or kept."""
        try:
            i = next(self._cursor)
        except StopIteration:
            raise ValueError("the pool is empty (or this rank's share of it is): nothing to draw") from None
        if pool is None:
            pool = self.global_pool
        return pool[i] if pool is not None else i

    __call__ = sample

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current round: samples until the bag is empty (it is then refilled)."""
        _, it = self._epoch_draws()
        return map(self.global_pool.__getitem__, it) if self.global_pool is not None else it

    def _epoch_draws(self) -> Tuple[int, Iterator[Any]]:
        # bound to the round, not to a count: threads iterating together
        # stop when the round is used up, whoever drew its last item
        c = self._cursor
        e = c.epoch
        return e, iter(functools.partial(c.next_in, e), None)

    def _ready(self, cursor: Any) -> None:
        # a round found finished (elastic resume) is refilled at once, as sample() does
        if cursor.index >= cursor.count and self._n > 0:
            cursor.seek(cursor.epoch + 1, 0, 0)

    def take(self, n: int) -> Any:
        """The next `n` draws (indices) as an int64 array, refilling the bag as sample() does."""
        return self._cursor.take(_length_arg(n, "n"))

    def _batch_left(self) -> int:
        # the rest of the round, as iteration gives it; a finished round is refilled by take()
        c = self._cursor
        left = c.count - c.index
        return left if left > 0 else c.count


def _durations(buckets: Any) -> np.ndarray:
    if not isinstance(buckets, Mapping):
        raise ValueError(f"buckets must be a mapping of key -> [(path, duration), ...], not {type(buckets).__name__}")
    out: List[float] = []
    for key, bucket in buckets.items():
        try:
            for j, pair in enumerate(bucket):
                _path, duration = pair
                if isinstance(duration, bool) or not isinstance(duration, (int, float, np.integer, np.floating)):
                    raise ValueError(f"buckets[{key!r}][{j}]: duration must be a number, got {duration!r}")
                d = float(duration)
                if math.isnan(d) or d < 0 or math.isinf(d):
                    raise ValueError(f"buckets[{key!r}][{j}]: duration must be finite and >= 0, got {duration!r}")
                out.append(d)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ValueError) and str(exc).startswith("buckets["):
                raise
            raise ValueError(f"buckets[{key!r}] must be a list of (path, duration) pairs: {exc}") from None
    if not out:
        raise ValueError("buckets hold no items at all")
    return np.asarray(out, dtype=np.float64)


class BatchedOrderedSampler(_Sharded):
    """Greedily packs the buckets' items (numbered across buckets in dict order) into batches of indices.

    Before an item is added the open batch is closed when ``max_duration > 0``
    and its running duration plus the item's would exceed ``max_duration``, or
    else when ``max_batch_size > 0`` and it holds ``max_batch_size`` items; the
    running duration is ``duration * len(batch)`` with ``use_max_size`` (padding
    aware) or the plain sum.  A limit of 0 means no limit; both 0 is an error.
    ``drop_last`` drops the final open batch and, with ranks, the batches that
    do not divide evenly (else they are padded by repetition).  ``shuffle``
    orders the batches by the keyed bijection of ``(seed, epoch)``.  Ranks
    share whole batches."""

    _kind = "BatchedOrderedSampler"

    def __init__(self, buckets: Mapping[Any, Sequence[Any]], max_duration: float = 0,
                 max_batch_size: int = 0, shuffle: bool = False, drop_last: bool = True,
                 use_max_size: bool = True, *, seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        if isinstance(max_duration, bool) or not isinstance(max_duration, (int, float, np.integer, np.floating)):
            raise ValueError(f"max_duration must be a number, got {max_duration!r}")
        md = float(max_duration)
        if math.isnan(md) or md < 0:
            raise ValueError(f"max_duration must be >= 0 (0: no limit), got {max_duration!r}")
        mb = _int_arg(max_batch_size, "max_batch_size")
        if mb < 0:
            raise ValueError(f"max_batch_size must be >= 0 (0: no limit), got {mb}")
        if md == 0 and mb == 0:
            raise ValueError("max_duration and max_batch_size cannot both be 0 (0 means no limit)")
        durations = _durations(buckets)
        offsets = _core.batch_pack(durations, md, min(mb, _U64), bool(use_max_size), bool(drop_last))
        self._items = int(durations.shape[0])
        self.max_duration = max_duration
        self.max_batch_size = mb
        self.use_max_size = bool(use_max_size)
        self._setup(int(offsets.shape[0]) - 1, seed=seed, shuffle=shuffle, drop_last=drop_last,
                    rank=rank, world_size=world_size, offsets=offsets)
        self._fingerprint = "%016x" % _core.checksum64(offsets.tobytes())

    @property
    def shuffle(self) -> bool:
        return self._shuffle

    @property
    def num_items(self) -> int:
        """Items in the buckets."""
        return self._items

    @property
    def batches(self) -> List[List[int]]:
        """The packed batches in build order (materialised on each call)."""
        off = self._offsets.tolist()
        return [list(range(off[b], off[b + 1])) for b in range(len(off) - 1)]

    def take(self, n: int) -> List[np.ndarray]:
        """The next `n` batches of the current epoch (fewer at its end) as int64 arrays."""
        return self._cursor.take(_length_arg(n, "n"))

    def _extra_state(self) -> Dict[str, Any]:
        return {"items": self._items, "shuffle": self._shuffle, "fingerprint": self._fingerprint}

    def _check_extra(self, state: Mapping[str, Any]) -> None:
        if state.get("items") != self._items or state.get("fingerprint") != self._fingerprint:
            raise SamplerStateError(
                f"sampler state was saved for other batches (items {state.get('items')!r}, "
                f"fingerprint {state.get('fingerprint')!r}; here {self._items}, {self._fingerprint})")
        if state.get("shuffle") is not self._shuffle:
            raise SamplerStateError(
                f"sampler state has shuffle={state.get('shuffle')!r}, this sampler shuffle={self._shuffle}")


class Batches:
    """A sampler's draws in batches: an iterable of int64 index arrays with a length.

    Made by ``sampler.batches(batch_size, drop_last=False, keyed=False)``; pass
    it as ``DataLoader(dataset, batch_sampler=...)``.  Each ``iter()`` covers
    the rest of the sampler's current epoch (round, for a PoolSampler),
    starting the next one when it is finished, as iterating the sampler does.
    The position lives in the sampler: save and load ``sampler.state_dict()``.
    ``len()`` is the number of batches of a full epoch on this rank.  With
    ``keyed`` each batch is a list of ``(epoch, index)`` pairs of ints, the
    epoch being the sampler's when the batch was drawn; the draws and the
    sampler's position are the same as without it."""

    def __init__(self, sampler: "_Sharded", batch_size: int, drop_last: bool = False,
                 keyed: bool = False) -> None:
        bs = _int_arg(batch_size, "batch_size")
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        self.sampler = sampler
        self.batch_size = bs
        self.drop_last = bool(drop_last)
        self.keyed = bool(keyed)

    def __len__(self) -> int:
        n, bs = len(self.sampler), self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def __iter__(self) -> Iterator[Union[np.ndarray, List[Tuple[int, int]]]]:
        left = self.sampler._batch_left()
        return self._run(left)

    def _run(self, left: int) -> Iterator[Any]:
        c = self.sampler._cursor
        take = c.take
        bs, drop, keyed = self.batch_size, self.drop_last, self.keyed
        while left > 0:
            # a batch never crosses an epoch (at most `left` draws); the epoch is read before the
            # take, since a PoolSampler refills (starts its next round) right after the last draw
            epoch = c.epoch
            a = take(bs if bs < left else left)
            got = len(a)
            if got == 0:
                return
            left -= got
            if got < bs and drop:
                return
            yield [(epoch, i) for i in a.tolist()] if keyed else a

    def __repr__(self) -> str:
        keyed = ", keyed=True" if self.keyed else ""
        return f"Batches({self.sampler!r}, batch_size={self.batch_size}, drop_last={self.drop_last}{keyed})"


def resume_state(states: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The state a new world should load from all ranks' states of one save: the earliest position.

    No item is skipped; items that ranks ahead of the slowest one had drawn
    are drawn again.  Raises SamplerStateError when the states do not belong
    to one sampler (kind, length, seed, world size)."""
    if not states:
        raise SamplerStateError("resume_state needs at least one state")
    first = states[0]
    kind = first.get("kind") if isinstance(first, Mapping) else None
    for s in states:
        _check_header(s, str(kind))
        for key in ("length", "seed", "world_size"):
            if s.get(key) != first.get(key):
                raise SamplerStateError(f"sampler states disagree on {key!r}: {s.get(key)!r} != {first.get(key)!r}")
    best = min(states, key=lambda s: (_state_int(s, "epoch"),
                                      min(_state_int(s, "base") + _state_int(s, "index") * _state_int(s, "world_size"),
                                          _state_int(s, "length"))))
    return dict(best)
