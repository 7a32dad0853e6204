"""mlutils.train end to end: commands through a pipe, SIGTERM, SIGKILL mid-save, exact resume, rotation."""
import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

torch = pytest.importorskip("torch")
if os.environ.get("MLUTILS_NO_TORCH") == "1":
    pytest.skip("the training loop trains torch models", allow_module_level=True)

import mlutils.train as mt  # noqa: E402
from mlutils.train import checkpoint as ck  # noqa: E402
from mlutils.io import json_parse  # noqa: E402
from _train_helpers import CountEngine, cfg, load_rank0  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "test_train_driver.py")


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


_RUNNING = []


@pytest.fixture(autouse=True)
def _kill_leftover_drivers():
    yield
    while _RUNNING:
        p = _RUNNING.pop()
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the driver and its DataLoader workers
        except ProcessLookupError:
            pass
        p.wait()


class Run:
    """A driver subprocess whose stdout (metrics lines) and stderr are collected by threads."""

    def __init__(self, args, stdin=subprocess.PIPE, prefix=()):
        self.proc = subprocess.Popen([*prefix, sys.executable, DRIVER, *map(str, args)], stdin=stdin,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                     cwd=ROOT, start_new_session=True)
        _RUNNING.append(self.proc)
        self.out, self.err = [], []
        self._threads = [threading.Thread(target=self._pump, args=(s, dst), daemon=True)
                         for s, dst in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, dst):
        for line in stream:
            dst.append(line.rstrip("\n"))

    def steps(self):
        return [json_parse(x) for x in list(self.out) if x.startswith("{") and '"epoch"' in x]

    def wait_for(self, pred, timeout=120.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return
            if self.proc.poll() is not None and not pred():
                time.sleep(0.2)
                if pred():
                    return
                raise AssertionError(f"driver exited ({self.proc.returncode}) first:\n" + "\n".join(self.err[-30:]))
            time.sleep(0.005)
        raise AssertionError("timed out; stderr:\n" + "\n".join(self.err[-30:]))

    def wait_step(self, n):
        self.wait_for(lambda: any(s["step"] >= n for s in self.steps()))

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout=120):
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def result(self):
        lines = [x for x in self.out if x.startswith("RESULT ")]
        assert lines, "no RESULT line; stderr:\n" + "\n".join(self.err[-30:])
        return json_parse(lines[-1][len("RESULT "):])


def run_to_end(args, timeout=120):
    r = Run(args, stdin=subprocess.DEVNULL)
    assert r.finish(timeout) == 0, "\n".join(r.err[-30:])
    return r


def assert_same_weights(a, b):
    ma, mb = a["engines"]["model"]["model"], b["engines"]["model"]["model"]
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    oa, ob = a["engines"]["model"]["optimizer"]["state"], b["engines"]["model"]["optimizer"]["state"]
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)


