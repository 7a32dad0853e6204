"""mlutils.train under hostile input: stdin floods, odd commands, odd metrics, odd config, rollbacks."""
import logging
import os
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if os.environ.get("MLUTILS_NO_TORCH") == "1":
    pytest.skip("the training loop trains torch models", allow_module_level=True)

import mlutils.train as mt  # noqa: E402
from mlutils.io import json_parse  # noqa: E402
from mlutils.train import checkpoint as ck  # noqa: E402
from mlutils.train.commands import StdinReader  # noqa: E402
from _train_helpers import CountEngine, cfg, load_rank0  # noqa: E402


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
    reader = StdinReader()
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
    """'time to ²' passed str.isdigit() but not int(); a target a clock cannot show overflowed localtime();
    a target past what a checkpoint can hold is refused."""
    last = (1 << 63) - 1
    stdin_from(f"time to \u00b2\ntime to 99999999999999999999999999\ntime to -5\ntime to 3\ntime to {last}\n"
               f"quit\n".encode())
    with caplog.at_level(logging.INFO, logger="mlutils.train"):
        res = mt.train(range(100), CountEngine(), config=cfg(tmp_path, iterations=last, read_commands=True))
    assert res.status == "quit" and res.step == 1
    msgs = [r.getMessage() for r in caplog.records]
    assert any("bad step in 'time to \u00b2': '\u00b2' is not a whole number" in m for m in msgs)
    assert any("bad step in 'time to -5': '-5' is not a whole number" in m for m in msgs)
    assert any("bad step in 'time to 99999999999999999999999999': past the last step" in m for m in msgs)
    times = [m for m in msgs if m.startswith("time:")]
    assert len(times) == 2 and times[1].endswith("(beyond the calendar)")


