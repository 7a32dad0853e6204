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


def test_sdist_carries_every_source_the_build_needs(tmp_path):
    """The sdist holds all of csrc/ (.cu and stub.c whatever the build config),
    the license, and no build product; its metadata states license and Python."""
    import shutil
    import tarfile

    want = {"LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in",
            "mlutils/_version.py", "mlutils/py.typed", "mlutils/_core.pyi"}
    for d, _dirs, files in os.walk(os.path.join(ROOT, "csrc")):
        want |= {os.path.relpath(os.path.join(d, f), ROOT) for f in files if f.endswith((".c", ".h", ".cu"))}
    assert any(f.endswith(".cu") for f in want) and "csrc/cuda/stub.c" in want
    # CUDA off dropped the .cu files, CUDA on dropped stub.c: check both configurations.
    configs = ["0"] + (["1"] if shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc") else [])
    # sdist stages its files in the working directory: build from a copy of the
    # tree (built extension included, so the no-build-product check means something)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                              ".jdeb", ".hypothesis", "mlutils-*"))
    for cuda in configs:
        out = tmp_path / f"cuda{cuda}"
        out.mkdir()
        r = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out),
                            "sdist", "--dist-dir", str(out)], cwd=src, capture_output=True, text=True,
                           env={**os.environ, "MLUTILS_CUDA": cuda}, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        (sdist,) = out.glob("mlutils-*.tar.gz")
        with tarfile.open(sdist) as tf:
            names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
            pkg_info = tf.extractfile(f"{sdist.name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
        assert not want - names, f"MLUTILS_CUDA={cuda}: the sdist lacks {sorted(want - names)}"
        junk = sorted(n for n in names if n.endswith((".so", ".o", ".config", ".pyc")))
        assert not junk, f"MLUTILS_CUDA={cuda}: the sdist carries build products {junk}"
        assert "License-Expression: MIT" in pkg_info and "License-File: LICENSE" in pkg_info
        assert "Requires-Python: >=3.11" in pkg_info
