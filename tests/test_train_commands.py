"""mlutils.train: command arguments range-checked, the `time` report's numbers, an unwritable
metrics_file, micro-batches of batches holding values without a batch dimension, the moment a failed
background write is raised, and the fsyncs that make a checkpoint folder durable."""
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

torch = pytest.importorskip("torch")
if os.environ.get("MLUTILS_NO_TORCH") == "1":
    pytest.skip("the training loop trains torch models", allow_module_level=True)

import mlutils.train as mt  # noqa: E402
from mlutils.train import checkpoint as ck, commands  # noqa: E402
from mlutils.train.loop import _Loop  # noqa: E402
from _train_helpers import CountEngine, cfg  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _messages(caplog, level=logging.WARNING):
    return [r.getMessage() for r in caplog.records if r.levelno >= level and r.name == "mlutils.train"]


# ---------------------------------------------------------------- command arguments


@pytest.mark.parametrize("line, why", [
    ("save@" + "9" * 1000, "past the last step"),
    ("save@" + "1" + "0" * 30, "past the last step"),
    ("eval@21", "past the last step"),
    ("save@-3", "not a whole number"),
    ("save@1e3", "not a whole number"),
    ("save@", "not a whole number"),
    ("time to 1" + "0" * 400, "past the last step"),
    ("time to -1", "not a whole number"),
    ("time to 0x10", "not a whole number"),
    ("lr 1" + "0" * 400, "finite number"),
    ("lr nan", "finite number"),
], ids=lambda v: v if len(v) < 30 else v[:12] + f"...({len(v)})")
def test_a_bad_command_argument_is_one_error_line_and_training_goes_on(tmp_path, caplog, line, why):
    e = CountEngine()
    with caplog.at_level(logging.INFO, logger="mlutils.train"):
        result = mt.train(range(1, 100), e, config=cfg(tmp_path, iterations=20, save_frequency=5,
                                                       events=[line]))
    assert result.status == "completed" and e.global_step == 20
    assert [s for s, _ in mt.find_checkpoints(str(tmp_path))][-1] == 20  # every write still works
    bad = [m for m in _messages(caplog) if why in m]
    assert len(bad) == 1 and len(bad[0]) < 400, bad  # one line, not the thousand digits back


def test_a_scheduled_step_at_the_last_step_is_accepted(tmp_path):
    e = CountEngine()
    result = mt.train(range(1, 100), e, config=cfg(tmp_path, iterations=20, events=["quit@20", "save@0"]))
    assert result.step == 20 and result.status == "quit"


def test_commands_read_from_stdin_are_range_checked(tmp_path, monkeypatch, caplog):
    r, w = os.pipe()
    os.write(w, b"save@" + b"7" * 1000 + b"\ntime to 1" + b"0" * 400 + b"\nsave@4\n")
    os.close(w)
    f = os.fdopen(r, "rb")
    monkeypatch.setattr("sys.stdin", f)
    e = CountEngine()
    try:
        with caplog.at_level(logging.INFO, logger="mlutils.train"):
            result = mt.train(range(1, 100), e, config=cfg(tmp_path, iterations=8, read_commands=True,
                                                           keep_last=0))
    finally:
        f.close()
    assert result.status == "completed"
    assert [s for s, _ in mt.find_checkpoints(str(tmp_path))] == [4, 8]
    assert sum("past the last step" in m for m in _messages(caplog)) == 2


def _loop(tmp_path, **kw):
    return _Loop(range(1, 100), mt.Engines(CountEngine()), None, cfg(tmp_path, **kw))


def test_time_reports_the_mean_step_time_and_the_arrival(tmp_path, monkeypatch, caplog):
    loop = _loop(tmp_path, iterations=50)
    loop.step = 10
    loop.step_times = [9.0] * 5 + [0.25, 0.75] * 50  # the last 100 steps count: 0.5 s each
    monkeypatch.setattr(commands.time, "time", lambda: 1_000_000.0)
    arrive = {t: time.strftime("%H:%M:%S", time.localtime(1_000_000.0 + 0.5 * (t - 10))) for t in (30, 50)}
    with caplog.at_level(logging.INFO, logger="mlutils.train"):
        commands.run_command(loop, "time to 30")
        commands.run_command(loop, "time")
    got = [m for m in _messages(caplog, logging.INFO) if m.startswith("time:")]
    assert got == [f"time: 0.500 s/step; step 10 -> 30 in about 10 s ({arrive[30]})",
                   f"time: 0.500 s/step; step 10 -> 50 in about 20 s ({arrive[50]})"]


def test_time_before_any_step_and_to_a_past_step(tmp_path, caplog):
    loop = _loop(tmp_path, iterations=50)
    with caplog.at_level(logging.INFO, logger="mlutils.train"):
        commands.run_command(loop, "time")
        loop.step, loop.step_times = 40, [2.0]
        commands.run_command(loop, "time to 30")
        loop.step_times = [9000.0]
        commands.run_command(loop, "time to 50")
    got = [m for m in _messages(caplog, logging.INFO) if m.startswith("time:")]
    assert got[0] == "time: no step timed yet"
    day = time.strftime("%Y-%m-%d", time.localtime(time.time() + 90000))
    assert got[2].startswith(f"time: 9000.000 s/step; step 40 -> 50 in about 90000 s ({day} ")
    assert got[1].startswith("time: 2.000 s/step; step 40 -> 30 in about 0 s (")


