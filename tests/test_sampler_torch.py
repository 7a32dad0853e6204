"""The samplers in torch's DataLoader, and without torch."""
import os
import subprocess
import sys

import pytest

from mlutils.sampler import BatchedOrderedSampler, OrderedSampler, PoolSampler, RandomSampler


class Squares:
    """A map-style dataset (picklable for worker processes)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i * i


def test_samplers_are_torch_samplers(torch):
    from torch.utils.data import Sampler

    for s in (RandomSampler(5), OrderedSampler(5), PoolSampler(range(5)),
              BatchedOrderedSampler({"a": [("x", 1.0)] * 5}, max_batch_size=2)):
        assert isinstance(s, Sampler)


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_sampler_and_resume(torch, workers, loader_mp):
    from torch.utils.data import DataLoader

    n = 40
    s = RandomSampler(n, seed=3)
    dl = DataLoader(Squares(n), batch_size=4, sampler=s, num_workers=workers,
                    multiprocessing_context=loader_mp if workers else None)
    assert len(dl) == 10
    first = [b.tolist() for b in dl]
    flat = [v for b in first for v in b]
    assert sorted(flat) == sorted(i * i for i in range(n))
    assert flat == [i * i for i in RandomSampler(n, seed=3).take(n).tolist()]
    assert s.epoch == 0 and s.index() == n  # the sampler ran in the main process
    second = [v for b in dl for v in b.tolist()]  # the next epoch: another order
    assert s.epoch == 1
    assert sorted(second) == sorted(flat) and second != flat
    # resume mid-epoch from a state taken with the loader in the main process
    t = RandomSampler(n, seed=3)
    it = iter(DataLoader(Squares(n), batch_size=4, sampler=t, num_workers=0))
    head = [next(it).tolist() for _ in range(3)]
    state = t.state_dict()
    u = RandomSampler(n, seed=99)
    u.load_state_dict(state)
    tail = [b.tolist() for b in DataLoader(Squares(n), batch_size=4, sampler=u, num_workers=workers,
                                           multiprocessing_context=loader_mp if workers else None)]
    assert head + tail == first


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_batch_sampler(torch, workers, loader_mp):
    from torch.utils.data import DataLoader

    buckets = {"short": [(f"s{i}", 1.0 + i / 10) for i in range(12)],
               "long": [(f"l{i}", 5.0 + i) for i in range(6)]}
    bs = BatchedOrderedSampler(buckets, max_duration=12, shuffle=True, seed=4, drop_last=False)
    dl = DataLoader(Squares(18), batch_sampler=bs, num_workers=workers,
                    multiprocessing_context=loader_mp if workers else None)
    got = [b.tolist() for b in dl]
    want_batches = BatchedOrderedSampler(buckets, max_duration=12, shuffle=True, seed=4, drop_last=False)
    assert got == [[i * i for i in b] for b in want_batches]
    assert len(dl) == len(bs)


def test_dataloader_distributed_shards(torch):
    from torch.utils.data import DataLoader

    n, world = 30, 4
    seen = []
    for rank in range(world):
        s = RandomSampler(n, seed=1, rank=rank, world_size=world)
        seen.append([v for b in DataLoader(Squares(n), batch_size=3, sampler=s) for v in b.tolist()])
    assert len({len(x) for x in seen}) == 1
    assert {v for x in seen for v in x} == {i * i for i in range(n)}


def test_without_torch():
    code = (
        "import sys\n"
        "from mlutils.sampler import RandomSampler, BatchedOrderedSampler, PoolSampler, _Sharded\n"
        "s = RandomSampler(10, seed=1)\n"
        "assert _Sharded.__bases__ == (object,) and 'torch' not in sys.modules\n"
        "assert sorted(s) == list(range(10))\n"
        "b = BatchedOrderedSampler({'a': [('x', 1.0)] * 5}, max_batch_size=2, drop_last=False)\n"
        "assert list(b) == [[0, 1], [2, 3], [4]]\n"
        "print(RandomSampler(10, seed=1).take(10).tolist())\n"
    )
    env = dict(os.environ, MLUTILS_NO_TORCH="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    # the same order with and without torch
    assert out.stdout.strip() == str(RandomSampler(10, seed=1).take(10).tolist())


def test_sampler_of_a_dataset_like_torch(torch):
    # torch's habit: the sampler is built from the dataset itself
    from torch.utils.data import DataLoader

    ds = Squares(30)
    got = [v for b in DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, seed=2)) for v in b.tolist()]
    assert got == [i * i for i in RandomSampler(30, seed=2).take(30).tolist()]
    assert [v for b in DataLoader(ds, batch_size=7, sampler=OrderedSampler(ds)) for v in b.tolist()] == \
        [i * i for i in range(30)]


def test_workers_leave_the_sampler_ahead_of_the_loop(torch, loader_mp):
    # what the README says next to the DataLoader example: with workers the
    # sampler's state is ahead of the consumed batches by the prefetched ones
    from torch.utils.data import DataLoader

    n, bs = 200, 4
    for workers, ahead in ((0, False), (2, True)):
        s = RandomSampler(n, seed=1)
        it = iter(DataLoader(Squares(n), batch_size=bs, sampler=s, num_workers=workers,
                             prefetch_factor=2 if workers else None,
                             multiprocessing_context=loader_mp if workers else None))
        for _ in range(3):
            next(it)
        assert (s.index() > 3 * bs) == ahead, (workers, s.index())
        del it
    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")).read()
    assert "num_workers > 0" in readme and "prefetch" in readme
