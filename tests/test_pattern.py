"""mlutils.pattern without torch: layouts written out from the reference's
documented behaviour, numpy gathers against numpy fancy indexing, bad input."""
import numpy as np
import pytest

import mlutils
from reference import ref_pattern as R  # the reference's documented behaviour (numpy tables)
from mlutils import _core
from mlutils.pattern import (
    CoarseFirstPattern,
    CodebooksPatternProvider,
    DelayedPatternProvider,
    LayoutCoord,
    MusicLMPattern,
    ParallelPatternProvider,
    Pattern,
    PatternError,
    UnrolledPatternProvider,
)


def plain(layout):
    return [[(c.t, c.q) for c in step] for step in layout]


def check_tables(got, ref_tables):
    """The (indexes, mask) a call returned are the reference's, not merely self-consistent."""
    _, indexes, mask = got
    want_i, want_m = ref_tables
    assert isinstance(indexes, np.ndarray) and indexes.dtype == np.int64 and mask.dtype == bool
    assert indexes.shape == want_i.shape and np.array_equal(indexes, want_i)
    assert mask.shape == want_m.shape and np.array_equal(mask, want_m)


def numpy_oracle(x, indexes, special, lead):
    """The reference's gather: flatten, append a special column, index."""
    flat = x.reshape(lead + (-1,))
    col = np.zeros(lead + (1,), dtype=x.dtype) + special
    flat = np.concatenate([flat.astype(col.dtype), col], axis=-1)
    return flat[..., indexes.reshape(-1)]


# --- layouts written out -------------------------------------------------------

def test_delayed_docstring_example():
    # delays=None, T=4, n_q=3: [[S,1,2,3,4],[S,S,1,2,3],[S,S,S,1,2]] over the valid steps
    p = DelayedPatternProvider(3).get_pattern(4)
    z = np.array([[[1, 2, 3, 4]] * 3])
    S = -1
    values, indexes, mask = p.build_pattern_sequence(z, S, keep_only_valid_steps=True)
    assert values.tolist() == [[[S, 1, 2, 3, 4], [S, S, 1, 2, 3], [S, S, S, 1, 2]]]
    assert mask.tolist() == [[False, True, True, True, True],
                             [False, False, True, True, True],
                             [False, False, False, True, True]]
    assert indexes.tolist() == [[12, 0, 1, 2, 3], [12, 12, 4, 5, 6], [12, 12, 12, 8, 9]]
    assert plain(p.layout) == [
        [], [(0, 0)], [(1, 0), (0, 1)], [(2, 0), (1, 1), (0, 2)], [(3, 0), (2, 1), (1, 2)],
        [(4, 0), (3, 1), (2, 2)], [(5, 0), (4, 1), (3, 2)]]
    assert p.max_delay == 2 and p.num_sequence_steps == 6 and len(p.valid_layout) == 5
    assert p.starts_with_special_token()


def test_delayed_flatten_first_and_empty_initial():
    p = DelayedPatternProvider(2, delays=[0, 1], flatten_first=1, empty_initial=2).get_pattern(3)
    assert plain(p.layout) == [[], [], [], [(0, 0)], [(0, 1)], [(1, 0)], [(2, 0), (1, 1)], [(3, 0), (2, 1)]]


def test_delayed_negative_empty_initial_has_no_special_step():
    p = DelayedPatternProvider(2, delays=[0, 1], empty_initial=-1).get_pattern(2)
    assert plain(p.layout) == [[(0, 0)], [(1, 0), (0, 1)], [(2, 0), (1, 1)]]
    assert not p.starts_with_special_token()
    # max_delay skips the first step, as the reference does
    assert p.max_delay == 1 and len(p.valid_layout) == 2
    logits = np.arange(2 * 1 * 2 * 3, dtype=np.float32).reshape(2, 1, 2, 3)
    values, indexes, mask = p.revert_pattern_logits(logits, 0.5)
    # no special step to drop: the model output of step s is the target of step s
    assert indexes.tolist() == [[0, 1], [4, 5]]
    assert mask.all()


def test_parallel_empty_initial():
    p = ParallelPatternProvider(2, empty_initial=1).get_pattern(2)
    assert plain(p.layout) == [[], [], [(0, 0), (0, 1)], [(1, 0), (1, 1)]]


