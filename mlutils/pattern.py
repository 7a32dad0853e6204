"""Codebook interleaving patterns for multi-codebook token sequences.

The names and results follow the public reference (audiocraft's codebook
patterns, with the leading-special-step option of ``empty_initial < 0``):
a :class:`Pattern` holds a layout -- for each sequence step, the
:class:`LayoutCoord` ``(t, q)`` it carries -- and turns ``[B, K, T]`` codes
into an interleaved ``[B, K, S]`` sequence and back.  Layouts and index
tables are built in C (``mlutils._core``) and cached per arguments; the
gathers run in C for numpy arrays and CPU tensors and in a CUDA kernel for
CUDA tensors.  Inputs may be numpy arrays or torch tensors of any integer or
float dtype; outputs keep the input's kind, dtype and device (promoted the
way ``z + special_token`` promotes, as the reference's concatenation does).
Bad providers or inputs raise :class:`mlutils.PatternError` (a ValueError, and an
AssertionError as the reference's asserts were).
"""
from __future__ import annotations

import logging
import operator
import typing as tp
from abc import ABC, abstractmethod
from collections import OrderedDict, namedtuple
from functools import lru_cache

import numpy as np

from . import _core
from ._core import PatternError
from ._torch import loaded_torch

if tp.TYPE_CHECKING:
    import torch

#: What the pattern methods take and give: a NumPy array or a torch tensor.
_Array = tp.Union[np.ndarray, "torch.Tensor"]

__all__ = [
    "LayoutCoord",
    "PatternLayout",
    "Pattern",
    "PatternError",
    "CodebooksPatternProvider",
    "DelayedPatternProvider",
    "ParallelPatternProvider",
    "UnrolledPatternProvider",
    "CoarseFirstPattern",
    "MusicLMPattern",
]

logger = logging.getLogger(__name__)

LayoutCoord = namedtuple("LayoutCoord", ["t", "q"])  # (timestep, codebook index)
PatternLayout = tp.List[tp.List[LayoutCoord]]

_CACHE_SIZE = 100  # tables kept per pattern, as the reference's lru_cache(100)


def _is_torch(x: tp.Any) -> bool:
    torch = loaded_torch()
    return torch is not None and isinstance(x, torch.Tensor)


