"""mlutils.train.loggers against the real trackers: TensorBoard event files read back with TensorBoard's own
readers, W&B runs in offline mode read back from their transaction log with W&B's own protobuf schema.
Tests of a tracker skip when it is not installed (``pip install 'mlutils[tensorboard,wandb]'``)."""
import fractions
import glob
import logging
import math
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import mlutils
from mlutils.train import Logger, LoggerDependencyError, TensorBoardLogger, WandbLogger, flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# flatten


def test_flatten_nested_numbers_and_what_is_left_out():
    skipped = []
    line = {"step": 10, "epoch": 0, "loss": 0.5, "lr": 1e-3, "ok": True, "tokens": np.int64(4096),
            "gnorm": np.float32(2.5), "one": np.array([[7.0]]), "zero_dim": np.array(3),
            "big": 1 << 70, "nan": math.nan, "third": fractions.Fraction(1, 3),
            "eval": {"loss": 0.4, "acc": 0.9, "step": 3, "per_class": {"cat": 1.0}},
            "name": "warmup", "none": None, "hist": [1, 2], "vec": np.zeros(3), "z": 1j, "when": np.datetime64(0, "s"),
            5: 1.5}
    flat = flatten(line, skipped=skipped)
    assert flat == {"epoch": 0, "loss": 0.5, "lr": 1e-3, "ok": 1, "tokens": 4096, "gnorm": 2.5, "one": 7.0,
                    "zero_dim": 3, "big": float(1 << 70), "nan": flat["nan"], "third": 1 / 3,
                    "eval/loss": 0.4, "eval/acc": 0.9, "eval/step": 3, "eval/per_class/cat": 1.0, "5": 1.5}
    assert math.isnan(flat["nan"])
    for key in ("ok", "tokens", "zero_dim", "epoch"):
        assert type(flat[key]) is int, key
    for key in ("gnorm", "one", "big", "third"):
        assert type(flat[key]) is float, key
    assert skipped == ["name", "none", "hist", "vec", "z", "when"]
    assert flatten({"eval": {"loss": 1}}, sep=".") == {"eval.loss": 1}
    assert flatten({"step": 1}) == {}


def test_flatten_tensors(torch):
    line = {"loss": torch.tensor(0.25), "n": torch.tensor([3]), "flag": torch.tensor(True),
            "grad": torch.tensor(1.5, requires_grad=True) * 2, "vec": torch.ones(2), "c": torch.tensor(1j)}
    skipped = []
    assert flatten(line, skipped=skipped) == {"loss": 0.25, "n": 3, "flag": 1, "grad": 3.0}
    assert skipped == ["vec", "c"]


def test_importing_mlutils_train_needs_no_tracker():
    code = ("import sys\n"
            "sys.modules['tensorboard'] = sys.modules['wandb'] = None\n"
            "import mlutils.train\n"
            "from mlutils.train import TensorBoardLogger, WandbLogger, Logger, flatten\n"
            "sys.modules.pop('tensorboard'); sys.modules.pop('wandb')\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'wandb')\n"
            "             or m.startswith('torch.utils.tensorboard'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("blocked,make,extra", [
    (("wandb",), lambda tmp: WandbLogger(project="p"), "wandb"),
    (("torch.utils.tensorboard", "tensorboard"), lambda tmp: TensorBoardLogger(tmp), "tensorboard"),
    (("torch",), lambda tmp: TensorBoardLogger(tmp), "torch"),
])
def test_missing_tracker_is_an_import_error_naming_the_extra(request, monkeypatch, tmp_path, blocked, make, extra):
    if extra == "tensorboard":
        request.getfixturevalue("torch")  # without torch, torch is what is named
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails as when it is not installed
    with pytest.raises(LoggerDependencyError) as info:
        make(tmp_path)
    assert isinstance(info.value, ImportError) and isinstance(info.value, mlutils.MlutilsError)
    assert f"pip install 'mlutils[{extra}]'" in str(info.value)
    assert info.value.name == blocked[0]
    assert isinstance(info.value.__cause__, ImportError)


# ---------------------------------------------------------------------------
# TensorBoard


@pytest.fixture
def tensorboard(torch):
    return pytest.importorskip("tensorboard")


def _legacy_reader(log_dir):
    """{tag: [(step, value)]} as TensorBoard's EventAccumulator reads the folder."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()[event_accumulator.SCALARS]}


def _server_reader(log_dir):
    """The same as the reader behind `tensorboard --load_fast=false` sees it (scalars held as tensors)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.util import tensor_util

    acc = plugin_event_accumulator.EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


READERS = pytest.mark.parametrize("read", [_legacy_reader, _server_reader], ids=["EventAccumulator", "server"])


def _f32(x):
    return float(np.float32(x))  # TensorBoard keeps scalars as float32