def test_unrolled_layouts():
    # full flattening: one codebook per step
    p = UnrolledPatternProvider(3).get_pattern(2)
    assert plain(p.layout) == [[], [(0, 0)], [(0, 1)], [(0, 2)], [(1, 0)], [(1, 1)], [(1, 2)]]
    # partial flattening [0, 1, 1]
    p = UnrolledPatternProvider(3, flattening=[0, 1, 1]).get_pattern(2)
    assert plain(p.layout) == [[], [(0, 0)], [(0, 1), (0, 2)], [(1, 0)], [(1, 1), (1, 2)]]
    # flattening with delays [0, 3, 3] (docstring example 3): entries sorted by
    # (t + delay, coordinates), so delayed codebooks come before codebook 0 at a tie
    p = UnrolledPatternProvider(3, flattening=[0, 1, 1], delays=[0, 3, 3]).get_pattern(4)
    assert plain(p.layout) == [
        [], [(0, 0)], [(1, 0)], [(2, 0)], [(0, 1), (0, 2)], [(3, 0)], [(1, 1), (1, 2)], [(4, 0)],
        [(2, 1), (2, 2)], [(5, 0)], [(3, 1), (3, 2)], [(6, 0)]]
    z = np.array([[[1, 2, 3, 4]] * 3])
    S = 0
    values, _, _ = p.build_pattern_sequence(z, S)
    # the docstring's picture (codebook 0 last, without the leading special step)
    assert values[0, 2, 1:11].tolist() == [S, S, S, 1, S, 2, S, 3, S, 4]
    assert values[0, 0, 1:6].tolist() == [1, 2, 3, S, 4]
    # gaps in the flattening produce empty inner steps
    p = UnrolledPatternProvider(2, flattening=[0, 2]).get_pattern(2)
    assert plain(p.layout) == [[], [], [(0, 0)], [(0, 1)], [], [(1, 0)], [(1, 1)]]
    assert UnrolledPatternProvider(2, flattening=[0, 2]).num_virtual_steps(5) == 16


def test_coarse_first_and_musiclm_layouts():
    p = CoarseFirstPattern(3, delays=[0, 1]).get_pattern(2)
    assert plain(p.layout) == [[], [(0, 0)], [(1, 0)], [(0, 1)], [(1, 1), (0, 2)], [(2, 1), (1, 2)]]
    p = MusicLMPattern(4, group_by=2).get_pattern(2)
    assert plain(p.layout) == [[], [(0, 0)], [(0, 1)], [(1, 0)], [(1, 1)], [(0, 2)], [(0, 3)],
                               [(1, 2)], [(1, 3)]]
    assert plain(MusicLMPattern(2, group_by=-1).get_pattern(3).layout) == [[]]


def test_layout_is_list_of_layoutcoord_and_pattern_api():
    p = DelayedPatternProvider(2).get_pattern(3)
    assert isinstance(p.layout, list) and isinstance(p.layout[1][0], LayoutCoord)
    assert p.layout[1][0].t == 0 and p.layout[1][0].q == 0
    assert p.get_sequence_coords_with_timestep(1) == [(2, LayoutCoord(1, 0)), (3, LayoutCoord(1, 1))]
    assert p.get_steps_with_timestep(1, 1) == [3]
    assert p.get_first_step_with_timesteps(2) == 3
    assert p.get_first_step_with_timesteps(3) == 4  # t >= timesteps still in the layout
    assert p.get_first_step_with_timesteps(1, -1) is None
    with pytest.raises(PatternError):
        p.get_sequence_coords_with_timestep(4)
    with pytest.raises(PatternError):
        p.get_steps_with_timestep(0, 3)
    # a Pattern made from its layout is equal to it
    q = Pattern(p.layout, timesteps=3, n_q=2)
    assert q == p and q.layout is not None
    assert Pattern(p.layout, timesteps=4, n_q=2) != p
    assert repr(q).startswith("Pattern(layout=[[], [LayoutCoord(t=0, q=0)]")
    provider = DelayedPatternProvider(2)
    assert provider.get_pattern(5) is provider.get_pattern(5)
    assert isinstance(provider, CodebooksPatternProvider)


