"""Samplers' batched form: sampler.batches(batch_size) as a DataLoader batch_sampler, with exact resume."""
import json

import numpy as np
import pytest

from mlutils.sampler import IndexedTensorDataset, OrderedSampler, PoolSampler, RandomSampler, collate_batch

MAKERS = {
    "random": lambda n, **kw: RandomSampler(n, seed=7, **kw),
    "ordered": lambda n, **kw: OrderedSampler(n, **kw),
    "pool": lambda n, **kw: PoolSampler(range(n), seed=7, **kw),
}


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("n,bs", [(1000, 64), (1024, 256), (5, 8), (1, 1), (0, 4)])
def test_batches_equal_take(kind, n, bs):
    make = MAKERS[kind]
    got = list(make(n).batches(bs))
    assert all(isinstance(b, np.ndarray) and b.dtype == np.int64 for b in got)
    assert all(len(b) == bs for b in got[:-1])
    flat = np.concatenate(got) if got else np.zeros(0, np.int64)
    assert np.array_equal(flat, make(n).take(n))
    assert len(make(n).batches(bs)) == len(got) == -(-n // bs)
    if kind != "ordered":
        assert sorted(flat.tolist()) == list(range(n))


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_drop_last_and_len(kind):
    make = MAKERS[kind]
    b = make(1000).batches(64, drop_last=True)
    got = list(b)
    assert len(b) == len(got) == 15 and all(len(x) == 64 for x in got)
    assert np.array_equal(np.concatenate(got), make(1000).take(960))
    assert len(make(1000).batches(64)) == 16
    assert len(make(1024).batches(256, drop_last=True)) == 4


def test_bad_batch_size():
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="batch_size"):
            RandomSampler(10).batches(bad)


def test_next_epoch_and_iteration_agree():
    """Each iter() of the batches is one epoch, the same epochs the sampler itself gives."""
    a, b = RandomSampler(300, seed=3), RandomSampler(300, seed=3)
    batches = a.batches(100)
    for _ in range(3):
        assert np.concatenate(list(batches)).tolist() == list(b)


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("k", [0, 1, 5, 15])
def test_resume_mid_epoch(kind, k):
    """A state taken after k batches continues at batch k + 1, through JSON."""
    make = MAKERS[kind]
    full = list(make(1000).batches(64))
    s = make(1000)
    it = iter(s.batches(64))
    seen = [next(it) for _ in range(k)]
    state = json.loads(json.dumps(s.state_dict()))
    for x, y in zip(seen, full):
        assert np.array_equal(x, y)
    r = make(1000)
    r.load_state_dict(state)
    rest = list(r.batches(64))
    assert len(rest) == len(full) - k
    for x, y in zip(rest, full[k:]):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_sharding(world):
    n, bs = 1001, 32
    shards = [RandomSampler(n, seed=5, rank=r, world_size=world).batches(bs) for r in range(world)]
    per_rank = [np.concatenate(list(b)) for b in shards]
    for r, got in enumerate(per_rank):
        assert np.array_equal(got, RandomSampler(n, seed=5, rank=r, world_size=world).take(n))
        assert len(shards[r]) == -(-(-(-n // world)) // bs)
    allv = np.concatenate(per_rank)
    assert set(allv.tolist()) == set(range(n))
    assert len(allv) == world * -(-n // world)  # padded by repetition to equal counts
    dl = [RandomSampler(n, seed=5, rank=r, world_size=world, drop_last=True).batches(bs) for r in range(world)]
    got = np.concatenate([np.concatenate(list(b)) for b in dl])
    assert len(got) == len(set(got.tolist())) == world * (n // world)


def test_indexed_dataset_numpy():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    y = np.arange(20) * 10
    ds = IndexedTensorDataset(x, y)
    idx = np.array([3, 0, 19, 3], dtype=np.int64)
    bx, by = ds.__getitems__(idx)
    assert np.array_equal(bx, x[idx]) and np.array_equal(by, y[idx])
    assert len(ds) == 20 and ds[4][1] == 40
    with pytest.raises(IndexError):
        ds.__getitems__(np.array([20]))
    with pytest.raises(IndexError):
        ds.__getitems__([-1])
    with pytest.raises(ValueError, match="first dimension"):
        IndexedTensorDataset(x, y[:5])
    with pytest.raises(ValueError):
        IndexedTensorDataset()


class NoItemByItem(IndexedTensorDataset):
    """Fails if fetched item by item (module level: picklable for workers)."""

    def __getitem__(self, i):
        raise AssertionError("fetched item by item")


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_getitems_fast_path(torch, workers, loader_mp):
    """DataLoader(batch_sampler=sampler.batches(...)) hands each int64 batch to __getitems__ once."""
    from torch.utils.data import DataLoader

    n = 1000
    x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    y = torch.arange(n) * 2
    ds = NoItemByItem(x, y)
    s = RandomSampler(n, seed=11)
    loader = DataLoader(ds, batch_sampler=s.batches(128), collate_fn=collate_batch, num_workers=workers,
                        multiprocessing_context=loader_mp if workers else None)
    assert len(loader) == 8
    expect = list(RandomSampler(n, seed=11).batches(128))
    got = list(loader)
    assert len(got) == len(expect)
    for (bx, by), idx in zip(got, expect):
        t = torch.from_numpy(idx)
        assert torch.equal(bx, x[t]) and torch.equal(by, y[t])
    # the second epoch is the sampler's next one
    s2 = RandomSampler(n, seed=11)
    s2.set_epoch(1)
    got2 = torch.cat([by for _, by in loader]) // 2
    assert got2.tolist() == list(s2)


def test_dataloader_resume_workers0(torch):
    from torch.utils.data import DataLoader

    n = 1000
    ds = IndexedTensorDataset(torch.arange(n))
    full = [b[0] for b in DataLoader(ds, batch_sampler=RandomSampler(n, seed=2).batches(100), collate_fn=collate_batch)]
    s = RandomSampler(n, seed=2)
    it = iter(DataLoader(ds, batch_sampler=s.batches(100), collate_fn=collate_batch))
    for _ in range(3):
        next(it)
    state = s.state_dict()
    r = RandomSampler(n, seed=2)
    r.load_state_dict(state)
    rest = [b[0] for b in DataLoader(ds, batch_sampler=r.batches(100), collate_fn=collate_batch)]
    assert len(rest) == 7
    for a, b in zip(rest, full[3:]):
        assert torch.equal(a, b)


def test_dataloader_default_collate_lists(torch):
    """Without __getitems__, the DataLoader indexes item by item with the array's entries: it works too."""
    from torch.utils.data import DataLoader

    data = list(range(100, 150))
    loader = DataLoader(data, batch_sampler=OrderedSampler(50).batches(16))
    got = [b.tolist() for b in loader]
    assert got[0] == list(range(100, 116)) and len(got) == 4 and got[-1] == [148, 149]


def test_indexed_dataset_torch_bounds(torch):
    ds = IndexedTensorDataset(torch.arange(10), torch.zeros(10, 3))
    bx, by = ds.__getitems__(np.array([9, 0], dtype=np.int64))
    assert bx.tolist() == [9, 0] and by.shape == (2, 3)
    for bad in ([10], [-1]):
        with pytest.raises(IndexError):
            ds.__getitems__(np.array(bad, dtype=np.int64))
    with pytest.raises(ValueError, match="one-dimensional"):
        ds.__getitems__(np.zeros((2, 2), dtype=np.int64))