def test_commands_through_a_pipe(tmp_path):
    ck = tmp_path / "ck"
    r = Run(["--ckpt", ck, "--iterations", 100000, "--sleep", 0.02, "--keep-last", 0])
    r.wait_step(3)
    r.send("save")
    r.wait_for(lambda: any("saved checkpoint" in e for e in r.err))
    r.send("lr 0.01")
    r.wait_for(lambda: any(s["lr"] == 0.01 for s in r.steps()))
    r.send("eval")
    r.wait_for(lambda: any('"eval"' in x for x in r.out))
    r.send("frobnicate 3")
    r.send("lr fast")
    r.send("export")
    r.send("time")
    r.send("time to 500")
    r.send("quit@90000")
    r.send("quit@100000000")
    r.send("event show")
    r.wait_for(lambda: any("events:" in e for e in r.err))
    r.send("event clear")
    r.send("event show")
    r.wait_for(lambda: any("events: none" in e for e in r.err))
    r.send("quit")
    assert r.finish() == 0
    res = r.result()
    assert res["status"] == "quit"
    steps = r.steps()
    assert [s["step"] for s in steps] == list(range(1, res["step"] + 1))
    lrs = [s["lr"] for s in steps]
    first_new = lrs.index(0.01)
    assert set(lrs[:first_new]) == {0.001} and set(lrs[first_new:]) == {0.01}
    err = "\n".join(r.err)
    assert "unknown command 'frobnicate 3'" in err
    assert "lr needs a number, got 'fast'" in err
    assert "time:" in err and "s/step" in err
    assert "scheduled 'quit' at step 90000" in err
    assert "bad step in 'quit@100000000': past the last step (100000, TrainConfig.iterations)" in err
    saved = mt.find_checkpoints(str(ck))
    assert len(saved) == 3 and saved[-1][0] == res["step"] and saved[0][0] < res["step"]  # save, export, quit
    assert res["checkpoint"] == saved[-1][1]
    ckpt = load_rank0(saved[-1][1])  # what torch.load(weights_only=True) reads
    assert ckpt["step"] == res["step"] and ckpt["engines"]["model"]["global_step"] == res["step"]
    assert ckpt["engines"]["model"]["optimizer"]["param_groups"][0]["lr"] == 0.01
    exports = [f for f in os.listdir(ck) if f.endswith(".safetensors")]
    assert len(exports) == 1
    from safetensors.torch import load_file

    exported = load_file(str(ck / exports[0]))
    assert set(exported) == {"0.weight", "0.bias", "3.weight", "3.bias"}