def test_save_command_without_checkpoint_dir_says_so(stdin_from, caplog):
    stdin_from(b"save\nquit\n")
    with caplog.at_level(logging.WARNING, logger="mlutils.train"):
        res = mt.train(range(100), CountEngine(), config=cfg(None, checkpoint_dir=None, iterations=50,
                                                             read_commands=True))
    assert res.status == "quit" and res.checkpoint is None
    assert any("save: no checkpoint_dir" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- metrics


class OddMetrics(CountEngine):
    def train_step(self, batch):
        super().train_step(batch)
        return {"loss": torch.tensor(0.5), "hist": torch.tensor([1.0, 2.0]), "n": np.int64(3),
                "big": 10 ** 30, "nan": float("nan"), "step": 1000 + self._step, "epoch": "mine", "eval": 7}


def test_odd_metrics_are_logged_and_do_not_take_the_loop_keys(tmp_path):
    """A tensor or an int past 64 bits in the metrics stopped training (TypeError/OverflowError from the JSON
    writer); an engine's own 'step' / 'epoch' / 'eval' overwrote the loop's and broke the resumed log."""
    log_file = tmp_path / "m.jsonl"
    res = mt.train(range(100), OddMetrics(), config=cfg(tmp_path, iterations=4, metrics_file=str(log_file),
                                                         progress=True))
    assert res.status == "completed"
    recs = [json_parse(x) for x in log_file.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and {r["epoch"] for r in recs} == {0}
    r = recs[-1]
    assert r["loss"] == 0.5 and r["hist"] == [1.0, 2.0] and r["n"] == 3 and r["big"] == float(10 ** 30)
    assert r["nan"] != r["nan"] and "eval" not in r
    assert r["model/step"] == 1004 and r["model/epoch"] == "mine" and r["model/eval"] == 7
    assert res.last_metrics["model/step"] == 1004 and "step" not in res.last_metrics
    # the resumed run keeps the log as one run
    res2 = mt.train(range(100), OddMetrics(), config=cfg(tmp_path, iterations=6, metrics_file=str(log_file)))
    assert res2.resumed_from is not None
    assert [json_parse(x)["step"] for x in log_file.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("field,value,exc", [
    ("checkpoint_dir", 3, TypeError), ("checkpoint_dir", b"ck", TypeError), ("export_dir", 1.5, TypeError),
    ("metrics_file", 7, TypeError), ("events", "quit@5", TypeError), ("events", [5], TypeError),
    ("async_save", "no", TypeError), ("progress", None, TypeError), ("resume", 1, TypeError),
    ("resume", 0, TypeError), ("iterations", 2.0, ValueError), ("save_frequency", True, ValueError),
])
def test_config_of_the_wrong_type_names_the_field(field, value, exc):
    """checkpoint_dir=3 went through os.listdir(3) (a file descriptor) and failed only at the final save."""
    with pytest.raises(exc, match=f"TrainConfig.{field}"):
        mt.TrainConfig(**{field: value})


def test_path_like_config_works(tmp_path):
    res = mt.train(range(100), CountEngine(), config=cfg(tmp_path, checkpoint_dir=tmp_path / "ck", iterations=3,
                                                         metrics_file=tmp_path / "m.jsonl"))
    assert res.checkpoint == str(tmp_path / "ck" / "step-00000003")


def test_relative_checkpoint_dir_is_fixed_at_start(tmp_path, monkeypatch):
    """A relative checkpoint_dir followed the process's working folder: a chdir during training (in a
    step, in eval_fn) scattered checkpoints over two folders and resume="auto" missed them."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")

    class Wanderer(CountEngine):
        def train_step(self, batch):
            if self._step == 3:
                os.chdir(tmp_path / "b")
            return super().train_step(batch)

    res = mt.train(range(100), Wanderer(), config=cfg(tmp_path, checkpoint_dir="ck", export_dir="ex",
                                                      iterations=6, save_frequency=2, keep_last=0,
                                                      events=["export@5"]))
    assert not os.listdir(tmp_path / "b")
    assert [s for s, _ in mt.find_checkpoints(str(tmp_path / "a" / "ck"))] == [2, 4, 5, 6]  # export saves too
    assert os.listdir(tmp_path / "a" / "ex") == ["export-00000005.safetensors"]
    assert res.checkpoint == str(tmp_path / "a" / "ck" / "step-00000006")


# ---------------------------------------------------------------- checkpoints


def test_async_checkpoint_equals_sync_checkpoint(tmp_path):
    """The asynchronous snapshot turned the OrderedDicts of model.state_dict() into plain dicts and lost their
    _metadata (the module versions load_state_dict reads): async and sync checkpoints differed."""
    def run(sub, use_async):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        e = mt.TorchEngine(model, opt, lambda m, b: m(b).pow(2).mean())
        data = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(5)]
        mt.train(data, e, config=cfg(tmp_path / sub, iterations=4, save_frequency=2, async_save=use_async,
                                     save_at_end=False))
        return load_rank0(tmp_path / sub / "step-00000002")["engines"]["model"]["model"]

    a, s = run("async", True), run("sync", False)
    assert type(a) is type(s) and a._metadata == s._metadata and a._metadata
    assert a.keys() == s.keys() and all(torch.equal(a[k], s[k]) for k in a)


def test_resuming_an_older_checkpoint_keeps_what_it_saves(tmp_path):
    """Resuming from an older checkpoint (a rollback) while newer ones exist: rotation counted the newer
    ones and deleted the checkpoint just written, and the result named a folder that was gone."""
    first = CountEngine()
    mt.train(range(100), first, config=cfg(tmp_path, iterations=20, save_frequency=5, keep_last=2))
    assert [s for s, _ in mt.find_checkpoints(str(tmp_path))] == [15, 20]
    e = CountEngine()
    res = mt.train(range(100), e, config=cfg(tmp_path, iterations=18, save_frequency=1, keep_last=1,
                                             resume=str(tmp_path / "step-00000015")))
    assert res.resumed_from == str(tmp_path / "step-00000015") and res.step == 18
    assert os.path.isdir(res.checkpoint) and load_rank0(res.checkpoint)["step"] == 18
    assert [s for s, _ in mt.find_checkpoints(str(tmp_path))] == [18, 20]  # the later run's 20 left alone


def test_metrics_log_rewrite_on_resume_is_atomic(tmp_path):
    """On resume the log was cut back with open(path, 'w') then a write: a failure in between (disk full,
    a file size limit, a kill) left it empty or half written.  Now the old log stays whole."""
    import resource
    import signal

    log_file = tmp_path / "m.jsonl"
    mt.train(range(100), CountEngine(), config=cfg(tmp_path, iterations=40, save_frequency=20, save_at_end=False,
                                                   metrics_file=str(log_file)))
    before = log_file.read_bytes()
    assert len(before.splitlines()) == 40 and len(before) > 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300, hard))
    try:
        with pytest.raises(OSError):
            mt.train(range(100), CountEngine(), config=cfg(tmp_path, iterations=50, metrics_file=str(log_file)))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert log_file.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.jsonl", "step-00000020"]  # no temporary file left
    # a torn last line (cut inside a character) is dropped, not a UnicodeDecodeError
    with open(log_file, "ab") as f:
        f.write(b'{"step": 41, "x": "\xc3')
    res = mt.train(range(100), CountEngine(), config=cfg(tmp_path, iterations=22, metrics_file=str(log_file)))
    assert res.resumed_from == str(tmp_path / "step-00000020")
    assert [json_parse(x)["step"] for x in log_file.read_text().splitlines()] == list(range(1, 23))


def _damage(folder, how):
    rank = folder / "rank-00000-of-00001.pt"
    if how == "truncated":
        data = rank.read_bytes()
        rank.write_bytes(data[:len(data) // 2])
    elif how == "empty":
        rank.write_bytes(b"")
    elif how == "not a checkpoint":
        torch.save({"a": 1}, rank)
    elif how == "fields missing":
        torch.save({"format": mt.CHECKPOINT_FORMAT, "engines": {"model": {}}}, rank)
    elif how == "bad events":
        state = torch.load(rank, weights_only=True)
        state["loop"]["events"] = [["soon", "quit"]]
        torch.save(state, rank)


@pytest.mark.parametrize("how,match", [("truncated", "cannot read the checkpoint file"),
                                       ("empty", "cannot read the checkpoint file"),
                                       ("not a checkpoint", "is not a mlutils.train/1 checkpoint"),
                                       ("fields missing", "damaged .*step, rng, loop"),
                                       ("bad events", "damaged .*: loop.events missing or of the wrong type")])
def test_damaged_newest_checkpoint_is_a_checkpoint_error(tmp_path, how, match):
    """A damaged rank file raised the reader's TorchFormatError or a bare KeyError('step'); now a
    CheckpointError names the file and the way out, and the engine is left as it was."""
    mt.train(range(100), CountEngine(), config=cfg(tmp_path, iterations=4, save_frequency=2, keep_last=0))
    _damage(tmp_path / "step-00000004", how)
    e = CountEngine()
    with pytest.raises(mt.CheckpointError, match=match) as info:
        mt.train(range(100), e, config=cfg(tmp_path, iterations=6))
    assert "step-00000004" in str(info.value) and e.global_step == 0 and e.seen == []
    res = mt.train(range(100), e, config=cfg(tmp_path, iterations=6, resume=str(tmp_path / "step-00000002")))
    assert res.status == "completed" and e.seen == [0, 1, 2, 3, 4, 5]


def test_folder_named_like_a_rank_file_is_not_a_checkpoint(tmp_path):
    mt.train(range(100), CountEngine(), config=cfg(tmp_path, iterations=4, save_frequency=2, keep_last=0))
    (tmp_path / "step-00000010" / "rank-00000-of-00001.pt").mkdir(parents=True)
    (tmp_path / "step-xxx").write_text("junk")
    (tmp_path / "step-00000011").write_text("junk")
    assert mt.latest_checkpoint(str(tmp_path)) == str(tmp_path / "step-00000004")
    res = mt.train(range(100), CountEngine(), config=cfg(tmp_path, iterations=6))
    assert res.resumed_from == str(tmp_path / "step-00000004") and res.step == 6


# ---------------------------------------------------------------- events from the config


def test_config_events_at_the_start_step(tmp_path):
    """'quit@0' in TrainConfig.events ran 'quit' and dropped its result: the run trained to the end.  On a
    resume at step S, '<command>@S' had already run before the checkpoint of step S was written and ran again."""
    evals = []
    res = mt.train(range(100), CountEngine(), eval_fn=lambda step, stop: evals.append(step),
                   config=cfg(tmp_path, iterations=10, events=["quit@0"]))
    assert res.status == "quit" and res.step == 0
    events = ["eval@4", "quit@4", "lr 0.5@4"]
    e = CountEngine()
    res = mt.train(range(100), e, eval_fn=lambda step, stop: evals.append(step),
                   config=cfg(tmp_path, iterations=10, events=events, resume=False))
    assert res.status == "quit" and res.step == 4 and evals == [4] and e.lr == 0.5
    e2 = CountEngine()
    res2 = mt.train(range(100), e2, eval_fn=lambda step, stop: evals.append(step),
                    config=cfg(tmp_path, iterations=10, events=events))
    assert res2.resumed_from == str(tmp_path / "step-00000004")
    assert res2.status == "completed" and res2.step == 10 and evals == [4]


# ---------------------------------------------------------------- failures


class Boom(Exception):
    pass


def test_engine_error_wins_over_a_failed_background_write(tmp_path, monkeypatch):
    """When a step raised while the background write also failed, the cleanup raised the CheckpointError
    instead: the engine's error (the cause of the stop) was only its __context__."""
    gate = threading.Event()

    def failing(obj, path):
        gate.wait(10)
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(ck, "torch_save", failing)
    before = {s: __import__("signal").getsignal(s) for s in (2, 15)}

    class Breaks(CountEngine):
        def train_step(self, batch):
            if self._step == 3:
                gate.set()
                raise Boom("the step failed")
            return super().train_step(batch)

    with pytest.raises(Boom, match="the step failed"):
        mt.train(range(100), Breaks(), config=cfg(tmp_path, iterations=50, save_frequency=2))
    assert {s: __import__("signal").getsignal(s) for s in (2, 15)} == before


def test_engine_error_keeps_the_pending_checkpoint_whole(tmp_path, monkeypatch):
    real = ck.torch_save

    def slow(obj, path):
        time.sleep(0.3)
        real(obj, path)

    monkeypatch.setattr(ck, "torch_save", slow)

    class Breaks(CountEngine):
        def train_step(self, batch):
            if self._step == 3:
                raise Boom("the step failed")
            return super().train_step(batch)

    with pytest.raises(Boom):
        mt.train(range(100), Breaks(), config=cfg(tmp_path, iterations=50, save_frequency=2))
    assert [s for s, _ in mt.find_checkpoints(str(tmp_path))] == [2]
    assert load_rank0(tmp_path / "step-00000002")["engines"]["model"]["seen"] == [0, 1]


def test_checkpoint_dir_that_is_a_file_fails_before_training(tmp_path):
    """With resume=False the run trained every step and failed only at the final save."""
    target = tmp_path / "ck"
    target.write_text("not a folder")
    e = CountEngine()
    with pytest.raises(mt.CheckpointError, match="checkpoint_dir") as info:
        mt.train(range(100), e, config=cfg(tmp_path, checkpoint_dir=str(target), iterations=20, resume=False))
    assert isinstance(info.value.__cause__, OSError) and str(target) in str(info.value)
    assert e.global_step == 0
    e2 = CountEngine()
    with pytest.raises(mt.CheckpointError, match="checkpoint_dir"):
        mt.train(range(100), e2, config=cfg(tmp_path, checkpoint_dir=str(target / "sub"), iterations=20))
    assert e2.global_step == 0
    with pytest.raises(mt.CheckpointError, match="TrainConfig.export_dir"):  # an export failed mid-run
        mt.train(range(100), e2, config=cfg(tmp_path, checkpoint_dir=str(tmp_path / "ck2"), export_dir=str(target),
                                            iterations=20, events=["export@10"]))
    assert e2.global_step == 0


def _same(a, b, where="state"):
    if where.endswith("['loop']['elapsed']"):  # wall-clock seconds: the one field two runs never share
        assert isinstance(a, float) and isinstance(b, float), where
        return
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where


def test_async_checkpoint_is_the_state_at_save_time_bit_for_bit(tmp_path, monkeypatch):
    """A slow background write while later steps change the model and AdamW's moments in place: the
    checkpoint must equal, bit for bit and key for key, what a synchronous save of the same step writes."""
    real = ck.torch_save

    def slow(obj, path):
        time.sleep(0.15)
        real(obj, path)

    monkeypatch.setattr(ck, "torch_save", slow)

    def run(sub, use_async):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, 2)
        e = mt.TorchEngine(model, opt, lambda m, b: m(b).pow(2).mean(), sched, clip_grad_norm=1.0)
        data = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(7)]
        mt.train(data, e, config=cfg(tmp_path / sub, iterations=9, save_frequency=3, keep_last=0,
                                     async_save=use_async))
        return {s: load_rank0(p) for s, p in mt.find_checkpoints(str(tmp_path / sub))}

    a, s = run("async", True), run("sync", False)
    assert list(a) == list(s) == [3, 6, 9]
    for step in a:
        _same(a[step], s[step], f"step {step}")
        assert a[step]["engines"]["model"]["model"]._metadata == s[step]["engines"]["model"]["model"]._metadata


# ---------------------------------------------------------------- signals


def test_second_sigint_interrupts_and_everything_is_restored(tmp_path, monkeypatch):
    import signal

    real = ck.torch_save

    def slow(obj, path):
        time.sleep(0.2)
        real(obj, path)

    monkeypatch.setattr(ck, "torch_save", slow)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}

    class TwoInterrupts(CountEngine):
        def train_step(self, batch):
            if self._step == 3:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return super().train_step(batch)

    with pytest.raises(KeyboardInterrupt):
        mt.train(range(100), TwoInterrupts(), config=cfg(tmp_path, iterations=50, save_frequency=2))
    assert {s: signal.getsignal(s) for s in before} == before
    assert [s for s, _ in mt.find_checkpoints(str(tmp_path))] == [2]  # the write in flight finished
    assert load_rank0(tmp_path / "step-00000002")["step"] == 2