def test_tables_are_cached():
    p = DelayedPatternProvider(4).get_pattern(10)
    z = np.zeros((2, 4, 10), dtype=np.int64)
    _, i1, m1 = p.build_pattern_sequence(z, 0)
    _, i2, m2 = p.build_pattern_sequence(z, 7)
    assert i1 is i2 and m1 is m2
    _, i3, _ = p.build_pattern_sequence(z, 0, keep_only_valid_steps=True)
    assert i3 is not i1


# --- numpy gathers ---------------------------------------------------------------

def _providers():
    """(ours, the reference's) pairs."""
    return [(DelayedPatternProvider(4, [0, 1, 1, 3]), R.RefDelayed(4, [0, 1, 1, 3])),
            (UnrolledPatternProvider(4, [0, 1, 1, 3], [0, 2, 2, 2]), R.RefUnrolled(4, [0, 1, 1, 3], [0, 2, 2, 2])),
            (CoarseFirstPattern(4, [0, 1, 2]), R.RefCoarseFirst(4, [0, 1, 2])), (MusicLMPattern(4), R.RefMusicLM(4)),
            (ParallelPatternProvider(4, empty_initial=-1), R.RefParallel(4, empty_initial=-1))]


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "int32", "int64", "uint64",
                                   "float16", "float32", "float64", "bfloat16"])
def test_numpy_dtypes_match_fancy_indexing(dtype):
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dt = np.dtype(ml_dtypes.bfloat16)
    else:
        dt = np.dtype(dtype)
    rng = np.random.default_rng(0)
    for provider, ref in _providers():
        p, rp = provider.get_pattern(9), ref.get_pattern(9)
        assert plain(p.layout) == plain(rp.layout)
        for valid in (False, True):
            z = rng.integers(0, 100, size=(3, 4, 7)).astype(dt)
            got = p.build_pattern_sequence(z, 5, valid)
            check_tables(got, rp.build_tables(7, 4, valid))
            values, indexes, mask = got
            assert values.dtype == dt and values.shape == (3, 4, indexes.shape[1])
            expect = numpy_oracle(z, rp.build_tables(7, 4, valid)[0], 5, (3,))
            assert values.tobytes() == expect.tobytes()
            S = indexes.shape[1]
            s = rng.integers(0, 100, size=(3, 4, S)).astype(dt)
            got = p.revert_pattern_sequence(s, 3, valid)
            check_tables(got, rp.revert_tables(S, 4, valid, False))
            values = got[0]
            assert values.shape == (3, 4, 9) and values.dtype == dt
            assert values.tobytes() == numpy_oracle(s, rp.revert_tables(S, 4, valid, False)[0], 3, (3,)).tobytes()
            logits = rng.standard_normal(size=(2, 3, 4, S)).astype(dt) if dt.kind == "f" or dt.name == "bfloat16" \
                else rng.integers(0, 9, size=(2, 3, 4, S)).astype(dt)
            got = p.revert_pattern_logits(logits, 1, valid)
            check_tables(got, rp.revert_tables(S, 4, valid, True))
            values = got[0]
            assert values.shape == (2, 3, 4, 9)
            assert values.tobytes() == numpy_oracle(logits, rp.revert_tables(S, 4, valid, True)[0], 1, (2, 3)).tobytes()


def test_numpy_promotion_and_non_contiguous():
    p = DelayedPatternProvider(2).get_pattern(4)
    z = np.arange(16, dtype=np.int64).reshape(2, 2, 4)[:, :, ::-1]  # not contiguous
    values, indexes, _ = p.build_pattern_sequence(z, 0.5)
    assert values.dtype == np.float64  # z + 0.5 is float64 in numpy
    assert np.array_equal(values.reshape(2, -1), numpy_oracle(z, indexes, 0.5, (2,)))
    with pytest.raises((OverflowError, ValueError)):
        p.build_pattern_sequence(z.astype(np.int8), 1000)


