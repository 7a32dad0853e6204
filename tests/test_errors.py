"""One exception tree: every exception class mlutils defines derives from
mlutils.MlutilsError and from a builtin exception (as cbor2's
CBORDecodeValueError(CBORDecodeError, ValueError)), the package exports the
whole tree, and its __all__ names exactly its public names."""
import ast
import builtins
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys

import pytest

import mlutils
from mlutils import MlutilsError, _core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Exceptions that do not derive from MlutilsError yet (none): the test below
# fails once one does, so that its name leaves this set at the same time.
NOT_YET: set = set()

# Builtins that say nothing about the kind of failure.
TOO_BROAD = {BaseException, Exception, object}


#: Modules that are torch-only by design (imported lazily by their package when torch is there).
TORCH_ONLY = {"mlutils.offload._autograd"}


def _modules():
    """Every module of the package, imported (none may need torch or a GPU to import, but the torch-only
    ones, which are left out when torch is missing)."""
    names = ["mlutils"] + [m.name for m in pkgutil.walk_packages(mlutils.__path__, "mlutils.")]
    out = []
    for n in sorted(set(names)):
        if n in TORCH_ONLY and os.environ.get("MLUTILS_NO_TORCH") == "1":
            continue
        out.append(importlib.import_module(n))
    return out


def _exception_classes():
    """{dotted name: class} of every exception or warning class a module of mlutils defines."""
    found = {}
    for module in _modules():
        for name, obj in vars(module).items():
            if not (inspect.isclass(obj) and issubclass(obj, BaseException)):
                continue
            if module is _core:
                # the C module's classes are named mlutils.<Name>
                if obj.__module__ == "mlutils":
                    found[f"mlutils._core.{name}"] = obj
            elif obj.__module__ == module.__name__ and obj.__qualname__ == name:
                found[f"{module.__name__}.{name}"] = obj
    return found


def _builtin_bases(cls):
    return [k for k in cls.__mro__ if getattr(builtins, k.__name__, None) is k and k not in TOO_BROAD]


def test_the_walk_finds_the_exceptions():
    # the checks below could not fail if the walk found nothing
    found = _exception_classes()
    for name in ("mlutils._core.MlutilsError", "mlutils._core.SafetensorsError",
                 "mlutils._torch.TorchNotInstalledError", "mlutils.distributed.DistributedError",
                 "mlutils.distributed.NcclUnavailableError", "mlutils.train.checkpoint.CheckpointError",
                 "mlutils.offload._engine.OffloadPoolFullError", "mlutils.train.counters.OutOfMemoryStop", *NOT_YET):
        assert name in found, (name, sorted(found))


def test_every_exception_is_an_mlutils_error_and_a_builtin():
    wrong = []
    for name, cls in sorted(_exception_classes().items()):
        if cls is MlutilsError:
            continue
        is_ours = issubclass(cls, MlutilsError)
        if name in NOT_YET:
            assert not is_ours, f"{name} derives from MlutilsError now: take it out of NOT_YET"
            continue
        if not is_ours:
            wrong.append(f"{name} does not derive from MlutilsError")
        if not _builtin_bases(cls):
            wrong.append(f"{name} derives from no builtin exception more telling than Exception")
    assert not wrong, "\n".join(wrong)


def test_mlutils_error_is_the_root():
    assert MlutilsError.__bases__ == (Exception,)
    assert mlutils.MlutilsError is _core.MlutilsError


def test_the_package_exports_the_whole_tree():
    found = _exception_classes()
    exported = {getattr(mlutils, n) for n in mlutils.__all__}
    missing = sorted(n for n, cls in found.items() if cls not in exported)
    assert not missing, f"not exported by mlutils: {missing}"
    for n in mlutils.__all__:
        obj = getattr(mlutils, n)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert obj in found.values(), n


def _public_names(module):
    return {n for n, v in vars(module).items() if not n.startswith("_") and not inspect.ismodule(v)}


def test_all_names_exactly_the_public_names():
    for n in mlutils.__all__:
        getattr(mlutils, n)  # loads the lazily exported ones
    assert len(mlutils.__all__) == len(set(mlutils.__all__))
    assert set(mlutils.__all__) - {"__version__"} == _public_names(mlutils)
    assert set(dir(mlutils)) >= set(mlutils.__all__)


def test_import_stays_light_and_star_import_works_without_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # any import of torch now fails
        "import mlutils\n"
        "heavy = [m for m in ('mlutils.train', 'mlutils.offload', 'mlutils.distributed', 'socket')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from mlutils import *\n"
        "assert issubclass(CheckpointError, RuntimeError) and issubclass(DistributedTimeoutError, TimeoutError)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mlutils.nope  # noqa: B018


def test_stub_names_the_bases_the_module_gives():
    """mypy.stubtest does not compare base classes: each exception of
    mlutils/_core.pyi must name the bases mlutils._core gives it, in order."""
    import json
    import pickle

    with open(os.path.join(ROOT, "mlutils", "_core.pyi"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = {**vars(builtins), "json": json, "pickle": pickle, **vars(_core)}
    checked = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and issubclass(getattr(_core, node.name), BaseException):
            stub = tuple(eval(ast.unparse(b), names) for b in node.bases)
            assert stub == getattr(_core, node.name).__bases__, node.name
            checked.add(node.name)
    assert checked == {n for n, v in vars(_core).items() if inspect.isclass(v) and issubclass(v, BaseException)}
