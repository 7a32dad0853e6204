"""The C include graph runs one way: csrc/core/ is pure C (no Python, NumPy,
binding or CUDA code), csrc/cuda/ never reaches into the binding or Python;
and no C or CUDA function grows past MAX_FUNCTION_LINES."""
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


# ------------------------------------------------------------ function length

MAX_FUNCTION_LINES = 150
_LITERAL = re.compile(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)
_DIRECTIVE = re.compile(r"^[ \t]*#(?:[^\n]*\\\n)*[^\n]*", re.M)
# a block whose functions stand at file level: `namespace x {`, `extern "C" {`
_TRANSPARENT = re.compile(r'^(?:namespace\b[\w\s:]*|extern\s*"[^"]*")$')


def _blank(m):
    """The match with every character but newlines (and a literal's quotes) made a space."""
    text = m.group(0)
    keep = text[0] if text[0] in "\"'" else ""
    body = re.sub(r"[^\n]", " ", text[len(keep):len(text) - len(keep)])
    return keep + body + keep


def c_functions(text):
    """(name, first line, last line) of every function defined in C/CUDA source text.

    Comments, string and character literals and preprocessor lines (macro
    bodies included) are blanked first; a function is a brace at file level
    (or inside `namespace`/`extern "C"` blocks) whose head ends with the ')'
    of a parameter list and holds no '=' (initializers, struct bodies and
    enums are not functions).  A function's lines run from the first line of
    its head (return type, template line) to its closing brace."""
    code = _DIRECTIVE.sub(_blank, _LITERAL.sub(_blank, text))
    found, stack, boundary = [], [], 0
    for i, ch in enumerate(code):
        if ch == "{":
            kind = "inner"
            if all(k == "transparent" for k in stack):
                head = code[boundary:i].strip()
                if _TRANSPARENT.match(head):
                    kind = "transparent"
                elif re.search(r"\)\s*(?:const\s*)?$", head) and "=" not in head:
                    kind = "function"
                    close = head.rstrip().rstrip("const").rstrip()
                    depth, j = 0, len(close) - 1
                    while j >= 0:
                        depth += {")": 1, "(": -1}.get(close[j], 0)
                        if depth == 0:
                            break
                        j -= 1
                    name = re.search(r"(\w+)\s*$", close[:j])
                    start = code.count("\n", 0, code.index(head, boundary)) + 1
                    found.append([name.group(1) if name else "?", start, None])
                else:
                    kind = "other"
            stack.append(kind)
            boundary = i + 1
        elif ch == "}" and stack:
            if stack.pop() == "function":
                found[-1][2] = code.count("\n", 0, i) + 1
            if all(k == "transparent" for k in stack):
                boundary = i + 1
        elif ch == ";" and all(k == "transparent" for k in stack):
            boundary = i + 1
    return [tuple(f) for f in found if f[2] is not None]


def _csrc_functions():
    out = []
    for dirpath, _dirs, files in os.walk(CSRC):
        for f in sorted(files):
            if f.endswith((".c", ".cu")):
                path = os.path.join(dirpath, f)
                with open(path, encoding="utf-8") as fh:
                    for name, first, last in c_functions(fh.read()):
                        out.append((os.path.relpath(path, CSRC), name, first, last))
    return out


def test_function_parser_sees_functions():
    # the check below could not fail if the parser missed every function
    sample = (
        '#define BODY(x) {\\\n  return x; \\\n}\n'
        'static const char *s = "{";\n'
        'struct point { int x, y; };\n'
        'static int table[] = {1, 2};\n'
        'namespace {\n'
        'template <typename T>\n'
        '__global__ void kernel(T *p)\n{\n    if (p) { p[0] = 0; } /* } */\n}\n'
        '}  // namespace\n'
        'extern "C" int f(int a,\n          int b)\n{\n    return a + \'}\';\n}\n'
        'int g(void) { return 0; }\n'
    )
    assert c_functions(sample) == [("kernel", 8, 12), ("f", 14, 18), ("g", 19, 19)]
    names = {(src, name) for src, name, _first, _last in _csrc_functions()}
    assert ("core/zipread.c", "mlu_zip_open") in names
    assert ("py/module.c", "PyInit__core") in names
    assert ("cuda/offload.cu", "mlu_cuda_offload_save") in names


def test_no_function_is_too_long():
    long = [f"csrc/{src}:{first}: {name} has {last - first + 1} lines"
            for src, name, first, last in _csrc_functions() if last - first + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(long)


def test_every_folder_says_what_belongs_there():
    for folder in ("csrc", "csrc/core", "csrc/py", "csrc/cuda", "tests", "bench", "reference"):
        path = os.path.join(ROOT, folder, "README.md")
        assert os.path.isfile(path), path
        with open(path, encoding="utf-8") as fh:
            assert len(fh.read().strip()) > 40, path


# --------------------------------------------------------- tests/ and bench/
# Neither imports the other: what both need (the oracles and baselines) lives
# in reference/.  A test may still run a bench script as a subprocess.

# Imports the rework of their test file removes; each entry must still be
# true, so that it leaves this table with the import.
IMPORTS_NOT_YET_REMOVED: set = set()


def _py_files(folder):
    for dirpath, _dirs, files in os.walk(os.path.join(ROOT, folder)):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def _imported(path):
    """Top-level names of the modules a file imports (absolute imports, at any depth)."""
    import ast

    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _module_names(folder):
    names = {folder}
    for f in os.listdir(os.path.join(ROOT, folder)):
        if f.endswith(".py"):
            names.add(f[:-3])
    return names


@pytest.mark.parametrize("folder,other", [("tests", "bench"), ("bench", "tests")])
def test_tests_and_bench_do_not_import_each_other(folder, other):
    theirs = _module_names(other) - {"__init__"}
    found = set()
    for path in _py_files(folder):
        rel = os.path.relpath(path, ROOT)
        for name in _imported(path) & theirs:
            found.add((rel, name))
    for entry in IMPORTS_NOT_YET_REMOVED:
        if entry[0].startswith(folder + "/"):
            assert entry in found, f"{entry} is gone: take it out of IMPORTS_NOT_YET_REMOVED"
    found -= IMPORTS_NOT_YET_REMOVED
    assert not found, f"{folder}/ imports from {other}/ (share it through reference/ instead): {sorted(found)}"


def test_import_scan_sees_imports():
    # the check above could not fail if the scan missed every import
    assert "reference" in _imported(os.path.join(ROOT, "tests", "test_sampler.py"))
    assert "_harness" in _imported(os.path.join(ROOT, "bench", "bench_sampler.py"))
    assert "_pthelpers" in _imported(os.path.join(ROOT, "tests", "test_ptload_format.py"))