@pytest.mark.parametrize("stdin", ["eof", "closed"])
def test_stdin_at_eof_or_closed_keeps_training(tmp_path, stdin):
    prefix = ("bash", "-c", 'exec "$@" 0<&-', "_") if stdin == "closed" else ()
    r = Run(["--ckpt", tmp_path, "--iterations", 12], stdin=subprocess.DEVNULL, prefix=prefix)
    assert r.finish() == 0, "\n".join(r.err)
    assert r.result()["status"] == "completed" and r.result()["step"] == 12


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_then_resume_is_bit_exact(tmp_path, workers, loader_mp):
    total = 60  # 25 batches per epoch (203 items, batch 8, drop_last): crosses two epoch ends
    mp = ["--mp-context", loader_mp] if workers and loader_mp else []
    ref = run_to_end(["--ckpt", tmp_path / "ref", "--iterations", total, "--workers", workers, *mp,
                      "--metrics-file", tmp_path / "ref.jsonl"])
    common = ["--ckpt", tmp_path / "ck", "--iterations", total, "--workers", workers, *mp, "--save-frequency", 7,
              "--metrics-file", tmp_path / "run.jsonl"]
    r = Run([*common, "--sleep", 0.03])
    r.wait_step(total // 2)
    r.proc.send_signal(signal.SIGTERM)
    assert r.finish() == 0, "\n".join(r.err)
    first = r.result()
    assert first["status"] == "signal" and first["signal"] == "SIGTERM"
    assert total // 2 <= first["step"] < total
    assert mt.latest_checkpoint(str(tmp_path / "ck")) == first["checkpoint"]
    second = run_to_end(common)
    res = second.result()
    assert res["status"] == "completed" and res["resumed_from"] == first["checkpoint"]
    assert [s["step"] for s in second.steps()] == list(range(first["step"] + 1, total + 1))
    assert_same_weights(load_rank0(ref.result()["checkpoint"]), load_rank0(res["checkpoint"]))
    ref_log = [json_parse(x) for x in (tmp_path / "ref.jsonl").read_text().splitlines()]
    run_log = [json_parse(x) for x in (tmp_path / "run.jsonl").read_text().splitlines()]
    elapsed = [x.pop("elapsed") for x in run_log]  # wall-clock seconds: carried across the resume
    [x.pop("elapsed") for x in ref_log]
    assert run_log == ref_log and len(ref_log) == total
    assert elapsed == sorted(elapsed)


def test_sigterm_during_eval_stops_eval_and_saves(tmp_path):
    r = Run(["--ckpt", tmp_path, "--iterations", 100000, "--sleep", 0.2, "--eval-frequency", 2])
    r.wait_for(lambda: any(s["step"] >= 2 for s in r.steps()))
    time.sleep(0.25)  # inside the evaluation (5 batches of 0.2 s)
    r.proc.send_signal(signal.SIGTERM)
    assert r.finish() == 0
    res = r.result()
    assert res["status"] == "signal" and res["step"] == 2
    evals = [json_parse(x) for x in r.out if '"eval"' in x]
    assert evals and evals[-1]["eval"]["items"] < 203  # cut short
    assert load_rank0(res["checkpoint"])["step"] == 2


def test_sigkill_mid_save_leaves_previous_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    args = ["--ckpt", ck, "--iterations", 12, "--save-frequency", 5, "--big-mib", 96, "--announce-writes"]
    r = Run([*args, "--sleep", 0.01], stdin=subprocess.DEVNULL)
    r.wait_for(lambda: any(e.startswith("WRITING") and "step-00000010" in e for e in r.err))
    r.proc.kill()
    r.finish()
    assert r.proc.returncode == -signal.SIGKILL
    partial = ck / "step-00000010"
    assert partial.is_dir() and not (partial / "rank-00000-of-00001.pt").exists(), "the kill came after the write"
    assert mt.latest_checkpoint(str(ck)) == str(ck / "step-00000005")
    assert load_rank0(ck / "step-00000005")["step"] == 5
    again = run_to_end(args)
    res = again.result()
    assert res["resumed_from"] == str(ck / "step-00000005") and res["status"] == "completed" and res["step"] == 12
    assert [s["step"] for s in again.steps()] == list(range(6, 13))
    assert [s for s, _ in mt.find_checkpoints(str(ck))] == [5, 10, 12]


# ---------------------------------------------------------------- in-process


def test_rotation_keeps_last_k_and_auto_resume_ignores_partial(tmp_path):
    e = CountEngine()
    res = mt.train(range(7), e, config=cfg(tmp_path, iterations=10, save_frequency=2, keep_last=2))
    assert res.status == "completed" and e.quitted and e.seen == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    assert [s for s, _ in mt.find_checkpoints(str(tmp_path))] == [8, 10]
    # a newer folder with only a temporary file (a save killed midway) is not a checkpoint
    partials = [tmp_path / "step-00000009", tmp_path / "step-00000099"]
    for partial in partials:
        partial.mkdir()
        (partial / ".rank-00000-of-00001.pt.abc123.tmp").write_bytes(b"PK\x03\x04 half")
    e2 = CountEngine()
    res2 = mt.train(range(7), e2, config=cfg(tmp_path, iterations=12, save_frequency=2, keep_last=2))
    assert res2.resumed_from == str(tmp_path / "step-00000010")
    assert e2.seen == e.seen + [3, 4]
    assert [s for s, _ in mt.find_checkpoints(str(tmp_path))] == [10, 12]
    # partial and older than the newest complete one: removed; newer: kept (another rank may be writing it)
    assert not partials[0].exists() and partials[1].exists()


def test_async_save_error_is_raised_at_next_step(tmp_path, monkeypatch):
    def failing(obj, path):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(ck, "torch_save", failing)
    e = CountEngine()
    with pytest.raises(mt.CheckpointError, match="writing a checkpoint failed: .*No space left") as info:
        mt.train(range(100), e, config=cfg(tmp_path, iterations=50, save_frequency=2))
    assert isinstance(info.value.__cause__, OSError)
    assert 3 <= e.global_step <= 4  # raised at the boundary after the failed write, not at the end


def test_a_failed_checkpoint_write_names_its_file(tmp_path):
    """A real write failure (the rank file's name is taken by a folder): the
    CheckpointError's cause is the writer's OSError, as open() raises it, with
    the rank file as its file name, named once in the message."""
    rank_file = tmp_path / "step-00000002" / "rank-00000-of-00001.pt"
    rank_file.mkdir(parents=True)
    e = CountEngine()
    with pytest.raises(mt.CheckpointError) as info:
        mt.train(range(100), e, config=cfg(tmp_path, iterations=50, save_frequency=2, resume=False))
    cause = info.value.__cause__
    assert isinstance(cause, IsADirectoryError)
    assert (cause.errno, cause.filename) == (errno.EISDIR, str(rank_file))
    assert str(info.value).count(str(rank_file)) == 1
    assert rank_file.is_dir() and not os.listdir(rank_file)


def test_async_snapshot_is_taken_before_the_next_step(tmp_path, monkeypatch):
    real = ck.torch_save
    gate = threading.Event()

    def slow(obj, path):
        gate.wait(10)
        real(obj, path)

    monkeypatch.setattr(ck, "torch_save", slow)
    e = CountEngine()
    t = threading.Timer(0.3, gate.set)
    t.start()
    mt.train(range(1, 100), e, config=cfg(tmp_path, iterations=4, save_frequency=2, save_at_end=False))
    t.join()
    s2 = torch.load(tmp_path / "step-00000002" / "rank-00000-of-00001.pt", weights_only=True)
    assert s2["engines"]["model"]["w"].tolist() == [3.0, 3.0, 3.0]  # 1 + 2, not what later steps added


def test_signal_handlers_restored_and_signal_status(tmp_path):
    before = signal.getsignal(signal.SIGTERM)

    class Killer(CountEngine):
        def train_step(self, batch):
            if self._step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().train_step(batch)

    res = mt.train(range(100), Killer(), config=cfg(tmp_path, iterations=50))
    assert res.status == "signal" and res.signal == "SIGTERM" and res.step == 4
    assert signal.getsignal(signal.SIGTERM) is before
    assert load_rank0(tmp_path / "step-00000004")["step"] == 4


def test_scheduled_events_survive_resume(tmp_path):
    e = CountEngine()
    res = mt.train(range(100), e, config=cfg(tmp_path, iterations=50, events=["quit@4", "lr 0.5@8", "quit@10"]))
    assert res.status == "quit" and res.step == 4
    e2 = CountEngine()
    res2 = mt.train(range(100), e2, config=cfg(tmp_path, iterations=50))
    assert res2.status == "quit" and res2.step == 10 and e2.lr == 0.5


def test_torch_engine_accumulation_matches_one_batch():
    def make():
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 2)
        return m, torch.optim.SGD(m.parameters(), lr=0.1)

    def loss_fn(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    x, y = torch.randn(8, 4), torch.randn(8, 2)
    m1, o1 = make()
    m2, o2 = make()
    a = mt.TorchEngine(m1, o1, loss_fn).train_step((x, y))
    b = mt.TorchEngine(m2, o2, loss_fn, accumulate=4, clip_grad_norm=1e9).train_step((x, y))
    assert abs(a["loss"] - b["loss"]) < 1e-6 and "grad_norm" in b
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q)


def test_bad_arguments():
    with pytest.raises(ValueError, match="iterations"):
        mt.TrainConfig(iterations=-1)
    with pytest.raises(TypeError, match="Engine protocol"):
        mt.train([1], object(), config=mt.TrainConfig(read_commands=False))
    with pytest.raises(ValueError, match="no batch"):
        mt.train([], CountEngine(), config=mt.TrainConfig(read_commands=False, progress=False, iterations=3))


def test_torch_engine_amp_scaler_state_round_trips(tmp_path):
    def make():
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        return mt.TorchEngine(m, opt, lambda mod, b: mod(b).float().pow(2).mean(), amp_dtype=torch.float16)

    data = [torch.randn(8, 4) for _ in range(5)]
    e = make()
    e.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # a scale the fresh engine does not have
    mt.train(data, e, config=cfg(tmp_path, iterations=3))
    e2 = make()
    res = mt.train(data, e2, config=cfg(tmp_path, iterations=3))
    assert res.resumed_from == str(tmp_path / "step-00000003") and e2.global_step == 3
    assert e2.scaler.get_scale() == e.scaler.get_scale() == 1024.0
    for p, q in zip(e.model.parameters(), e2.model.parameters()):
        assert torch.equal(p, q)