# ---------------------------------------------------------------- metrics_file


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_unwritable_metrics_file_is_one_warning_and_training_goes_on(tmp_path, caplog):
    e = CountEngine()
    with caplog.at_level(logging.WARNING, logger="mlutils.train"):
        result = mt.train(range(1, 100), e, config=cfg(tmp_path, iterations=6, metrics_file="/dev/full"))
    assert result.status == "completed" and result.step == 6
    assert mt.latest_checkpoint(str(tmp_path)).endswith("step-00000006")
    warned = [m for m in _messages(caplog) if "metrics_file" in m]
    assert len(warned) == 1 and "/dev/full" in warned[0] and "No space left" in warned[0]


# ---------------------------------------------------------------- micro-batches


def test_accumulation_passes_values_without_a_batch_dimension_whole():
    torch.manual_seed(0)
    seen = []

    def loss_fn(model, batch):
        seen.append((tuple(batch["x"].shape), float(batch["temp"]), batch["name"], tuple(batch["table"].shape)))
        return (model(batch["x"]).squeeze(-1) / batch["temp"] - batch["y"]).pow(2).mean()

    def engine(k):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        return model, mt.TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, accumulate=k)

    batch = {"x": torch.randn(6, 3), "y": torch.randn(6), "temp": torch.tensor(0.5), "name": "b0",
             "table": torch.randn(4, 2)}
    m1, e1 = engine(1)
    e1.train_step(batch)
    m2, e2 = engine(2)
    e2.train_step(batch)
    assert seen[1:] == [((3, 3), 0.5, "b0", (4, 2))] * 2
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert mt.TorchEngine._batch_size((torch.tensor(2.0), torch.zeros(5, 1))) == 5


# ---------------------------------------------------------------- a failed background write


def test_a_failed_background_write_is_raised_at_the_very_next_step(tmp_path, monkeypatch):
    """The write of step 2 fails while step 3 runs (the engine waits for the failure): the error must be
    raised at the boundary of step 3, not later."""
    failed = threading.Event()

    def failing(obj, path):
        failed.set()
        raise OSError(28, "No space left on device", path)

    class WaitingEngine(CountEngine):
        def train_step(self, batch):
            if self._step == 2:
                assert failed.wait(10)
                time.sleep(0.05)  # the writer thread has stored its error
            return super().train_step(batch)

    monkeypatch.setattr(ck, "torch_save", failing)
    e = WaitingEngine()
    with pytest.raises(mt.CheckpointError, match="No space left"):
        mt.train(range(100), e, config=cfg(tmp_path, iterations=50, save_frequency=2))
    assert e.global_step == 3


# ---------------------------------------------------------------- durability


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_checkpoint_folder_and_its_parent_are_fsynced(tmp_path):
    """The step folder is created, the rank file renamed into it, then both the step folder and the
    checkpoint folder are fsynced: after a power cut the checkpoint is there whole or not at all."""
    ck = tmp_path / "ck"
    script = ("import sys; sys.path.insert(0, 'tests'); import mlutils.train as mt; "
              "from _train_helpers import CountEngine; "
              f"mt.train(range(1, 9), CountEngine(), config=mt.TrainConfig(iterations=2, checkpoint_dir={str(ck)!r}, "
              "read_commands=False, progress=False, metrics_stdout=False, handle_signals=False))")
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-y", "-qq", "-o", str(trace), "-e", "trace=mkdir,mkdirat,rename,renameat,"
                    "renameat2,fsync,fdatasync", sys.executable, "-c", script], cwd=ROOT, check=True, timeout=120)
    calls = [line.split(None, 1)[1] for line in trace.read_text().splitlines() if " " in line]
    step = str(ck / "step-00000002")

    def first(pred, after=-1):
        return next(i for i, c in enumerate(calls) if i > after and pred(c))

    made = first(lambda c: c.startswith("mkdir") and step + '"' in c)
    parent_synced = first(lambda c: c.startswith("fsync(") and f"<{ck}>" in c, made)
    renamed = first(lambda c: c.startswith("rename") and "rank-00000-of-00001.pt" in c, made)
    step_synced = first(lambda c: c.startswith("fsync(") and f"<{step}>" in c, renamed)
    assert parent_synced and step_synced


# ---------------------------------------------------------------- handlers set outside Python


def test_a_faulthandler_stack_dump_handler_survives_train(tmp_path):
    """faulthandler.register(SIGUSR1) is a C-level handler Python cannot name: after train() returns it is
    still there (SIGUSR1 dumps the stacks instead of killing the process)."""
    dump = tmp_path / "stacks.txt"
    script = (
        "import faulthandler, os, signal, sys; sys.path.insert(0, 'tests')\n"
        f"f = open({str(dump)!r}, 'w')\n"
        "faulthandler.register(signal.SIGUSR1, file=f, all_threads=False)\n"
        "import mlutils.train as mt\n"
        "from _train_helpers import CountEngine\n"
        "r = mt.train(range(1, 9), CountEngine(), config=mt.TrainConfig(iterations=3, read_commands=False, "
        "progress=False, metrics_stdout=False))\n"
        "assert r.status == 'completed', r\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "f.flush()\n"
        "print('ALIVE')\n")
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "ALIVE" in p.stdout, (p.returncode, p.stderr[-2000:])
    assert "Current thread" in dump.read_text() or "Stack (most recent call first)" in dump.read_text()