def test_sigterm_while_a_background_write_runs(tmp_path, monkeypatch):
    import signal

    real = ck.torch_save

    def slow(obj, path):
        time.sleep(0.2)
        real(obj, path)

    monkeypatch.setattr(ck, "torch_save", slow)

    class Term(CountEngine):
        def train_step(self, batch):
            if self._step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().train_step(batch)

    res = mt.train(range(100), Term(), config=cfg(tmp_path, iterations=50, save_frequency=2))
    assert res.status == "signal" and res.signal == "SIGTERM" and res.step == 3
    assert [s for s, _ in mt.find_checkpoints(str(tmp_path))] == [2, 3]
    e = CountEngine()
    res2 = mt.train(range(100), e, config=cfg(tmp_path, iterations=5))
    assert res2.resumed_from == str(tmp_path / "step-00000003") and e.seen == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- engines


class Quiet(CountEngine):
    def train_step(self, batch):
        super().train_step(batch)
        return None


class Scalar(CountEngine):
    def train_step(self, batch):
        super().train_step(batch)
        return 0.5


@pytest.mark.parametrize("several", [False, True])
def test_engine_metrics_none_or_not_a_mapping(tmp_path, several):
    """An engine returning None (no metrics) stopped training with "'NoneType' object is not iterable"
    (or "has no attribute 'items'" with several engines); a number gave an error that named no engine."""
    def engines(cls):
        return {"a": cls(), "b": CountEngine()} if several else {"a": cls()}

    res = mt.train(range(100), engines(Quiet), config=cfg(tmp_path, iterations=3, resume=False))
    assert res.status == "completed" and res.step == 3
    assert res.last_metrics == ({"b/loss": 1 / 3, "b/lr": 1.0} if several else {})
    with pytest.raises(TypeError, match=r"engine 'a' \(Scalar\)\.train_step returned float"):
        mt.train(range(100), engines(Scalar), config=cfg(tmp_path, iterations=3, resume=False))


