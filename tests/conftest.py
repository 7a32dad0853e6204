"""Shared fixtures.  Tests that need PyTorch use the `torch` fixture (or
`pytest.importorskip`); MLUTILS_NO_TORCH=1 skips them (and makes the
library behave as if torch were not installed where it checks)."""
import os
import sys

import pytest

if os.environ.get("MLUTILS_NO_TORCH") == "1":
    # Run the suite as on a machine without torch: any `import torch` fails.
    sys.modules["torch"] = None  # type: ignore[assignment]

import mlutils  # noqa: F401  (fails loudly if the extension is missing: no silent fallback)


def _torch():
    if os.environ.get("MLUTILS_NO_TORCH") == "1":
        pytest.skip("MLUTILS_NO_TORCH=1: running as without torch")
    return pytest.importorskip("torch")


@pytest.fixture
def torch():
    return _torch()


@pytest.fixture
def loader_mp():
    """The multiprocessing_context for a DataLoader with workers: the platform's
    default (fork on Linux, what users get), except in the sanitizer run.  There,
    forking a test process that has threads is not safe (the sanitizer runtime's
    locks are not reset in the child: a worker hung that way), so workers come
    from a forkserver, a fresh single-threaded process."""
    import mlutils

    return "forkserver" if "asan" in mlutils.features else None


@pytest.fixture
def fail_alloc():
    """Call fail_alloc(n) to make the core's (n+1)th allocation fail; reset after the test."""
    from mlutils import _core

    yield _core._fail_alloc_after
    _core._fail_alloc_after(-1)


# pytest-timeout's signal method fails a hung test with its traceback and goes
# on, but its handler runs only when the interpreter gets control back: a hang
# inside C code (holding the GIL, or with SIGALRM blocked) would never end.
# A faulthandler watchdog backs it up: HANG_GRACE seconds after the timeout
# it writes every thread's traceback to stderr and ends the run (exit 1).
HANG_GRACE = float(os.environ.get("MLUTILS_HANG_GRACE", "30"))


def _timeout_of(item):
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    try:
        value = item.config.getoption("timeout", None)
        if value is None:
            value = item.config.getini("timeout")
        return float(value or 0)
    except (ValueError, TypeError):
        return 0.0


_STDERR_FD = []  # a copy of the real stderr (fd 2 is captured while tests run)


def pytest_configure(config):
    # Without pytest-timeout, pytest only warns about the `timeout` setting and
    # a hang never ends: refuse to run unless the plugin is switched off on
    # purpose (-p no:timeout).
    if not config.pluginmanager.hasplugin("timeout") and not config.pluginmanager.is_blocked("timeout"):
        raise pytest.UsageError("pytest-timeout is not installed, so no test would time out: "
                                "pip install -e '.[test]' (or pass -p no:timeout to run without timeouts)")
    _STDERR_FD.append(os.dup(2))


def pytest_unconfigure(config):
    while _STDERR_FD:
        os.close(_STDERR_FD.pop())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import faulthandler

    timeout = _timeout_of(item) if _STDERR_FD else 0.0
    if timeout > 0:
        faulthandler.dump_traceback_later(timeout + HANG_GRACE, exit=True, file=_STDERR_FD[0])
    try:
        yield
    finally:
        if timeout > 0:
            faulthandler.cancel_dump_traceback_later()
