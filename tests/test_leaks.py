"""Bounded memory: many calls of each public API (valid and invalid input)
must not grow the process.

A release build has no sys.gettotalrefcount, so two counters stand in for
it: sys.getallocatedblocks() (Python's small-object allocator: one leaked
object per call shows as one block per call) and, on glibc, mallinfo2()'s
bytes in use (the C heap: every core allocation goes through malloc).
Elsewhere the resident set size is the (coarser) measure.  A loop that grows
is run once more (with full collections) before it fails, so that one-off
growth (caches, free lists, cycles promoted to the old generation) is not
taken for a leak.  The sanitizer build is skipped (ASan replaces malloc and
keeps freed memory in quarantine).  The file takes about 10 s.
"""
import ctypes
import gc
import os

import numpy as np
import pytest

import mlutils
from mlutils import _core, _safetensors as S, io as mio, pattern as P, sampler as SM

pytestmark = [
    pytest.mark.leaks,
    pytest.mark.skipif("asan" in mlutils.features, reason="ASan replaces malloc and quarantines freed memory"),
]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


def _mallinfo2():
    try:
        f = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _MallInfo2
    f.argtypes = []
    return f


_MALLINFO2 = _mallinfo2()


def _heap() -> int:
    """Bytes the C heap has handed out (or the RSS without glibc's mallinfo2)."""
    if _MALLINFO2 is not None:
        m = _MALLINFO2()
        return m.uordblks + m.hblkhd
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _growth(fn, n, full=False):
    # the young generations only unless asked: a full collection can cost
    # more than the loop
    gen = 2 if full else 1
    gc.collect(gen)
    b0, h0 = sys_blocks(), _heap()
    for _ in range(n):
        fn()
    gc.collect(gen)
    return sys_blocks() - b0, _heap() - h0


def sys_blocks() -> int:
    import sys

    return sys.getallocatedblocks()


def bounded(fn, n):
    """Calls fn n times (after a warm-up) and asserts that neither Python's
    objects nor the C heap grew with the count."""
    max_blocks = n // 20 + 50
    max_heap = 8 * n + (64 << 10) if _MALLINFO2 is not None else 2 << 20
    for _ in range(min(n, 100)):
        fn()
    blocks, heap = _growth(fn, n)
    if blocks > max_blocks or heap > max_heap:
        # a leak grows again; a warm-up effect, or cyclic garbage that reached
        # the old generation, does not
        blocks, heap = _growth(fn, n, full=True)
    assert blocks <= max_blocks, f"{n} calls left {blocks} more Python objects"
    assert heap <= max_heap, f"{n} calls grew the C heap by {heap} bytes"


def raises(exc, f, *args, **kw):
    """A call of f(*args, **kw) that must raise exc."""
    def call():
        try:
            f(*args, **kw)
        except exc:
            return
        raise AssertionError(f"{f.__name__} did not raise {exc.__name__}")
    return call


def test_bounded_catches_a_leak():
    # the measure itself sees one small object, or one small C allocation, per call
    kept = []
    with pytest.raises(AssertionError, match="more Python objects"):
        bounded(lambda: kept.append(object()), 3000)
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    with pytest.raises(AssertionError, match="C heap|Python objects"):
        bounded(lambda: libc.malloc(24), 3000)


# ------------------------------------------------------------------------- json

DOC = {"a": [1, 2.123456789, "x\u00e9\n", None, True, -(2**63)], "b": {"c": np.float32(1.5), "d": np.arange(3)},
       "n": float("nan"), 3: (1, 2)}


def test_json_stringify_and_parse():
    text = mio.json_stringify(DOC)
    bounded(lambda: mio.json_stringify(DOC, truncate=True, pretty=True), 3000)
    bounded(lambda: mio.json_stringify(DOC, raw=True), 3000)
    bounded(lambda: mio.json_parse(text), 3000)
    bounded(lambda: mio.json_parse(b'[NaN, "a\\u0000b", -Infinity, {"k": [1.5e300]}]'), 3000)
    bounded(lambda: _core.truncate_json('{"a": 1.123456789, "b": "2.123456789"}'), 3000)