def test_eval_fn_results(tmp_path):
    """eval_fn returning a number gave "'float' object is not iterable"; tensors in its metrics stopped
    training at the JSON line; an error inside eval_fn is raised as it is."""
    log_file = tmp_path / "m.jsonl"
    res = mt.train(range(100), CountEngine(), eval_fn=lambda step, stop: {"acc": torch.tensor(0.25)},
                   config=cfg(tmp_path, iterations=2, eval_frequency=2, metrics_file=str(log_file), resume=False))
    assert res.eval_metrics == {"acc": torch.tensor(0.25)}
    assert json_parse(log_file.read_text().splitlines()[-1]) == {"step": 2, "eval": {"acc": 0.25}}
    with pytest.raises(TypeError, match="eval_fn returned float 0.5; it must return a mapping"):
        mt.train(range(100), CountEngine(), eval_fn=lambda step, stop: 0.5,
                 config=cfg(tmp_path, iterations=2, eval_frequency=2, resume=False))

    def broken(step, stop):
        raise Boom("eval failed")

    with pytest.raises(Boom, match="eval failed"):
        mt.train(range(100), CountEngine(), eval_fn=broken,
                 config=cfg(tmp_path, iterations=4, eval_frequency=2, resume=False))


# ---------------------------------------------------------------- stdout


