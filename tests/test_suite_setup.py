"""The test suite's own contracts: the default run leaves the heavy cases to
`-m slow`, and a hang fails with a traceback instead of stopping the run."""
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))


def run_pytest(tmp_path, source, *args, env=None, timeout=120):
    (tmp_path / "test_case.py").write_text(source)
    shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path / "conftest.py")
    cmd = [sys.executable, "-m", "pytest", "-c", os.path.join(ROOT, "pyproject.toml"), "--rootdir", str(tmp_path),
           "-p", "no:cacheprovider", "-q", str(tmp_path / "test_case.py"), *args]
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=tmp_path)


def test_default_run_skips_slow_and_m_slow_runs_them(tmp_path):
    src = ("import pytest\n\n@pytest.mark.slow\ndef test_big():\n    pass\n\n\ndef test_small():\n    pass\n")
    out = run_pytest(tmp_path, src, "-rA")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASSED test_case.py::test_small" in out.stdout and "::test_big" not in out.stdout
    assert "1 passed, 1 deselected" in out.stdout
    out = run_pytest(tmp_path, src, "-rA", "-m", "slow")
    assert "PASSED test_case.py::test_big" in out.stdout and "1 passed, 1 deselected" in out.stdout


def test_heavy_cases_are_marked_slow():
    # the cases that write a file over 4 GiB or need GBs of memory
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                          "-m", "slow", "tests/test_ptsave.py", "tests/test_ptload_torch.py"],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert "test_real_file_over_4gib_matches_torch" in out.stdout, out.stdout + out.stderr
    assert "test_large_file" in out.stdout
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "pytest -q -p no:cacheprovider -m slow" in f.read()  # CI still runs them


def test_python_hang_fails_with_a_traceback_and_the_run_goes_on(tmp_path):
    src = ("def test_hang():\n    x = 0\n    while True:\n        x += 1\n\n\ndef test_after():\n    pass\n")
    out = run_pytest(tmp_path, src, "-o", "timeout=2")
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "Timeout" in text and "test_hang" in text and "while True" in text
    assert "1 failed, 1 passed" in out.stdout


def test_hang_the_signal_cannot_reach_ends_the_run_with_tracebacks(tmp_path):
    # SIGALRM blocked: like C code that never returns to the interpreter
    src = ("import signal, time\n\n"
           "def test_blocked():\n"
           "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
           "    time.sleep(60)\n")
    t0 = time.monotonic()
    out = run_pytest(tmp_path, src, "-o", "timeout=1", env={"MLUTILS_HANG_GRACE": "2"})
    text = out.stdout + out.stderr
    assert time.monotonic() - t0 < 40
    assert out.returncode != 0
    assert "Timeout" in text and "test_blocked" in text and "test_case.py" in text
