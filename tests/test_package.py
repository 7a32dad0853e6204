"""Build, packaging and CUDA-availability contracts."""
import os
import subprocess
import sys

import numpy as np
import pytest

import mlutils
from mlutils import _core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_single_source():
    ns = {}
    with open(os.path.join(ROOT, "mlutils", "_version.py")) as f:
        exec(f.read(), ns)
    assert mlutils.__version__ == ns["__version__"] == _core.__version__


def test_features_name_what_the_build_has():
    assert isinstance(mlutils.features, frozenset)
    assert "json" in mlutils.features
    # scripts/test.sh sets MLUTILS_EXPECT_CUDA=1 when nvcc is there: no silent fallback.
    if os.environ.get("MLUTILS_EXPECT_CUDA") == "1":
        assert "cuda" in mlutils.features
    assert _core.cuda_built() == ("cuda" in mlutils.features)


def test_type_information_is_shipped():
    assert os.path.exists(os.path.join(ROOT, "mlutils", "py.typed"))
    with open(os.path.join(ROOT, "mlutils", "_core.pyi")) as f:
        stub = f.read()
    for name in ("json_dumps", "json_loads", "cuda_built", "checksum64"):
        assert f"def {name}(" in stub
        assert hasattr(_core, name)


def test_exceptions_mix_in_builtins():
    import json
    import pickle

    assert issubclass(mlutils.JSONDecodeError, json.JSONDecodeError)
    assert issubclass(mlutils.JSONDecodeError, ValueError)
    assert issubclass(mlutils.SafetensorsError, mlutils.MlutilsError)
    assert issubclass(mlutils.SafetensorsError, ValueError)
    assert issubclass(mlutils.UnsafePickleError, mlutils.TorchFormatError)
    assert issubclass(mlutils.UnsafePickleError, pickle.UnpicklingError)
    assert issubclass(mlutils.SamplerStateError, ValueError)
    assert issubclass(mlutils.PatternError, ValueError)
    # the reference validates with assert: code catching AssertionError keeps working
    assert issubclass(mlutils.PatternError, AssertionError)
    assert issubclass(mlutils.PatternError, mlutils.MlutilsError)


def test_import_without_torch_and_without_gpu():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # any import of torch now fails
        "import mlutils, mlutils.io, mlutils.utils\n"
        "print(mlutils.cuda_available(), mlutils.cuda_status())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False ")


def test_cuda_available_matches_device_count():
    count, reason = _core.cuda_device_count()
    assert mlutils.cuda_available() == (count > 0)
    if count == 0:
        assert reason  # says why
        assert mlutils.cuda_status() == reason


def test_checksum64_cpu_reference():
    data = np.random.default_rng(0).integers(0, 256, size=10_000, dtype=np.uint8)
    want = int((data.astype(np.uint64) * (2 * np.arange(data.size, dtype=np.uint64) + 1)).sum(dtype=np.uint64))
    assert _core.checksum64(data) == want
    assert _core.checksum64(b"") == 0
    assert _core.checksum64(b"\x01\x02\x03") == 1 + 6 + 15


@pytest.mark.skipif(mlutils.cuda_available(), reason="no-GPU behaviour")
def test_cuda_calls_fail_cleanly_without_a_device():
    if not _core.cuda_built():
        with pytest.raises(RuntimeError, match="without CUDA"):
            _core.cuda_checksum64(0, 16)
    else:
        with pytest.raises(RuntimeError):
            _core.cuda_checksum64(1 << 40, 16)
    if _core.cuda_built():
        assert _core.cuda_checksum64(0, 0) == 0  # nothing to do is not an error, even without a device
    else:
        with pytest.raises(RuntimeError, match="without CUDA"):
            _core.cuda_checksum64(0, 0)
    with pytest.raises(ValueError):
        _core.cuda_checksum64(0, -1)


@pytest.mark.skipif(not mlutils.cuda_available(), reason="needs a CUDA device")
def test_cuda_checksum_matches_cpu(torch):
    x = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
    want = _core.checksum64(x.numpy())
    xd = x.cuda()
    got = _core.cuda_checksum64(xd.data_ptr(), xd.numel(), torch.cuda.current_stream().cuda_stream)
    assert got == want