@pytest.mark.parametrize("how", ["broken pipe", "none", "closed"])
@pytest.mark.parametrize("progress", [False, True])
def test_metrics_on_a_dead_stdout_do_not_stop_training(tmp_path, monkeypatch, caplog, how, progress):
    """`train.py | head -3`: once the reader left, the next metrics line raised BrokenPipeError and training
    stopped; with stdout closed at start (sys.stdout is None) it stopped at the first step."""
    if how == "broken pipe":
        r, w = os.pipe()
        os.close(r)
        out = os.fdopen(w, "w")
    elif how == "closed":
        out = open(tmp_path / "o.txt", "w")
        out.close()
    else:
        out = None
    monkeypatch.setattr("sys.stdout", out)
    log_file = tmp_path / "m.jsonl"
    with caplog.at_level(logging.WARNING, logger="mlutils.train"):
        res = mt.train(range(100), CountEngine(), config=mt.TrainConfig(
            iterations=5, checkpoint_dir=str(tmp_path / "ck"), metrics_file=str(log_file), read_commands=False,
            progress=progress))
    assert res.status == "completed" and res.step == 5
    assert len(log_file.read_text().splitlines()) == 5
    assert sum("metrics on stdout stopped" in r.getMessage() for r in caplog.records) == 1
    if how == "broken pipe":  # let what its buffer holds go somewhere when it is closed
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, out.fileno())
        os.close(null)
        out.close()


