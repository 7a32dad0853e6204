"""mlutils.train.loggers against the real trackers: TensorBoard event files read back with TensorBoard's own
readers.  Tests of a tracker skip when it is not installed (``pip install 'mlutils[tensorboard]'``)."""
import fractions
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import mlutils
from mlutils.train import Logger, LoggerDependencyError, TensorBoardLogger, flatten

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
            "from mlutils.train import TensorBoardLogger, Logger, flatten\n"
            "sys.modules.pop('tensorboard'); sys.modules.pop('wandb')\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'wandb')\n"
            "             or m.startswith('torch.utils.tensorboard'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("blocked,make,extra", [
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
