"""mlutils.train under hostile input: stdin floods, odd commands, odd metrics, odd config, rollbacks."""
import logging
import os
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if os.environ.get("MLUTILS_NO_TORCH") == "1":
    pytest.skip("the training loop trains torch models", allow_module_level=True)

import mlutils.train as mt  # noqa: E402
from mlutils.io import json_parse  # noqa: E402


class CountEngine:
    """A minimal Engine: state is a tensor, the step and the batches seen."""

    def __init__(self):
        self.seen, self.lr, self._step = [], 1.0, 0
        self.w = torch.zeros(3)

    @property
    def global_step(self):
        return self._step

    def train_step(self, batch):
        self.seen.append(int(batch))
        self.w += batch
        self._step += 1
        return {"loss": 1.0 / self._step, "lr": self.lr}

    def state_dict(self):
        return {"w": self.w, "step": self._step, "seen": list(self.seen)}

    def load_state_dict(self, s):
        self.w, self._step, self.seen = s["w"].clone(), int(s["step"]), list(s["seen"])

    def export(self):
        return {"w": self.w.clone()}

    def set_lr(self, lr):
        self.lr = lr

    def quit(self):
        pass


def cfg(tmp_path, **kw):
    kw.setdefault("checkpoint_dir", str(tmp_path))
    kw.setdefault("read_commands", False)
    return mt.TrainConfig(progress=False, metrics_stdout=False, **kw)


def load_rank0(folder):
    return torch.load(os.path.join(folder, "rank-00000-of-00001.pt"), weights_only=True)


@pytest.fixture
def stdin_from(monkeypatch):
    """Point sys.stdin at a file or at a pipe's read end holding `data` (closed at the end)."""
    opened = []

    def use(data=None, path=None):
        if path is None:
            r, w = os.pipe()
            os.write(w, data)
            os.close(w)
            f = os.fdopen(r, "rb")
        else:
            f = open(path, "rb")
        opened.append(f)
        monkeypatch.setattr("sys.stdin", f)
        return f

    yield use
    for f in opened:
        f.close()


# ---------------------------------------------------------------- stdin


def test_stdin_flood_is_read_in_bounded_slices(tmp_path, stdin_from, caplog):
    """A stdin that always has data (a file, /dev/zero, `yes save |`) must not
    keep one poll reading for ever, and a line without an end must not grow
    without bound: each poll reads a bounded slice; an overlong line is dropped."""
    path = tmp_path / "flood"
    junk = b"\0" * (4 << 20)
    lines = b"eval\n" * 200_000
    path.write_bytes(junk + b"\nquit\n" + lines)
    f = stdin_from(path=path)
    reader = mt._StdinReader()
    with caplog.at_level(logging.WARNING, logger="mlutils.train"):
        first = reader.poll()
        assert first == []
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) <= 1 << 20  # not the whole 4 MiB of junk in one go
        assert len(reader._buf) <= 1 << 20
        got = list(first)
        for _ in range(200):
            got = reader.poll()
            if got:
                break
        assert got[0] == "quit" and set(got[1:]) <= {"eval"}
        assert len(got) <= 1024  # a bounded batch of commands per step, the rest on the next polls
    assert any("too long" in r.getMessage() for r in caplog.records)


def test_stdin_dev_zero_keeps_training(tmp_path, stdin_from):
    stdin_from(path="/dev/zero")
    e = CountEngine()
    res = mt.train(range(100), e, config=cfg(tmp_path, iterations=5, read_commands=True))
    assert res.status == "completed" and res.step == 5


def test_odd_time_commands_are_refused_not_fatal(tmp_path, stdin_from, caplog):
    """'time to ²' passed str.isdigit() but not int(); a target a clock cannot show overflowed localtime()."""
    stdin_from(b"time to \xc2\xb2\ntime to 99999999999999999999999999\ntime to -5\ntime to 3\nquit\n")
    with caplog.at_level(logging.INFO, logger="mlutils.train"):
        res = mt.train(range(100), CountEngine(), config=cfg(tmp_path, iterations=50, read_commands=True))
    assert res.status == "quit" and res.step == 1
    msgs = [r.getMessage() for r in caplog.records]
    assert any("unknown command 'time to \u00b2'" in m for m in msgs)
    assert any("unknown command 'time to -5'" in m for m in msgs)
    assert sum("time:" in m for m in msgs) == 2


def test_save_command_without_checkpoint_dir_says_so(stdin_from, caplog):
    stdin_from(b"save\nquit\n")
    with caplog.at_level(logging.WARNING, logger="mlutils.train"):
        res = mt.train(range(100), CountEngine(), config=cfg(None, checkpoint_dir=None, iterations=50,
                                                             read_commands=True))
    assert res.status == "quit" and res.checkpoint is None
    assert any("save: no checkpoint_dir" in r.getMessage() for r in caplog.records)