@READERS
def test_tensorboard_lines_read_back(tensorboard, tmp_path, caplog, read):
    logger = TensorBoardLogger(tmp_path / "tb", flush_secs=1)
    assert isinstance(logger, Logger)
    with caplog.at_level(logging.WARNING, logger="mlutils.train"):
        for step in (10, 20):
            logger.log({"step": step, "epoch": 0, "loss": 1 / step, "lr": 1e-3, "phase": "warmup"}, step)
            logger.log({"step": step, "eval": {"loss": 2 / step, "acc": 0.5 + step / 100}}, step)
    logger.close()
    logger.close()  # again: nothing
    with pytest.raises(RuntimeError, match="closed"):
        logger.log({"loss": 1.0}, 30)
    assert [r.getMessage() for r in caplog.records if "phase" in r.getMessage()] == [
        "TensorBoardLogger: 'phase' at step 10 not a number: not logged (said once per key)"]
    scalars = read(tmp_path / "tb")
    assert sorted(scalars) == ["epoch", "eval/acc", "eval/loss", "loss", "lr"]
    assert scalars["loss"] == [(10, _f32(0.1)), (20, _f32(0.05))]
    assert scalars["eval/acc"] == [(10, _f32(0.6)), (20, _f32(0.7))]
    assert scalars["lr"] == [(10, _f32(1e-3)), (20, _f32(1e-3))]


def _crashed_run(log_dir, last=10):
    run = TensorBoardLogger(log_dir)
    for step in range(1, last + 1):
        run.log({"step": step, "loss": float(step), "eval": {"acc": step / 100}}, step)
    run.close()  # what a killed run flushed


def _check_resumed(scalars):
    # each step once; 7..12 from the resumed run; eval/acc, which the resumed run did not log again,
    # keeps only what the checkpoint covers
    assert scalars["loss"] == [(s, float(s)) for s in range(1, 7)] + [(s, 100.0 + s) for s in range(7, 13)]
    assert scalars["eval/acc"] == [(s, _f32(s / 100)) for s in range(1, 7)]


@READERS
def test_tensorboard_resume_drops_what_the_crashed_run_logged_past_the_checkpoint(tensorboard, tmp_path, read):
    _crashed_run(tmp_path)
    resumed = TensorBoardLogger(tmp_path)  # a new process, resumed from the checkpoint of step 6
    resumed.resume(6)
    for step in range(7, 13):
        resumed.log({"step": step, "loss": 100.0 + step}, step)
    resumed.close()
    _check_resumed(read(tmp_path))


@READERS
def test_tensorboard_resume_in_the_same_logger(tensorboard, tmp_path, read):
    logger = TensorBoardLogger(tmp_path)
    for step in range(1, 11):
        logger.log({"step": step, "loss": float(step), "eval": {"acc": step / 100}}, step)
    logger.resume(6)
    for step in range(7, 13):
        logger.log({"step": step, "loss": 100.0 + step}, step)
    logger.close()
    _check_resumed(read(tmp_path))


@READERS
def test_tensorboard_resume_mark_is_written_even_if_nothing_follows(tensorboard, tmp_path, read):
    _crashed_run(tmp_path)
    resumed = TensorBoardLogger(tmp_path)
    resumed.resume(6)  # e.g. resumed at the last step: nothing left to log
    resumed.close()
    assert read(tmp_path)["loss"] == [(s, float(s)) for s in range(1, 7)]


@READERS
def test_tensorboard_fresh_run_in_a_used_folder_replaces_the_old_one(tensorboard, tmp_path, read):
    # as a fresh start empties metrics_file: the folder holds one training run
    _crashed_run(tmp_path)
    fresh = TensorBoardLogger(tmp_path)
    for step in (1, 2):
        fresh.log({"step": step, "loss": -float(step)}, step)
    fresh.close()
    scalars = read(tmp_path)
    assert scalars["loss"] == [(1, -1.0), (2, -2.0)]
    assert scalars.get("eval/acc", []) == []


def test_tensorboard_resume_checks(tensorboard, tmp_path):
    logger = TensorBoardLogger(tmp_path)
    with pytest.raises(ValueError, match="step must be >= 0"):
        logger.resume(-1)
    logger.close()
    with pytest.raises(RuntimeError, match="closed"):
        logger.resume(3)


# ---------------------------------------------------------------------------
# Weights & Biases (offline)


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """wandb writing only under tmp_path, offline; its service process ended after the test."""
    wandb = pytest.importorskip("wandb")
    for var, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path, "WANDB_SILENT": "true",
                       "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_CACHE_DIR": tmp_path / "cache",
                       "WANDB_DATA_DIR": tmp_path / "data", "WANDB_CONSOLE": "off",
                       "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true"}.items():
        monkeypatch.setenv(var, str(value))
    yield wandb
    wandb.teardown()


