"""The C include graph runs one way: csrc/core/ is pure C (no Python, NumPy,
binding or CUDA code), csrc/cuda/ never reaches into the binding or Python."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)


def _includes(folder):
    """(file relative to csrc/, include as written, include resolved relative to csrc/ or None)."""
    out = []
    base = os.path.join(CSRC, folder)
    for dirpath, _dirs, files in os.walk(base):
        for f in sorted(files):
            if not f.endswith((".c", ".h", ".cu", ".cuh")):
                continue
            path = os.path.join(dirpath, f)
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            for kind, name in INCLUDE.findall(text):
                resolved = None
                if kind == '"':
                    resolved = os.path.relpath(os.path.normpath(os.path.join(dirpath, name)), CSRC)
                out.append((os.path.relpath(path, CSRC), name, resolved))
    return out


def _forbidden(folder, bad_dirs, bad_system):
    found = []
    for src, name, resolved in _includes(folder):
        top = resolved.split(os.sep)[0] if resolved else None
        if top in bad_dirs or any(name == s or name.startswith(s + "/") for s in bad_system):
            found.append(f"{src}: #include {name}")
    return found


def test_include_parser_sees_includes():
    # the check below could not fail if the parser missed every line
    core = _includes("core")
    assert ("core/json.c", "json.h", "core/json.h") in core
    assert any(n == "../mlu.h" for _s, n, _r in core)
    py = _includes("py")
    assert any(n == "Python.h" for _s, n, _r in py)
    assert any(r is not None and r.startswith("core" + os.sep) for _s, _n, r in py)


@pytest.mark.parametrize("folder,bad_dirs,bad_system", [
    ("core", {"py", "cuda"}, ("Python.h", "numpy", "structmember.h")),
    ("cuda", {"py"}, ("Python.h", "numpy", "structmember.h")),
])
def test_include_graph_one_way(folder, bad_dirs, bad_system):
    found = _forbidden(folder, bad_dirs, bad_system)
    assert not found, f"csrc/{folder}/ includes what it must not:\n" + "\n".join(found)


def test_every_folder_says_what_belongs_there():
    for folder in ("csrc", "csrc/core", "csrc/py", "csrc/cuda", "tests", "bench"):
        path = os.path.join(ROOT, folder, "README.md")
        assert os.path.isfile(path), path
        with open(path, encoding="utf-8") as fh:
            assert len(fh.read().strip()) > 40, path
