"""mlutils.train on the engines users grow into, with 2 real ranks (torchrun, gloo, CPU): DDP, FSDP1 and
FSDP2 stop at a step and resume to the end bit-identical to an uninterrupted run (full weights and
optimizer state); every rank reports the same global grad_norm, the same under every wrapper; a sharded
checkpoint is a torch.distributed.checkpoint folder that resumes on another number of ranks; DDP's
replicated state is written once."""
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if os.environ.get("MLUTILS_NO_TORCH") == "1":
    pytest.skip("the training loop trains torch models", allow_module_level=True)
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

# several torch processes a test: they exercise torch and the loop, not the C core, so the
# sanitizer pass leaves them out (scripts/asan.sh)
pytestmark = pytest.mark.heavy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "dist_engines_driver.py")


def launch(kind, ranks, ckpt, iterations, out, *events, loaded=None, results=True, fails=False):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    if loaded is not None:
        env["LOADED_WEIGHTS"] = str(loaded)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(ranks), DRIVER, kind, str(ckpt), str(iterations), str(out), *events],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if fails:
        assert p.returncode != 0, p.stdout[-2000:]
        return p
    assert p.returncode == 0, p.stderr[-4000:]
    got = {}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            _, rank, text = line.split(" ", 2)
            got[int(rank)] = json.loads(text)
    assert sorted(got) == (list(range(ranks)) if results else []), p.stdout
    return got


