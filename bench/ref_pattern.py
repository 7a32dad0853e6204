"""A plain Python/torch rendering of the public reference's codebook patterns.

This is the baseline of bench/bench_pattern.py and the oracle of
tests/test_pattern*.py: it follows the documented behaviour of audiocraft's
``codebooks_patterns`` (with the ``empty_initial < 0`` / leading special
step variant the seed uses) step by step -- Python lists of named tuples,
index tables filled in loops and cached with ``lru_cache``, torch indexing
for the gathers -- and reports bad arguments with ``AssertionError`` (or
whatever Python raises) as the reference does.
"""
from __future__ import annotations

import typing as tp
from collections import namedtuple
from functools import lru_cache

import numpy as np
import torch

RefCoord = namedtuple("RefCoord", ["t", "q"])


class RefPattern:
    """layout, timesteps, n_q; index tables cached per arguments (lru_cache(100))."""

    def __init__(self, layout: list, timesteps: int, n_q: int) -> None:
        self.layout = layout
        self.timesteps = timesteps
        self.n_q = n_q
        assert len(self.layout) > 0
        self._check()
        self._scatter_build = lru_cache(100)(self._scatter_build)
        self._scatter_revert = lru_cache(100)(self._scatter_revert)

    def _check(self) -> None:
        last = {q: 0 for q in range(self.n_q)}
        for s, coords in enumerate(self.layout):
            if coords:
                seen = set()
                for c in coords:
                    seen.add(c.q)
                    assert c.t >= last[c.q], f"past timestep for codebook {c.q} at step {s}"
                    last[c.q] = c.t
                assert len(seen) == len(coords), f"duplicate codebook at step {s}"

    @property
    def num_sequence_steps(self) -> int:
        return len(self.layout) - 1

    @property
    def max_delay(self) -> int:
        top = 0
        for coords in self.layout[1:]:
            for c in coords:
                top = max(top, c.t + 1)
        return top - self.timesteps

    @property
    def valid_layout(self) -> list:
        return self.layout[: len(self.layout) - self.max_delay]

    def starts_with_special_token(self) -> bool:
        return self.layout[0] == []

    def get_sequence_coords_with_timestep(self, t: int, q: tp.Optional[int] = None) -> list:
        assert t <= self.timesteps
        if q is not None:
            assert q <= self.n_q
        out = []
        for s, coords in enumerate(self.layout):
            for c in coords:
                if c.t == t and (q is None or c.q == q):
                    out.append((s, c))
        return out

    def get_steps_with_timestep(self, t: int, q: tp.Optional[int] = None) -> list:
        return [s for s, _ in self.get_sequence_coords_with_timestep(t, q)]

    def get_first_step_with_timesteps(self, t: int, q: tp.Optional[int] = None) -> tp.Optional[int]:
        steps = self.get_steps_with_timestep(t, q)
        return steps[0] if steps else None

    def _scatter_build(self, timesteps: int, n_q: int, keep_only_valid_steps: bool, device: str = "cpu"):
        assert n_q == self.n_q
        assert timesteps <= self.timesteps
        ref = self.valid_layout if keep_only_valid_steps else self.layout
        indexes = np.full((n_q, len(ref)), n_q * timesteps, dtype=np.int64)
        mask = np.zeros((n_q, len(ref)), dtype=bool)
        for s, coords in enumerate(ref):
            for c in coords:
                if c.t < timesteps:
                    indexes[c.q, s] = c.t + c.q * timesteps
                    mask[c.q, s] = True
        return torch.from_numpy(indexes).to(device), torch.from_numpy(mask).to(device)

    def build_pattern_sequence(self, z: torch.Tensor, special_token, keep_only_valid_steps: bool = False):
        B, K, T = z.shape
        indexes, mask = self._scatter_build(T, K, keep_only_valid_steps, str(z.device))
        flat = z.view(B, -1)
        flat = torch.cat([flat, torch.zeros_like(flat[:, :1]) + special_token], dim=1)
        values = flat[:, indexes.view(-1)].view(B, K, indexes.shape[-1])
        return values, indexes, mask

    def _scatter_revert(self, sequence_steps: int, n_q: int, keep_only_valid_steps: bool = False,
                        is_model_output: bool = False, device: str = "cpu"):
        ref = self.valid_layout if keep_only_valid_steps else self.layout
        timesteps = self.timesteps
        assert n_q == self.n_q
        assert sequence_steps <= len(ref)
        if is_model_output and self.starts_with_special_token():
            ref = ref[1:]
        indexes = np.full((n_q, timesteps), n_q * sequence_steps, dtype=np.int64)
        mask = np.zeros((n_q, timesteps), dtype=bool)
        for s, coords in enumerate(ref):
            if s < sequence_steps:
                for c in coords:
                    if c.t < timesteps:
                        indexes[c.q, c.t] = s + c.q * sequence_steps
                        mask[c.q, c.t] = True
        return torch.from_numpy(indexes).to(device), torch.from_numpy(mask).to(device)

    def revert_pattern_sequence(self, s: torch.Tensor, special_token, keep_only_valid_steps: bool = False):
        B, K, S = s.shape
        indexes, mask = self._scatter_revert(S, K, keep_only_valid_steps, False, str(s.device))
        flat = s.view(B, -1)
        flat = torch.cat([flat, torch.zeros_like(flat[:, :1]) + special_token], dim=1)
        values = flat[:, indexes.view(-1)].view(B, K, indexes.shape[-1])
        return values, indexes, mask

    def revert_pattern_logits(self, logits: torch.Tensor, special_token, keep_only_valid_steps: bool = False):
        B, card, K, S = logits.shape
        indexes, mask = self._scatter_revert(S, K, keep_only_valid_steps, True, str(logits.device))
        flat = logits.reshape(B, card, -1)
        flat = torch.cat([flat, torch.zeros_like(flat[:, :, :1]) + special_token], dim=-1)
        values = flat[:, :, indexes.view(-1)].view(B, card, K, indexes.shape[-1])
        return values, indexes, mask


