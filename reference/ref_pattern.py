"""Test oracle (and bench baseline): the reference's codebook patterns written
out from their documented behaviour, independently of mlutils.

Each provider places every coordinate ``(t, q)`` at the sequence step its
definition gives; the index tables are computed per output cell (which
``(t, q)`` a step carries, which step carries a ``(t, q)``).  Everything is
plain Python and numpy; torch is imported only by the gathers that are given
torch tensors.  Bad arguments raise ``AssertionError`` (or what Python
raises), as the reference does.

Documented behaviour used here (``mlutils.pattern`` must agree):

* A layout is a list of steps, each a list of ``(t, q)``; within a step
  coordinates are in increasing ``q`` (one provider, Unrolled, keeps its
  groups' order).  A codebook's ``t`` never decreases along the steps, no
  step holds a codebook twice, every ``q`` is in ``[0, n_q)``; a codebook's
  first ``t`` must be >= 0.
* ``max_delay`` = (largest ``t + 1`` over the steps after the first, or 0)
  minus ``timesteps``; ``valid_layout`` is ``layout[:len(layout) - max_delay]``
  with Python's slice rules.
* ``build``: output cell ``(q, s)`` holds ``z[q, t]`` when step ``s`` carries
  ``(t, q)`` with ``t`` < the input's length, else the special token.
* ``revert``: output cell ``(q, t)`` holds ``s[q, step]`` for the last step
  (< the input's length) carrying ``(t, q)``, else the special token; for
  logits, a layout starting with the special step is read one step earlier
  (the model predicts step ``s + 1`` at ``s``).
"""
from __future__ import annotations

import functools
from collections import namedtuple
from typing import Dict, List, Optional, Tuple

import numpy as np

RefCoord = namedtuple("RefCoord", ["t", "q"])


def _steps(count: int) -> List[list]:
    return [[] for _ in range(max(count, 0))]


def _place(layout: List[list], placed: Dict[int, List[Tuple[int, int]]]) -> List[list]:
    """Puts the coordinates placed per step (already in their step order) into layout."""
    for s, coords in placed.items():
        layout[s].extend(RefCoord(t, q) for t, q in coords)
    return layout