def test_large_pattern_is_lazy():
    p = DelayedPatternProvider(8).get_pattern(100000)
    assert p.num_sequence_steps == 100007 and p.max_delay == 7
    assert p._layout is None  # not materialised until asked for
    assert len(p.layout) == 100008 and p.layout[-1] == [LayoutCoord(100006 - q, q) for q in range(8)]


# --- bad input -------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: DelayedPatternProvider(3, delays=[0, 2, 1]), "sorted"),
    (lambda: DelayedPatternProvider(3, delays=[0, 1]), "entries"),
    (lambda: ParallelPatternProvider(0), "n_q"),
    (lambda: UnrolledPatternProvider(3, flattening=[0, 1]), "flattening"),
    (lambda: UnrolledPatternProvider(3, flattening=[1, 0, 2]), "sorted"),
    (lambda: UnrolledPatternProvider(3, delays=[0, 0]), "delays"),
    (lambda: UnrolledPatternProvider(3, flattening=[0, 1, 1], delays=[0, 1, 2]), "inconsistent"),
    (lambda: CoarseFirstPattern(3, delays=[0]), "delays"),
    (lambda: CoarseFirstPattern(3, delays=[2, 1]), "sorted"),
    (lambda: CoarseFirstPattern(1).get_pattern(3), "at least 2"),
    (lambda: MusicLMPattern(3, group_by=0).get_pattern(3), "group_by"),
    (lambda: MusicLMPattern(3, group_by=2).get_pattern(3), "outside"),
    (lambda: DelayedPatternProvider(2, flatten_first=-2).get_pattern(3), "Past timesteps"),
    (lambda: DelayedPatternProvider(2).get_pattern(-1), "timesteps"),
    (lambda: DelayedPatternProvider(1, delays=[1 << 50]), "out of range"),
    (lambda: Pattern([], timesteps=1, n_q=1), "empty"),
    (lambda: Pattern([[], [LayoutCoord(1, 0)], [LayoutCoord(0, 0)]], timesteps=2, n_q=1), "Past timesteps"),
    (lambda: Pattern([[], [LayoutCoord(0, 0), LayoutCoord(0, 0)]], timesteps=2, n_q=1), "Multiple entries"),
    (lambda: Pattern([[], [LayoutCoord(0, 2)]], timesteps=2, n_q=2), "outside"),
    (lambda: Pattern([[], [LayoutCoord(-1, 0)]], timesteps=2, n_q=1), "Past timesteps"),
    (lambda: UnrolledPatternProvider(2, delays=[0, 1 << 39]).get_pattern(1 << 30), "too large"),
    (lambda: DelayedPatternProvider(1, [-(1 << 40)], flatten_first=-(1 << 40)).get_pattern(5), "too large"),
    (lambda: CoarseFirstPattern(3, [-(1 << 40), 0]).get_pattern(3), "too large"),
    (lambda: Pattern([[], [LayoutCoord(1 << 33, 0)]], timesteps=1, n_q=1), "out of range"),
])
def test_bad_providers_raise_pattern_error(make, match):
    with pytest.raises(PatternError, match=match) as info:
        make()
    assert isinstance(info.value, ValueError) and isinstance(info.value, mlutils.MlutilsError)
    # code written against the reference's asserts keeps working
    with pytest.raises(AssertionError, match=match):
        make()
    try:
        make()
    except AssertionError as exc:
        assert type(exc) is PatternError


def test_bad_inputs_raise_pattern_error():
    p = DelayedPatternProvider(2).get_pattern(4)
    with pytest.raises(PatternError, match="timesteps"):
        p.build_pattern_sequence(np.zeros((1, 2, 5)), 0)
    with pytest.raises(PatternError, match="codebooks"):
        p.build_pattern_sequence(np.zeros((1, 3, 4)), 0)
    with pytest.raises(PatternError, match="dimensions"):
        p.build_pattern_sequence(np.zeros((2, 4)), 0)
    with pytest.raises(PatternError, match="longer than the defined pattern"):
        p.revert_pattern_sequence(np.zeros((1, 2, 7)), 0)
    with pytest.raises(PatternError, match="longer than the defined pattern"):
        p.revert_pattern_sequence(np.zeros((1, 2, 6)), 0, keep_only_valid_steps=True)
    with pytest.raises(PatternError, match="dimensions"):
        p.revert_pattern_logits(np.zeros((1, 2, 6)), 0.0)
    with pytest.raises(TypeError):
        p.build_pattern_sequence([[[1]]], 0)
    with pytest.raises(TypeError):
        p.build_pattern_sequence(np.zeros((1, 2, 4)), "x")
    with pytest.raises(TypeError):
        Pattern([[], [(0, "a")]], timesteps=1, n_q=1)


