"""_core.sigaction_save / sigaction_restore: a signal's kernel-level action
(a handler set in C, such as faulthandler.register's) survives a Python
handler being installed and removed around it."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mlutils import _core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# faulthandler's handler on SIGUSR1; a Python handler installed over it and
# removed through signal.signal (which only knows Python's view: SIG_DFL);
# then, unless told not to, the raw action put back.  The signal is then sent.
CHILD = textwrap.dedent("""
    import faulthandler, os, signal, sys
    from mlutils import _core

    restore = sys.argv[2] == "restore"
    log = open(sys.argv[1], "w")
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=False)
    saved = _core.sigaction_save(signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # Python cannot see faulthandler's
    def python_handler(signum, frame):
        raise SystemExit("the Python handler ran")
    signal.signal(signal.SIGUSR1, python_handler)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    if restore:
        _core.sigaction_restore(signal.SIGUSR1, saved)
        assert _core.sigaction_save(signal.SIGUSR1) == saved
    os.kill(os.getpid(), signal.SIGUSR1)
    log.flush()
    print("survived", flush=True)
""")


def _run_child(tmp_path, mode):
    log = tmp_path / "faulthandler.log"
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", CHILD, str(log), mode], capture_output=True, text=True,
                       env=env, timeout=120)
    return r, log.read_text() if log.exists() else ""


def test_faulthandler_survives_a_python_handler(tmp_path):
    r, log = _run_child(tmp_path, "restore")
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout == "survived\n"
    # faulthandler wrote the traceback of the thread the signal hit
    assert "Current thread" in log or "Stack (most recent call first)" in log, log
    assert 'File "<string>"' in log, log


def test_without_the_restore_the_signal_kills(tmp_path):
    """What the pair is for: signal.signal(SIG_DFL) alone drops faulthandler's handler."""
    r, log = _run_child(tmp_path, "plain")
    assert r.returncode == -signal.SIGUSR1, (r.returncode, r.stderr)
    assert log == ""


def test_ignored_signal_round_trips(tmp_path):
    code = textwrap.dedent("""
        import os, signal
        from mlutils import _core
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        saved = _core.sigaction_save(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        _core.sigaction_restore(signal.SIGUSR2, saved)
        os.kill(os.getpid(), signal.SIGUSR2)
        print("ignored")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert (r.returncode, r.stdout) == (0, "ignored\n"), r.stderr


def test_save_is_stable_and_restore_of_the_current_action_changes_nothing():
    a = _core.sigaction_save(signal.SIGUSR2)
    assert isinstance(a, bytes) and len(a) > 0
    assert _core.sigaction_save(signal.SIGUSR2) == a
    _core.sigaction_restore(signal.SIGUSR2, a)
    _core.sigaction_restore(signal.SIGUSR2, bytearray(a))  # any bytes-like
    _core.sigaction_restore(signal.SIGUSR2, memoryview(a))
    assert _core.sigaction_save(signal.SIGUSR2) == a
    assert _core.sigaction_save(signal.Signals.SIGUSR2) == a  # IntEnum members are ints


@pytest.mark.parametrize("signum", [0, -1, signal.NSIG, signal.NSIG + 1, 2**31, 2**70, -(2**70)])
def test_signal_numbers_out_of_range(signum):
    good = _core.sigaction_save(signal.SIGUSR2)
    with pytest.raises(ValueError, match="out of range"):
        _core.sigaction_save(signum)
    with pytest.raises(ValueError, match="out of range"):
        _core.sigaction_restore(signum, good)


@pytest.mark.parametrize("signum", ["10", 10.0, None, b"\n"])
def test_signal_numbers_of_the_wrong_type(signum):
    with pytest.raises(TypeError):
        _core.sigaction_save(signum)
    with pytest.raises(TypeError):
        _core.sigaction_restore(signum, _core.sigaction_save(signal.SIGUSR2))


def test_saved_bytes_of_the_wrong_size_or_kind():
    good = _core.sigaction_save(signal.SIGUSR2)
    for bad in (b"", good[:-1], good + b"\0", good * 2):
        with pytest.raises(ValueError, match="bytes"):
            _core.sigaction_restore(signal.SIGUSR2, bad)
    # the right size, but not a saved action
    for bad in (bytes(len(good)), b"\xff" * len(good), b"x" + good[1:]):
        with pytest.raises(ValueError, match="not a saved signal action"):
            _core.sigaction_restore(signal.SIGUSR2, bad)
    with pytest.raises(TypeError):
        _core.sigaction_restore(signal.SIGUSR2, good.decode("latin-1"))
    with pytest.raises(TypeError):
        _core.sigaction_restore(signal.SIGUSR2, None)
    with pytest.raises(TypeError):
        _core.sigaction_restore(signal.SIGUSR2)
    with pytest.raises(TypeError):
        _core.sigaction_restore(signal.SIGUSR2, good, good)
    assert _core.sigaction_save(signal.SIGUSR2) == good  # nothing was changed by the refusals


def test_saved_for_another_signal_is_refused():
    usr1 = _core.sigaction_save(signal.SIGUSR1)
    before = _core.sigaction_save(signal.SIGUSR2)
    with pytest.raises(ValueError, match=f"saved for signal {int(signal.SIGUSR1)}, not {int(signal.SIGUSR2)}"):
        _core.sigaction_restore(signal.SIGUSR2, usr1)
    assert _core.sigaction_save(signal.SIGUSR2) == before


def test_saved_in_another_process_is_refused():
    """A handler address means nothing in another process: bytes that outlived theirs are refused."""
    code = "import signal, sys; from mlutils import _core; sys.stdout.buffer.write(_core.sigaction_save(signal.SIGUSR2))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    other = r.stdout
    assert len(other) == len(_core.sigaction_save(signal.SIGUSR2))
    try:
        with open("/proc/sys/kernel/randomize_va_space") as f:
            aslr = f.read().strip() != "0"
    except OSError:
        aslr = True
    if not aslr:
        pytest.skip("no address space randomisation: every process loads the module at the same place")
    with pytest.raises(ValueError, match="another process"):
        _core.sigaction_restore(signal.SIGUSR2, other)


def test_a_fork_may_restore_its_parents_bytes():
    saved = _core.sigaction_save(signal.SIGUSR2)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            _core.sigaction_restore(signal.SIGUSR2, saved)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("name", ["SIGKILL", "SIGSTOP"])
def test_signals_whose_action_cannot_change(name):
    signum = getattr(signal, name)
    saved = _core.sigaction_save(signum)  # reading it is allowed
    with pytest.raises(OSError) as e:
        _core.sigaction_restore(signum, saved)
    assert e.value.errno == 22  # EINVAL, as signal.signal(SIGKILL, ...) gets
    assert "restore the action of signal" in str(e.value)