def test_json_errors():
    cyclic = []
    cyclic.append(cyclic)
    bounded(raises(mlutils.JSONDecodeError, mio.json_parse, '{"a": 1, "a": 2}'), 3000)
    bounded(raises(mlutils.JSONDecodeError, mio.json_parse, b'[1, \xff]'), 3000)
    bounded(raises(mlutils.JSONDecodeError, mio.json_parse, "[NaN, tru"), 3000)
    bounded(raises(ValueError, mio.json_parse, "\ud800"), 3000)
    bounded(raises(TypeError, mio.json_parse, 5), 3000)
    bounded(raises(TypeError, mio.json_stringify, {"a": [1, {2}]}), 3000)
    bounded(raises(TypeError, mio.json_stringify, {(1,): 2}), 3000)
    bounded(raises(OverflowError, mio.json_stringify, [2**70]), 3000)
    bounded(raises(ValueError, mio.json_stringify, ["\ud800"]), 3000)
    bounded(raises(ValueError, mio.json_stringify, cyclic), 1000)


BIG = {"text": "x" * 65536, "doc": DOC}


def test_json_files(tmp_path):
    p = str(tmp_path / "x.json")
    bounded(lambda: mio.json_write(BIG, p), 60)  # each one fsyncs: few calls, a big document
    bounded(lambda: mio.json_read(p), 3000)
    bounded(raises(OSError, mio.json_write, DOC, str(tmp_path / "missing" / "x.json")), 3000)
    bounded(raises(ValueError, _core.write_file_atomic, str(tmp_path) + "/", b"x"), 3000)


# ------------------------------------------------------------------- safetensors

TENSORS = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.int64),
           "r": S.RawTensor("F4", (4,), b"\x12\x34")}


def test_safetensors_save_and_load(tmp_path):
    blob = S.save(TENSORS, {"format": "pt", "note": "n" * 40})
    path = str(tmp_path / "m.safetensors")
    S.save_file(TENSORS, path, {"format": "pt", "note": "n" * 40})

    def lazy():
        with S.safe_open(path) as f:
            f.get_tensor("w")
            f.get_slice("w")[1:, ::2]
            f.metadata()
            f.keys()

    bounded(lambda: S.save(TENSORS, {"format": "pt", "note": "n" * 40}), 3000)
    bounded(lambda: S.load(blob), 3000)
    bounded(lambda: S.load_file(path), 3000)
    bounded(lambda: S.read_header(path), 3000)
    bounded(lazy, 3000)
    bounded(lambda: S.save_file(TENSORS, path), 60)  # each one fsyncs


