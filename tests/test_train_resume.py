"""mlutils.train resumes exactly whatever feeds it: every way of handing an mlutils sampler to a
DataLoader, torch's own shuffling with persistent workers, a checkpoint of the last step, and every
RNG a step draws from (Python's, NumPy's, torch's).  Each test compares an interrupted and resumed
run with an uninterrupted one, batch by batch and draw by draw."""
import logging
import os
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if os.environ.get("MLUTILS_NO_TORCH") == "1":
    pytest.skip("the training loop trains torch models", allow_module_level=True)

from torch.utils.data import BatchSampler, DataLoader  # noqa: E402

import mlutils.train as mt  # noqa: E402
from mlutils.io import torch_save  # noqa: E402
from mlutils.sampler import BatchedOrderedSampler, OrderedSampler, RandomSampler  # noqa: E402
from _train_helpers import cfg, load_rank0  # noqa: E402

N = 22  # items: with batches of 4, 6 batches an epoch (the last one short)


class DrawEngine:
    """Records each batch and one draw from every global generator the loop saves (python, numpy,
    torch): a resume that restores any of them wrongly changes the record."""

    def __init__(self):
        self.seen = []
        self._step = 0

    @property
    def global_step(self):
        return self._step

    def train_step(self, batch):
        items = batch.tolist() if hasattr(batch, "tolist") else list(batch)
        self.seen.append([items, random.random(), float(np.random.rand()), float(torch.rand(()))])
        self._step += 1
        return {"loss": 1.0}

    def state_dict(self):
        return {"seen": [list(x) for x in self.seen], "step": self._step}

    def load_state_dict(self, s):
        self.seen, self._step = [list(x) for x in s["seen"]], int(s["step"])

    def export(self):
        return {}

    def set_lr(self, lr):
        pass

    def quit(self):
        pass