def _wandb_records(path):
    """The records of a run's transaction log (``run-<id>.wandb``): a ':W&B' header, then LevelDB-log
    framing (32 KiB blocks; 7-byte chunk headers: crc, length, type full/first/middle/last), each record a
    ``wandb_internal_pb2.Record``.  A torn tail (a log still being written) ends the list."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if len(chunk) < length or kind == 0:
            break
        assert kind in (1, 2, 3, 4), (path, pos, kind, length)
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _finished_records(path, timeout=30.0):
    """The records of a finished run's log.  run.finish() returns once wandb's service has the exit
    record; the service writes the log out when it closes the run's stream, just after."""
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s ({len(records)} records)"
        time.sleep(0.05)


def _offline_runs(root):
    """[(run id, {step: {key: value}})] for each offline run folder under root, in order of start."""
    import json

    runs = []
    for path in glob.glob(os.path.join(str(root), "wandb", "offline-run-*", "run-*.wandb")):
        run_id, start, rows = None, None, {}
        for record in _finished_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id, start = record.run.run_id, record.run.start_time.ToNanoseconds()
            elif kind == "history":
                row = rows.setdefault(record.history.step.num, {})
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        row[key] = json.loads(item.value_json)
        runs.append((start, run_id, rows))
    return [(run_id, rows) for _start, run_id, rows in sorted(runs, key=lambda r: r[0])]


def test_wandb_lines_read_back(wandb_offline, tmp_path, caplog):
    logger = WandbLogger(project="mlutils-test", config={"lr": 1e-3})
    assert isinstance(logger, Logger)
    run_id = logger.state_dict()["run_id"]  # chosen before the run starts
    with caplog.at_level(logging.WARNING, logger="mlutils.train"):
        for step in (10, 20):
            logger.log({"step": step, "epoch": 0, "loss": 1 / step, "lr": 1e-3, "phase": "warmup"}, step)
            logger.log({"step": step, "eval": {"loss": 2 / step, "acc": np.float32(0.5)}}, step)
    assert logger.run.id == run_id
    logger.close()
    logger.close()  # again: nothing
    with pytest.raises(RuntimeError, match="closed"):
        logger.log({"loss": 1.0}, 30)
    assert [r.getMessage() for r in caplog.records if "phase" in r.getMessage()] == [
        "WandbLogger: 'phase' at step 10 not a number: not logged (said once per key)"]
    [(read_id, rows)] = _offline_runs(tmp_path)
    assert read_id == run_id
    # the training line and the evaluation line of a step fill one row at that step
    assert rows == {10: {"epoch": 0, "loss": 0.1, "lr": 1e-3, "eval/loss": 0.2, "eval/acc": 0.5},
                    20: {"epoch": 0, "loss": 0.05, "lr": 1e-3, "eval/loss": 0.1, "eval/acc": 0.5}}


def test_wandb_resume_continues_the_run_of_the_checkpoint(wandb_offline, tmp_path):
    first = WandbLogger(project="mlutils-test")
    for step in range(1, 6):
        first.log({"step": step, "loss": float(step)}, step)
    state = first.state_dict()
    first.close()
    assert state == {"run_id": first.run_id}

    resumed = WandbLogger(project="mlutils-test")  # a new process: a new id until the checkpoint's is loaded
    assert resumed.state_dict() != state
    resumed.load_state_dict(state)
    resumed.load_state_dict(dict(state))  # again, same id: nothing
    run = resumed.start()
    assert run.id == state["run_id"] and run.settings.resume == "allow"
    with pytest.raises(RuntimeError, match="already started"):
        resumed.load_state_dict({"run_id": "otherrun"})
    for step in range(6, 9):
        resumed.log({"step": step, "loss": 10.0 + step}, step)
    assert resumed.state_dict() == state
    resumed.close()

    runs = _offline_runs(tmp_path)  # one offline folder per process, the same run id
    assert [r[0] for r in runs] == [state["run_id"]] * 2
    assert runs[0][1] == {s: {"loss": float(s)} for s in range(1, 6)}
    assert runs[1][1] == {s: {"loss": 10.0 + s} for s in range(6, 9)}


def test_wandb_start_with_a_state_and_a_resume_of_the_caller(wandb_offline, tmp_path):
    logger = WandbLogger(project="mlutils-test", resume="must", fork_from="abc?_step=3")
    run = logger.start({"run_id": "given-run_1"})
    assert run.id == "given-run_1" and run.settings.resume == "must" and run.settings.fork_from is None
    logger.close()


@pytest.mark.parametrize("state", [None, {}, {"run": "x"}, {"run_id": ""}, {"run_id": 5}, {"run_id": "a/b"},
                                   {"run_id": " a"}, {"run_id": "a\n"}, {"run_id": "x" * 129}, ["run_id"]])
def test_wandb_bad_state_is_a_value_error(wandb_offline, state):
    logger = WandbLogger(project="mlutils-test")
    with pytest.raises(ValueError, match="WandbLogger"):
        logger.load_state_dict(state)
    assert logger.run is None
    with pytest.raises(ValueError, match="id= argument"):
        WandbLogger(id="a:b")
