"""scripts/gpu_train_check.py, the training section of scripts/gpu_check.sh: its CPU mode (gloo, one
torchrun rank) resumes FSDP2 under TorchEngine and DeepSpeed ZeRO-2 under DeepSpeedEngine exactly; its
verdicts (a resume that differs, ends elsewhere or starts from elsewhere fails the check); gpu_check.sh
parses.  No GPU is needed: the GPU mode runs the same code with cuda and NCCL."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_train_check.py")
if not os.path.isfile(SCRIPT):  # a source distribution ships tests/ but not scripts/
    pytest.skip("scripts/ is not here (a source distribution)", allow_module_level=True)


def _torch():
    if os.environ.get("MLUTILS_NO_TORCH") == "1":
        pytest.skip("MLUTILS_NO_TORCH=1: running as without torch")
    torch = pytest.importorskip("torch")
    return torch


def _script():
    spec = importlib.util.spec_from_file_location("gpu_train_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_cpu_mode_resumes_fsdp2_and_deepspeed_exactly(tmp_path):
    torch = _torch()
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    engines = ["fsdp2"] + (["deepspeed"] if importlib.util.find_spec("deepspeed") else [])
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "runs"
    p = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--engines", ",".join(engines), "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=580)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert "on cpu with gloo, 1 rank(s), quit@3 of 6 steps" in p.stdout
    rows = {line.split()[0]: line.split() for line in p.stdout.splitlines()
            if line.split() and line.split()[0] in engines}
    assert sorted(rows) == sorted(engines)
    for engine, (_name, steps, size, ok, diff) in rows.items():
        assert (steps, ok, float(diff)) == ("3+3", "yes", 0.0), engine
        assert int(size) == sum(f.stat().st_size for f in (out / engine / f"{engine}-ckpt" / "step-00000003").rglob("*")
                                if f.is_file())
        run = json.loads((out / engine / f"{engine}-run-rank0.json").read_text())
        assert (run["backend"], run["world"], run["device"]) == ("gloo", 1, "cpu")
        assert (run["stopped"]["status"], run["stopped"]["step"]) == ("quit", 3)
        resumed = json.loads((out / engine / f"{engine}-resume-rank0.json").read_text())["resumed"]
        assert resumed["resumed_from"].endswith("step-00000003") and resumed["step"] == 6
    if "deepspeed" in rows:  # DeepSpeed's own files are in the checkpoint
        assert (out / "deepspeed" / "deepspeed-ckpt" / "step-00000003" / "model" / "state").is_dir()


def _fake_launch(mod, torch, resumed_weights, resumed_from="step-00000003", stopped=("quit", 3)):
    """A _launch that writes what the workers would, the resumed weights as given."""
    ref = {"a.weight": torch.ones(2, 3), "a.bias": torch.zeros(2)}

    def launch(args, engine, phase, out):
        if phase == "run":
            step_dir = os.path.join(out, f"{engine}-ckpt", "step-00000003")
            os.makedirs(step_dir)
            with open(os.path.join(step_dir, "rank-00000-of-00001.pt"), "wb") as fh:
                fh.write(b"x" * 123)
            torch.save(ref, os.path.join(out, f"{engine}-reference.pt"))
            got = {"backend": "gloo", "world": 1, "device": "cpu",
                   "reference": {"status": "completed", "step": 6, "resumed_from": None, "checkpoint": None},
                   "stopped": {"status": stopped[0], "step": stopped[1], "resumed_from": None, "checkpoint": None}}
        else:
            torch.save(resumed_weights(ref), os.path.join(out, f"{engine}-resumed.pt"))
            got = {"resumed": {"status": "completed", "step": 6, "checkpoint": None,
                               "resumed_from": os.path.join(out, resumed_from) if resumed_from else None}}
        with open(os.path.join(out, f"{engine}-{phase}-rank0.json"), "w", encoding="utf-8") as fh:
            json.dump(got, fh)
        return None

    return launch


def test_the_verdict_follows_the_runs(tmp_path, monkeypatch, capsys):
    torch = _torch()
    mod = _script()
    args = mod._args(["--device", "cpu"])

    def row(name, **kw):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.setattr(mod, "_launch", _fake_launch(mod, torch, **kw))
        return mod.check(args, "fsdp2", str(folder))

    same = row("same", resumed_weights=lambda ref: {k: v.clone() for k, v in ref.items()})
    assert (same.ok, same.max_abs_diff, same.checkpoint_bytes, same.steps) == (True, 0.0, 123, "3+3")
    assert mod.report([same]) == 0
    off = row("off", resumed_weights=lambda ref: dict(ref, **{"a.bias": ref["a.bias"] + 0.5}))
    assert not off.ok and off.max_abs_diff == 0.5 and "differ" in off.problem
    assert mod.report([same, off]) == 1
    assert "fsdp2: the resumed weights differ from the reference's by up to 0.5" in capsys.readouterr().out
    renamed = row("renamed", resumed_weights=lambda ref: {"b.weight": ref["a.weight"], "a.bias": ref["a.bias"]})
    assert not renamed.ok and renamed.max_abs_diff is None and "other names or shapes" in renamed.problem
    fresh = row("fresh", resumed_weights=lambda ref: ref, resumed_from=None)
    assert not fresh.ok and "started from None" in fresh.problem
    late = row("late", resumed_weights=lambda ref: ref, stopped=("completed", 6))
    assert not late.ok and "the stopped run ended completed at 6" in late.problem
    assert mod.report([]) == 1  # nothing checked is no pass


def test_a_failed_launch_is_a_failed_row(tmp_path, monkeypatch):
    _torch()
    mod = _script()
    args = mod._args(["--device", "cpu"])
    monkeypatch.setattr(mod, "_launch", lambda a, e, phase, o: f"{phase}: torchrun exited 1\nboom")
    r = mod.check(args, "deepspeed", str(tmp_path))
    assert not r.ok and r.problem.startswith("run: torchrun exited 1") and r.checkpoint_bytes is None
    assert "NO" in mod.table([r]).splitlines()[1]


def test_bad_arguments_are_refused(capsys):
    mod = _script()
    for argv, msg in ((["--engines", "fsdp3"], "unknown ['fsdp3']"), (["--stop-at", "6"], "--stop-at must be"),
                      (["--nproc-per-node", "0"], ">= 1"), (["--atol", "-1"], "--atol must be >= 0"),
                      (["--device", "tpu"], "invalid choice")):
        with pytest.raises(SystemExit) as exc:
            mod._args(argv)
        assert exc.value.code == 2
        assert msg in capsys.readouterr().err, argv


def test_gpu_check_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    p = subprocess.run([bash, "-n", os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with open(os.path.join(ROOT, "scripts", "gpu_check.sh"), encoding="utf-8") as fh:
        text = fh.read()
    assert "== train: FSDP2 and DeepSpeed on one GPU with NCCL" in text
    assert "scripts/gpu_train_check.py --device cuda --nproc-per-node 1" in text
