"""mlutils.train with 2 processes (gloo, torchrun): stdin commands reach every rank, SIGTERM on one rank stops all."""
import os
import signal
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if os.environ.get("MLUTILS_NO_TORCH") == "1":
    pytest.skip("the training loop trains torch models", allow_module_level=True)
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

import mlutils.train as mt  # noqa: E402
from test_train import Run, _kill_leftover_drivers, assert_same_weights  # noqa: E402,F401  (the fixture kills leftovers)

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


def torchrun(args, stdin=subprocess.PIPE):
    # Run() puts sys.executable before the driver: torchrun takes the script path and its arguments
    return Run(args, stdin=stdin, prefix=(*TORCHRUN, "--no-python"))


def load(folder, rank):
    return torch.load(os.path.join(folder, f"rank-{rank:05d}-of-00002.pt"), weights_only=True)


def test_two_ranks_sigterm_on_one_rank_then_exact_resume(tmp_path):
    total = 40
    ref = torchrun(["--ckpt", tmp_path / "ref", "--iterations", total], stdin=subprocess.DEVNULL)
    assert ref.finish() == 0, "\n".join(ref.err[-40:])
    ref_ck = ref.result()["checkpoint"]
    common = ["--ckpt", tmp_path / "ck", "--iterations", total, "--save-frequency", 6]
    r = torchrun([*common, "--sleep", 0.05], stdin=subprocess.DEVNULL)
    r.wait_for(lambda: any(e.startswith("PID rank 1") for e in r.err))
    r.wait_step(total // 2)
    pid = int(next(e for e in r.err if e.startswith("PID rank 1")).split()[-1])
    os.kill(pid, signal.SIGTERM)  # rank 1 only: rank 0 must stop at the same step
    assert r.finish() == 0, "\n".join(r.err[-40:])
    first = r.result()
    assert first["status"] == "signal"  # rank 0 got no signal itself: it reports none
    stopped = first["step"]
    assert total // 2 <= stopped < total
    folder = mt.latest_checkpoint(str(tmp_path / "ck"))
    assert folder == first["checkpoint"] and load(folder, 0)["step"] == load(folder, 1)["step"] == stopped
    second = torchrun(common, stdin=subprocess.DEVNULL)
    assert second.finish() == 0, "\n".join(second.err[-40:])
    assert second.result()["resumed_from"] == folder
    for rank in (0, 1):
        assert_same_weights(load(ref_ck, rank), load(second.result()["checkpoint"], rank))


def test_two_ranks_stdin_commands_reach_every_rank(tmp_path):
    r = torchrun(["--ckpt", tmp_path, "--iterations", 100000, "--sleep", 0.05, "--keep-last", 0])
    r.wait_step(3)
    r.send("lr 0.02")
    r.send("save")
    r.send("nonsense")
    r.send("quit@12")
    assert r.finish() == 0, "\n".join(r.err[-40:])
    res = r.result()
    assert res["status"] == "quit" and res["step"] == 12 and res["world"] == 2
    assert "unknown command 'nonsense'" in "\n".join(r.err)
    saved = mt.find_checkpoints(str(tmp_path))
    assert len(saved) == 2 and saved[-1][0] == 12
    for rank in (0, 1):
        st = load(saved[-1][1], rank)
        assert st["rank"] == rank and st["engines"]["model"]["optimizer"]["param_groups"][0]["lr"] == 0.02