def same_state(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sorted(a["model"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # the model's own names
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optim"]["state"], b["optim"]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for k in sa[i]:
            if torch.is_tensor(sa[i][k]):
                assert torch.equal(sa[i][k], sb[i][k]), (i, k)


def stop_and_resume(tmp_path, kind):
    ref = launch(kind, 2, tmp_path / "ref", 6, tmp_path / "ref.pt")
    cut = launch(kind, 2, tmp_path / "ck", 6, tmp_path / "cut.pt", "quit@3")
    assert {r["status"] for r in cut.values()} == {"quit"}
    again = launch(kind, 2, tmp_path / "ck", 6, tmp_path / "again.pt")
    assert {r["resumed_from"] for r in again.values()} == {str(tmp_path / "ck" / "step-00000003")}
    same_state(tmp_path / "ref.pt", tmp_path / "again.pt")
    norms = {r["metrics"]["grad_norm"] for r in ref.values()}
    assert len(norms) == 1  # the global norm, the same on every rank
    return norms.pop()


def test_fsdp2_stop_and_resume_is_exact_and_sharded(tmp_path):
    norm = stop_and_resume(tmp_path, "fsdp2")
    step = tmp_path / "ck" / "step-00000004"
    assert sorted(os.listdir(step)) == ["model", "rank-00000-of-00002.pt", "rank-00001-of-00002.pt"]
    assert ".metadata" in os.listdir(step / "model")  # a torch.distributed.checkpoint folder
    small = [torch.load(step / f"rank-0000{r}-of-00002.pt", weights_only=True) for r in (0, 1)]
    assert all("model" not in s["engines"]["model"] for s in small)  # the shards live in the DCP folder only
    # the export holds the full weights with the model's own names
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "ref" / "export-00000006.safetensors"))
    full = torch.load(tmp_path / "ref.pt", weights_only=True)["model"]
    assert exported.keys() == full.keys() and all(torch.equal(exported[k], full[k]) for k in full)
    assert norm > 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp1"])
def test_ddp_and_fsdp1_stop_and_resume_is_exact(tmp_path, kind):
    stop_and_resume(tmp_path, kind)


def test_ddp_writes_the_replicated_state_once_and_grad_norms_agree(tmp_path):
    ddp = launch("ddp", 2, tmp_path / "ddp", 2, tmp_path / "ddp.pt")
    fsdp = launch("fsdp2", 2, tmp_path / "fsdp", 2, tmp_path / "fsdp.pt")
    n_ddp = {r["metrics"]["grad_norm"] for r in ddp.values()}
    n_fsdp = {r["metrics"]["grad_norm"] for r in fsdp.values()}
    assert len(n_ddp) == len(n_fsdp) == 1
    assert abs(n_ddp.pop() - n_fsdp.pop()) < 1e-5
    step = tmp_path / "ddp" / "step-00000002"
    r0 = torch.load(step / "rank-00000-of-00002.pt", weights_only=True)["engines"]["model"]
    r1 = torch.load(step / "rank-00001-of-00002.pt", weights_only=True)["engines"]["model"]
    assert "model" in r0 and "optimizer" in r0 and r1 == {"replica_of_rank": 0}
    assert sorted(r0["model"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # no "module." prefix


@pytest.mark.parametrize("ranks", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_a_sharded_checkpoint_of_2_ranks_resumes_on_another_number(tmp_path, ranks):
    launch("fsdp2", 2, tmp_path / "ck", 6, tmp_path / "two.pt", "quit@3")
    got = launch("fsdp2", ranks, tmp_path / "ck", 3, tmp_path / "other.pt", loaded=3)
    assert {r["resumed_from"] for r in got.values()} == {str(tmp_path / "ck" / "step-00000003")}
    same_state(tmp_path / "two.pt", tmp_path / "other.pt")  # resharded exactly


@pytest.mark.slow  # two more launches; one ended once in an abort in torch's teardown (exit -6)
def test_a_checkpoint_written_by_plain_dcp_save_loads_through_resume(tmp_path, monkeypatch):
    folder = tmp_path / "theirs"
    monkeypatch.setenv("PLAIN_DCP", str(folder))
    launch("fsdp2", 2, tmp_path / "unused", 0, tmp_path / "theirs.pt", results=False)
    monkeypatch.delenv("PLAIN_DCP")
    monkeypatch.setenv("RESUME", str(folder))
    launch("fsdp2", 2, tmp_path / "ck", 0, tmp_path / "loaded.pt", loaded=0)
    a = torch.load(tmp_path / "theirs.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "loaded.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_rank_killed_during_an_async_sharded_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """Rank 1 is killed (-9) inside DCP's background writer while step 4 is saved: that folder never counts
    as complete, every rank resumes step 2 with resume='auto', and the run ends as an uninterrupted one
    (step 2's copy was staged slowly in the background: the step after it waited before changing the state)."""
    ref = launch("fsdp2", 2, tmp_path / "ref", 6, tmp_path / "ref.pt")
    monkeypatch.setenv("KILL_AT", "4")
    monkeypatch.setenv("SLOW_STAGING", "1")  # step 3 must wait for step 2's staged copy before it changes the state
    launch("fsdp2", 2, tmp_path / "ck", 6, tmp_path / "killed.pt", fails=True)
    monkeypatch.delenv("KILL_AT")
    monkeypatch.delenv("SLOW_STAGING")
    from mlutils.train import find_checkpoints

    assert os.path.isdir(tmp_path / "ck" / "step-00000004" / "model")  # the save had started
    assert [s for s, _ in find_checkpoints(str(tmp_path / "ck"))] == [2]
    again = launch("fsdp2", 2, tmp_path / "ck", 6, tmp_path / "again.pt")
    assert {r["resumed_from"] for r in again.values()} == {str(tmp_path / "ck" / "step-00000002")}
    same_state(tmp_path / "ref.pt", tmp_path / "again.pt")
    assert {r["metrics"]["grad_norm"] for r in again.values()} == {r["metrics"]["grad_norm"] for r in ref.values()}


def test_without_background_staging_a_sharded_save_is_written_in_place(tmp_path, monkeypatch):
    """A torch without DCP's DefaultStager (before 2.9): the sharded part of a periodic save is written by
    dcp.save on the training thread, and the run still resumes exactly."""
    monkeypatch.setenv("NO_BACKGROUND_STAGING", "1")
    launch("fsdp2", 1, tmp_path / "ref", 4, tmp_path / "ref.pt")
    launch("fsdp2", 1, tmp_path / "ck", 4, tmp_path / "cut.pt", "quit@3")
    assert ".metadata" in os.listdir(tmp_path / "ck" / "step-00000002" / "model")  # the periodic save
    again = launch("fsdp2", 1, tmp_path / "ck", 4, tmp_path / "again.pt")
    assert {r["resumed_from"] for r in again.values()} == {str(tmp_path / "ck" / "step-00000003")}
    same_state(tmp_path / "ref.pt", tmp_path / "again.pt")