def test_checkpoint_of_another_model_names_the_checkpoint(tmp_path):
    """A checkpoint whose weights do not fit the model raised torch's bare size-mismatch RuntimeError, which
    did not say which checkpoint (resume="auto" chose it)."""
    def engine(width):
        m = torch.nn.Linear(4, width)
        return mt.TorchEngine(m, torch.optim.SGD(m.parameters(), lr=0.1), lambda mod, b: mod(b).pow(2).mean())

    data = [torch.randn(2, 4) for _ in range(3)]
    mt.train(data, engine(3), config=cfg(tmp_path, iterations=2))
    with pytest.raises(mt.CheckpointError, match=r"(?s)step-00000002.*does not fit the engines.*size mismatch") as info:
        mt.train(data, engine(5), config=cfg(tmp_path, iterations=4))
    assert isinstance(info.value.__cause__, RuntimeError)


# ---------------------------------------------------------------- evaluation and exact resume


def _rng_run(tmp_path, sub, iterations, eval_fn, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    e = mt.TorchEngine(model, opt, lambda m, b: m(b).pow(2).mean())
    data = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    return mt.train(data, e, eval_fn=eval_fn, config=cfg(tmp_path / sub, iterations=iterations, eval_frequency=3,
                                                          save_frequency=3, keep_last=0, **kw))


def _drawing_eval(calls, stop_at=None, crash_at=None):
    """An evaluation that draws from torch's RNG (as a shuffled or augmented eval loader does)."""
    def eval_fn(step, should_stop):
        calls.append(step)
        total = 0.0
        for i in range(4):
            if i == 2 and step == stop_at and calls.count(step) == 1:
                os.kill(os.getpid(), __import__("signal").SIGTERM)
            if i == 2 and step == crash_at and calls.count(step) == 1:
                raise Boom("killed during the evaluation")
            if should_stop():
                break
            total += float(torch.rand(()))
        return {"total": total, "parts": i + 1}
    return eval_fn


def test_signal_during_eval_resumes_bit_exact_and_evaluates_again(tmp_path):
    """The periodic save ran before the evaluation of the same step, and a signal during that evaluation
    saved nothing more: the resumed run restored the RNGs from before the evaluation, skipped it, and drew
    different dropout masks than an uninterrupted run; the cut-short evaluation was logged as the real one."""
    ref_calls, calls = [], []
    _rng_run(tmp_path, "ref", 9, _drawing_eval(ref_calls))
    log_file = tmp_path / "m.jsonl"
    res = _rng_run(tmp_path, "run", 9, _drawing_eval(calls, stop_at=6), metrics_file=str(log_file))
    assert res.status == "signal" and res.step == 6
    res2 = _rng_run(tmp_path, "run", 9, _drawing_eval(calls, stop_at=6), metrics_file=str(log_file))
    assert res2.status == "completed" and ref_calls == [3, 6, 9] and calls == [3, 6, 6, 9]
    evals = [json_parse(x) for x in log_file.read_text().splitlines() if '"eval"' in x]
    assert [(r["step"], r.get("interrupted", False), r["eval"]["parts"]) for r in evals] == \
        [(3, False, 4), (6, True, 3), (6, False, 4), (9, False, 4)]
    ref = dict(mt.find_checkpoints(str(tmp_path / "ref")))
    run = dict(mt.find_checkpoints(str(tmp_path / "run")))
    _same(load_rank0(ref[9])["engines"], load_rank0(run[9])["engines"])
    _same(load_rank0(ref[9])["rng"], load_rank0(run[9])["rng"])


def test_crash_during_eval_resumes_bit_exact(tmp_path):
    """A crash (or SIGKILL) during the evaluation of a step that also saved left that step's checkpoint with
    the RNGs from before the evaluation: the resumed run skipped the evaluation and diverged."""
    ref_calls, calls = [], []
    _rng_run(tmp_path, "ref", 9, _drawing_eval(ref_calls))
    with pytest.raises(Boom):
        _rng_run(tmp_path, "run", 9, _drawing_eval(calls, crash_at=6))
    res = _rng_run(tmp_path, "run", 9, _drawing_eval(calls, crash_at=6))
    assert res.resumed_from == str(tmp_path / "run" / "step-00000003") and calls == [3, 6, 6, 9]
    ref = dict(mt.find_checkpoints(str(tmp_path / "ref")))
    run = dict(mt.find_checkpoints(str(tmp_path / "run")))
    _same(load_rank0(ref[9])["engines"], load_rank0(run[9])["engines"])


_BACKGROUND_CHILD = r"""
import fcntl, os, sys, termios
os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty is this session's terminal; this process's group is its foreground
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)  # like `python train.py &`: a group of its own, in the background
    import mlutils.train as mt
    sys.path.insert(0, sys.argv[1])
    from _train_helpers import CountEngine
    res = mt.train(range(100), CountEngine(), config=mt.TrainConfig(
        iterations=30, checkpoint_dir=None, read_commands=True, progress=False, metrics_stdout=False))
    print("RESULT", res.status, res.step, flush=True)
    os._exit(0)
_, status = os.waitpid(pid, os.WUNTRACED)
if os.WIFSTOPPED(status):
    print("STOPPED by", os.WSTOPSIG(status), flush=True)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
"""


def test_background_job_does_not_read_its_terminal(tmp_path):
    """`python train.py &` then typing in the shell: the loop read the terminal from a background process
    group, the kernel sent SIGTTIN and the training process stopped ('[1]+ Stopped')."""
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    try:
        os.write(master, b"time\n")  # typed at the shell, waiting in the terminal's input queue
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH"))
                                                          if p))
        out = subprocess.run([sys.executable, "-c", _BACKGROUND_CHILD, os.path.dirname(__file__)], stdin=slave,
                             capture_output=True, text=True, timeout=60, env=env)
    finally:
        os.close(slave)
        os.close(master)
    assert "RESULT completed 30" in out.stdout, out.stdout + out.stderr


