"""mlutils.train's trainer features: accumulation across loader batches, out-of-memory steps skipped,
counters, no per-step host sync, plain progress lines in logs, evaluation options, best checkpoints,
exports, fine-tuning from another run, loggers and the loss_scale command."""
import json
import logging
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if os.environ.get("MLUTILS_NO_TORCH") == "1":
    pytest.skip("the training loop trains torch models", allow_module_level=True)

import mlutils.train as mt  # noqa: E402
from _train_helpers import CountEngine, cfg, load_rank0  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(n=12, rows=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(rows, 3, generator=g), "y": torch.randn(rows, generator=g)} for _ in range(n)]


def _mse(model, batch):
    return (model(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean()


def _engine(seed=0, loss_fn=_mse, **kw):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    return mt.TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, **kw)


def _messages(caplog, level=logging.WARNING):
    return [r.getMessage() for r in caplog.records if r.levelno >= level and r.name == "mlutils.train"]


# ---------------------------------------------------------------- accumulation across loader batches


def test_accumulate_batches_steps_once_on_k_loader_batches(tmp_path):
    data = _data(5, rows=4) + [{"x": torch.randn(2, 3), "y": torch.randn(2)}]  # 22 items, the last batch short
    acc = _engine()
    res = mt.train(data, acc, config=cfg(tmp_path / "a", iterations=3, accumulate_batches=2))
    assert res.step == 3 and acc.global_step == 3
    ref = _engine()
    for i in range(0, 6, 2):  # the same steps on the concatenated batches (weights by size)
        ref.train_step({k: torch.cat([data[i][k], data[i + 1][k]]) for k in ("x", "y")})
    for p, q in zip(acc.model.parameters(), ref.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_accumulate_batches_last_step_of_an_epoch_takes_what_is_left(tmp_path):
    seen = []

    class Sizes(CountEngine):
        def train_step(self, batch):
            seen.append([int(b) for b in batch] if isinstance(batch, list) else int(batch))
            self._step += 1
            return {}

    mt.train(range(1, 6), Sizes(), config=cfg(tmp_path, iterations=5, accumulate_batches=2))
    assert seen == [[1, 2], [3, 4], [5], [1, 2], [3, 4]]


def test_accumulate_batches_resume_is_exact(tmp_path):
    data = _data(7)
    ref = _engine()
    mt.train(data, ref, config=cfg(tmp_path / "ref", iterations=9, accumulate_batches=3))
    first = _engine()
    mt.train(data, first, config=cfg(tmp_path / "cut", iterations=9, accumulate_batches=3, events=["quit@4"]))
    again = _engine(seed=5)
    res = mt.train(data, again, config=cfg(tmp_path / "cut", iterations=9, accumulate_batches=3))
    assert res.resumed_from is not None
    for p, q in zip(ref.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- out of memory


class OOMOnce(torch.nn.Module):
    """A linear layer whose forward runs out of memory on the batches whose first target is marked."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x):
        if float(x[0, 0]) == 99.0:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.lin(x)


def _oom_data(marks):
    data = _data(8)
    for i in marks:
        data[i]["x"][0, 0] = 99.0
    return data


def _oom_engine(seed=0):
    torch.manual_seed(seed)
    model = OOMOnce()
    return mt.TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), _mse)


def test_an_oom_step_is_skipped_and_counted(tmp_path, caplog):
    e = _oom_engine()
    lines = tmp_path / "m.jsonl"
    with caplog.at_level(logging.WARNING, logger="mlutils.train"):
        res = mt.train(_oom_data([2]), e, config=cfg(tmp_path, iterations=6, metrics_file=str(lines)))
    assert res.status == "completed" and res.step == 6 and res.oom_skipped == 1
    assert any("out of memory in step 3" in m for m in _messages(caplog))
    recs = [json.loads(x) for x in lines.read_text().splitlines()]
    assert [r["oom_skipped"] for r in recs] == [0, 0, 1, 1, 1, 1]
    assert all(p.grad is None for p in e.model.parameters()) is False  # later steps trained again


def test_oom_raise_is_the_old_behaviour(tmp_path):
    with pytest.raises(torch.OutOfMemoryError):
        mt.train(_oom_data([1]), _oom_engine(), config=cfg(tmp_path, iterations=6, oom="raise"))


def test_three_ooms_in_a_row_stop_with_a_checkpoint(tmp_path):
    e = _oom_engine()
    with pytest.raises(mt.OutOfMemoryStop, match="three steps in a row"):
        mt.train(_oom_data([2, 3, 4]), e, config=cfg(tmp_path, iterations=8))
    assert e.global_step == 2
    state = load_rank0(mt.latest_checkpoint(str(tmp_path)))
    assert state["step"] == 2 and state["loop"]["batches_in_epoch"] == 5 and state["loop"]["oom_skipped"] == 3


def test_a_resume_after_an_oom_skips_the_same_batches(tmp_path):
    data = _oom_data([2])
    ref = _oom_engine()
    mt.train(data, ref, config=cfg(tmp_path / "ref", iterations=10))
    mt.train(data, _oom_engine(), config=cfg(tmp_path / "cut", iterations=10, events=["quit@4"]))
    again = _oom_engine(seed=3)
    res = mt.train(data, again, config=cfg(tmp_path / "cut", iterations=10))
    assert res.oom_skipped == 2  # the first run's and the second epoch's
    for p, q in zip(ref.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- counters and host syncs


def test_samples_and_elapsed_are_carried_across_resumes(tmp_path):
    lines = tmp_path / "m.jsonl"
    data = _data(6, rows=4)
    mt.train(data, _engine(), config=cfg(tmp_path, iterations=4, metrics_file=str(lines)))
    mt.train(data, _engine(), config=cfg(tmp_path, iterations=7, metrics_file=str(lines)))
    recs = [json.loads(x) for x in lines.read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 8))
    assert [r["samples"] for r in recs] == [4 * s for s in range(1, 8)]
    el = [r["elapsed"] for r in recs]
    assert el == sorted(el) and el[0] >= 0


def test_the_loss_is_read_back_only_on_logged_steps(tmp_path, monkeypatch):
    reads = []
    for name in ("item", "__float__", "tolist", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, _name=name, **k):
            reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    res = mt.train(_data(40), _engine(), config=cfg(tmp_path, iterations=30, log_every=10, checkpoint_dir=None))
    monkeypatch.undo()
    assert res.step == 30
    assert len(reads) <= 3 + 1, reads  # one per logged step (and the result's last metrics)


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path):
    script = ("import sys; sys.path.insert(0, 'tests'); import mlutils.train as mt; "
              "from _train_helpers import CountEngine; "
              "mt.train(range(1, 500), CountEngine(), config=mt.TrainConfig(iterations=400, read_commands=False, "
              "metrics_stdout=False, progress=True))")
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "\r" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("step ")]
    assert 5 <= len(lines) <= 21 and lines[-1].startswith("step 400/400 (100%)")


# ---------------------------------------------------------------- evaluation


def test_eval_errors_log_keeps_training(tmp_path, caplog):
    def bad_eval(step, should_stop):
        raise RuntimeError("metric server down")

    with caplog.at_level(logging.ERROR, logger="mlutils.train"):
        res = mt.train(range(1, 20), CountEngine(), bad_eval, cfg(tmp_path, iterations=6, eval_frequency=2,
                                                                  eval_errors="log"))
    assert res.status == "completed" and res.step == 6
    failed = [r for r in caplog.records if "eval_fn failed at step" in r.getMessage()]
    assert len(failed) == 3 and failed[0].exc_info is not None
    with pytest.raises(RuntimeError, match="metric server down"):
        mt.train(range(1, 20), CountEngine(), bad_eval, cfg(tmp_path / "b", iterations=6, eval_frequency=2))


def test_eval_on_leader_runs_eval_fn_on_the_leader(tmp_path):
    calls = []
    res = mt.train(range(1, 20), CountEngine(), lambda s, stop: calls.append((s, stop())) or {"v": s},
                   cfg(tmp_path, iterations=4, eval_frequency=2, eval_on="leader"))
    assert calls == [(2, False), (4, False)] and res.eval_metrics == {"v": 4}


# ---------------------------------------------------------------- best checkpoints


def test_keep_best_keeps_the_best_checkpoints_through_rotation(tmp_path):
    losses = {2: 5.0, 4: 1.0, 6: 3.0, 8: 0.5, 10: 4.0, 12: 2.0}
    res = mt.train(range(1, 50), CountEngine(), lambda s, stop: {"loss": losses[s]},
                   cfg(tmp_path, iterations=12, eval_frequency=2, save_frequency=3, keep_last=1, keep_best=2))
    assert res.best == [(0.5, 8), (1.0, 4)]
    kept = [s for s, _ in mt.find_checkpoints(str(tmp_path))]
    assert kept == [4, 8, 12]
    assert (tmp_path / "best").read_text() == "step-00000008\n"
    state = load_rank0(str(tmp_path / "step-00000012"))
    assert state["loop"]["best"] == [[0.5, 8], [1.0, 4]]


def test_keep_best_max_mode_and_nested_metric(tmp_path):
    accs = {2: 0.5, 4: 0.9, 6: 0.7}
    res = mt.train(range(1, 50), CountEngine(), lambda s, stop: {"val": {"acc": accs[s]}},
                   cfg(tmp_path, iterations=6, eval_frequency=2, keep_last=1, keep_best=1, best_metric="val/acc",
                       best_mode="max"))
    assert res.best == [(0.9, 4)]
    assert [s for s, _ in mt.find_checkpoints(str(tmp_path))] == [4, 6]


# ---------------------------------------------------------------- exports


def test_exports_in_a_dtype_with_metadata_on_save_and_on_quit(tmp_path):
    from safetensors import safe_open

    e = _engine()
    mt.train(_data(), e, config=cfg(tmp_path, iterations=4, save_frequency=2, export_dtype="bfloat16",
                                    export_on_save=True, export_on_quit=True,
                                    export_metadata={"config": {"dim": 3}, "name": "tiny"}))
    names = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert names == ["export-00000002.safetensors", "export-00000004.safetensors"]
    with safe_open(str(tmp_path / names[-1]), framework="pt") as f:
        meta = f.metadata()
        assert meta["step"] == "4" and meta["dtype"] == "bfloat16" and meta["name"] == "tiny"
        assert json.loads(meta["config"]) == {"dim": 3}
        w = f.get_tensor("weight")
    assert w.dtype == torch.bfloat16 and torch.equal(w, e.model.weight.detach().to(torch.bfloat16))


def test_export_metadata_may_not_replace_what_the_export_writes():
    with pytest.raises(ValueError, match="step"):
        mt.TrainConfig(export_metadata={"step": 3})
    with pytest.raises(ValueError, match="export_dtype"):
        mt.TrainConfig(export_dtype="int8")


# ---------------------------------------------------------------- fine-tuning


def test_init_from_takes_weights_only_and_starts_at_step_0(tmp_path):
    donor = _engine(seed=1)
    mt.train(_data(), donor, config=cfg(tmp_path / "donor", iterations=5))
    for source in (tmp_path / "donor", tmp_path / "donor" / "step-00000005"):
        e = _engine(seed=2)
        mt.train(_data(), e, config=cfg(tmp_path / f"ft{len(str(source))}", iterations=0, init_from=str(source)))
        assert e.global_step == 0 and torch.equal(e.model.weight, donor.model.weight)
        assert e.optimizer.state_dict()["state"] == {}  # SGD without momentum: nothing, and nothing loaded


def test_init_from_an_export_file_and_non_strict(tmp_path, caplog):
    donor = _engine(seed=1)
    mt.train(_data(), donor, config=cfg(tmp_path / "donor", iterations=2, events=["export@2"]))

    class Bigger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, 3))
            self.bias = torch.nn.Parameter(torch.zeros(1))
            self.extra = torch.nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return x @ self.weight.t() + self.bias + self.extra.sum() * 0

    path = str(tmp_path / "donor" / "export-00000002.safetensors")
    big = Bigger()
    e = mt.TorchEngine(big, torch.optim.SGD(big.parameters(), lr=0.1), _mse)
    with pytest.raises(mt.CheckpointError, match="init_strict=False"):
        mt.train(_data(), e, config=cfg(tmp_path / "strict", iterations=0, init_from=path))
    with caplog.at_level(logging.WARNING, logger="mlutils.train"):
        mt.train(_data(), e, config=cfg(tmp_path / "loose", iterations=0, init_from=path, init_strict=False))
    assert torch.equal(big.weight, donor.model.weight)
    assert any("missing keys ['extra']" in m for m in _messages(caplog))


def test_init_from_with_the_optimizer_and_resume_wins(tmp_path, caplog):
    def adam(seed):
        torch.manual_seed(seed)
        m = torch.nn.Linear(3, 1)
        return mt.TorchEngine(m, torch.optim.Adam(m.parameters(), lr=0.01), _mse)

    donor = adam(1)
    mt.train(_data(), donor, config=cfg(tmp_path / "donor", iterations=3))
    e = adam(2)
    mt.train(_data(), e, config=cfg(tmp_path / "ft", iterations=2, init_from=str(tmp_path / "donor"),
                                    init_optimizer=True))
    assert e.global_step == 2
    e2 = adam(3)
    with caplog.at_level(logging.INFO, logger="mlutils.train"):
        res = mt.train(_data(), e2, config=cfg(tmp_path / "ft", iterations=4, init_from=str(tmp_path / "donor")))
    assert res.resumed_from.endswith("step-00000002")
    assert any("init_from is ignored" in m for m in _messages(caplog, logging.INFO))


# ---------------------------------------------------------------- loggers and commands


class ListLogger:
    def __init__(self):
        self.calls, self.closed = [], False

    def log(self, metrics, step):
        self.calls.append((step, metrics))

    def close(self):
        self.closed = True


def test_every_metrics_line_reaches_every_logger(tmp_path):
    lg = ListLogger()
    mt.train(range(1, 20), CountEngine(), lambda s, stop: {"acc": 0.5},
             cfg(tmp_path, iterations=4, log_every=2, eval_frequency=4, loggers=[lg]))
    assert [s for s, _ in lg.calls] == [2, 4, 4] and lg.closed
    assert lg.calls[0][1]["loss"] == 0.5 and "step" not in lg.calls[0][1]
    assert lg.calls[2][1] == {"eval": {"acc": 0.5}}


def test_a_logger_that_raises_is_dropped_with_one_warning(tmp_path, caplog):
    class Broken(ListLogger):
        def log(self, metrics, step):
            raise ConnectionError("tracker unreachable")

    bad, good = Broken(), ListLogger()
    with caplog.at_level(logging.WARNING, logger="mlutils.train"):
        res = mt.train(range(1, 20), CountEngine(), config=cfg(tmp_path, iterations=5, loggers=[bad, good]))
    assert res.step == 5 and len(good.calls) == 5 and bad.closed
    assert sum("dropped" in m for m in _messages(caplog)) == 1


def test_loss_scale_and_bare_event_commands(tmp_path, caplog):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    e = mt.TorchEngine(m, torch.optim.SGD(m.parameters(), lr=0.1), lambda mod, b: mod(b).float().pow(2).mean(),
                       amp_dtype=torch.float16)
    data = [torch.randn(8, 4) for _ in range(5)]
    with caplog.at_level(logging.INFO, logger="mlutils.train"):
        mt.train(data, e, config=cfg(tmp_path, iterations=3, events=["loss_scale 512@2", "save@3", "event",
                                                                     "loss_scale -1"]))
    assert e.scaler.get_scale() == 512.0
    msgs = _messages(caplog, logging.INFO)
    assert any(m.startswith("events: loss_scale 512@2") for m in msgs)
    assert any("loss_scale must be a finite number > 0" in m for m in msgs)
    with caplog.at_level(logging.WARNING, logger="mlutils.train"):
        mt.train(range(1, 9), CountEngine(), config=cfg(tmp_path / "c", iterations=2, events=["loss_scale 8"]))
    assert any("have no loss scale" in m for m in _messages(caplog))


def test_tensorboard_steps_continue_without_duplicates_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "tb"
    # the first run logs steps 1..5 but its last checkpoint is step 4 (a kill after step 5)
    mt.train(range(1, 50), CountEngine(), config=cfg(tmp_path / "ck", iterations=5, save_frequency=4,
                                                     save_at_end=False, loggers=[mt.TensorBoardLogger(str(logs))]))
    res = mt.train(range(1, 50), CountEngine(), config=cfg(tmp_path / "ck", iterations=7,
                                                           loggers=[mt.TensorBoardLogger(str(logs))]))
    assert res.resumed_from.endswith("step-00000004")
    acc = EventAccumulator(str(logs))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in loss] == list(range(1, 8))  # step 5 once, from the resumed run
    assert loss[4][1] == pytest.approx(1.0 / 5)


# ---------------------------------------------------------------- requeue on pre-emption


def _stub_scontrol(tmp_path, monkeypatch, rc=0):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.args"
    stub = bin_dir / "scontrol"
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {record}\nexit {rc}\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    return record


class PreemptedAt(CountEngine):
    def __init__(self, at, sig="SIGUSR1"):
        super().__init__()
        self.at, self.sig = at, sig

    def train_step(self, batch):
        if self._step + 1 == self.at:
            import signal

            os.kill(os.getpid(), getattr(signal, self.sig))
        return super().train_step(batch)


def test_preemption_under_slurm_saves_then_requeues(tmp_path, monkeypatch):
    record = _stub_scontrol(tmp_path, monkeypatch)
    res = mt.train(range(1, 50), PreemptedAt(3), config=cfg(tmp_path / "ck", iterations=20, save_at_end=False))
    assert res.status == "requeued" and res.step == 3
    assert record.read_text() == "requeue 4242\n"
    assert mt.latest_checkpoint(str(tmp_path / "ck")).endswith("step-00000003")


def test_other_signals_and_failed_requeues_do_not_requeue(tmp_path, monkeypatch, caplog):
    record = _stub_scontrol(tmp_path, monkeypatch, rc=1)
    res = mt.train(range(1, 50), PreemptedAt(2, "SIGTERM"), config=cfg(tmp_path / "a", iterations=20))
    assert res.status == "signal" and not record.exists()
    with caplog.at_level(logging.ERROR, logger="mlutils.train"):
        res = mt.train(range(1, 50), PreemptedAt(2), config=cfg(tmp_path / "b", iterations=20))
    assert res.status == "signal" and record.read_text() == "requeue 4242\n"
    assert any("scontrol requeue 4242` failed" in m for m in _messages(caplog, logging.ERROR))
    res = mt.train(range(1, 50), PreemptedAt(2), config=cfg(tmp_path / "c", iterations=20, requeue=False))
    assert res.status == "signal"