class RefProvider:
    def __init__(self, n_q: int) -> None:
        assert n_q > 0
        self.n_q = n_q
        self.get_pattern = lru_cache(100)(self.get_pattern)

    def get_pattern(self, timesteps: int) -> RefPattern:  # pragma: no cover - abstract
        raise NotImplementedError


class RefDelayed(RefProvider):
    def __init__(self, n_q: int, delays=None, flatten_first: int = 0, empty_initial: int = 0) -> None:
        super().__init__(n_q)
        self.delays = list(range(n_q)) if delays is None else delays
        self.flatten_first = flatten_first
        self.empty_initial = empty_initial
        assert len(self.delays) == self.n_q
        assert sorted(self.delays) == self.delays

    def get_pattern(self, timesteps: int) -> RefPattern:
        out: list = [] if self.empty_initial < 0 else [[]]
        top = max(self.delays)
        if self.empty_initial:
            out += [[] for _ in range(self.empty_initial)]
        if self.flatten_first:
            for t in range(min(timesteps, self.flatten_first)):
                for q in range(self.n_q):
                    out.append([RefCoord(t, q)])
        for t in range(self.flatten_first, timesteps + top):
            step = []
            for q, d in enumerate(self.delays):
                if t - d >= self.flatten_first:
                    step.append(RefCoord(t - d, q))
            out.append(step)
        return RefPattern(out, timesteps=timesteps, n_q=self.n_q)


class RefParallel(RefDelayed):
    def __init__(self, n_q: int, empty_initial: int = 0) -> None:
        super().__init__(n_q, [0] * n_q, empty_initial=empty_initial)


class RefUnrolled(RefProvider):
    Flat = namedtuple("Flat", ["codebooks", "delay"])

    def __init__(self, n_q: int, flattening=None, delays=None) -> None:
        super().__init__(n_q)
        flattening = list(range(n_q)) if flattening is None else flattening
        delays = [0] * n_q if delays is None else delays
        assert len(flattening) == n_q
        assert len(delays) == n_q
        assert sorted(flattening) == flattening
        assert sorted(delays) == delays
        groups: dict = {}
        for q, (inner, d) in enumerate(zip(flattening, delays)):
            if inner not in groups:
                groups[inner] = RefUnrolled.Flat([q], d)
            else:
                assert groups[inner].delay == d, "inconsistent delay and flattening"
                groups[inner].codebooks.append(q)
        self._groups = groups
        self.max_delay = max(delays)

    def get_pattern(self, timesteps: int) -> RefPattern:
        n_inner = max(self._groups.keys()) + 1
        keyed: list = [(-1, [])]
        top = timesteps + self.max_delay
        for t in range(top):
            for step in range(n_inner):
                if step in self._groups:
                    g = self._groups[step]
                    key = t + g.delay
                    if key < top and t < top:
                        keyed.append((key, [RefCoord(t, q) for q in g.codebooks]))
                else:
                    keyed.append((t, []))
        return RefPattern([c for _, c in sorted(keyed)], timesteps=timesteps, n_q=self.n_q)


class RefCoarseFirst(RefProvider):
    def __init__(self, n_q: int, delays=None) -> None:
        super().__init__(n_q)
        self.delays = [0] * (n_q - 1) if delays is None else delays
        assert len(self.delays) == self.n_q - 1
        assert sorted(self.delays) == self.delays

    def get_pattern(self, timesteps: int) -> RefPattern:
        out: list = [[]]
        for t in range(timesteps):
            out.append([RefCoord(t, 0)])
        top = max(self.delays)
        for t in range(timesteps + top):
            step = []
            for q, d in enumerate(self.delays):
                if t - d >= 0:
                    step.append(RefCoord(t - d, q + 1))
            out.append(step)
        return RefPattern(out, timesteps=timesteps, n_q=self.n_q)


class RefMusicLM(RefProvider):
    def __init__(self, n_q: int, group_by: int = 2) -> None:
        super().__init__(n_q)
        self.group_by = group_by

    def get_pattern(self, timesteps: int) -> RefPattern:
        out: list = [[]]
        for offset in range(0, self.n_q, self.group_by):
            for t in range(timesteps):
                for q in range(offset, offset + self.group_by):
                    out.append([RefCoord(t, q)])
        return RefPattern(out, timesteps=timesteps, n_q=self.n_q)