class Items(torch.utils.data.Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return int(i)


def _collate(batch):
    if isinstance(batch, (list, tuple)):
        return [int(x) for x in batch]
    return [int(x) for x in np.asarray(batch).ravel()]


class MyBatches:
    """A user's own batch sampler over an mlutils sampler: pairs of draws, exposing `.sampler`."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        batch = []
        for i in self.sampler:
            batch.append(int(i))
            if len(batch) == 3:
                yield batch
                batch = []
        if batch:
            yield batch

    def __len__(self):
        return -(-len(self.sampler) // 3)


def _reseed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _loaders():
    """name -> a function making a fresh loader (fresh sampler) of that kind."""
    buckets = {"a": [(f"a{i}", 1.0 + (i % 3)) for i in range(12)], "b": [(f"b{i}", 2.5) for i in range(10)]}
    return {
        "sampler=": lambda: DataLoader(Items(), batch_size=4, sampler=RandomSampler(N, seed=3),
                                       collate_fn=_collate),
        "sampler= drop_last": lambda: DataLoader(Items(), batch_size=4, drop_last=True,
                                                 sampler=RandomSampler(N, seed=3), collate_fn=_collate),
        "batches(n)": lambda: DataLoader(Items(), batch_sampler=RandomSampler(N, seed=3).batches(4),
                                         collate_fn=_collate),
        "batches(n, drop_last)": lambda: DataLoader(Items(), batch_sampler=OrderedSampler(N).batches(4, True),
                                                    collate_fn=_collate),
        "BatchedOrderedSampler": lambda: DataLoader(
            Items(), batch_sampler=BatchedOrderedSampler(buckets, max_duration=8.0, shuffle=True, seed=5),
            collate_fn=_collate),
        "user batch sampler": lambda: DataLoader(Items(), batch_sampler=MyBatches(RandomSampler(N, seed=3)),
                                                 collate_fn=_collate),
        "shuffle=True": lambda: DataLoader(Items(), batch_size=4, shuffle=True, collate_fn=_collate),
    }


def _run(tmp_path, make_loader, iterations, **kw):
    engine = DrawEngine()
    result = mt.train(make_loader(), engine, config=cfg(tmp_path, iterations=iterations, **kw))
    return engine, result


@pytest.mark.parametrize("kind", list(_loaders()))
@pytest.mark.parametrize("stop", [3, 8, 13])  # epoch 0 mid, epoch 1 mid, epoch 2 (after 2 whole epochs)
def test_resume_is_exact_for_every_way_of_feeding_the_loader(tmp_path, kind, stop):
    make = _loaders()[kind]
    _reseed(0)
    ref, _ = _run(tmp_path / "ref", make, 17)
    _reseed(0)
    first, r1 = _run(tmp_path / "cut", make, 17, events=[f"quit@{stop}"])
    assert r1.status == "quit" and first.global_step == stop
    _reseed(99)  # the resumed process starts from other generator states: the checkpoint must restore them
    resumed, r2 = _run(tmp_path / "cut", make, 17)
    assert r2.resumed_from is not None and r2.step == 17
    assert resumed.seen == ref.seen


@pytest.mark.parametrize("persistent", [False, True])
def test_resume_with_shuffling_workers_is_exact(tmp_path, persistent, loader_mp):
    """torch's RandomSampler with workers: a persistent iterator is reset at each epoch (no seed draw)
    where the resumed process builds a new one (a draw); the loop makes both draw alike."""
    def make():
        return DataLoader(Items(), batch_size=4, shuffle=True, collate_fn=_collate, num_workers=2,
                          persistent_workers=persistent, multiprocessing_context=loader_mp)

    _reseed(0)
    ref, _ = _run(tmp_path / "ref", make, 15)
    for stop in (8, 12):  # in epoch 1, and at the start of epoch 2
        _reseed(0)
        first, _ = _run(tmp_path / f"cut{stop}", make, 15, events=[f"quit@{stop}"])
        _reseed(7)
        resumed, _ = _run(tmp_path / f"cut{stop}", make, 15)
        assert resumed.seen == ref.seen, stop


def test_resume_with_the_loaders_own_generator_is_exact(tmp_path):
    def make():
        g = torch.Generator()
        g.manual_seed(11)
        return DataLoader(Items(), batch_size=4, shuffle=True, collate_fn=_collate, generator=g)

    _reseed(0)
    ref, _ = _run(tmp_path / "ref", make, 15)
    _reseed(0)
    _run(tmp_path / "cut", make, 15, events=["quit@9"])
    _reseed(5)
    resumed, _ = _run(tmp_path / "cut", make, 15)
    assert resumed.seen == ref.seen


def test_resume_at_the_last_step_restores_the_rngs(tmp_path):
    """A job requeued after training ended (the checkpoint of step == iterations): what the script
    draws after train() is what an uninterrupted run draws."""
    make = _loaders()["sampler="]
    _reseed(0)
    _run(tmp_path / "ref", make, 10, save_at_end=False)
    after_ref = [random.random(), float(np.random.rand()), float(torch.rand(()))]
    _reseed(0)
    _run(tmp_path / "cut", make, 10)
    _reseed(42)
    again, result = _run(tmp_path / "cut", make, 10)
    assert result.resumed_from is not None and result.step == 10 and again.global_step == 10
    assert [random.random(), float(np.random.rand()), float(torch.rand(()))] == after_ref


# ---------------------------------------------------------------- positions the epoch does not have


def _damage(folder, **loop):
    path = os.path.join(folder, "rank-00000-of-00001.pt")
    state = load_rank0(folder)
    state["loop"].update(loop)
    torch_save(state, path)
    return path


@pytest.mark.parametrize("kind", ["shuffle=True", "sampler=", "user batch sampler"])
def test_a_position_past_the_epoch_goes_on_from_the_next_epoch(tmp_path, kind, caplog):
    """batches_in_epoch beyond the epoch (a damaged checkpoint, a dataset that shrank): never a skip for
    ever, a warning and the next epoch."""
    make = _loaders()[kind]
    _run(tmp_path, make, 3)
    path = _damage(os.path.join(tmp_path, "step-00000003"), batches_in_epoch=10 ** 9)
    if kind == "sampler=":
        state = load_rank0(os.path.join(tmp_path, "step-00000003"))
        state["sampler"]["draws"] = 4 * 10 ** 9
        torch_save(state, path)
    with caplog.at_level(logging.WARNING, logger="mlutils.train"):
        engine, result = _run(tmp_path, make, 9)
    assert result.step == 9
    assert any("does not reach" in r.getMessage() and path in r.getMessage() for r in caplog.records)


def test_a_position_past_the_end_of_a_loader_without_len(tmp_path, caplog):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(10))

    def make():
        return DataLoader(Stream(), batch_size=4, collate_fn=_collate)

    _run(tmp_path, make, 2)
    _damage(os.path.join(tmp_path, "step-00000002"), batches_in_epoch=10 ** 12)
    with caplog.at_level(logging.WARNING, logger="mlutils.train"):
        engine, result = _run(tmp_path, make, 6)
    assert result.step == 6
    assert engine.seen[2][0] == [0, 1, 2, 3]  # the next epoch, from its start
    assert any("does not reach" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("field, value", [
    ("batches_in_epoch", -1), ("epoch", -5), ("epoch", 1 << 63), ("events", [[-1, "save"]]),
    ("events", [[1 << 64, "save"]]), ("eval_pending", "yes"), ("epoch_rng", {"python": 1}),
])
def test_a_damaged_loop_field_is_a_checkpoint_error(tmp_path, field, value):
    make = _loaders()["shuffle=True"]
    _run(tmp_path, make, 2)
    path = _damage(os.path.join(tmp_path, "step-00000002"), **{field: value})
    engine = DrawEngine()
    with pytest.raises(mt.CheckpointError, match=f"{path}.*loop.{field}"):
        mt.train(make(), engine, config=cfg(tmp_path, iterations=5))
    assert engine.seen == [] and engine.global_step == 0  # nothing was loaded


def _rng_damages():
    def py_short(r):
        r["python"] = (r["python"][0], tuple(r["python"][1])[:10], r["python"][2])

    def py_missing(r):
        del r["python"]

    def np_wrong_kind(r):
        r["numpy"] = ("PCG64",) + tuple(r["numpy"])[1:]

    def np_short(r):
        r["numpy"] = (r["numpy"][0], np.asarray(r["numpy"][1])[:5]) + tuple(r["numpy"])[2:]

    def torch_short(r):
        r["torch"] = r["torch"][:100]

    def torch_float(r):
        r["torch"] = r["torch"].float()

    def cuda_junk(r):
        r["cuda"] = ["x"]

    def not_a_dict(r):
        r.clear()

    return [py_short, py_missing, np_wrong_kind, np_short, torch_short, torch_float, cuda_junk, not_a_dict]


@pytest.mark.parametrize("damage", _rng_damages(), ids=lambda f: f.__name__)
def test_a_damaged_rng_entry_is_a_checkpoint_error_naming_the_file(tmp_path, damage):
    make = _loaders()["sampler="]
    _run(tmp_path, make, 2)
    folder = os.path.join(tmp_path, "step-00000002")
    path = os.path.join(folder, "rank-00000-of-00001.pt")
    state = load_rank0(folder)
    damage(state["rng"])
    torch_save(state, path)
    engine = DrawEngine()
    _reseed(3)
    before = random.getstate(), torch.get_rng_state()
    with pytest.raises(mt.CheckpointError, match=f"{path}.* rng "):
        mt.train(make(), engine, config=cfg(tmp_path, iterations=5))
    assert engine.global_step == 0
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])


def test_a_sampler_state_that_does_not_fit_is_a_checkpoint_error(tmp_path):
    _run(tmp_path, lambda: DataLoader(Items(), batch_size=4, sampler=RandomSampler(N, seed=3),
                                      collate_fn=_collate), 2)
    engine = DrawEngine()
    other = DataLoader(Items(), batch_size=4, sampler=RandomSampler(N + 5, seed=3), collate_fn=_collate)
    with pytest.raises(mt.CheckpointError, match="sampler state does not fit"):
        mt.train(other, engine, config=cfg(tmp_path, iterations=5))
    assert engine.global_step == 0
