"""mlutils.train with 2 processes (gloo, torchrun): stdin commands reach every rank, SIGTERM on one rank stops all."""
import os
import shutil
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


def sigterm_rank1(common, total):
    """A 2-rank run of `common` stopped by SIGTERM to rank 1 alone past step total // 2: its result."""
    r = torchrun([*common, "--sleep", 0.05], stdin=subprocess.DEVNULL)
    r.wait_for(lambda: any(e.startswith("PID rank 1") for e in r.err))
    r.wait_step(total // 2)
    pid = int(next(e for e in r.err if e.startswith("PID rank 1")).split()[-1])
    os.kill(pid, signal.SIGTERM)  # rank 1 only: rank 0 must stop at the same step
    assert r.finish() == 0, "\n".join(r.err[-40:])
    res = r.result()
    assert res["status"] == "signal"  # rank 0 got no signal itself: it reports none
    assert total // 2 <= res["step"] < total
    return res


def test_two_ranks_sigterm_on_one_rank_saves_what_an_uninterrupted_run_has(tmp_path):
    """The default run's form of the slow test below, with two launches instead
    of three: the checkpoint that SIGTERM on rank 1 leaves holds, for each
    rank, the state that both ranks resumed from the run's last periodic
    checkpoint reach at that step without interruption (weights, optimizer,
    sampler, RNG)."""
    total = 40
    first = sigterm_rank1(["--ckpt", tmp_path / "ck", "--iterations", total, "--save-frequency", 6], total)
    stopped = first["step"]
    saved = mt.find_checkpoints(str(tmp_path / "ck"))
    assert saved[-1] == (stopped, first["checkpoint"])
    _, start = [c for c in saved if c[0] < stopped][-1]  # a periodic save, before the signal
    shutil.copytree(start, tmp_path / "again" / os.path.basename(start))
    again = torchrun(["--ckpt", tmp_path / "again", "--iterations", stopped, "--save-frequency", 6],
                     stdin=subprocess.DEVNULL)
    assert again.finish() == 0, "\n".join(again.err[-40:])
    res = again.result()
    assert res["status"] == "completed" and res["step"] == stopped
    assert res["resumed_from"] == str(tmp_path / "again" / os.path.basename(start))
    for rank in (0, 1):
        a, b = load(first["checkpoint"], rank), load(res["checkpoint"], rank)
        assert a["step"] == b["step"] == stopped and a["rank"] == b["rank"] == rank
        assert_same_weights(a, b)
        assert _same(a["sampler"], b["sampler"]) and _same(a["rng"], b["rng"]), rank


def _same(a, b):
    """Equal nested states (dicts, lists, tensors, numbers)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return type(a) is type(b) and a == b


@pytest.mark.slow  # three 2-rank launches (20-50 s); the test above is its fast form
def test_two_ranks_sigterm_on_one_rank_then_exact_resume(tmp_path):
    total = 40
    ref = torchrun(["--ckpt", tmp_path / "ref", "--iterations", total], stdin=subprocess.DEVNULL)
    assert ref.finish() == 0, "\n".join(ref.err[-40:])
    ref_ck = ref.result()["checkpoint"]
    common = ["--ckpt", tmp_path / "ck", "--iterations", total, "--save-frequency", 6]
    first = sigterm_rank1(common, total)
    stopped = first["step"]
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
