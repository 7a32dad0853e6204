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
def fail_alloc():
    """Call fail_alloc(n) to make the core's (n+1)th allocation fail; reset after the test."""
    from mlutils import _core

    yield _core._fail_alloc_after
    _core._fail_alloc_after(-1)
