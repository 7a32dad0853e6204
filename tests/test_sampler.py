"""Samplers: original behaviour, exact resume, seeds, ranks, elastic resume, take, bad input."""
import json
import math
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from mlutils import SamplerStateError, _core
from mlutils.sampler import (
    STATE_VERSION,
    BatchedOrderedSampler,
    OrderedSampler,
    PoolSampler,
    RandomSampler,
    resume_state,
)

from reference import seed_sampler  # the original samplers, re-implemented

U64 = (1 << 64) - 1


# ------------------------------------------------------------------ helpers

def draws(s, m):
    """The next m draws of sampler s across epochs, the way a training loop iterates it."""
    out = []
    if isinstance(s, PoolSampler):
        return [s.sample() for _ in range(m)]
    it = iter(s)
    guard = 0
    while len(out) < m:
        try:
            x = next(it)
        except StopIteration:
            it = iter(s)
            guard += 1
            assert guard < 10 * m + 10, "sampler yields nothing"
            continue
        out.append(x if not isinstance(x, list) else tuple(x))
    return out


def roundtrip(state):
    return json.loads(json.dumps(state))


def make_buckets(rng, nbuckets=4, per=30, sort=True):
    buckets = {}
    for b in range(nbuckets):
        durs = [round(rng.uniform(0.5, 10.0), 3) for _ in range(rng.randint(0, per))]
        if sort:
            durs.sort()
        buckets[f"b{b}"] = [(f"p{b}_{i}", d) for i, d in enumerate(durs)]
    if not any(buckets.values()):
        buckets["extra"] = [("x", 1.0)]
    return buckets


FACTORIES = {
    "ordered": lambda **kw: OrderedSampler(23, **kw),
    "random": lambda **kw: RandomSampler(23, seed=7, **kw),
    "pool": lambda **kw: PoolSampler(list(range(23)), seed=7, **kw),
    "batched": lambda **kw: BatchedOrderedSampler(make_buckets(random.Random(3)), max_duration=25,
                                                  max_batch_size=6, shuffle=True, seed=7, **kw),
}


# ------------------------------------------------------------------ the original behaviour

def test_ordered_matches_original():
    ref, ours = seed_sampler.OrderedSampler(11), OrderedSampler(11)
    assert len(ours) == len(ref) == 11
    it_r, it_o = iter(ref), iter(ours)
    assert [next(it_r) for _ in range(4)] == [next(it_o) for _ in range(4)]
    # the original counts a yielded item only when the next one is asked for,
    # so its state taken here would yield item 3 twice; ours counts it at once
    assert ours.index() == 4 and ref.index() == 3
    # the rest, then an exhausted sampler restarts at 0 on the next iter()
    assert list(it_o) == list(it_r) == list(range(4, 11))
    assert list(ours) == list(ref) == list(range(11))


