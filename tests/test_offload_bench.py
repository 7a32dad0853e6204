"""bench/offload_gpu.py run on CPU tensors (--device cpu): every step of the
GPU check (correctness, bandwidth, every way of the speed table, the peak
measurement in a child process) runs here, so that the script is known to
work before a machine with a GPU runs it."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "offload_gpu.py")
SMALL = ["--device", "cpu", "--hidden", "64", "--seq", "32", "--layers", "2", "--heads", "4",
         "--steps", "1", "--rounds", "1", "--check-steps", "4", "--copy-mib", "1", "--min-bytes", "0"]


def _run(args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _ways():
    """The ways the script knows, as its own refusal of an unknown one lists them (run as a program: no
    test imports code from bench/)."""
    out = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--ways", "no-such-way"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    m = re.search(r"unknown no-such-way \(known: ([^)]*)\)", out.stderr)
    assert m, out.stderr
    return [w.strip() for w in m.group(1).split(",")]


def test_dry_run_covers_every_step_and_way(torch):
    out = _run(SMALL + ["--peaks", "inline"])
    assert "dry run" in out
    for check in ("gradients offload_checkpoint", "gradients offload_saved_tensors", "compress torch.float32",
                  "compress torch.bfloat16", "compress torch.float16   fp8 with inf/nan",
                  "compress torch.bfloat16  fp8 with inf/nan", "compress torch.bfloat16  fp8 of a tensor of max",
                  "stream ordering", "4 steps: host pool"):
        line = next((ln for ln in out.splitlines() if ln.startswith(check)), None)
        assert line is not None and line.endswith("ok"), (check, out)
    assert re.search(r"^offload \(D2H\) +\d", out, re.M) and re.search(r"^reload \(H2D\) +\d", out, re.M)
    ways = _ways()
    assert "offload_saved_tensors_noprefetch" in ways
    for way in ways:  # a row with a time and no memory figures (the CPU has none)
        assert re.search(rf"^{way} +\d+\.\d +[\d.]+-[\d.]+ +n/a +n/a +[\d.]+x$", out, re.M), (way, out)
    assert "offload_checkpoint vs torch checkpoint:" in out
    assert "offload_saved_tensors_noprefetch vs save_on_cpu:" in out
    assert out.rstrip().endswith("correctness: ok")


def test_dry_run_measures_peaks_in_child_processes(torch):
    out = _run(SMALL + ["--skip-correctness", "--peaks", "process", "--ways", "torch_checkpoint,offload_checkpoint"])
    assert "each way in a fresh process" in out
    assert "failed" not in out, out
    for way in ("torch_checkpoint", "offload_checkpoint"):
        assert re.search(rf"^{way} +\d+\.\d .* n/a +n/a ", out, re.M), (way, out)
    assert not re.search(r"^none ", out, re.M)


def test_unknown_way_is_refused(torch):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, SCRIPT, *SMALL, "--skip-correctness", "--ways", "nonsense"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0 and "nonsense" in out.stderr