class RefPattern:
    """A layout with its checks, properties and (cached) index tables."""

    def __init__(self, layout: list, timesteps: int, n_q: int) -> None:
        assert len(layout) > 0, "a layout has at least one step"
        self.layout = layout
        self.timesteps = timesteps
        self.n_q = n_q
        seen_t = [0] * n_q
        for s, step in enumerate(layout):
            qs = [c.q for c in step]
            assert len(set(qs)) == len(qs), f"step {s} holds a codebook twice"
            for c in step:
                assert 0 <= c.q < n_q, f"codebook {c.q} at step {s} is outside [0, {n_q})"
                assert c.t >= seen_t[c.q], f"codebook {c.q} goes back in time at step {s}"
                seen_t[c.q] = c.t
        self.build_tables = functools.lru_cache(100)(self.build_tables)
        self.revert_tables = functools.lru_cache(100)(self.revert_tables)

    # ---- properties
    @property
    def num_sequence_steps(self) -> int:
        return len(self.layout) - 1

    @property
    def max_delay(self) -> int:
        ends = [c.t + 1 for step in self.layout[1:] for c in step]
        return max(ends, default=0) - self.timesteps

    @property
    def valid_layout(self) -> list:
        return self.layout[: len(self.layout) - self.max_delay]

    def starts_with_special_token(self) -> bool:
        return len(self.layout[0]) == 0

    def get_sequence_coords_with_timestep(self, t: int, q: Optional[int] = None) -> list:
        assert t <= self.timesteps, "timestep past the pattern"
        assert q is None or q <= self.n_q, "codebook past the pattern"
        return [(s, c) for s, step in enumerate(self.layout) for c in step
                if c.t == t and (q is None or c.q == q)]

    def get_steps_with_timestep(self, t: int, q: Optional[int] = None) -> list:
        return [s for s, _ in self.get_sequence_coords_with_timestep(t, q)]

    def get_first_step_with_timesteps(self, t: int, q: Optional[int] = None) -> Optional[int]:
        steps = self.get_steps_with_timestep(t, q)
        return steps[0] if steps else None

    # ---- index tables (numpy), one cell at a time
    def build_tables(self, T: int, K: int, valid: bool) -> Tuple[np.ndarray, np.ndarray]:
        """(indexes[K, S], mask[K, S]) into z flattened to K*T plus the special cell K*T."""
        assert K == self.n_q, "codebooks do not match the pattern"
        assert T <= self.timesteps, "input longer than the pattern"
        steps = self.valid_layout if valid else self.layout
        indexes = np.empty((K, len(steps)), dtype=np.int64)
        mask = np.empty((K, len(steps)), dtype=bool)
        for s, step in enumerate(steps):
            t_of = {c.q: c.t for c in step}  # which timestep of each codebook this step carries
            for q in range(K):
                t = t_of.get(q)
                hit = t is not None and t < T
                indexes[q, s] = q * T + t if hit else K * T
                mask[q, s] = hit
        return indexes, mask

    def revert_tables(self, S: int, K: int, valid: bool, model_output: bool) -> Tuple[np.ndarray, np.ndarray]:
        """(indexes[K, timesteps], mask) into the sequence flattened to K*S plus the special cell K*S."""
        assert K == self.n_q, "codebooks do not match the pattern"
        steps = self.valid_layout if valid else self.layout
        assert S <= len(steps), "sequence longer than the pattern"
        shift = 1 if model_output and self.starts_with_special_token() else 0
        T = self.timesteps
        step_of: Dict[Tuple[int, int], int] = {}  # (t, q) -> the last step < S carrying it
        for s in range(shift, len(steps)):
            if s - shift >= S:
                break
            for c in steps[s]:
                step_of[(c.t, c.q)] = s - shift
        indexes = np.empty((K, T), dtype=np.int64)
        mask = np.empty((K, T), dtype=bool)
        for q in range(K):
            for t in range(T):
                s = step_of.get((t, q))
                indexes[q, t] = q * S + s if s is not None else K * S
                mask[q, t] = s is not None
        return indexes, mask

    # ---- gathers: the flattened input with one special cell appended, indexed
    @staticmethod
    def _gather(x, lead: int, indexes: np.ndarray, special, shape_tail):
        import torch

        idx = torch.from_numpy(indexes).to(x.device)
        flat = x.reshape(*x.shape[:lead], -1)
        cell = torch.zeros_like(flat[..., :1]) + special
        flat = torch.cat([flat, cell], dim=-1)
        values = flat[..., idx.reshape(-1)].reshape(*x.shape[:lead], *shape_tail)
        return values, idx

    def build_pattern_sequence(self, z, special_token, keep_only_valid_steps: bool = False):
        import torch

        B, K, T = z.shape
        indexes, mask = self.build_tables(T, K, bool(keep_only_valid_steps))
        values, idx = self._gather(z, 1, indexes, special_token, indexes.shape)
        return values, idx, torch.from_numpy(mask).to(z.device)

    def revert_pattern_sequence(self, s, special_token, keep_only_valid_steps: bool = False):
        import torch

        B, K, S = s.shape
        indexes, mask = self.revert_tables(S, K, bool(keep_only_valid_steps), False)
        values, idx = self._gather(s, 1, indexes, special_token, indexes.shape)
        return values, idx, torch.from_numpy(mask).to(s.device)

    def revert_pattern_logits(self, logits, special_token, keep_only_valid_steps: bool = False):
        import torch

        B, card, K, S = logits.shape
        indexes, mask = self.revert_tables(S, K, bool(keep_only_valid_steps), True)
        values, idx = self._gather(logits, 2, indexes, special_token, indexes.shape)
        return values, idx, torch.from_numpy(mask).to(logits.device)


class RefProvider:
    def __init__(self, n_q: int) -> None:
        assert n_q > 0, "n_q must be positive"
        self.n_q = n_q
        self.get_pattern = functools.lru_cache(100)(self.get_pattern)

    def get_pattern(self, timesteps: int) -> RefPattern:  # pragma: no cover - abstract
        raise NotImplementedError


class RefDelayed(RefProvider):
    """Codebook q at step (start of the delayed part) + t + delays[q] - flatten_first;
    the first `flatten_first` timesteps come before it one codebook per step; the
    special step (unless empty_initial < 0) and `empty_initial` empty steps lead."""

    def __init__(self, n_q: int, delays=None, flatten_first: int = 0, empty_initial: int = 0) -> None:
        super().__init__(n_q)
        self.delays = list(range(n_q)) if delays is None else list(delays)
        assert len(self.delays) == n_q, "one delay per codebook"
        assert all(a <= b for a, b in zip(self.delays, self.delays[1:])), "delays must be sorted"
        self.flatten_first = flatten_first
        self.empty_initial = empty_initial

    def get_pattern(self, T: int) -> RefPattern:
        K, ff, d = self.n_q, self.flatten_first, self.delays
        lead = (0 if self.empty_initial < 0 else 1) + max(self.empty_initial, 0)
        flat = K * min(T, ff) if ff > 0 else 0         # steps of the flattened head
        tail = max(T + max(d) - ff, 0)                 # steps of the delayed part
        layout = _steps(lead + flat + tail)
        placed: Dict[int, List[Tuple[int, int]]] = {}
        for t in range(min(T, ff) if ff > 0 else 0):
            for q in range(K):
                placed.setdefault(lead + t * K + q, []).append((t, q))
        for q in range(K):
            # the delayed part's step i carries timestep ff + i - delays[q] of codebook q
            # (a timestep before flatten_first or a step before the part: none)
            for t in range(max(ff, ff - d[q]), T + max(d) - d[q]):
                placed.setdefault(lead + flat + t + d[q] - ff, []).append((t, q))
        for s in placed:
            placed[s].sort(key=lambda c: c[1])
        return RefPattern(_place(layout, placed), timesteps=T, n_q=K)


