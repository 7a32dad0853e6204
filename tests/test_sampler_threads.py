"""Samplers shared by threads: every method that moves the position is safe to
call from several threads at once.  Eight threads hammer one sampler; the
union of their draws must be exactly one epoch (one pool round) of an
uninterrupted run, with nothing drawn twice and nothing past the end, and the
state saved afterwards must load."""
import json
import random
import sys
import threading
from collections import Counter

import numpy as np
import pytest

from mlutils.sampler import BatchedOrderedSampler, OrderedSampler, PoolSampler, RandomSampler

THREADS = 8


def make(kind):
    if kind == "ordered":
        return OrderedSampler(48_000)
    if kind == "random":
        return RandomSampler(48_000, seed=5)
    if kind == "pool":
        return PoolSampler(range(48_000), seed=5)
    buckets = {f"b{b}": [(f"p{b}_{i}", 1.0 + (i % 7)) for i in range(6000)] for b in range(4)}
    return BatchedOrderedSampler(buckets, max_batch_size=3, shuffle=True, seed=5, drop_last=False)


def as_items(x):
    """Draws as hashable items (batches become tuples)."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    return [tuple(np.asarray(b).tolist()) for b in x]


@pytest.fixture(autouse=True)
def fast_switching():
    # switch threads as often as possible, so that a race shows every run
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def hammer(work):
    """Runs work(i) on THREADS threads started together; returns their results."""
    barrier = threading.Barrier(THREADS)
    out = [None] * THREADS
    errors = []

    def run(i):
        try:
            barrier.wait()
            out[i] = work(i)
        except BaseException as exc:  # reported below, with the thread's traceback
            errors.append(exc)

    # daemon threads: a sampler that never ends its epoch must not keep pytest alive
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread never finished"
    if errors:
        raise errors[0]
    return out


def check_one_epoch(kind, s, parts):
    """The union of the parts is exactly the first epoch of an uninterrupted run; the state loads."""
    want = as_items(make(kind).take(len(s)))
    got = [x for p in parts for x in p]
    assert len(got) == len(want), (len(got), len(want))
    dupes = [x for x, c in Counter(got).items() if c > 1]
    assert not dupes, f"drawn twice: {dupes[:5]}"
    assert sorted(got) == sorted(want)
    state = json.loads(json.dumps(s.state_dict()))
    t = make(kind)
    t.load_state_dict(state)
    assert t.state_dict() == s.state_dict()
    if kind == "pool":  # the bag was refilled: the next round follows
        assert (s.epoch, s.index()) == (1, 0)
    else:
        assert (s.epoch, s.index(), s.remaining()) == (0, len(s), 0)
        assert len(s.take(5)) == 0 and len(t.take(5)) == 0  # the epoch ends
    # and both go on with the next epoch of the uninterrupted run
    ref = make(kind)
    ref.take(len(ref))
    if kind != "pool":
        ref.set_epoch(1)
        s.set_epoch(1)
        t.set_epoch(1)
    assert as_items(s.take(50)) == as_items(t.take(50)) == as_items(ref.take(50))


@pytest.mark.parametrize("kind", ["ordered", "random", "pool", "batched"])
def test_take_from_many_threads(kind):
    s = make(kind)
    n = len(s)

    def work(i):
        rng = random.Random(i)
        mine = []
        if kind == "pool":  # a pool never runs dry: draw exactly a share of the round
            left = n // THREADS
            while left:
                k = min(left, rng.randint(1, 700))
                mine += as_items(s.take(k))
                left -= k
            return mine
        while len(mine) <= n:  # more than an epoch: drawn past its end
            got = as_items(s.take(rng.randint(1, 700)))
            if not got:
                return mine
            mine += got
        return mine

    check_one_epoch(kind, s, hammer(work))


@pytest.mark.parametrize("kind", ["ordered", "random", "pool", "batched"])
def test_iterate_from_many_threads(kind):
    s = make(kind)
    its = [iter(s) for _ in range(THREADS)]  # made before any draw: all in epoch 0

    def work(i):
        out = []
        for x in its[i]:
            out.append(x if not isinstance(x, list) else tuple(x))
            if len(out) > len(s):  # more than an epoch: drawn past its end
                break
        return out

    check_one_epoch(kind, s, hammer(work))


def test_pool_sample_from_many_threads():
    s = PoolSampler(list(range(48_000)), keep_all=True, seed=5)
    per = len(s) // THREADS
    check_one_epoch("pool", s, hammer(lambda i: [s.sample() for _ in range(per)]))


@pytest.mark.parametrize("kind", ["ordered", "random", "batched"])
def test_set_epoch_from_many_threads(kind):
    # every thread moves the sampler to epoch 1 (the training loop's habit)
    # and draws: set_epoch of the epoch it is in must not restart it
    s = make(kind)

    def work(i):
        rng = random.Random(i)
        mine = []
        while len(mine) <= len(s):  # more than an epoch: drawn past its end
            s.set_epoch(1)
            got = as_items(s.take(rng.randint(1, 50)))
            if not got:
                return mine
            mine += got
        return mine

    parts = hammer(work)
    ref = make(kind)
    ref.set_epoch(1)
    want = as_items(ref.take(len(ref)))
    got = [x for p in parts for x in p]
    assert len(got) == len(want) and sorted(got) == sorted(want)
    assert s.epoch == 1 and s.remaining() == 0


@pytest.mark.parametrize("kind", ["ordered", "random", "pool", "batched"])
def test_state_dict_while_threads_draw(kind):
    # states taken while other threads draw are consistent: each one loads,
    # and a sampler loaded from it continues with draws nobody had made yet
    s = make(kind)
    n = len(s)
    states = []

    def work(i):
        if i == 0:
            for _ in range(200):
                states.append(s.state_dict())
            return []
        mine = []
        for _ in range(n // (2 * THREADS) // 10):
            mine += as_items(s.take(10))
        return mine

    parts = hammer(work)
    drawn = [x for p in parts for x in p]
    assert len(set(drawn)) == len(drawn)
    full = as_items(make(kind).take(n))
    t = make(kind)
    for st in states:
        t.load_state_dict(st)
        assert t.epoch == 0
        # the state's position: what an uninterrupted run yields from there on
        assert as_items(t.take(5)) == full[st["index"]:st["index"] + 5]


@pytest.mark.parametrize("kind", ["ordered", "random", "pool", "batched"])
def test_load_state_dict_while_threads_draw(kind):
    s = make(kind)
    saved = s.state_dict()
    stop = threading.Event()

    def work(i):
        if i == 0:
            for _ in range(100):
                s.load_state_dict(saved)
            stop.set()
            return []
        while not stop.is_set():
            s.take(7)
            s.state_dict()
        return []

    hammer(work)
    # whatever interleaving happened, the sampler's state is a valid one
    t = make(kind)
    t.load_state_dict(s.state_dict())
    assert as_items(t.take(20)) == as_items(s.take(20))


def test_take_still_runs_without_the_gil():
    # the range is reserved with the GIL held; the draws are computed without it
    from _gil import assert_releases_gil

    for s in (RandomSampler(10**12, seed=1), PoolSampler(range(10**6), seed=1)):
        assert_releases_gil(lambda: s.take(4_000_000), calls=2)