@pytest.mark.parametrize("use_max_size", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_batched_packing_matches_original(use_max_size, drop_last):
    rng = random.Random(11 + use_max_size + 2 * drop_last)
    for trial in range(60):
        buckets = make_buckets(rng, nbuckets=rng.randint(1, 5), sort=rng.random() < 0.7)
        md = rng.choice([0, 5, 12.5, 30, 100])
        mb = rng.choice([0, 1, 3, 8]) if md else rng.choice([1, 3, 8])
        ref = seed_sampler.BatchedOrderedSampler(buckets, md, mb, False, drop_last, use_max_size)
        ours = BatchedOrderedSampler(buckets, md, mb, False, drop_last, use_max_size)
        assert ours.batches == ref.batches, (trial, md, mb)
        assert len(ours) == len(ref)
        assert list(ours) == ref.batches
        assert ours.num_items == sum(len(b) for b in buckets.values())


def test_batched_limit_zero_means_no_limit():
    buckets = {"a": [("x", 1.0)] * 10}
    assert BatchedOrderedSampler(buckets, max_duration=0, max_batch_size=4, drop_last=False).batches == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert BatchedOrderedSampler(buckets, max_duration=3.0, max_batch_size=0, drop_last=False).batches == [
        [0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    # an item longer than the limit still forms its own (never empty) batch
    big = {"a": [("x", 9.0), ("y", 1.0)]}
    assert BatchedOrderedSampler(big, max_duration=2.0, drop_last=False).batches == [[0], [1]]


def test_batched_shuffle_changes_per_epoch_and_keeps_batches():
    s = BatchedOrderedSampler(make_buckets(random.Random(5), per=60), max_batch_size=3, shuffle=True, seed=1)
    e0, e1 = list(s), list(s)
    assert sorted(e0) == sorted(e1) == sorted(s.batches)
    assert e0 != e1 and e0 != s.batches


def test_pool_behaviour():
    pool = [f"item{i}" for i in range(7)]
    s = PoolSampler(pool, keep_all=True, seed=3)
    assert len(s) == 7 and s.index() == 0
    first = [s() for _ in range(3)]
    assert s.index() == 3 and all(x in pool for x in first)
    rest = list(s)  # iterating yields samples until the bag is empty
    assert sorted(first + rest) == sorted(pool)
    assert s.index() == 0 and s.epoch == 1  # refilled
    # a round is a permutation, and rounds never run dry
    rounds = [[s.sample() for _ in range(7)] for _ in range(5)]
    assert all(sorted(r) == sorted(pool) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1
    # without keep_all: indices, or pool[index] with an explicit pool
    t = PoolSampler(pool, seed=3)
    assert t.global_pool is None
    i = t.sample()
    assert isinstance(i, int) and 0 <= i < 7
    assert t.sample(pool) in pool
    assert PoolSampler(pool, seed=3).sample() == i
    # like the original: a round draws each index once, index() counts the
    # round's draws and the bag is refilled right after its last one
    ref, ours = seed_sampler.PoolSampler(pool), PoolSampler(pool, seed=5)
    for _ in range(3):
        got_ref, got_ours = [], []
        for k in range(7):
            assert ours.index() == ref.index() == k
            got_ref.append(ref.sample())
            got_ours.append(ours.sample())
        assert sorted(got_ours) == sorted(got_ref) == list(range(7))
        assert ours.index() == ref.index() == 0
    assert len(ours) == len(ref) == 7


def test_pool_empty_is_a_clear_error():
    s = PoolSampler()
    assert len(s) == 0 and list(s) == []
    with pytest.raises(ValueError, match="empty"):
        s.sample()


# ------------------------------------------------------------------ exact resume

@pytest.mark.parametrize("kind", sorted(FACTORIES))
@pytest.mark.parametrize("world", [1, 3])
def test_exact_resume_everywhere(kind, world):
    rng = random.Random(hash((kind, world)) & 0xFFFF)
    for rank in range(world):
        ref = FACTORIES[kind](rank=rank, world_size=world)
        full = draws(ref, 120)  # several epochs
        epoch_len = len(FACTORIES[kind](rank=rank, world_size=world))
        cuts = {0, 1, epoch_len - 1, epoch_len, epoch_len + 1, 2 * epoch_len, 119}
        cuts |= {rng.randrange(120) for _ in range(6)}
        for cut in sorted(c for c in cuts if 0 <= c < 120):
            s = FACTORIES[kind](rank=rank, world_size=world)
            assert draws(s, cut) == full[:cut]
            state = roundtrip(s.state_dict())
            t = FACTORIES[kind](rank=rank, world_size=world)
            draws(t, rng.randrange(30))  # wherever it stood before
            t.load_state_dict(state)
            assert t.state_dict() == s.state_dict()
            assert draws(t, 120 - cut) == full[cut:], (kind, world, rank, cut)


def test_resume_after_set_epoch_and_take():
    s = RandomSampler(50, seed=9)
    s.set_epoch(4)
    a = s.take(17)
    st = s.get_state()  # the original's name
    rest = list(s)
    t = RandomSampler(50)  # another seed: the state carries it
    t.set_state(roundtrip(st))
    assert t.seed == 9 and t.epoch == 4 and t.index() == 17
    t.set_epoch(4)  # the training loop calls it again after a resume: no restart
    assert list(t) == rest
    assert sorted(a.tolist() + rest) == list(range(50))


def test_state_is_plain_json_and_small():
    for s in (RandomSampler(10**9, seed=U64), PoolSampler(range(10**9)), OrderedSampler(10**9)):
        st = s.state_dict()
        text = json.dumps(st)
        assert json.loads(text) == st
        assert len(text) < 1024
        assert st["kind"] == type(s).__name__ and st["version"] == STATE_VERSION


def test_huge_sampler_is_instant():
    t0 = time.perf_counter()
    s = RandomSampler(10**12, seed=5)
    a = s.take(1000)
    assert time.perf_counter() - t0 < 1.0
    assert a.dtype == np.int64 and len(set(a.tolist())) == 1000
    assert a.min() >= 0 and a.max() < 10**12
    with pytest.raises(ValueError, match="too large"):
        PoolSampler(range(10)).take(1 << 62)  # a pool never runs dry: this would be 32 EiB
    it = iter(s)
    assert [next(it) for _ in range(3)] == RandomSampler(10**12, seed=5).take(1003)[1000:].tolist()


# ------------------------------------------------------------------ seeds and the documented generator

def _mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def _hash32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def reference_perm(n, seed, stream, epoch):
    """The bijection exactly as the module docstring and sampler.h document it."""
    s = _mix64((_mix64(_mix64(seed) ^ stream) + epoch) & U64)
    h = 0
    while 4 ** h < n:
        h += 1
    rounds = 12 if h <= 8 else 6
    keys = []
    for _ in range(rounds):
        s = (s + 0x9E3779B97F4A7C15) & U64
        keys.append(_mix64(s) >> 32)
    mask = (1 << h) - 1

    def once(x):
        lo, hi = x & mask, x >> h
        for i in range(0, rounds, 2):
            hi ^= _hash32(lo ^ keys[i]) & mask
            lo ^= _hash32(hi ^ keys[i + 1]) & mask
        return (hi << h) | lo

    def apply(x):
        if n <= 1:
            return x
        x = once(x)
        while x >= n:
            x = once(x)
        return x

    return apply


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 17, 1000, 4**7 + 1, 10**12, (1 << 63) - 1])
def test_generator_matches_its_documentation(n):
    for seed, epoch in [(0, 0), (1, 3), (U64, 2**40)]:
        ref = reference_perm(n, seed, 1, epoch)
        s = RandomSampler(n, seed=seed)
        s.set_epoch(epoch)
        k = min(n, 300)
        assert s.take(k).tolist() == [ref(i) for i in range(k)]


def test_seeds_and_epochs():
    a, b = RandomSampler(1000, seed=1), RandomSampler(1000, seed=1)
    assert list(a) == list(b)
    assert list(RandomSampler(1000, seed=2)) != list(RandomSampler(1000, seed=1))
    assert RandomSampler(1000, seed=-1).take(10).tolist() == RandomSampler(1000, seed=U64).take(10).tolist()
    orders = []
    for e in range(4):
        s = RandomSampler(1000, seed=1)
        s.set_epoch(e)
        orders.append(s.take(1000).tolist())
    assert len({tuple(o) for o in orders}) == 4
    assert all(sorted(o) == list(range(1000)) for o in orders)
    # epochs advance by themselves too, with the same orders as set_epoch
    c = RandomSampler(1000, seed=1)
    assert [list(c) for _ in range(4)] == orders
    # kinds use separate streams: a pool round is not the random sampler's epoch
    assert PoolSampler(range(1000), seed=1).take(1000).tolist() != orders[0]


def test_seed_is_process_independent():
    code = ("from mlutils.sampler import RandomSampler;"
            "print(RandomSampler(10**6, seed=123).take(5).tolist())")
    env = dict(os.environ, PYTHONHASHSEED="77")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(RandomSampler(10**6, seed=123).take(5).tolist())


# ------------------------------------------------------------------ take

@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_take_advances_like_iteration(kind):
    for world, rank in [(1, 0), (2, 1)]:
        a, b = FACTORIES[kind](rank=rank, world_size=world), FACTORIES[kind](rank=rank, world_size=world)
        if kind == "pool":
            got = a.take(5).tolist() + a.take(40).tolist()
            assert got == draws(b, 45)
            assert a.state_dict() == b.state_dict()
            continue
        n = len(a)
        first = a.take(4)
        rest = a.take(10**6)
        if kind == "batched":
            assert isinstance(first, list) and all(x.dtype == np.int64 for x in first)
            got = [tuple(x.tolist()) for x in first + rest]
        else:
            assert first.dtype == np.int64
            got = first.tolist() + rest.tolist()
        assert len(got) == n
        assert got == draws(b, n)
        assert a.state_dict() == b.state_dict()
        assert len(a.take(3)) == 0  # the epoch is done: take never starts the next one
        assert len(a.take(1 << 62)) == 0
        assert draws(a, 3) == draws(b, 3)  # iteration does


# ------------------------------------------------------------------ ranks

@pytest.mark.parametrize("kind", ["ordered", "random", "pool"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_partition_the_epoch(kind, drop_last):
    for n in [0, 1, 5, 12, 23, 101]:
        for world in [1, 2, 3, 4, 7]:
            def mk(rank):
                if kind == "ordered":
                    return OrderedSampler(n, rank=rank, world_size=world, drop_last=drop_last)
                if kind == "random":
                    return RandomSampler(n, seed=4, rank=rank, world_size=world, drop_last=drop_last)
                return PoolSampler(range(n), seed=4, rank=rank, world_size=world, drop_last=drop_last)
            shares = [list(mk(r)) for r in range(world)]
            counts = {len(x) for x in shares}
            assert len(counts) == 1, (n, world, counts)  # equal counts: no hang
            count = counts.pop()
            assert count == len(mk(0))
            flat = [i for s in shares for i in s]
            if drop_last:
                assert count == n // world
                assert len(set(flat)) == len(flat)  # disjoint
            else:
                assert count == -(-n // world)
                assert set(flat) == set(range(n))  # union is the epoch
                assert len(flat) - n == (count * world - n if n else 0)  # repeats are only the padding


def test_ranks_match_torch_distributed_sampler(torch):
    from torch.utils.data import DistributedSampler

    for n in [1, 10, 23, 64]:
        for world in [1, 2, 3, 5]:
            for drop_last in [False, True]:
                for rank in range(world):
                    ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False,
                                             drop_last=drop_last)
                    ours = OrderedSampler(n, rank=rank, world_size=world, drop_last=drop_last)
                    assert list(ours) == list(ref), (n, world, drop_last, rank)
                    assert len(ours) == len(ref)


def test_batched_ranks_get_whole_batches_evenly():
    buckets = make_buckets(random.Random(8), per=50)
    for world in [1, 2, 3, 4]:
        for drop_last in [True, False]:
            full = BatchedOrderedSampler(buckets, max_batch_size=5, shuffle=True, seed=2, drop_last=drop_last)
            shares = [list(BatchedOrderedSampler(buckets, max_batch_size=5, shuffle=True, seed=2,
                                                 drop_last=drop_last, rank=r, world_size=world))
                      for r in range(world)]
            assert len({len(s) for s in shares}) == 1
            got = [tuple(b) for s in shares for b in s]
            want = {tuple(b) for b in full.batches}
            assert set(got) <= want
            if drop_last:
                assert len(got) == len(set(got)) == (len(want) // world) * world
            else:
                assert set(got) == want


def test_ranks_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    s = OrderedSampler(9)
    assert (s.rank, s.world_size) == (2, 3) and list(s) == [2, 5, 8]
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        OrderedSampler(9)


# ------------------------------------------------------------------ elastic resume

def run_ranks(samplers, steps):
    return [[s.sample() for _ in range(steps)] if isinstance(s, PoolSampler) else s.take(steps).tolist()
            for s in samplers]


@pytest.mark.parametrize("kind", ["ordered", "random", "pool"])
def test_elastic_resume_4_to_3(kind):
    n = 101  # 4 ranks x 5 steps = 20 consumed, 81 = 3 x 27 left

    def mk(rank, world):
        if kind == "ordered":
            return OrderedSampler(n, rank=rank, world_size=world)
        if kind == "random":
            return RandomSampler(n, seed=11, rank=rank, world_size=world)
        return PoolSampler(range(n), seed=11, rank=rank, world_size=world)

    four = [mk(r, 4) for r in range(4)]
    for s in four:
        s.set_epoch(2)
    seen = [i for part in run_ranks(four, 5) for i in part]
    states = [roundtrip(s.state_dict()) for s in four]
    three = [mk(r, 3) for r in range(3)]
    for r, s in enumerate(three):
        s.load_state_dict(states[r])  # any rank's state: they all describe the same global progress
        assert s.epoch == 2 and s.remaining() == 27
    rest = [i for part in run_ranks(three, 27) for i in part]
    assert sorted(seen + rest) == list(range(n))
    # and the epoch ends on every new rank at once
    if kind != "pool":
        assert all(len(s.take(1)) == 0 for s in three)
    else:
        assert all(s.epoch == 3 and s.index() == 0 for s in three)


def test_elastic_resume_pads_evenly_and_skips_nothing():
    n = 50
    four = [RandomSampler(n, seed=3, rank=r, world_size=4) for r in range(4)]
    seen = [i for part in run_ranks(four, 4) for i in part]  # 16 consumed, 34 left
    state = four[0].state_dict()
    three = [RandomSampler(n, seed=3, rank=r, world_size=3) for r in range(3)]
    for s in three:
        s.load_state_dict(state)
    parts = run_ranks(three, 100)
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == 12  # ceil(34 / 3)
    rest = [i for p in parts for i in p]
    assert set(seen + rest) == set(range(n)) and len(seen + rest) == 52  # 2 padding repeats
    # with drop_last the new world drops the uneven tail instead
    dropped = [RandomSampler(n, seed=3, rank=r, world_size=3, drop_last=True) for r in range(3)]
    for s in dropped:
        s.load_state_dict(state)
    rest = [i for p in run_ranks(dropped, 100) for i in p]
    assert len(rest) == 33 and not set(rest) & set(seen) and len(set(rest)) == 33


def test_elastic_resume_batched_by_batches():
    buckets = make_buckets(random.Random(21), nbuckets=5, per=40)
    probe = BatchedOrderedSampler(buckets, max_batch_size=4, shuffle=True, seed=5, drop_last=False)
    nb = len(probe)
    four = [BatchedOrderedSampler(buckets, max_batch_size=4, shuffle=True, seed=5, drop_last=False,
                                  rank=r, world_size=4) for r in range(4)]
    seen = [tuple(b.tolist()) for s in four for b in s.take(3)]
    state = roundtrip(four[1].state_dict())
    two = [BatchedOrderedSampler(buckets, max_batch_size=4, shuffle=True, seed=5, drop_last=False,
                                 rank=r, world_size=2) for r in range(2)]
    for s in two:
        s.load_state_dict(state)
    parts = [[tuple(b) for b in s] for s in two]
    assert len(parts[0]) == len(parts[1])
    union = seen + parts[0] + parts[1]
    assert set(union) == {tuple(b) for b in probe.batches}
    assert len(union) - nb == (2 * len(parts[0]) - (nb - 12))  # repeats are only padding


def test_ranks_saved_at_different_positions():
    n = 56  # 20 consumed by the slowest, 36 = 3 x 12 left: no padding
    four = [RandomSampler(n, seed=8, rank=r, world_size=4) for r in range(4)]
    steps = [5, 5, 7, 6]  # rank 2 and 3 ran ahead of the others
    seen = [s.take(k).tolist() for s, k in zip(four, steps)]
    states = [roundtrip(s.state_dict()) for s in four]
    # the same world: every rank continues exactly from its own state
    again = [RandomSampler(n, seed=8, rank=r, world_size=4) for r in range(4)]
    for s, st in zip(again, states):
        s.load_state_dict(st)
    assert [len(list(s)) for s in again] == [14 - k for k in steps]
    # another world: resume_state picks the slowest rank, so nothing is skipped;
    # exactly the draws the ranks ahead made past it are repeated
    merged = resume_state(states)
    assert merged["index"] == 5 and merged["consumed"] == 20
    three = [RandomSampler(n, seed=8, rank=r, world_size=3) for r in range(3)]
    for s in three:
        s.load_state_dict(merged)
    rest = [i for s in three for i in s]
    everything = [i for part in seen for i in part] + rest
    assert set(everything) == set(range(n))
    repeated = sorted(i for i in set(everything) if everything.count(i) > 1)
    ahead = sorted(seen[2][5:] + seen[3][5:])
    assert repeated == ahead
    with pytest.raises(SamplerStateError, match="seed"):
        resume_state(states + [RandomSampler(n, seed=9, rank=0, world_size=4).state_dict()])
    with pytest.raises(SamplerStateError):
        resume_state([])


# ------------------------------------------------------------------ state errors

def test_state_errors():
    s = RandomSampler(10, seed=1)
    st = s.state_dict()
    with pytest.raises(SamplerStateError, match="kind 'OrderedSampler'"):
        s.load_state_dict(OrderedSampler(10).state_dict())
    with pytest.raises(SamplerStateError, match="length 11"):
        s.load_state_dict(RandomSampler(11).state_dict())
    with pytest.raises(SamplerStateError, match="newer"):
        s.load_state_dict(dict(st, version=STATE_VERSION + 1))
    assert issubclass(SamplerStateError, ValueError)
    bad = [dict(st, index=11), dict(st, index=-1), dict(st, index="3"), dict(st, base=11),
           dict(st, seed=1.5), dict(st, drop_last="no"), dict(st, version=None), [1, 2], None,
           {k: v for k, v in st.items() if k != "epoch"}, dict(st, world_size=0)]
    for b in bad:
        with pytest.raises(SamplerStateError):
            s.load_state_dict(b)
    assert s.state_dict() == st  # a refused state changes nothing
    # the original's (pickle-era) state is refused with a clear message, not a crash
    with pytest.raises(SamplerStateError, match="kind"):
        s.set_state({"position": 3, "length": 10, "perm": list(range(10))})
    b = BatchedOrderedSampler({"a": [("x", 1.0)] * 9}, max_batch_size=3)
    other = BatchedOrderedSampler({"a": [("x", 1.0)] * 9}, max_batch_size=2)
    with pytest.raises(SamplerStateError):
        b.load_state_dict(other.state_dict())  # same kind, different batches
    with pytest.raises(SamplerStateError, match="shuffle"):
        b.load_state_dict(BatchedOrderedSampler({"a": [("x", 1.0)] * 9}, max_batch_size=3,
                                                shuffle=True).state_dict())


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("bad", [-1, 2.5, 3.0, "7", b"7", None, True, False, 1 << 63, object(),
                                 iter(range(3)), np.zeros(())])
def test_bad_lengths(bad):
    for cls in (RandomSampler, OrderedSampler):
        with pytest.raises(ValueError, match="length") as info:
            cls(bad)
        msg = str(info.value)
        if isinstance(bad, bool):
            assert "bool" in msg
        elif isinstance(bad, (str, bytes)):
            assert type(bad).__name__ in msg and "int()" in msg
        elif not isinstance(bad, int):
            assert "sized data source" in msg and type(bad).__name__ in msg


class Sized:
    """A map-style data source: only __len__ (and __getitem__) like a torch Dataset."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


@pytest.mark.parametrize("source", [Sized(37), list(range(37)), range(37), np.arange(37), tuple(range(37)),
                                    {i: i for i in range(37)}])
def test_sized_data_source_as_length(source):
    # torch's habit: RandomSampler(dataset); the length is len(dataset)
    for cls, kw in ((RandomSampler, {"seed": 4}), (OrderedSampler, {})):
        s, t = cls(source, **kw), cls(37, **kw)
        assert len(s) == 37 and s.length == 37
        assert s.state_dict() == t.state_dict()
        assert s.take(37).tolist() == t.take(37).tolist()
    assert list(OrderedSampler(Sized(5), rank=1, world_size=2)) == [1, 3, 0]  # padded like torch
    assert len(RandomSampler(Sized(0))) == 0


def test_bad_sized_data_sources():
    class Negative:
        def __len__(self):
            return -3

    class Huge:
        def __len__(self):
            return 1 << 63

    with pytest.raises(ValueError, match="Negative"):
        RandomSampler(Negative())
    with pytest.raises(ValueError, match="Huge"):
        OrderedSampler(Huge())


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        RandomSampler(10, rank=3, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        RandomSampler(10, rank=-1, world_size=3)
    with pytest.raises(ValueError, match="world_size"):
        OrderedSampler(10, rank=0, world_size=0)
    with pytest.raises(ValueError, match="seed"):
        RandomSampler(10, seed=1.5)
    with pytest.raises(ValueError, match="pool"):
        PoolSampler(5)
    with pytest.raises(ValueError, match="epoch"):
        RandomSampler(10).set_epoch(-1)
    with pytest.raises(ValueError, match="n must"):
        RandomSampler(10).take(-1)
    ok = {"a": [("x", 1.0)]}
    with pytest.raises(ValueError, match="both be 0"):
        BatchedOrderedSampler(ok)
    with pytest.raises(ValueError, match="no items"):
        BatchedOrderedSampler({}, max_batch_size=2)
    with pytest.raises(ValueError, match="no items"):
        BatchedOrderedSampler({"a": [], "b": []}, max_batch_size=2)
    with pytest.raises(ValueError, match="duration"):
        BatchedOrderedSampler({"a": [("x", -1.0)]}, max_batch_size=2)
    with pytest.raises(ValueError, match="duration"):
        BatchedOrderedSampler({"a": [("x", 1.0), ("y", math.nan)]}, max_batch_size=2)
    with pytest.raises(ValueError, match="duration"):
        BatchedOrderedSampler({"a": [("x", "long")]}, max_batch_size=2)
    with pytest.raises(ValueError, match="max_duration"):
        BatchedOrderedSampler(ok, max_duration=-1)
    with pytest.raises(ValueError, match="max_duration"):
        BatchedOrderedSampler(ok, max_duration=math.nan, max_batch_size=1)
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchedOrderedSampler(ok, max_batch_size=-2)
    with pytest.raises(ValueError, match="buckets"):
        BatchedOrderedSampler([("x", 1.0)], max_batch_size=2)
    with pytest.raises(ValueError, match="buckets"):
        BatchedOrderedSampler({"a": [("x",)]}, max_batch_size=2)
    with pytest.raises(ValueError, match="buckets"):
        BatchedOrderedSampler({"a": 5}, max_batch_size=2)


def test_core_checks_its_own_input():
    with pytest.raises(ValueError, match="rank"):
        _core.SamplerCursor(10, world_size=2, rank=2)
    with pytest.raises(ValueError, match="length"):
        _core.SamplerCursor(-1)
    with pytest.raises(ValueError, match="too large"):
        _core.SamplerCursor(1 << 63)
    with pytest.raises(ValueError, match="duration"):
        _core.batch_pack(np.array([1.0, -2.0]), 3.0, 0, True, False)
    with pytest.raises(ValueError, match="both be 0"):
        _core.batch_pack(np.array([1.0]), 0.0, 0, True, False)
    with pytest.raises(ValueError, match="no items"):
        _core.batch_pack(np.zeros(0), 1.0, 0, True, False)
    c = _core.SamplerCursor(10, world_size=3, rank=1)
    with pytest.raises(ValueError, match="past"):
        c.seek(0, 11, 0)
    with pytest.raises(ValueError, match="index"):
        c.seek(0, 0, 5)
    with pytest.raises(ValueError):
        _core.perm_apply(10, 0, 0, 0, np.array([10]))


def test_allocation_failure_is_memory_error(fail_alloc):
    fail_alloc(0)
    with pytest.raises(MemoryError):
        _core.batch_pack(np.ones(10), 3.0, 0, True, False)
    fail_alloc(-1)
    assert len(_core.batch_pack(np.ones(10), 3.0, 0, True, False)) == 5


def test_pool_elastic_resume_at_the_end_of_a_round():
    # 4 ranks drew a whole round (2 x 4 = 8 of 8); 3 ranks continue with the next round
    four = [PoolSampler(range(8), seed=2, rank=r, world_size=4) for r in range(4)]
    for s in four:
        s.take(1)
    state = four[0].state_dict()
    state = dict(state, index=2, base=0, epoch=0)  # as saved just before the refill
    three = [PoolSampler(range(8), seed=2, rank=r, world_size=3) for r in range(3)]
    for s in three:
        s.load_state_dict(state)
        assert s.epoch == 1 and s.index() == 0
    got = [s.sample() for s in three for _ in range(3)]
    assert set(got) == set(range(8)) and len(got) == 9  # the new round, one padding repeat
    # and a bare cursor left at the end of a round by a seek starts the next one too
    c = _core.SamplerCursor(8, seed=2, stream=2, shuffle=True, eager=True, world_size=2, rank=0)
    c.seek(0, 8, 0)
    assert c.count == 0 and next(c) in range(8) and c.epoch == 1
    c.seek(0, 8, 0)
    assert len(c.take(5)) == 5 and c.epoch == 2


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_pickle_and_deepcopy_keep_the_position(kind):
    import copy
    import pickle

    s = FACTORIES[kind](rank=1, world_size=2)
    draws(s, 7)
    for clone in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert clone.state_dict() == s.state_dict()
        assert draws(clone, 30) == draws(copy.deepcopy(s), 30)


try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    @settings(max_examples=150, deadline=None)
    @given(n=st.integers(0, 300), w=st.integers(1, 6), m=st.integers(1, 6), frac=st.floats(0, 1),
           drop_last=st.booleans(), seed=st.integers(0, U64))
    def test_elastic_resume_property(n, w, m, frac, drop_last, seed):
        """Any world size continues any other's save: nothing skipped, repeats only as padding."""
        old = [RandomSampler(n, seed=seed, rank=r, world_size=w, drop_last=drop_last) for r in range(w)]
        steps = int(frac * len(old[0]))
        seen = [i for s in old for i in s.take(steps).tolist()]
        state = roundtrip(old[0].state_dict())
        new = [RandomSampler(n, seed=seed, rank=r, world_size=m, drop_last=drop_last) for r in range(m)]
        for s in new:
            s.load_state_dict(state)
        parts = [s.take(10**6).tolist() for s in new]  # the rest of this epoch only
        assert len({len(p) for p in parts}) == 1
        rest = [i for p in parts for i in p]
        consumed = min(w * steps, n)
        left = n - consumed
        assert len(parts[0]) == (left // m if drop_last else -(-left // m))
        everything = seen + rest
        if drop_last:
            assert len(set(everything)) == len(everything)  # nothing twice
            assert len(everything) >= n - (w - 1) - (m - 1)  # only uneven tails are dropped
        else:
            assert set(everything) == set(range(n))  # nothing skipped
            assert len(rest) - left == (len(parts[0]) * m - left)  # repeats are only padding

if given is not None:
    _json = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=5),
                         lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                         max_leaves=8)

    @settings(max_examples=300, deadline=None)
    @given(kind=st.sampled_from(sorted(FACTORIES)), changes=st.dictionaries(
        st.sampled_from(["kind", "version", "length", "seed", "epoch", "world_size", "rank", "drop_last",
                         "base", "index", "consumed", "items", "shuffle", "fingerprint", "other"]), _json, max_size=3),
        drop=st.lists(st.sampled_from(["version", "length", "seed", "epoch", "world_size", "base", "index",
                                       "drop_last"]), max_size=2))
    def test_corrupt_states_are_refused_or_exact(kind, changes, drop):
        """A state with any fields changed or missing is refused with SamplerStateError, or loads fully."""
        s = FACTORIES[kind](rank=1, world_size=3)
        draws(s, 5)
        state = dict(s.state_dict(), **changes)
        for key in drop:
            state.pop(key, None)
        before = s.state_dict()
        try:
            s.load_state_dict(state)
        except SamplerStateError:
            assert s.state_dict() == before  # refused: nothing changed
        else:
            # loaded: it continues where the state says, by the documented rules
            want = expected_after_load(kind, state, rank=1, world=3, m=10)
            assert as_draws(s.take(len(want))) == want, (state, before)


_STREAM = {"ordered": 0, "random": 1, "pool": 2, "batched": 3}


def as_draws(x):
    return [tuple(b.tolist()) for b in x] if isinstance(x, list) else x.tolist()


def expected_after_load(kind, state, rank, world, m):
    """The next (up to) m draws of the segment a FACTORIES sampler continues with after
    loading `state`, from the documented rules alone (sampler.h, reference_perm)."""
    drop_last = kind == "batched"  # the FACTORIES samplers' own setting
    n, seed, epoch = state["length"], state["seed"], state["epoch"]
    base, k = state["base"], state["index"]
    if state["world_size"] != world or state["drop_last"] != drop_last:
        base, k = min(base + k * state["world_size"], n), 0  # elastic: the rest of the epoch re-dealt

    def count(b):
        rest = n - b
        return rest // world + (1 if not drop_last and rest % world else 0)

    if kind == "pool" and k >= count(base) and n > 0:
        epoch, base, k = epoch + 1, 0, 0  # a finished round is refilled at once
    order = (lambda x: x) if kind == "ordered" else reference_perm(n, seed, _STREAM[kind], epoch & U64)
    batches = FACTORIES["batched"]().batches if kind == "batched" else None
    out = []
    for j in range(k, min(k + m, count(base))):
        q = base + rank + j * world
        if q >= n:
            q = (q - n) % n  # padding repeats from the start of the epoch
        item = order(q)
        out.append(tuple(batches[item]) if batches is not None else item)
    return out


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_resume_model_matches_uninterrupted_runs(kind):
    # the model above agrees with plain uninterrupted runs (so that the
    # corrupt-state property compares against something real)
    for cut in (0, 3, 7):
        s = FACTORIES[kind](rank=1, world_size=3)
        full = FACTORIES[kind](rank=1, world_size=3)
        whole = as_draws(full.take(len(full)))
        s.take(cut)
        want = expected_after_load(kind, s.state_dict(), rank=1, world=3, m=10)
        assert want == whole[cut:cut + 10]
    # another world size: the rest of the epoch from the saved global position
    four = FACTORIES[kind](rank=0, world_size=4)
    four.take(2)
    three = FACTORIES[kind](rank=1, world_size=3)
    three.load_state_dict(four.state_dict())
    want = expected_after_load(kind, four.state_dict(), rank=1, world=3, m=10)
    assert want and as_draws(three.take(len(want))) == want


def test_cursor_keeps_its_own_copy_of_the_batch_offsets():
    # the offsets are validated once; a later change to the caller's array
    # (or to the one __reduce__ hands out) must not reach the cursor
    offsets = np.array([0, 2, 5], dtype=np.int64)
    c = _core.SamplerCursor(2, offsets=offsets)
    offsets[2] = -5
    offsets[1] = 100
    assert [list(b) for b in c] == [[0, 1], [2, 3, 4]]
    _, args, _ = c.__reduce__()
    with pytest.raises(ValueError):
        args[-1][1] = 7


def test_batch_pack_refuses_negative_sizes_at_the_c_boundary():
    from mlutils import _core

    with pytest.raises(ValueError, match="max_batch_size"):
        _core.batch_pack([1.0, 2.0], 0.0, -1, True, False)
    assert _core.batch_pack([1.0, 2.0], 0.0, 1, True, False).tolist() == [0, 1, 2]
