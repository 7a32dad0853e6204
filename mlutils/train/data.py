"""Where the loop is in its data: the mlutils sampler behind a loader (seekable or not), the epoch and
the batches consumed in it, the sampler state and RNG states of the epoch start, and how a resume gets
back there (the sampler seeked, or the epoch read again and the consumed batches skipped)."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from .._torch import require_torch
from .checkpoint import CheckpointError, rng_state

__all__ = ["DataSource", "DataPosition", "data_source"]

log = logging.getLogger("mlutils.train")


_SAMPLER_METHODS = ("state_dict", "load_state_dict", "take", "set_epoch", "remaining")


def _is_sampler(obj: Any) -> bool:
    """True for an mlutils-style sampler: one whose position can be saved, loaded and moved."""
    return obj is not None and all(callable(getattr(obj, m, None)) for m in _SAMPLER_METHODS)


def _find_sampler(obj: Any) -> Any:
    """The mlutils sampler `obj` is or holds (following ``.sampler`` attributes), or None."""
    for _ in range(8):
        if obj is None or _is_sampler(obj):
            return obj
        obj = getattr(obj, "sampler", None)
    return None


@dataclass(frozen=True)
class DataSource:
    """How the loop finds its place in a loader's epoch.

    ``sampler``: the mlutils sampler feeding the loader (None: none found);
    ``draws``: sampler draws per batch when the loop can seek the sampler
    to a batch exactly, None when the epoch must be read again from its
    start (``replay``) and the consumed batches skipped; ``drop_last``: a
    short final batch of the epoch is not yielded."""

    sampler: Any = None
    draws: Optional[int] = None
    drop_last: bool = False

    @property
    def replay(self) -> bool:
        return self.draws is None


def data_source(loader: Any) -> DataSource:
    """Where the loader's batches come from: an mlutils sampler the loop can seek (``sampler=``,
    ``batch_sampler=`` a sampler or ``sampler.batches(n)``), one it cannot seek (inside a batch sampler of
    the user's), or none."""
    from ..sampler import Batches

    bs = getattr(loader, "batch_sampler", None)
    if bs is None:  # batch_size=None: one sampler draw per item, no batching
        s = getattr(loader, "sampler", None)
        if _is_sampler(s):
            return DataSource(s, 1)
        return DataSource(_find_sampler(s))
    if _is_sampler(bs):  # a sampler of batches (BatchedOrderedSampler) as the batch_sampler
        return DataSource(bs, 1)
    inner = getattr(bs, "sampler", None)
    if _is_sampler(inner):
        size = getattr(bs, "batch_size", None)
        if isinstance(bs, Batches) or _is_torch_batch_sampler(bs):
            if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
                return DataSource(inner, size, bool(getattr(bs, "drop_last", False)))
    return DataSource(_find_sampler(bs) or _find_sampler(getattr(loader, "sampler", None)))


def _is_torch_batch_sampler(bs: Any) -> bool:
    """torch's own BatchSampler (what ``DataLoader(sampler=..., batch_size=n)`` builds), not a subclass that
    may batch differently."""
    if "torch" not in sys.modules:
        return False
    from torch.utils.data import BatchSampler

    return type(bs) is BatchSampler


def _world() -> int:
    """The number of processes of this run."""
    from .. import distributed

    return int(distributed.world_size())


def _loader_len(loader: Any) -> Optional[int]:
    """Batches in one epoch of `loader` when it can tell (len()), else None."""
    try:
        n = len(loader)
    except Exception:  # noqa: BLE001  (no len, or an IterableDataset's len that raises)
        return None
    return n if isinstance(n, int) and n >= 0 else None


class DataPosition:
    """The loop's place in its loader: epoch, batches consumed in it, and what the epoch started from.

    ``start_state``: the sampler's state at the epoch start; ``start_rng``:
    the RNG states at the epoch's ``iter(loader)`` when the epoch would have
    to be read again on resume (no seekable sampler)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.source = data_source(loader)
        self.sampler = self.source.sampler
        self.generator = getattr(loader, "generator", None)  # a DataLoader's own torch.Generator
        self.epoch = 0
        self.batches = 0
        self.start_state: Optional[Dict[str, Any]] = None
        self.start_rng: Optional[Mapping[str, Any]] = None

    def state(self) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
        """(the checkpoint's loop fields of the position, its sampler entry)."""
        loop = {"epoch": self.epoch, "batches_in_epoch": self.batches, "epoch_rng": self.start_rng}
        if self.sampler is None:
            return loop, None
        draws = None if self.source.replay else self.batches * int(self.source.draws or 0)
        return loop, {"epoch_start": self.start_state, "draws": draws}

    def restore(self, loop: Mapping[str, Any], samp: Optional[Mapping[str, Any]], path: str,
                leader: bool, saved_world: Optional[int] = None) -> Tuple[int, Optional[Mapping[str, Any]]]:
        """Put the data where the saved run was: the sampler moved to the batch the loop reached (not where
        prefetching workers were), or, when it cannot be seeked, the epoch to be read again from its start
        with that start's RNG states, the consumed batches skipped.  Returns (batches to skip, the RNG
        states to read the epoch again with).  A position the epoch does not have (the data changed) is
        warned about and the next epoch starts."""
        self.epoch = int(loop["epoch"])
        self.batches = int(loop["batches_in_epoch"])
        start = samp.get("epoch_start") if samp is not None else None
        if saved_world is not None and saved_world != _world():
            return self._redeal(start, samp, saved_world, path, leader)
        if self.sampler is not None and start is not None:
            try:
                self.sampler.load_state_dict(start)
            except (ValueError, TypeError, KeyError, OverflowError) as exc:
                raise CheckpointError(f"{path}: its sampler state does not fit this data loader's sampler: "
                                      f"{type(exc).__name__}: {exc}") from exc
            self.start_state = dict(start)
        elif self.sampler is not None and self.batches and leader:
            log.warning("%s holds no sampler state: the sampler starts afresh and the position is found by "
                        "reading the epoch again", path)
        draws = samp.get("draws") if samp is not None else None
        if self.sampler is not None and start is not None and not self.source.replay and draws is not None:
            left = int(draws)
            while left > 0:
                got = self.sampler.take(min(left, 1 << 20))
                if len(got) == 0:
                    break
                left -= len(got)
            if left > 0:
                self.past_end(path, leader)
            elif self.exhausted():  # saved after the epoch's last batch: the next epoch starts
                self.next_epoch()
            return 0, None
        if not self.batches:
            return 0, None
        n = _loader_len(self.loader)
        if n is not None and self.batches > n:
            self.past_end(path, leader)
            return 0, None
        if leader:
            log.info("the data loader cannot be seeked: reading its epoch %d again and skipping %d batches to "
                     "the resumed position", self.epoch, self.batches)
        return self.batches, loop.get("epoch_rng")

    def _redeal(self, start: Optional[Mapping[str, Any]], samp: Optional[Mapping[str, Any]], saved_world: int,
                path: str, leader: bool) -> Tuple[int, None]:
        """Resume at another world size: a seekable mlutils sampler continues from the global position the
        saved ranks had reached together (``draws`` on each of them past the epoch start), dealt anew over
        this world's ranks; any other loader restarts the epoch, with a warning."""
        draws = samp.get("draws") if samp is not None else None
        if self.sampler is None or start is None or self.source.replay or draws is None:
            if leader:
                log.warning("%s: this data loader cannot be re-dealt to another number of processes: epoch %d "
                            "starts again from its beginning", path, self.epoch)
            self.batches = 0
            return 0, None
        begun = int(start.get("consumed", 0))
        length = int(start.get("length", 0)) or begun + int(draws) * saved_world
        at = min(begun + int(draws) * saved_world, length)
        state = dict(start, base=at, index=0, consumed=at)
        try:
            self.sampler.load_state_dict(state)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            raise CheckpointError(f"{path}: its sampler state does not fit this data loader's sampler: "
                                  f"{type(exc).__name__}: {exc}") from exc
        self.batches = 0  # counted from here: the re-dealt position is this run's anchor
        self.start_state = None
        if self.exhausted():
            self.next_epoch()
        return 0, None

    def past_end(self, path: str, leader: bool) -> None:
        """The resumed position lies past the end of this loader's epoch: the next epoch starts."""
        if leader:
            log.warning("%s was saved at batch %d of epoch %d, which this data loader's epoch does not reach "
                        "(the data changed?): training goes on from the start of epoch %d",
                        path, self.batches, self.epoch, self.epoch + 1)
        self.next_epoch()
        if self.sampler is not None:
            if not self.exhausted():
                self.sampler.set_epoch(int(getattr(self.sampler, "epoch", 0)) + 1)
            self.start_state = None  # taken afresh when the next epoch starts

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches = 0

    def exhausted(self) -> bool:
        """True when the sampler cannot give the loader another batch this epoch."""
        left = self.sampler.remaining()
        draws = self.source.draws or 1
        return left == 0 or (draws > 1 and self.source.drop_last and left < draws)

    def begin_epoch(self) -> None:
        """Move an exhausted sampler to its next epoch and remember its state there."""
        s = self.sampler
        if s is None:
            return
        if self.start_state is None or self.batches == 0:
            if self.exhausted():
                s.set_epoch(s.epoch + 1)
            self.start_state = s.state_dict()

    def iterate(self) -> Iterator[Any]:
        """iter(loader) for this epoch, with its RNG states kept when the epoch could have to be read again."""
        self.start_rng = rng_state(self.generator) if self.source.replay else None
        self._seed_draw_of_reused_iterator()
        return iter(self.loader)

    def _seed_draw_of_reused_iterator(self) -> None:
        """A DataLoader with persistent workers builds its iterator once, drawing the workers' base seed
        from torch's RNG, and later epochs reuse it without that draw; a resumed process builds a new one
        and draws.  The draw is made here for a reused iterator too, so both runs draw the same at every
        epoch start (the shuffle order, and everything drawn after, then match)."""
        ld = self.loader
        if not (getattr(ld, "persistent_workers", False) and getattr(ld, "num_workers", 0)
                and getattr(ld, "_iterator", None) is not None):
            return
        torch = require_torch("mlutils.train")

        gen = self.generator if isinstance(self.generator, torch.Generator) else None
        torch.empty((), dtype=torch.int64).random_(generator=gen)