def test_safetensors_invalid(tmp_path):
    blob = S.save(TENSORS)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[:-3])
    path = str(tmp_path / "m.safetensors")
    S.save_file(TENSORS, path)
    bounded(raises(mlutils.SafetensorsError, S.load, blob[:-3]), 3000)
    bounded(raises(mlutils.SafetensorsError, S.load, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1} "), 3000)
    bounded(raises(mlutils.SafetensorsError, S.load_file, str(cut)), 3000)
    bounded(raises(mlutils.SafetensorsError, S.verify, str(cut)), 3000)
    bounded(raises(OSError, S.safe_open, str(tmp_path / "missing")), 3000)
    bounded(raises(OSError, S.load_file, str(tmp_path)), 3000)
    bounded(raises(mlutils.SafetensorsError, S.save, {"a": S.RawTensor("F32", (3,), b"ab")}), 3000)
    bounded(raises(TypeError, S.save, {"a": S.RawTensor("U8", (2.5,), b"ab")}), 3000)
    bounded(raises(TypeError, S.save, {"a": np.zeros(2, np.complex128)}), 3000)

    def missing_name():
        with S.safe_open(path) as f:
            f.get_tensor("nope")

    bounded(raises(mlutils.SafetensorsError, missing_name), 3000)


# ---------------------------------------------------------------------- samplers

def test_samplers():
    ordered = SM.OrderedSampler(50, world_size=2, rank=1)
    shuffled = SM.RandomSampler(1000, seed=3)
    pool = SM.PoolSampler(list(range(10)), keep_all=True)
    buckets = {"a": [("p", 1.0)] * 10, "b": [("q", 2.0)] * 7}
    batched = SM.BatchedOrderedSampler(buckets, max_duration=4.0, shuffle=True)
    bounded(lambda: list(ordered), 3000)
    bounded(lambda: shuffled.take(64), 3000)
    bounded(lambda: pool.sample(), 3000)
    bounded(lambda: list(batched), 3000)
    bounded(lambda: batched.take(2), 3000)
    bounded(lambda: SM.BatchedOrderedSampler(buckets, max_duration=4.0), 3000)


def test_sampler_states_and_errors():
    s = SM.RandomSampler(100, seed=1)
    state = s.state_dict()
    bounded(lambda: s.load_state_dict(s.state_dict()), 3000)
    bounded(raises(mlutils.SamplerStateError, s.load_state_dict, dict(state, length=5)), 3000)
    bounded(raises(mlutils.SamplerStateError, s.load_state_dict, dict(state, index=10**6)), 3000)
    bounded(raises(mlutils.SamplerStateError, s.load_state_dict, dict(state, seed=-1)), 3000)
    bounded(raises(mlutils.SamplerStateError, s.load_state_dict, dict(state, kind="PoolSampler")), 3000)
    bounded(raises(mlutils.SamplerStateError, s.load_state_dict, [1, 2]), 3000)
    bounded(raises(ValueError, SM.OrderedSampler, -1), 3000)
    bounded(raises(ValueError, s.take, 1.5), 3000)
    bounded(raises(ValueError, SM.BatchedOrderedSampler, {"a": [("p", -1.0)]}, max_duration=1), 3000)
    bounded(raises(ValueError, SM.PoolSampler([]).sample), 3000)


# ---------------------------------------------------------------------- patterns

def test_patterns():
    z = np.arange(2 * 4 * 10, dtype=np.int64).reshape(2, 4, 10)

    def build_and_revert():
        pat = P.DelayedPatternProvider(4, flatten_first=1, empty_initial=1).get_pattern(10)
        values, _, _ = pat.build_pattern_sequence(z, -1)
        pat.revert_pattern_sequence(values, -1, keep_only_valid_steps=False)
        pat.revert_pattern_logits(values[:, None].astype(np.float32), 0.5)
        pat.get_sequence_coords_with_timestep(3)
        return pat.layout

    bounded(build_and_revert, 3000)
    bounded(lambda: P.UnrolledPatternProvider(4, [0, 1, 1, 2], [0, 1, 1, 2]).get_pattern(7).valid_layout, 3000)
    bounded(lambda: P.Pattern([[], [(0, 0), (0, 1)], [(1, 0)]], timesteps=2, n_q=2), 3000)


def test_pattern_errors():
    pat = P.DelayedPatternProvider(2).get_pattern(5)
    bounded(raises(P.PatternError, P.Pattern, [[], [(0, 5)]], timesteps=1, n_q=1), 3000)
    bounded(raises(P.PatternError, P.Pattern, [[], [(1, 0)], [(0, 0)]], timesteps=2, n_q=1), 3000)
    bounded(raises(TypeError, P.Pattern, [[], [("x", 0)]], timesteps=1, n_q=1), 3000)
    bounded(raises(TypeError, P.Pattern, 5, timesteps=1, n_q=1), 3000)
    bounded(raises(P.PatternError, P.DelayedPatternProvider, 3, [2, 1, 0]), 3000)
    bounded(raises(P.PatternError, pat.build_pattern_sequence, np.zeros((1, 3, 5)), 0), 3000)
    bounded(raises(P.PatternError, pat.revert_pattern_sequence, np.zeros((1, 2, 99)), 0), 3000)
    bounded(raises(TypeError, pat.build_pattern_sequence, np.zeros((1, 2, 5)), "x"), 3000)
