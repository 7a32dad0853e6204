"""mlutils.train.DeepSpeedEngine over real DeepSpeed (ZeRO-2, torch Adam) on 2 gloo ranks on the CPU, run by
tests/deepspeed_driver.py under torchrun: an exact resume, the lr command, export(), ZeRO-3's export, the
checkpoint files, fine-tuning from a weights file (ZeRO-2 and ZeRO-3), an out-of-memory error on one rank
skipped by both, the loss_scale command on an fp16 engine; and importing mlutils.train without importing
DeepSpeed.

One torchrun launch (about a minute: two processes importing torch and DeepSpeed) serves the fast tests;
the resume across processes launches twice and is marked slow."""
import json
import os
import subprocess
import sys

import pytest

# several torch processes a test: they exercise torch and the loop, not the C core, so the
# sanitizer pass leaves them out (scripts/asan.sh)
pytestmark = pytest.mark.heavy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "deepspeed_driver.py")
ITERATIONS, STOP_AT = 7, 4  # as in the driver


def _needs_deepspeed():
    if os.environ.get("MLUTILS_NO_TORCH") == "1":
        pytest.skip("MLUTILS_NO_TORCH=1: running as without torch")
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    pytest.importorskip("deepspeed")
    return torch


def _launch(out, *scenarios):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        DRIVER, str(out), *scenarios], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-5000:])


def _load(out, name, rank):
    import torch

    return torch.load(os.path.join(out, f"{name}-rank{rank}.pt"), weights_only=False)