def test_accumulation_on_a_batch_smaller_than_its_parts():
    """accumulate=4 and the last batch of an epoch holding 3 items (drop_last=False): the step raised
    'cannot be split into 4 micro-batches' and training stopped at the end of the first epoch."""
    def make(accumulate):
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        return m, mt.TorchEngine(m, opt, lambda mod, b: torch.nn.functional.mse_loss(mod(b[0]), b[1]),
                                 accumulate=accumulate)

    x, y = torch.randn(3, 4), torch.randn(3, 2)
    m1, e1 = make(1)
    m4, e4 = make(4)
    a, b = e1.train_step((x, y)), e4.train_step((x, y))
    assert abs(a["loss"] - b["loss"]) < 1e-6
    for p, q in zip(m1.parameters(), m4.parameters()):
        torch.testing.assert_close(p, q)


def test_async_checkpoint_keeps_tied_weights_shared(tmp_path):
    """The asynchronous snapshot copied each state_dict entry on its own: tied weights (an embedding shared
    with the output layer) were written twice, the file twice the size of a synchronous save's, and came
    back as two tensors."""
    def run(sub, use_async):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64, bias=False))
        model[1].weight = model[0].weight
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        e = mt.TorchEngine(model, opt, lambda m, b: m(b).logsumexp(-1).mean())
        data = [torch.randint(0, 64, (4, 3), generator=torch.Generator().manual_seed(i)) for i in range(5)]
        mt.train(data, e, config=cfg(tmp_path / sub, iterations=4, save_frequency=1, async_save=use_async,
                                     save_at_end=False, keep_last=0))  # saves 2 and 3 reuse the buffers of 1
        return tmp_path / sub / "step-00000003" / "rank-00000-of-00001.pt"

    a, s = run("async", True), run("sync", False)
    assert os.path.getsize(a) < 1.2 * os.path.getsize(s)
    for path in (a, s):
        w = torch.load(path, weights_only=True)["engines"]["model"]["model"]
        assert w["0.weight"].untyped_storage().data_ptr() == w["1.weight"].untyped_storage().data_ptr()
    _same(torch.load(a, weights_only=True), torch.load(s, weights_only=True))


