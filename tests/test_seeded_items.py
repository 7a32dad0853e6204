"""Per-item seeding (mlutils.seeding): an item's random draws depend on (seed, epoch, index) alone.

The items draw from Python's, NumPy's and torch's global generators; the
peer is a real torch DataLoader with 0 and 2 workers, persistent or not."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from mlutils.sampler import Batches, BatchedOrderedSampler, OrderedSampler, PoolSampler, RandomSampler
from mlutils.seeding import Keyed, SeededItems, seed_item

N, BS, SEED = 103, 8, 11
MAKERS = {
    "random": lambda n=N, **kw: RandomSampler(n, seed=5, **kw),
    "ordered": lambda n=N, **kw: OrderedSampler(n, **kw),
    "pool": lambda n=N, **kw: PoolSampler(range(n), seed=5, **kw),
}


def _torch_draw():
    if os.environ.get("MLUTILS_NO_TORCH") == "1":
        return None
    import torch

    return torch.rand(1).item()


class Draws:
    """Item i: (i, a draw from random, one from np.random, one from torch's CPU generator or None)."""

    def __init__(self, n=N):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return int(i), random.random(), float(np.random.rand()), _torch_draw()


def as_list(items):
    return list(items)


def collate_then_draw(items):
    return list(items), random.random()


def loader(sampler_or_batches, workers, mp=None, persistent=False, seed=SEED):
    from torch.utils.data import DataLoader

    kw = {}
    if workers:
        kw = dict(num_workers=workers, persistent_workers=persistent, multiprocessing_context=mp, prefetch_factor=2)
    ds = SeededItems(Draws(), seed=seed)
    if isinstance(sampler_or_batches, Batches) or isinstance(getattr(sampler_or_batches, "sampler", None),
                                                             BatchedOrderedSampler):
        return DataLoader(ds, batch_sampler=sampler_or_batches, collate_fn=as_list, **kw)
    return DataLoader(ds, sampler=sampler_or_batches, batch_size=BS, collate_fn=as_list, **kw)


def keyed(sampler, mode):
    return Keyed(sampler) if mode == "sampler" else sampler.batches(BS, keyed=True)


def epochs(dl, n):
    """n epochs of a loader: one list of items per epoch."""
    return [[item for batch in dl for item in batch] for _ in range(n)]


# ---------------------------------------------------------------- the seeding itself (no torch needed)


def test_seed_item_is_a_function_of_seed_epoch_index():
    seed_item(1, 2, 3)
    a = (random.random(), np.random.rand(), _torch_draw())
    random.random(), np.random.rand()  # move on, then seed again
    seed_item(1, 2, 3)
    assert (random.random(), np.random.rand(), _torch_draw()) == a
    others = set()
    for key in [(0, 2, 3), (1, 0, 3), (1, 2, 0), (1, 3, 2), (2, 1, 3), (1, 2, 4)]:
        seed_item(*key)
        others.add((random.random(), float(np.random.rand())))
    assert len(others) == 6 and (a[0], float(a[1])) not in others


def test_generators_get_distinct_keys():
    """Python's random and np.random are both MT19937: seeded alike they would draw the same numbers."""
    seed_item(0, 0, 0)
    py = [random.random() for _ in range(4)]
    npy = np.random.random_sample(4).tolist()
    assert py != npy
    assert len(set(py) & set(npy)) == 0


def test_nearby_items_are_unrelated():
    ds = SeededItems(Draws(3000), seed=0, restore=False)
    d = np.array([ds[(0, i)][1:3] for i in range(3000)])
    for col in range(2):
        x = d[:, col]
        assert abs(x.mean() - 0.5) < 0.02
        assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 0.06  # index i vs i + 1
    e1 = np.array([ds[(1, i)][1:3] for i in range(3000)])
    assert abs(np.corrcoef(d[:, 0], e1[:, 0])[0, 1]) < 0.06  # epoch e vs e + 1
    assert len(np.unique(d[:, 0])) == 3000


def test_an_item_does_not_depend_on_what_was_loaded_before():
    """Seeding per worker or per batch would make an item's draws depend on its neighbours."""
    ds = SeededItems(Draws(), seed=SEED)
    alone = {i: ds[(3, i)] for i in range(20)}
    keys = [(3, i) for i in range(20)]
    assert ds.__getitems__(keys[::-1]) == [alone[i] for i in range(20)][::-1]
    random.shuffle(keys)
    assert [ds[k] for k in keys] == [alone[i] for _, i in keys]
    assert SeededItems(Draws(), seed=SEED + 1)[(3, 5)] != alone[5]


def reseed(n):
    random.seed(n)
    np.random.seed(n)
    if os.environ.get("MLUTILS_NO_TORCH") != "1":
        import torch

        torch.manual_seed(n)


def test_main_process_restores_the_generators():
    ds = SeededItems(Draws())
    reseed(1)
    want = Draws()[0]
    reseed(1)
    ds[(0, 1)]
    ds.__getitems__([(0, 2), (1, 3)])
    assert Draws()[0] == want

    class Fails:
        def __len__(self):
            return 1

        def __getitem__(self, i):
            random.random()
            raise KeyError(i)

    random.seed(2)
    want = random.getstate()
    with pytest.raises(KeyError):
        SeededItems(Fails())[(0, 0)]
    assert random.getstate() == want


def test_restore_false_leaves_the_items_streams():
    ds = SeededItems(Draws(), seed=4, restore=False)
    item = ds[(2, 7)]
    after = random.random()
    seed_item(4, 2, 7)
    assert random.random() == item[1] and random.random() == after


def test_keys_are_checked():
    ds = SeededItems(Draws())
    for bad in (3, None, (1, 2, 3), "x"):
        with pytest.raises(TypeError, match=r"\(epoch, index\) keys.*Keyed\(sampler\)"):
            ds[bad]
    for bad in ((-1, 0), (0, -1), (0, 1 << 63), (1 << 64, 0), (0.5, 1), (True, 1)):
        with pytest.raises(ValueError, match="epoch|index"):
            ds[bad]
    assert ds[(np.int64(1), np.uint32(2))] == ds[(1, 2)]
    assert len(ds) == N and SeededItems(Draws(), seed=-1).seed == (1 << 64) - 1
    with pytest.raises(ValueError, match="seed"):
        SeededItems(Draws(), seed=1.5)


# ---------------------------------------------------------------- keys from the samplers (no torch needed)


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_keyed_batches_are_batches_consuming_alike(kind):
    """The training loop recognises Batches (sampler, batch_size, drop_last) and seeks by take(batch_size)."""
    make = MAKERS[kind]
    s, plain = make(), make()
    b = s.batches(BS, drop_last=True, keyed=True)
    assert isinstance(b, Batches) and b.sampler is s and b.batch_size == BS and b.drop_last and b.keyed
    assert len(b) == len(plain.batches(BS, drop_last=True)) == N // BS
    for _ in range(2):  # two epochs
        e = plain.epoch if plain.remaining() else plain.epoch + 1
        want = list(plain.batches(BS, drop_last=True))
        got = list(b)
        assert [[i for _, i in x] for x in got] == [a.tolist() for a in want]
        assert {k[0] for x in got for k in x} == {e}
        assert s.state_dict() == plain.state_dict()
    it, pit = iter(s.batches(BS, keyed=True)), iter(plain.batches(BS))
    next(it), next(pit)
    assert s.state_dict() == plain.state_dict()


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_keyed_sampler_forwards(kind):
    make = MAKERS[kind]
    s, plain = make(), make()
    k = Keyed(s)
    assert k.sampler is s and len(k) == len(s)
    for name in ("state_dict", "load_state_dict", "take", "set_epoch", "remaining"):
        assert callable(getattr(k, name))
    assert np.array_equal(k.take(5), plain.take(5))
    assert k.remaining() == plain.remaining() and k.index() == plain.index() == 5
    assert k.state_dict() == plain.state_dict() == k.get_state()
    got = list(k)
    assert [i for _, i in got] == plain.take(plain.remaining()).tolist()
    assert {e for e, _ in got} == {0}
    assert {e for e, _ in k} == {1} and k.epoch == (1 if kind != "pool" else 2)
    k.set_epoch(7)
    assert s.epoch == 7 and {e for e, _ in k} == {7}
    k.load_state_dict(plain.state_dict())
    assert s.state_dict() == plain.state_dict()
    with pytest.raises(TypeError, match="keyed=True"):
        Keyed(s.batches(4))
    with pytest.raises(TypeError, match="mlutils sampler"):
        Keyed(range(4))


def test_pool_keys_carry_the_round():
    """A PoolSampler refills right after a round's last draw: each key keeps the round it was drawn in."""
    p, twin = PoolSampler(range(10), seed=2), PoolSampler(range(10), seed=2)
    p.take(7), twin.take(7)
    a, b, c = twin.take(3).tolist()
    assert list(p.batches(2, keyed=True)) == [[(0, a), (0, b)], [(0, c)]]
    assert p.epoch == 1
    assert [e for e, _ in Keyed(p)] == [1] * 10
    assert [e for b in p.batches(3, keyed=True) for e, _ in b] == [2] * 10


def test_keyed_batched_ordered_sampler():
    buckets = {"a": [("x", 1.0)] * 10, "b": [("y", 2.0)] * 7}
    s = BatchedOrderedSampler(buckets, max_batch_size=3, shuffle=True, seed=1)
    plain = BatchedOrderedSampler(buckets, max_batch_size=3, shuffle=True, seed=1)
    k = Keyed(s)
    assert [[i for _, i in b] for b in k] == list(plain)
    assert {e for b in k for e, _ in b} == {1}
    assert [len(x) for x in k.take(2)] == [len(x) for x in plain.take(2)]


# ---------------------------------------------------------------- through a real DataLoader


@pytest.mark.parametrize("mode", ["sampler", "batches"])
@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("persistent", [False, True])
def test_workers_do_not_change_the_draws(torch, loader_mp, mode, kind, persistent):
    """(1) the same items come with the same draws with 0 and 2 workers, over two epochs (persistent
    workers get the second epoch through the keys); (2) an index's draws differ between epochs."""
    ref = epochs(loader(keyed(MAKERS[kind](), mode), 0), 2)
    got = epochs(loader(keyed(MAKERS[kind](), mode), 2, loader_mp, persistent), 2)
    assert got == ref
    assert sorted(i for i, *_ in ref[0]) == list(range(N))
    first = {i: d for i, *d in ref[0]}
    for i, *d in ref[1]:
        assert all(a != b for a, b in zip(d, first[i])), "the epoch is not part of the item's seed"


def test_items_not_seeded_per_worker(torch, loader_mp):
    """With seeding per worker (or none), which worker loads an item would change its draws."""
    from torch.utils.data import DataLoader

    def run(ds, workers):
        kw = dict(num_workers=workers, multiprocessing_context=loader_mp) if workers else {}
        return [x for b in DataLoader(ds, sampler=Keyed(RandomSampler(N, seed=3)), batch_size=4,
                                      collate_fn=as_list, **kw) for x in b]

    assert run(SeededItems(Draws()), 2) == run(SeededItems(Draws()), 0)
    assert run(Unseeded(), 2) != run(Unseeded(), 0)  # the test can see the difference


class Unseeded(Draws):
    def __getitem__(self, key):
        return super().__getitem__(key[1])


def test_worker_generators_carry_the_last_items_streams(torch, loader_mp):
    """In a worker nothing is restored: a collate_fn draws on from the batch's last item."""
    from torch.utils.data import DataLoader

    dl = DataLoader(SeededItems(Draws(), seed=9), batch_sampler=RandomSampler(N).batches(5, keyed=True),
                    collate_fn=collate_then_draw, num_workers=2, multiprocessing_context=loader_mp)
    for items, drawn in dl:
        e, i = 0, items[-1][0]
        seed_item(9, e, i)
        assert random.random() == items[-1][1] and random.random() == drawn


@pytest.mark.parametrize("mode", ["sampler", "batches"])
@pytest.mark.parametrize("kind", ["random", "pool"])
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("k", [0, 3, 12])
def test_resume_mid_epoch_with_fresh_workers(torch, loader_mp, mode, kind, persistent, k):
    """(3) a state taken after k batches, loaded into a fresh sampler and loader (new workers),
    gives the rest of the uninterrupted run's augmented items, into the next epoch."""
    make = MAKERS[kind]
    ref = epochs(loader(keyed(make(), mode), 2, loader_mp, persistent), 2)
    s = make()
    it = iter(loader(keyed(s, mode), 0))
    seen = [x for _ in range(k) for x in next(it)]
    assert seen == ref[0][:k * BS]
    state = json.loads(json.dumps(s.state_dict()))
    r = make()
    r.load_state_dict(state)
    dl = loader(keyed(r, mode), 2, loader_mp, persistent)
    assert epochs(dl, 2) == [ref[0][k * BS:], ref[1]]
    # as the training loop seeks: the epoch's start state, then take(draws) through the keyed object
    r = make()
    key = keyed(r, mode)
    (key if mode == "sampler" else key.sampler).take(k * BS)
    assert epochs(loader(key, 2, loader_mp, persistent), 1) == [ref[0][k * BS:]]


@pytest.mark.parametrize("mode", ["sampler", "batches"])
def test_other_world_size(torch, loader_mp, mode):
    """(4) two ranks give the items of one rank with the same draws; a 1-rank state loaded by
    2 ranks gives the rest of the 1-rank epoch, each item with the same draws."""
    n = 96
    one = epochs(loader(keyed(RandomSampler(n, seed=5, world_size=1, rank=0), mode), 0), 2)
    ranks = [epochs(loader(keyed(RandomSampler(n, seed=5, world_size=2, rank=r), mode), 2, loader_mp), 2)
             for r in range(2)]
    for e in range(2):
        union = sorted(ranks[0][e] + ranks[1][e])
        assert union == sorted(one[e]) and len(union) == n
    k = 5
    s = RandomSampler(n, seed=5, world_size=1, rank=0)
    it = iter(loader(keyed(s, mode), 0))
    for _ in range(k):
        next(it)
    state = s.state_dict()
    rest = []
    for r in range(2):
        rs = RandomSampler(n, seed=5, world_size=2, rank=r)
        rs.load_state_dict(state)
        rest += epochs(loader(keyed(rs, mode), 2, loader_mp), 1)[0]
    assert sorted(rest) == sorted(one[0][k * BS:])


def test_batched_ordered_sampler_in_a_loader(torch, loader_mp):
    buckets = {"a": [("x", 1.0)] * 60, "b": [("y", 2.0)] * 43}
    make = lambda: BatchedOrderedSampler(buckets, max_duration=9, shuffle=True, seed=4)  # noqa: E731
    ref = epochs(loader(Keyed(make()), 0), 2)
    assert epochs(loader(Keyed(make()), 2, loader_mp, True), 2) == ref
    s = make()
    it = iter(loader(Keyed(s), 0))
    for _ in range(3):
        next(it)
    r = make()
    r.load_state_dict(s.state_dict())
    rest = epochs(loader(Keyed(r), 2, loader_mp), 1)[0]
    assert rest == ref[0][len(ref[0]) - len(rest):] and len(rest) < len(ref[0])


class Recorder:
    """An Engine recording its batches' augmented items; its state is the step."""

    def __init__(self):
        self.seen, self._step = [], 0

    @property
    def global_step(self):
        return self._step

    def train_step(self, batch):
        self._step += 1
        # the step draws too (dropout, ...): from the loop's generators, which items must not disturb
        self.seen.append((batch, random.random(), float(np.random.rand())))
        return {"loss": 0.0}

    def state_dict(self):
        return {"step": self._step}

    def load_state_dict(self, s):
        self._step = int(s["step"])

    def export(self):
        return {}

    def set_lr(self, lr):
        pass

    def quit(self):
        pass


@pytest.mark.parametrize("mode", ["sampler", "batches"])
@pytest.mark.parametrize("workers", [0, 2])
def test_training_loop_resume_is_exact(torch, tmp_path, loader_mp, mode, workers):
    """The training loop saving at step 9 and resuming in a fresh loader sees the same augmented items."""
    from _train_helpers import cfg

    import mlutils.train as mt

    def dl():
        return loader(keyed(RandomSampler(N, seed=5), mode), workers, loader_mp, persistent=bool(workers))

    from mlutils.train.data import data_source

    source = data_source(dl())
    assert source.sampler is not None and not source.replay  # keyed batches are seeked, not read again

    def fresh_process():
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        return Recorder()

    total = 30  # 13 batches an epoch: crosses two epoch ends
    ref = fresh_process()
    mt.train(dl(), ref, None, cfg(tmp_path / "ref", iterations=total))
    first = fresh_process()
    mt.train(dl(), first, None, cfg(tmp_path / "run", iterations=9))
    second = fresh_process()
    res = mt.train(dl(), second, None, cfg(tmp_path / "run", iterations=total))
    assert res.status == "completed"
    assert first.seen + second.seen == ref.seen and len(ref.seen) == total


# ---------------------------------------------------------------- without torch


def test_imports_and_seeds_without_torch():
    """(5) with torch hidden the module imports, SeededItems is a plain object and random/numpy are seeded."""
    code = (
        "import sys, random; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from mlutils.sampler import RandomSampler\n"
        "from mlutils.seeding import Keyed, SeededItems, seed_item\n"
        "class D:\n"
        "    def __len__(self): return 9\n"
        "    def __getitem__(self, i): return i, random.random(), float(np.random.rand())\n"
        "ds = SeededItems(D(), seed=2)\n"
        "assert type(ds).__mro__[1] is object and type(Keyed(RandomSampler(3))).__mro__[1] is object\n"
        "items = [ds[k] for k in Keyed(RandomSampler(9, seed=1))]\n"
        "seed_item(2, 0, items[0][0])\n"
        "assert items[0][1:] == (random.random(), float(np.random.rand()))\n"
        "assert ds.__getitems__(next(iter(RandomSampler(9, seed=1).batches(9, keyed=True)))) == items\n"
        "print('ok')\n"
    )
    env = dict(os.environ, MLUTILS_NO_TORCH="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