def test_gather_rejects_inconsistent_runs_and_buffers():
    runs = np.array([[0, 3]], dtype=np.int64)
    src = np.zeros(2, dtype=np.int64)
    dst = np.zeros(3, dtype=np.int64)
    with pytest.raises(ValueError):
        _core.pattern_gather(runs, src.view(np.uint8), 1, 2, 3, b"\0" * 8, dst.view(np.uint8))
    with pytest.raises(ValueError):
        _core.pattern_gather(np.array([[-1, 3]]), src.view(np.uint8), 1, 2, 3, b"\0" * 8,
                             np.zeros(2, np.int64).view(np.uint8))


def test_allocation_failures_are_memory_errors(fail_alloc):
    expect = UnrolledPatternProvider(3, [0, 1, 1], [0, 2, 2]).get_pattern(200)
    failures = 0
    for n in range(0, 12):
        fail_alloc(n)
        try:
            got = UnrolledPatternProvider(3, [0, 1, 1], [0, 2, 2]).get_pattern(200)
        except MemoryError:
            failures += 1
        else:
            assert got == expect
        finally:
            fail_alloc(-1)
    assert failures > 0
    assert expect.num_sequence_steps == 402


def test_numpy_dispatch():
    from mlutils.pattern import _dispatch

    assert _dispatch(np.zeros(1)) == "numpy"
    with pytest.raises(TypeError):
        _dispatch([1, 2])