def _metrics(out, name):
    with open(os.path.join(out, f"{name}-metrics.jsonl"), encoding="utf-8") as fh:
        return [r for r in map(json.loads, fh) if "loss" in r]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The driver's fast scenarios, in one launch: reference, stopped and resumed runs in one process, the lr
    command, ZeRO-3's export, the errors, fine-tuning, out-of-memory steps, fp16's loss scale."""
    _needs_deepspeed()
    out = tmp_path_factory.mktemp("deepspeed")
    _launch(out, "all", "lr", "zero3", "errors", "finetune", "oom", "fp16")
    return out


def _assert_same_run(ref, got):
    import torch

    assert got["status"] == "completed" and got["step"] == ITERATIONS == got["global_steps"]
    assert sorted(got["weights"]) == sorted(ref["weights"])
    for k, v in ref["weights"].items():
        assert torch.equal(v, got["weights"][k]), k
    assert sorted(got["optimizer"]) == sorted(ref["optimizer"]) and got["optimizer"]
    for k, v in ref["optimizer"].items():  # this rank's Adam moments, step and fp32 master partition
        assert torch.equal(v, got["optimizer"][k]), k
    assert got["lrs"] == ref["lrs"] and got["base_lrs"] == ref["base_lrs"]


def _assert_resumed(out):
    ref_lines, stop_lines, res_lines = (_metrics(out, n) for n in ("reference", "stopped", "resumed"))
    assert [r["step"] for r in stop_lines] == list(range(1, STOP_AT + 1))
    assert [r["step"] for r in res_lines] == list(range(STOP_AT + 1, ITERATIONS + 1))
    def timeless(lines):
        return [{k: v for k, v in r.items() if k != "elapsed"} for r in lines]

    assert timeless(stop_lines + res_lines) == timeless(ref_lines)  # losses, lrs, samples: the same lines
    for rank in (0, 1):
        stopped = _load(out, "stopped", rank)
        assert stopped["status"] == "quit" and stopped["step"] == STOP_AT
        resumed = _load(out, "resumed", rank)
        assert resumed["resumed_from"].endswith(f"step-{STOP_AT:08d}")
        _assert_same_run(_load(out, "reference", rank), resumed)


def test_quit_and_resume_is_bit_identical(run):
    # a run quit at step K and resumed (a fresh DeepSpeed engine in the same processes) ends with the weights,
    # Adam moments, fp32 master partitions and learning rates of the uninterrupted run, bit for bit; its steps
    # cross the epoch's short last step (one micro-batch while gradient_accumulation_steps is 2), the lr
    # command moving WarmupLR's peak and DeepSpeed's gradient clipping
    _needs_deepspeed()
    _assert_resumed(run)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_quit_and_resume_in_new_processes_is_bit_identical(tmp_path):
    _needs_deepspeed()
    _launch(tmp_path, "reference", "stopped")
    _launch(tmp_path, "resumed")
    _assert_resumed(tmp_path)


def test_checkpoint_holds_deepspeed_files_under_the_engine_name(run):
    _needs_deepspeed()
    files = _load(run, "resumed", 0)["files"]
    for step in (STOP_AT, 6, ITERATIONS):  # save_frequency=2, the quit and the end
        folder = f"step-{step:08d}"
        assert sorted(f for f in files if f.startswith(folder + "/")) == [f"{folder}/{f}" for f in (
            "model/state/mp_rank_00_model_states.pt", "model/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "model/state/zero_pp_rank_1_mp_rank_00_optim_states.pt", "model/zero_to_fp32.py",
            "model/zero_to_torch.py", "rank-00000-of-00002.pt", "rank-00001-of-00002.pt")]
    assert not any(f.endswith("latest") for f in files)  # the rank files mark a checkpoint complete, not this


def test_lr_command_reaches_deepspeeds_optimizer(run):
    _needs_deepspeed()
    # no scheduler: "lr 0.0025@2" sets the rate the third step uses
    assert [(r["step"], r["lr"]) for r in _metrics(run, "lr")] == [(1, 0.01), (2, 0.01), (3, 0.0025)]
    for rank in (0, 1):
        got = _load(run, "lr", rank)
        assert got["ds_lr"] == [0.0025]                       # engine.get_lr()
        assert got["lrs"] == [0.0025]                         # the ZeRO optimizer's param groups
        assert got["base_lrs"] == [0.0025]                    # the torch Adam it steps
    # WarmupLR (linear from 0 to 0.01 over 3 steps): "lr 0.004@2" sets the rate and moves the peak, which
    # the schedule keeps, also after the resume (DeepSpeed's checkpoint does not hold the peak)
    lines = _metrics(run, "reference")
    warmup = [0.0, 0.0, 0.004, 0.004 * 2 / 3, 0.004, 0.004, 0.004]
    assert [r["lr"] for r in lines] == pytest.approx(warmup, abs=1e-4)  # metrics lines round
    assert [r["lr"] for r in _metrics(run, "resumed")] == [0.004] * (ITERATIONS - STOP_AT)


def test_export_gives_the_modules_weights_by_its_own_names(run):
    torch = _needs_deepspeed()
    for rank in (0, 1):
        got = _load(run, "lr", rank)
        assert sorted(got["weights"]) == sorted(got["module"]) == ["inp.bias", "inp.weight", "out.bias",
                                                                 "out.weight", "scale"]
        for k, v in got["module"].items():
            assert torch.equal(got["weights"][k], v) and got["weights"][k].device.type == "cpu", k


def test_zero3_export_gathers_full_weights_on_the_leader(run):
    torch = _needs_deepspeed()
    z = _load(run, "zero3", 0)
    assert all(s == (0,) for s in z["partitioned"])  # the module's own parameters are partitioned away
    assert sorted(z["first"]) == sorted(z["start"]) == sorted(z["trained"]) == sorted(z["gathered"])
    for k, v in z["start"].items():
        assert torch.equal(z["first"][k], v), k          # the weights it was made with
        assert torch.equal(z["trained"][k], z["gathered"][k]), k
    assert any(not torch.equal(z["trained"][k], z["start"][k]) for k in z["start"])
    assert _load(run, "zero3", 1)["first"] == {}         # gathered, but kept on the leader only


def test_errors_name_the_problem(run):
    _needs_deepspeed()
    with open(os.path.join(run, "errors-rank0.json"), encoding="utf-8") as fh:
        got = json.load(fh)
    assert "holds no DeepSpeed checkpoint" in got["missing"]
    assert "of step 0, the rank file of step 3" in got["step"]
    assert "deepspeed.initialize" in got["type"]
    assert "no loss scaler" in got["scale 8.0"] and "fp16" in got["scale 8.0"]  # an fp32 engine
    assert "finite number > 0" in got["scale 0.0"] and "finite number > 0" in got["scale nan"]
    assert got["skipped"] == ["model"]  # the loss_scale command warns that this engine has none


def _equal(a, b):
    import torch

    assert sorted(a) == sorted(b)
    return all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_from_a_weights_file_matches_loading_before_initialize(run):
    # TrainConfig(init_from=...) loads the weights into the DeepSpeed engine (ZeRO-2 from .safetensors, ZeRO-3
    # from a .pt of {"module": ...}); two steps later weights and fp32 master/Adam partitions are those of a
    # run whose module held the weights before deepspeed.initialize, on every rank
    _needs_deepspeed()
    ranks = [_load(run, "finetune", r) for r in (0, 1)]
    src = ranks[0]["src"]
    for stage in (2, 3):
        for rank, got in enumerate(ranks):
            tuned, ref = got[f"z{stage}"]["tuned"], got[f"z{stage}"]["ref"]
            assert tuned["status"] == "completed" and tuned["step"] == 2
            if stage == 3 and rank == 1:
                assert tuned["weights"] == ref["weights"] == {}  # ZeRO-3 exports on the leader only
                continue
            assert _equal(ref["start"], src)                   # the reference did start from them
            assert _equal(tuned["weights"], ref["weights"]), (stage, rank)
            assert not _equal(tuned["weights"], src)           # and the two steps moved them
            if stage == 2:
                assert _equal(tuned["optimizer"], ref["optimizer"]), rank  # this rank's fp32 and Adam partition
        if stage == 2:
            assert _equal(ranks[0]["z2"]["tuned"]["weights"], ranks[1]["z2"]["tuned"]["weights"])


def test_load_weights_refuses_what_does_not_fit(run):
    _needs_deepspeed()
    for rank in (0, 1):
        got = _load(run, "finetune", rank)
        assert "Unexpected key(s)" in got["z2 extra"] and "extra" in got["z2 extra"]
        assert got["z2 lenient"] == (["scale"], ["extra"])    # strict=False: (missing, unexpected)
        assert "Unexpected key(s) in state_dict: 'extra'" in got["z3 extra"]
        assert "Missing key(s) in state_dict: 'out.bias'" in got["z3 missing"]
        assert "size mismatch for out.weight" in got["z3 shape"] and "(2, 16)" in got["z3 shape"]
        if rank == 0:
            assert got["z3 unchanged"] is True                 # refused before anything was written


def test_out_of_memory_on_one_rank_skips_the_step_on_every_rank(run):
    # loss_fn raises torch.OutOfMemoryError on rank 1 only, in step 2's second micro-batch (after the first
    # one's backward pass): both ranks skip the step and its gradients, the run completes, and weights and
    # optimizer partitions are those of a run that never saw that batch; DeepSpeed's micro-step counter
    # did not keep the dropped micro-batch
    _needs_deepspeed()
    ranks = [_load(run, "oom", r) for r in (0, 1)]
    for stage in (0, 1, 2):
        for got in ranks:
            g = got[stage]
            res, ref = g["run"], g["ref"]
            assert (res["status"], res["step"], res["oom_skipped"], res["global_steps"]) == ("completed", 4, 1, 4)
            assert res["micro_steps"] == ref["micro_steps"] == 8
            assert _equal(res["weights"], ref["weights"]), stage
            assert _equal(res["optimizer"], ref["optimizer"]), stage
        assert _equal(ranks[0][stage]["run"]["weights"], ranks[1][stage]["run"]["weights"])
        lines = _metrics(run, f"oom{stage}")
        assert [(r["step"], r["oom_skipped"]) for r in lines] == [(1, 0), (2, 1), (3, 1), (4, 1)]
    assert ranks[0][0]["optimizer_type"] == "AdamW"          # ZeRO-0: DeepSpeed steps the torch optimizer
    assert ranks[0][2]["optimizer_type"] == "DeepSpeedZeroOptimizer"


def _fp16(run, rank):
    got = _load(run, "fp16", rank)
    if got.get("unsupported"):
        pytest.skip("DeepSpeed's CPU backend has no fp16 on this CPU (no oneDNN fp16 support)")
    return got


def test_loss_scale_command_sets_deepspeeds_fp16_scale(run):
    _needs_deepspeed()
    for rank in (0, 1):
        got = _fp16(run, rank)
        assert got["plain"]["scale"] == got["plain"]["ds_scale"] == 256 and got["plain"]["skipped_steps"] == 0
        # "loss_scale 64@2": the scale steps 3 and 4 run with, kept by the dynamic scaler (no overflow)
        assert got["set"]["scale"] == got["set"]["ds_scale"] == 64 and got["set"]["skipped_steps"] == 0
        # "loss_scale 1e9@1": the fp16 gradients overflow, so DeepSpeed skips steps and lowers the scale
        assert got["huge"]["skipped_steps"] >= 1 and got["huge"]["scale"] < 1e9
    assert [r["scale"] for r in _metrics(run, "fp16set")] == [256, 256, 64, 64]


def test_load_weights_in_fp16_keeps_fp32_master_weights(run):
    import torch

    _needs_deepspeed()
    for rank in (0, 1):
        got = _fp16(run, rank)
        assert sorted(got["master"]) == sorted(k for k in got["src"] if k != "scale")
        for k, v in got["master"].items():
            assert got["module"][k].dtype == torch.float16 and torch.equal(got["module"][k], got["src"][k].half())
            assert v.dtype == torch.float32 and torch.equal(v, got["src"][k]), k  # not the 16-bit copy


def test_importing_mlutils_train_does_not_import_deepspeed():
    code = ("import sys, mlutils.train as mt\n"
            "assert mt.DeepSpeedEngine.__module__ == 'mlutils.train.deepspeed'\n"
            "assert 'DeepSpeedEngine' in mt.__all__\n"
            "bad = sorted(m for m in sys.modules if m == 'deepspeed' or m.startswith('deepspeed.'))\n"
            "assert not bad, bad\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]