class RefParallel(RefProvider):
    """Every codebook of timestep t at one step, after the leading steps of Delayed."""

    def __init__(self, n_q: int, empty_initial: int = 0) -> None:
        super().__init__(n_q)
        self.empty_initial = empty_initial

    def get_pattern(self, T: int) -> RefPattern:
        lead = (0 if self.empty_initial < 0 else 1) + max(self.empty_initial, 0)
        layout = _steps(lead) + [[RefCoord(t, q) for q in range(self.n_q)] for t in range(T)]
        return RefPattern(layout, timesteps=T, n_q=self.n_q)


class RefUnrolled(RefProvider):
    """Codebooks grouped by their `flattening` index (0 .. max: the inner steps of a
    timestep); every (t, inner step) is one entry keyed t + the group's delay (an
    empty entry keyed t when no group has that inner step); after the special step,
    entries run by key, then by their coordinates (empty first, then the earlier
    timestep, then the lower codebook); the special step is keyed -1.  Entries keyed
    past T + max(delays), timesteps outside [0, T + max(delays)) and groups with a
    negative flattening index are left out."""

    def __init__(self, n_q: int, flattening=None, delays=None) -> None:
        super().__init__(n_q)
        flattening = list(range(n_q)) if flattening is None else list(flattening)
        delays = [0] * n_q if delays is None else list(delays)
        assert len(flattening) == n_q, "one flattening index per codebook"
        assert len(delays) == n_q, "one delay per codebook"
        assert all(a <= b for a, b in zip(flattening, flattening[1:])), "flattening must be sorted"
        assert all(a <= b for a, b in zip(delays, delays[1:])), "delays must be sorted"
        self.groups: Dict[int, Tuple[List[int], int]] = {}
        for q, (inner, delay) in enumerate(zip(flattening, delays)):
            qs, d = self.groups.setdefault(inner, ([], delay))
            assert d == delay, "inconsistent delay and flattening"
            qs.append(q)
        self.max_delay = max(delays)

    def get_pattern(self, T: int) -> RefPattern:
        top = T + self.max_delay
        inner = max(self.groups) + 1
        gaps = sum(1 for v in range(inner) if v not in self.groups)
        layout: List[list] = []
        # the special step is keyed -1: a negative delay can key entries before it
        lowest = min([-1] + [d for v, (_, d) in self.groups.items() if 0 <= v < inner])
        for key in range(lowest, max(top, 0)):
            if key == -1:
                layout.append([])
            layout += _steps(gaps if key >= 0 else 0)  # empty entries of timestep `key` sort first
            entries = []
            for v in range(inner):
                if v in self.groups:
                    qs, d = self.groups[v]
                    t = key - d
                    if 0 <= t < top:
                        entries.append([RefCoord(t, q) for q in qs])
            entries.sort(key=lambda e: [(c.t, c.q) for c in e])
            layout += entries
        return RefPattern(layout, timesteps=T, n_q=self.n_q)


class RefCoarseFirst(RefProvider):
    """Codebook 0 alone for every timestep, then codebooks 1.. delayed as in Delayed
    (codebook q + 1 carries timestep i - delays[q] at the i-th step of that part)."""

    def __init__(self, n_q: int, delays=None) -> None:
        super().__init__(n_q)
        self.delays = [0] * (n_q - 1) if delays is None else list(delays)
        assert len(self.delays) == n_q - 1, "one delay per codebook after the first"
        assert all(a <= b for a, b in zip(self.delays, self.delays[1:])), "delays must be sorted"

    def get_pattern(self, T: int) -> RefPattern:
        top = max(self.delays)  # ValueError for a single codebook, as in the reference
        layout = [[]] + [[RefCoord(t, 0)] for t in range(T)] + _steps(T + top)
        for i in range(max(T + top, 0)):
            layout[1 + T + i] = [RefCoord(i - d, q + 1) for q, d in enumerate(self.delays) if i - d >= 0]
        return RefPattern(layout, timesteps=T, n_q=self.n_q)


class RefMusicLM(RefProvider):
    """Codebooks in groups of `group_by`: group after group, each timestep of a group
    with its codebooks one per step (past n_q they are refused by the layout check)."""

    def __init__(self, n_q: int, group_by: int = 2) -> None:
        super().__init__(n_q)
        self.group_by = group_by

    def get_pattern(self, T: int) -> RefPattern:
        g = self.group_by
        assert g != 0, "group_by must not be 0"
        groups = -(-self.n_q // g) if g > 0 else 0
        layout: List[list] = [[]]
        for k in range(groups):
            layout += [[RefCoord(t, k * g + j)] for t in range(T) for j in range(g)]
        return RefPattern(layout, timesteps=T, n_q=self.n_q)