def test_arbitrary_layouts_never_crash():
    from hypothesis import given, settings, strategies as st

    atom = st.one_of(st.integers(-3, 6), st.integers(-(1 << 70), 1 << 70), st.none(), st.text(max_size=2),
                     st.floats(allow_nan=True))
    coord = st.one_of(st.tuples(atom, atom), st.lists(atom, max_size=3), atom)
    layouts = st.one_of(st.lists(st.lists(coord, max_size=4), max_size=6), atom)

    @settings(max_examples=300, deadline=None, database=None)
    @given(layouts, st.integers(-2, 5), st.integers(-1, 4))
    def check(layout, timesteps, n_q):
        try:
            p = Pattern(layout, timesteps=timesteps, n_q=n_q)
        except (ValueError, TypeError, OverflowError):
            return
        # a valid layout: every step's coordinates are back in the same order
        plain_layout = [[(int(c[0]), int(c[1])) for c in s] for s in layout]
        assert plain(p._table.layout(LayoutCoord)) == plain_layout
        # and the reference accepts it too, with the same properties
        rp = R.RefPattern([[R.RefCoord(*c) for c in s] for s in plain_layout], timesteps=timesteps, n_q=n_q)
        assert p.max_delay == rp.max_delay
        assert [[(int(c[0]), int(c[1])) for c in s] for s in p.valid_layout] == plain(rp.valid_layout)
        if p.timesteps >= 0:
            for valid in (False, True):
                for t_in in sorted({0, timesteps}):
                    z = np.arange(2 * n_q * t_in, dtype=np.int32).reshape(2, n_q, t_in)
                    got = p.build_pattern_sequence(z, -1, valid)
                    check_tables(got, rp.build_tables(t_in, n_q, valid))
                    assert got[0].tobytes() == numpy_oracle(z, rp.build_tables(t_in, n_q, valid)[0], -1, (2,)).tobytes()
                L = len(rp.valid_layout if valid else rp.layout)
                for S in sorted({0, L // 2, L}):
                    s = np.arange(3 * n_q * S, dtype=np.float32).reshape(3, n_q, S)
                    got = p.revert_pattern_sequence(s, 0.5, valid)
                    want = rp.revert_tables(S, n_q, valid, False)
                    check_tables(got, want)
                    assert got[0].tobytes() == numpy_oracle(s, want[0], 0.5, (3,)).tobytes()
                    lg = np.arange(2 * n_q * S, dtype=np.float32).reshape(1, 2, n_q, S)
                    got = p.revert_pattern_logits(lg, 0.25, valid)
                    want = rp.revert_tables(S, n_q, valid, True)
                    check_tables(got, want)
                    assert got[0].tobytes() == numpy_oracle(lg, want[0], 0.25, (1, 2)).tobytes()
        else:
            with pytest.raises(PatternError):
                p.revert_pattern_sequence(np.zeros((1, n_q, 1)), 0)

    check()


def test_layout_mutated_by_index_callback_is_an_error_not_a_crash():
    # __index__ of a coordinate empties the layout (and a list coordinate)
    # while the C side is reading them: it works on snapshots.
    layout = []

    class Shrinks:
        def __index__(self):
            layout.clear()
            coord.clear()
            return 0

    coord = [Shrinks(), 0]
    layout.extend([[coord], [LayoutCoord(0, 0)], [LayoutCoord(1, 0)]] +
                  [[LayoutCoord(i, 0)] for i in range(2, 64)])
    p = Pattern(layout, timesteps=64, n_q=1)
    expected = Pattern([[LayoutCoord(0, 0)]] + [[LayoutCoord(i, 0)] for i in range(64)], timesteps=64, n_q=1)
    assert len(p) == 65 and p == expected


def test_layout_callback_errors_propagate():
    # an exception raised by the layout's own code is not replaced by a TypeError
    class Boom(Exception):
        pass

    class BadIndex:
        def __index__(self):
            raise Boom("from __index__")

    class BadStep:
        def __iter__(self):
            raise Boom("from __iter__")

    with pytest.raises(Boom, match="__index__"):
        Pattern([[], [LayoutCoord(BadIndex(), 0)]], timesteps=1, n_q=1)
    with pytest.raises(Boom, match="__iter__"):
        Pattern([[], BadStep()], timesteps=1, n_q=1)
    with pytest.raises(Boom, match="__iter__"):
        Pattern([[], [BadStep()]], timesteps=1, n_q=1)
    with pytest.raises(Boom, match="__index__"):
        _core.pattern_check_delayed(1, [BadIndex()])
    # plain bad values still name the step
    with pytest.raises(TypeError, match="layout step 1 holds"):
        Pattern([[], [("x", 0)]], timesteps=1, n_q=1)
    with pytest.raises(OverflowError, match="layout step 1 .* 64 bits"):
        Pattern([[], [(2**70, 0)]], timesteps=1, n_q=1)
    with pytest.raises(TypeError, match="layout step 1 is not a list"):
        Pattern([[], 5], timesteps=1, n_q=1)


def test_gather_refuses_object_buffers():
    # bytes written into object pointers crashed
    runs = np.array([[0, 4]], dtype=np.int64)
    src = np.arange(4, dtype=np.int64)
    for dst in (np.empty(4, dtype=object), np.empty(4, dtype=[("x", object)])):
        with pytest.raises(TypeError, match="not Python objects"):
            _core.pattern_gather(runs, src, 1, 4, 4, b"\0" * 8, dst)
    with pytest.raises(TypeError, match="not Python objects"):
        _core.pattern_gather(runs, np.array([1, 2, 3, 4], dtype=object), 1, 4, 4, b"\0" * 8,
                             np.empty(4, np.int64))
    out = np.empty(4, np.int64)
    _core.pattern_gather(runs, src, 1, 4, 4, b"\0" * 8, out)
    assert out.tolist() == [0, 1, 2, 3]


def test_table_is_a_gc_heap_type():
    import gc

    t = DelayedPatternProvider(2).get_pattern(3)._table
    assert gc.is_tracked(t) and type(t) in gc.get_referents(t)


# --- valid steps at the edges, written out by hand ------------------------------
#
# The reference (audiocraft's codebooks_patterns.Pattern): max_delay is the
# largest t + 1 over layout[1:] minus timesteps, and keep_only_valid_steps
# builds from valid_layout = layout[:len(layout) - max_delay] (a Python
# slice: a negative stop counts from the end, below -len it is empty).  The
# layout below has len(layout) = 4 steps and timesteps = 2; its last step's
# codebook-0 timestep x sets max_delay = max(x + 1, 2) - 2.  z is
# [[10, 11], [20, 21]] (K = 2, T = 2), S the special token; every step in
# full: q0 [S, 10, 11, z0(x)], q1 [S, S, 20, 21], z0(x) = 11 for x = 1, else S.

S = -1
EDGE_Z = np.array([[[10, 11], [20, 21]]])


def edge_layout(x):
    C = LayoutCoord
    return [[], [C(0, 0)], [C(1, 0), C(0, 1)], [C(x, 0), C(1, 1)]]


@pytest.mark.parametrize("x,max_delay,n_valid,values,mask,indexes", [
    # max_delay 0: every step is valid
    (1, 0, 4, [[S, 10, 11, 11], [S, S, 20, 21]],
     [[0, 1, 1, 1], [0, 0, 1, 1]], [[4, 0, 1, 1], [4, 4, 2, 3]]),
    # max_delay = len(layout) - 1 = 3: one step
    (4, 3, 1, [[S], [S]], [[0], [0]], [[4], [4]]),
    # max_delay = len(layout) = 4: none
    (5, 4, 0, [[], []], [[], []], [[], []]),
    # max_delay = len(layout) + 1 = 5: layout[:-1], three steps (the slice counts from the end)
    (6, 5, 3, [[S, 10, 11], [S, S, 20]], [[0, 1, 1], [0, 0, 1]], [[4, 0, 1], [4, 4, 2]]),
    # max_delay = 2 len(layout) - 1 = 7: layout[:-3], one step
    (8, 7, 1, [[S], [S]], [[0], [0]], [[4], [4]]),
    # max_delay = 2 len(layout) = 8: layout[:-4], none; and past it, still none
    (9, 8, 0, [[], []], [[], []], [[], []]),
    (10, 9, 0, [[], []], [[], []], [[], []]),
])
def test_valid_steps_at_the_edges_by_hand(x, max_delay, n_valid, values, mask, indexes):
    p = Pattern(edge_layout(x), timesteps=2, n_q=2)
    assert p.max_delay == max_delay and len(p) == 4
    assert len(p.valid_layout) == n_valid
    assert plain(p.valid_layout) == plain(edge_layout(x))[:n_valid]
    v, i, m = p.build_pattern_sequence(EDGE_Z, S, keep_only_valid_steps=True)
    assert v.shape == (1, 2, n_valid) and i.shape == m.shape == (2, n_valid)
    assert v.tolist() == [values]
    assert m.astype(int).tolist() == mask
    assert i.tolist() == indexes
    # the whole layout whatever max_delay is: the first n_valid steps are the ones above
    v, i, m = p.build_pattern_sequence(EDGE_Z, S, keep_only_valid_steps=False)
    z0x = 11 if x == 1 else S
    assert v.tolist() == [[[S, 10, 11, z0x], [S, S, 20, 21]]]
    assert v[..., :n_valid].tolist() == [values]
    # and back: the valid steps alone give the timesteps they hold, the rest special
    r, _, _ = p.revert_pattern_sequence(v[..., :n_valid], S, keep_only_valid_steps=True)
    assert r.shape == (1, 2, 2)
    want = {1: [[10, 11], [20, 21]], 4: [[S, S], [S, S]], 5: [[S, S], [S, S]],
            6: [[10, 11], [20, S]], 8: [[S, S], [S, S]], 9: [[S, S], [S, S]], 10: [[S, S], [S, S]]}
    assert r.tolist() == [want[x]]


def test_negative_max_delay_keeps_every_step():
    """Timesteps beyond every coordinate: max_delay < 0, len(layout) - max_delay > len(layout)."""
    p = Pattern([[], [LayoutCoord(0, 0)], [LayoutCoord(0, 1)]], timesteps=5, n_q=2)
    assert p.max_delay == -4 and len(p.valid_layout) == 3
    z = np.array([[[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]])
    v, _, _ = p.build_pattern_sequence(z, S, keep_only_valid_steps=True)
    assert v.tolist() == [[[S, 1, S], [S, S, 6]]]