@pytest.mark.parametrize("use_async", [True, False])
def test_a_failed_write_is_a_checkpoint_error_sync_or_async(tmp_path, use_async):
    """A synchronous save (async_save=False, or the final save) let the writer's OSError out as it was,
    while the same failure in the background was a CheckpointError: one except clause could not catch both."""
    rank_file = tmp_path / "step-00000002" / "rank-00000-of-00001.pt"
    rank_file.mkdir(parents=True)
    e = CountEngine()
    with pytest.raises(mt.CheckpointError, match="writing a checkpoint failed") as info:
        mt.train(range(100), e, config=cfg(tmp_path, iterations=50, save_frequency=2, resume=False,
                                           async_save=use_async))
    assert isinstance(info.value.__cause__, IsADirectoryError)
    assert info.value.__cause__.filename == str(rank_file)


class Recorder(CountEngine):
    """Records each batch and the random number its step draws (as dropout would)."""

    def train_step(self, batch):
        self.seen.append((batch.tolist(), float(torch.rand(()))))
        self._step += 1
        return {}

    def state_dict(self):
        return {"step": self._step, "seen": [list(b) + [r] for b, r in self.seen]}

    def load_state_dict(self, s):
        self._step, self.seen = int(s["step"]), [(list(x[:-1]), x[-1]) for x in s["seen"]]


def test_resume_with_a_plain_shuffling_dataloader_is_exact(tmp_path):
    """A torch DataLoader(shuffle=True) (no mlutils sampler) is read again from the epoch start and the
    consumed batches skipped; iter() ran with the RNG states of the save, not of the epoch start, so the
    reread epoch came in another order: items seen twice, others never, and a different run."""
    from torch.utils.data import DataLoader

    def dl():
        return DataLoader(list(range(40)), batch_size=4, shuffle=True)

    torch.manual_seed(0)
    ref = Recorder()
    mt.train(dl(), ref, config=cfg(tmp_path / "ref", iterations=25))
    torch.manual_seed(0)
    mt.train(dl(), Recorder(), config=cfg(tmp_path / "run", iterations=25, events=["quit@6"]))
    torch.manual_seed(123)  # a new process: other RNG states until the resume sets them
    again = Recorder()
    res = mt.train(dl(), again, config=cfg(tmp_path / "run", iterations=25, events=["quit@6"]))
    assert res.resumed_from == str(tmp_path / "run" / "step-00000006") and res.step == 25
    assert [b for b, _ in again.seen] == [b for b, _ in ref.seen]
    assert again.seen == ref.seen


def test_a_signal_handler_set_outside_python_is_left_alone(tmp_path, monkeypatch, caplog):
    """signal.signal() returns None for a handler that was not set from Python (a host embedding Python):
    the loop stored that None and 'restored' it with signal.signal(sig, None), a TypeError that came out of
    train() after a finished run."""
    import signal

    real_signal, real_getsignal = signal.signal, signal.getsignal
    set_calls = []

    def fake_signal(sig, handler):
        set_calls.append((sig, handler))
        old = real_signal(sig, handler)
        return None if sig == signal.SIGUSR1 else old

    monkeypatch.setattr(signal, "signal", fake_signal)
    monkeypatch.setattr(signal, "getsignal", lambda sig: None if sig == signal.SIGUSR1 else real_getsignal(sig))
    before = real_getsignal(signal.SIGUSR1)
    try:
        with caplog.at_level(logging.WARNING, logger="mlutils.train"):
            res = mt.train(range(100), CountEngine(), config=cfg(tmp_path, iterations=3))
    finally:
        real_signal(signal.SIGUSR1, before)
    assert res.status == "completed" and res.step == 3
    assert all(sig != signal.SIGUSR1 for sig, _ in set_calls)
    assert any("SIGUSR1 has a handler not set from Python" in r.getMessage() for r in caplog.records)


def test_a_failed_export_command_is_reported_and_training_goes_on(tmp_path, caplog):
    """An `export` whose file cannot be written (its name taken by a folder here; a full disk alike) stopped
    the whole run with the raw error; it is logged, the run goes on, and a later export works."""
    export_dir = tmp_path / "exports"
    (export_dir / "export-00000002.safetensors").mkdir(parents=True)
    with caplog.at_level(logging.ERROR, logger="mlutils.train"):
        res = mt.train(range(100), CountEngine(), config=cfg(tmp_path / "ck", iterations=6, export_dir=str(export_dir),
                                                             events=["export@2", "export@4"]))
    assert res.status == "completed" and res.step == 6
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "export at step 2 failed: IsADirectoryError" in errors[0], errors
    from mlutils.io import torch_load

    got = torch_load(str(export_dir / "export-00000004.safetensors"), framework="np")
    assert np.array_equal(got["module"]["w"], np.full(3, 0 + 1 + 2 + 3, np.float32))