def _index(value: tp.Any, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None


class _Tables:
    """One cached index table: numpy indexes/mask/runs plus per-device torch copies."""

    __slots__ = ("indexes", "mask", "runs", "n_in", "torch")

    def __init__(self, indexes: np.ndarray, mask: np.ndarray, runs: np.ndarray, n_in: int) -> None:
        self.indexes = indexes
        self.mask = mask
        self.runs = runs
        self.n_in = n_in
        self.torch: dict = {}

    def for_torch(self, device: torch.device) -> tuple:
        key = str(device)
        pair = self.torch.get(key)
        if pair is None:
            torch = loaded_torch()
            idx = torch.from_numpy(self.indexes)
            mask = torch.from_numpy(self.mask)
            if key != "cpu":
                idx, mask = idx.to(device), mask.to(device)
            pair = self.torch[key] = (idx, mask)
        return pair


_special_cache: dict = {}


def _special_torch(src_dtype: torch.dtype, special: tp.Any) -> tuple:
    """(result dtype, bytes of one element) of ``zeros(dtype) + special``, as the reference appends it."""
    key = (src_dtype, type(special), _special_key(special))
    hit = _special_cache.get(key)
    if hit is None:
        torch = loaded_torch()
        v = torch.zeros(1, dtype=src_dtype) + special
        hit = (v.dtype, v.view(torch.uint8).numpy().tobytes())
        if len(_special_cache) > 256:
            _special_cache.clear()
        _special_cache[key] = hit
    return hit


def _special_numpy(src_dtype: np.dtype, special: tp.Any) -> tuple:
    key = ("np", src_dtype, type(special), _special_key(special))
    hit = _special_cache.get(key)
    if hit is None:
        try:
            v = np.zeros(1, dtype=src_dtype) + special
        except (OverflowError, TypeError) as exc:
            raise PatternError(f"special_token {special!r} does not fit dtype {src_dtype}: {exc}") from exc
        hit = (v.dtype, v.view(np.uint8).tobytes())
        if len(_special_cache) > 256:
            _special_cache.clear()
        _special_cache[key] = hit
    return hit


def _special_key(special: tp.Any) -> tp.Any:
    # floats by their bits, so that -0.0 and 0.0 (equal as keys) stay apart
    return special.hex() if isinstance(special, float) else special


def _check_special(special: tp.Any) -> tp.Any:
    if isinstance(special, (int, float, np.bool_, np.integer, np.floating)):
        return special.item() if isinstance(special, np.generic) else special
    if _is_torch(special) and special.numel() == 1:
        return special.item()
    raise TypeError(f"special_token must be an int or a float, got {type(special).__name__}")


def _dispatch(x: _Array) -> str:
    """Which gather serves x: 'numpy', 'cpu' (torch, C), 'cuda' (torch, kernel) or 'torch' (torch indexing)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if _is_torch(x):
        torch = loaded_torch()
        if x.requires_grad and torch.is_grad_enabled():
            return "torch"  # keep autograd: the reference's own indexing
        if x.device.type == "cpu":
            return "cpu"
        if x.device.type == "cuda" and _core.cuda_built():
            return "cuda"
        return "torch"
    raise TypeError(f"expected a numpy array or a torch tensor, got {type(x).__name__}")


def _gather(x: _Array, tab: _Tables, special: tp.Any, outer_shape: tuple, out_tail: tuple) -> _Array:
    """values[..., j] = x_flat[..., idx[j]] (special where idx[j] == n_in), shaped outer_shape + out_tail."""
    path = _dispatch(x)
    outer = 1
    for d in outer_shape:
        outer *= d
    n_in = tab.n_in
    n_out = tab.indexes.size
    if path == "numpy":
        dtype, spec = _special_numpy(x.dtype, special)
        src = np.ascontiguousarray(x, dtype=dtype)
        out = np.empty(outer_shape + out_tail, dtype=dtype)
        _core.pattern_gather(tab.runs, src.reshape(-1).view(np.uint8), outer, n_in, n_out, spec,
                             out.reshape(-1).view(np.uint8))
        return out
    torch = loaded_torch()
    if path == "torch":
        idx, _ = tab.for_torch(x.device)
        flat = x.reshape(outer_shape + (-1,))
        flat = torch.cat([flat, torch.zeros_like(flat[..., :1]) + special], dim=-1)
        return flat[..., idx.view(-1)].view(outer_shape + out_tail)
    dtype, spec = _special_torch(x.dtype, special)
    src = x.detach()
    if src.is_complex():  # the C and CUDA gathers copy memory: apply lazy conjugation first
        src = src.resolve_conj().resolve_neg()
    if src.dtype != dtype:
        src = src.to(dtype)
    src = src.contiguous()
    out = torch.empty(outer_shape + out_tail, dtype=dtype, device=x.device)
    if path == "cpu":
        _core.pattern_gather(tab.runs, src.view(-1).view(torch.uint8).numpy(), outer, n_in, n_out, spec,
                             out.view(-1).view(torch.uint8).numpy())
        return out
    idx, _ = tab.for_torch(x.device)
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        _core.cuda_pattern_gather(idx.data_ptr(), n_out, src.data_ptr(), outer, n_in, spec,
                                  out.data_ptr(), stream)
    return out


def _shape(x: tp.Any, rank: int, what: str) -> tuple:
    if not (isinstance(x, np.ndarray) or _is_torch(x)):
        raise TypeError(f"{what} must be a numpy array or a torch tensor, got {type(x).__name__}")
    shape = tuple(int(d) for d in x.shape)
    if len(shape) != rank:
        raise PatternError(f"{what} must have {rank} dimensions, got shape {list(shape)}")
    return shape


class Pattern:
    """A layout of (t, q) coordinates per sequence step over ``n_q`` codebooks and ``timesteps`` steps."""

    __hash__ = None  # type: ignore[assignment]  # like the reference's (non-frozen) dataclass

    def __init__(self, layout: PatternLayout, timesteps: int, n_q: int) -> None:
        """Checks the layout (PatternError when a codebook goes back in time or repeats in a step)."""
        timesteps = _index(timesteps, "timesteps")
        n_q = _index(n_q, "n_q")
        self._set_table(_core.pattern_from_layout(layout, n_q, timesteps), layout)

    @classmethod
    def _from_table(cls, table: tp.Any) -> "Pattern":
        self = cls.__new__(cls)
        self._set_table(table, None)
        return self

    def _set_table(self, table: tp.Any, layout: tp.Optional[list]) -> None:
        self._table = table
        self._layout = layout
        self.timesteps = table.timesteps
        self.n_q = table.n_q
        self._cache: "OrderedDict[tuple, _Tables]" = OrderedDict()
        logger.debug("New pattern, time steps: %d, sequence steps: %d", table.timesteps, table.n_steps)

    # -- layout -----------------------------------------------------------------
    @property
    def layout(self) -> PatternLayout:
        """The layout as a list of lists of LayoutCoord (built on first use)."""
        if self._layout is None:
            self._layout = self._table.layout(LayoutCoord)
        return self._layout

    @layout.setter
    def layout(self, value: PatternLayout) -> None:
        self._set_table(_core.pattern_from_layout(value, self.n_q, self.timesteps), value)

    def __len__(self) -> int:
        return self._table.n_steps

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._table.equals(other._table)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"Pattern(layout={self.layout!r}, timesteps={self.timesteps!r}, n_q={self.n_q!r})"

    @property
    def num_sequence_steps(self) -> int:
        """len(layout) - 1."""
        return self._table.n_steps - 1

    @property
    def max_delay(self) -> int:
        """Largest t + 1 over layout[1:] (or 0) minus timesteps."""
        return self._table.max_delay

    @property
    def valid_layout(self) -> PatternLayout:
        """layout[:len(layout) - max_delay]: the fully defined steps."""
        return self.layout[: self._table.n_steps - self._table.max_delay]

    def starts_with_special_token(self) -> bool:
        """True when the first step is empty (a special token starts the sequence)."""
        return self._table.starts_with_special

    def get_sequence_coords_with_timestep(self, t: int, q: tp.Optional[int] = None) -> tp.List[tuple]:
        """[(step, LayoutCoord)] of timestep t (and codebook q), in layout order."""
        t = _index(t, "t")
        if t > self.timesteps:
            raise PatternError(
                f"provided timesteps is greater than the pattern's number of timesteps: {t} > {self.timesteps}")
        if q is not None:
            q = _index(q, "q")
            if q > self.n_q:
                raise PatternError(
                    f"provided number of codebooks is greater than the pattern's number of codebooks: "
                    f"{q} > {self.n_q}")
            if q < 0:
                return []
        found = self._table.find(t, -1 if q is None else q)
        return [(s, LayoutCoord(ct, cq)) for s, ct, cq in found]

    def get_steps_with_timestep(self, t: int, q: tp.Optional[int] = None) -> tp.List[int]:
        """Steps carrying timestep t (and codebook q)."""
        return [s for s, _ in self.get_sequence_coords_with_timestep(t, q)]

    def get_first_step_with_timesteps(self, t: int, q: tp.Optional[int] = None) -> tp.Optional[int]:
        """The first step carrying timestep t (and codebook q), or None."""
        steps = self.get_steps_with_timestep(t, q)
        return steps[0] if steps else None

    # -- index tables -----------------------------------------------------------
    def _tables(self, key: tuple) -> _Tables:
        tab = self._cache.get(key)
        if tab is not None:
            try:
                self._cache.move_to_end(key)
            except KeyError:  # evicted meanwhile by another thread: still valid
                pass
            return tab
        kind, n, k, valid, model_output = key
        if kind == "build":
            idx, mask, runs = self._table.build_indexes(n, k, valid)
        else:
            idx, mask, runs = self._table.revert_indexes(n, k, valid, model_output)
        tab = _Tables(idx, mask, runs, k * n)
        self._cache[key] = tab
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return tab

    def _pair(self, x: _Array, tab: _Tables) -> tuple:
        if isinstance(x, np.ndarray):
            return tab.indexes, tab.mask
        return tab.for_torch(x.device)

    def build_pattern_sequence(self, z: _Array, special_token: tp.Union[int, float],
                               keep_only_valid_steps: bool = False) -> tuple:
        """z [B, K, T] -> (values [B, K, S], indexes [K, S], mask [K, S]); unfilled positions hold special_token."""
        B, K, T = _shape(z, 3, "z")
        special_token = _check_special(special_token)
        tab = self._tables(("build", T, K, bool(keep_only_valid_steps), False))
        S = tab.indexes.shape[1]
        values = _gather(z, tab, special_token, (B,), (K, S))
        return (values,) + self._pair(z, tab)

    def revert_pattern_sequence(self, s: _Array, special_token: tp.Union[int, float],
                                keep_only_valid_steps: bool = False) -> tuple:
        """s [B, K, S] -> (values [B, K, T], indexes [K, T], mask [K, T]), T = timesteps."""
        B, K, S = _shape(s, 3, "s")
        special_token = _check_special(special_token)
        tab = self._tables(("revert", S, K, bool(keep_only_valid_steps), False))
        values = _gather(s, tab, special_token, (B,), (K, self.timesteps))
        return (values,) + self._pair(s, tab)

    def revert_pattern_logits(self, logits: _Array, special_token: tp.Union[int, float],
                              keep_only_valid_steps: bool = False) -> tuple:
        """logits [B, card, K, S] -> (values [B, card, K, T], indexes [K, T], mask [K, T]), model-output aligned."""
        B, card, K, S = _shape(logits, 4, "logits")
        special_token = _check_special(special_token)
        tab = self._tables(("revert", S, K, bool(keep_only_valid_steps), True))
        values = _gather(logits, tab, special_token, (B, card), (K, self.timesteps))
        return (values,) + self._pair(logits, tab)


class CodebooksPatternProvider(ABC):
    """Provides the Pattern of an interleaving strategy for ``n_q`` codebooks; get_pattern is cached per T."""

    def __init__(self, n_q: int, cached: bool = True) -> None:
        n_q = _index(n_q, "n_q")
        if n_q <= 0:
            raise PatternError(f"n_q must be a positive number of codebooks, got {n_q}")
        self.n_q = n_q
        self.get_pattern = lru_cache(100)(self.get_pattern)  # type: ignore[method-assign]

    @abstractmethod
    def get_pattern(self, timesteps: int) -> Pattern:
        """The pattern for a sequence of ``timesteps`` steps."""
        raise NotImplementedError()


def _int_list(values: tp.Any, what: str) -> list:
    try:
        return [_index(v, what) for v in values]
    except TypeError as exc:
        raise TypeError(f"{what} must be a sequence of ints: {exc}") from None


class DelayedPatternProvider(CodebooksPatternProvider):
    """Codebook q delayed by delays[q] steps (default q); optional flattened start and empty initial steps."""

    def __init__(self, n_q: int, delays: tp.Optional[tp.List[int]] = None,
                 flatten_first: int = 0, empty_initial: int = 0) -> None:
        super().__init__(n_q)
        if delays is None:
            delays = list(range(self.n_q))
        self.delays = delays
        self.flatten_first = _index(flatten_first, "flatten_first")
        self.empty_initial = _index(empty_initial, "empty_initial")
        self._delays = _int_list(delays, "delays")
        _core.pattern_check_delayed(self.n_q, self._delays)

    def get_pattern(self, timesteps: int) -> Pattern:
        """Delayed layout for ``timesteps`` steps."""
        return Pattern._from_table(_core.pattern_delayed(
            self.n_q, self._delays, self.flatten_first, self.empty_initial, _index(timesteps, "timesteps")))


class ParallelPatternProvider(DelayedPatternProvider):
    """All codebooks of a timestep in one step (delays all 0)."""

    def __init__(self, n_q: int, empty_initial: int = 0) -> None:
        super().__init__(n_q, [0] * _index(n_q, "n_q"), empty_initial=empty_initial)


class UnrolledPatternProvider(CodebooksPatternProvider):
    """Codebooks flattened over inner steps (``flattening``, default one per codebook) with per-codebook delays."""

    FlattenedCodebook = namedtuple("FlattenedCodebook", ["codebooks", "delay"])

    def __init__(self, n_q: int, flattening: tp.Optional[tp.List[int]] = None,
                 delays: tp.Optional[tp.List[int]] = None) -> None:
        super().__init__(n_q)
        if flattening is None:
            flattening = list(range(self.n_q))
        if delays is None:
            delays = [0] * self.n_q
        self._flattening = _int_list(flattening, "flattening")
        self._delays = _int_list(delays, "delays")
        _core.pattern_check_unrolled(self.n_q, self._flattening, self._delays)
        self._flattened_codebooks = self._build_flattened_codebooks(self._delays, self._flattening)
        self.max_delay = max(self._delays)

    def _build_flattened_codebooks(self, delays: tp.List[int], flattening: tp.List[int]) -> dict:
        groups: dict = {}
        for q, (inner_step, delay) in enumerate(zip(flattening, delays)):
            if inner_step not in groups:
                groups[inner_step] = UnrolledPatternProvider.FlattenedCodebook(codebooks=[q], delay=delay)
            else:
                groups[inner_step].codebooks.append(q)
        return groups

    @property
    def _num_inner_steps(self) -> int:
        return max(self._flattened_codebooks.keys()) + 1

    def num_virtual_steps(self, timesteps: int) -> int:
        """timesteps * inner steps + 1."""
        return timesteps * self._num_inner_steps + 1

    def get_pattern(self, timesteps: int) -> Pattern:
        """Unrolled layout for ``timesteps`` steps."""
        return Pattern._from_table(_core.pattern_unrolled(
            self.n_q, self._flattening, self._delays, _index(timesteps, "timesteps")))


class CoarseFirstPattern(CodebooksPatternProvider):
    """Codebook 0 over all timesteps first, then the others with ``delays`` (n_q - 1 of them)."""

    def __init__(self, n_q: int, delays: tp.Optional[tp.List[int]] = None) -> None:
        super().__init__(n_q)
        if delays is None:
            delays = [0] * (self.n_q - 1)
        self.delays = delays
        self._delays = _int_list(delays, "delays")
        _core.pattern_check_coarse_first(self.n_q, self._delays)

    def get_pattern(self, timesteps: int) -> Pattern:
        """Coarse-first layout for ``timesteps`` steps."""
        return Pattern._from_table(_core.pattern_coarse_first(
            self.n_q, self._delays, _index(timesteps, "timesteps")))


class MusicLMPattern(CodebooksPatternProvider):
    """Full flattening by groups of ``group_by`` codebooks, each group over all timesteps in turn."""

    def __init__(self, n_q: int, group_by: int = 2) -> None:
        super().__init__(n_q)
        self.group_by = _index(group_by, "group_by")

    def get_pattern(self, timesteps: int) -> Pattern:
        """MusicLM-style layout for ``timesteps`` steps."""
        return Pattern._from_table(_core.pattern_musiclm(
            self.n_q, self.group_by, _index(timesteps, "timesteps")))
