"""JSON helpers against the standard library's json on a varied corpus."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlutils
from mlutils.io import json_parse, json_read, json_stringify, json_write
from mlutils.utils import truncate_json

CORPUS = [
    None, True, False, 0, -1, 1, 2**63 - 1, -(2**63), 1.5, -0.0, 1e-300, 1.7976931348623157e308,
    5e-324, 0.1, 1e16, 1e22, 123456789.123, "", "plain", "é ü ß 漢字 🎉", "quote \" backslash \\ slash /",
    "controls \x00 \x01 \x1f \x7f \b\f\n\r\t", "\u2028\u2029", [], {}, [[]], [{}],
    {"nested": {"list": [1, 2.0, "3", None, True, {"deep": [[[[[]]]]]}]}},
    {"metrics": {"loss": 0.123456789012, "acc": 0.99, "lr": 3e-4, "step": 1000}, "tags": ["a", "b"]},
    [1, [2, [3, [4, [5]]]]],
    {"unicode-key-é": 1, "": 2, "k\nnl": 3},
]


@pytest.mark.parametrize("value", CORPUS, ids=lambda v: repr(v)[:40])
def test_stringify_matches_stdlib(value):
    assert json_stringify(value) == json.dumps(value, ensure_ascii=False)
    assert json_stringify(value, pretty=True) == json.dumps(value, ensure_ascii=False, indent=4)
    assert json_stringify(value, raw=True) == json.dumps(value, ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("value", CORPUS, ids=lambda v: repr(v)[:40])
def test_parse_matches_stdlib(value):
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False), json.dumps(value, indent=2)):
        got = json_parse(text)
        assert got == json.loads(text)
        assert type(got) is type(json.loads(text))
        assert json_parse(text.encode("utf-8")) == json.loads(text)


def test_parse_unicode_escapes_and_surrogate_pairs():
    text = r'["\u00e9", "\ud83c\udf89", "\u0000", "\/", "\b\f\n\r\t"]'
    assert json_parse(text) == json.loads(text)


def test_nonfinite_follow_stdlib():
    value = [float("nan"), float("inf"), -float("inf"), {"x": float("nan")}]
    text = json_stringify(value)
    assert text == json.dumps(value)
    back = json_parse(text)
    assert math.isnan(back[0]) and back[1] == math.inf and back[2] == -math.inf and math.isnan(back[3]["x"])
    # strings that look like the tokens, and NUL-bearing strings, are untouched
    text = '["NaN", "\\u0000NaN", "\\u0000", "a\\u0000\\u0000b", {"Inf": NaN, "Infinity": -Infinity}]'
    got = json_parse(text)
    std = json.loads(text)
    assert got[:4] == std[:4]
    assert list(got[4].keys()) == list(std[4].keys())
    assert math.isnan(got[4]["Inf"]) and got[4]["Infinity"] == -math.inf


def test_nul_in_keys_is_a_clear_error():
    # jansson stores keys as C strings: a key holding U+0000 is refused, not truncated.
    with pytest.raises(ValueError, match="NUL"):
        json_parse('{"a\\u0000b": 1}')


def test_nonfinite_error_position_is_mapped_back():
    text = '[NaN, "\\u0000", 1,\n  ]'
    with pytest.raises(json.JSONDecodeError) as ei:
        json_parse(text)
    assert ei.value.lineno == 2
    assert ei.value.pos == text.index("]")


def test_deep_nesting():
    depth = 500
    value = []
    for _ in range(depth):
        value = [value]
    text = json_stringify(value)
    assert text == json.dumps(value)
    assert json_parse(text) == value
    d = {}
    cur = d
    for i in range(300):
        cur["k"] = {}
        cur = cur["k"]
    assert json_parse(json_stringify(d)) == d


def test_depth_cap():
    with pytest.raises(ValueError, match="depth"):
        json_parse("[" * 5000 + "]" * 5000)


def test_big_numbers():
    for n in (2**63 - 1, -(2**63), 10**18, -(10**18)):
        assert json_parse(json_stringify(n)) == n
    for n in (2**63, -(2**63) - 1, 2**64, 10**30):
        with pytest.raises(OverflowError, match="64 bits"):
            json_stringify({"a": [1, n]})
        with pytest.raises(ValueError):
            json_parse(str(n))
    assert json_parse("1e308") == 1e308
    assert json_parse("-1.5e-7") == -1.5e-7


def test_numpy_values():
    data = {
        "i": np.int64(7), "u": np.uint8(255), "f32": np.float32(0.5), "f16": np.float16(1.5),
        "b": np.bool_(True), "arr": np.arange(4, dtype=np.int32), "m": np.eye(2),
        "big": np.uint64(2**63 - 1),
    }
    got = json_parse(json_stringify(data))
    assert got == {"i": 7, "u": 255, "f32": 0.5, "f16": 1.5, "b": True, "arr": [0, 1, 2, 3],
                   "m": [[1.0, 0.0], [0.0, 1.0]], "big": 2**63 - 1}
    with pytest.raises(OverflowError):
        json_stringify(np.uint64(2**64 - 1))


def test_type_errors_name_type_and_path():
    with pytest.raises(TypeError, match=r"set at data\['a'\]\[2\]"):
        json_stringify({"a": [1, 2, {3}]})
    with pytest.raises(TypeError, match=r"bytes at data\[0\]\['k'\]"):
        json_stringify([{"k": b"x"}])
    with pytest.raises(TypeError, match="complex"):
        json_stringify([np.array([1 + 2j])])
    with pytest.raises(TypeError, match="keys must be"):
        json_stringify({(1, 2): 3})
    with pytest.raises(TypeError, match=r"^cannot serialise object of type object at data$"):
        json_stringify(object())


def test_non_string_keys_like_stdlib():
    data = {1: "a", 2.5: "b", True: "c", None: "d"}
    assert json_stringify(data) == json.dumps(data)


def test_tuples_and_subclasses():
    from collections import OrderedDict
    import enum

    class Color(enum.IntEnum):
        RED = 1

    data = OrderedDict([("t", (1, 2)), ("e", Color.RED), ("s", "x")])
    assert json_stringify(data) == json.dumps(data)


def test_circular_reference():
    # json.dumps raises ValueError too ("Circular reference detected")
    a = []
    a.append(a)
    with pytest.raises(ValueError, match=r"^circular reference detected at data(\[0\])+$"):
        json_stringify(a)
    d = {}
    d["self"] = d
    with pytest.raises(ValueError, match=r"^circular reference detected at data(\['self'\])+$"):
        json_stringify(d)


# ---- every walk over nested Python values: deep or self-referencing input
# raises RecursionError / ValueError, never overflows the C stack.  Each case
# runs in its own interpreter so that a crash fails the test (not the run).

_WALK_PRELUDE = """
import collections, os, sys, tempfile
import numpy as np
N = 200000
def obj0d(v):
    a = np.empty((), dtype=object); a[()] = v; return a
def obj1d(v):
    a = np.empty(1, dtype=object); a[0] = v; return a
def chain(wrap):
    x = 1
    for _ in range(N):
        x = wrap(x)
    return x
"""

_WALK_RUN = """
for name, call in sorted(CALLS.items()):
    d = tempfile.mkdtemp()
    try:
        call(x, d)
        result = 'no error'
    except (RecursionError, ValueError) as exc:
        result = type(exc).__name__ + ' ' + str(exc)[:60]
    print(name, '|', result, '|', sorted(os.listdir(d)), flush=True)
# numpy frees nested object arrays recursively (no trashcan): a 200000-deep
# chain of them overflows numpy's own stack at exit, so skip the teardown
os._exit(0)
"""

_DEEP = {
    "list": "x = chain(lambda v: [v])",
    "dict": "x = chain(lambda v: {'k': v})",
    "tuple": "x = chain(lambda v: (v,))",
    "array0d": "x = chain(obj0d)",
    "array1d": "x = chain(obj1d)",
    "array0d_list": "x = chain(lambda v: obj0d([v]))",
    "dict_array1d": "x = chain(lambda v: {'a': obj1d(v)})",
}
_SELF = {
    "list": "x = []; x.append(x)",
    "dict": "x = {}; x['self'] = x",
    "tuple_list": "l = []; x = (l,); l.append(x)",
    "array0d": "x = np.empty((), dtype=object); x[()] = x",
    "array1d": "x = np.empty(2, dtype=object); x[0] = 1; x[1] = x",
    "array0d_pair": "x = np.empty((), dtype=object); y = np.empty((), dtype=object); x[()] = y; y[()] = x",
    "array_list": "x = np.empty(1, dtype=object); x[0] = [x]",
    "dict_array0d": "x = {}; x['a'] = obj0d(x)",
}
_JSON_CALLS = """
from mlutils.io import json_stringify, json_write, torch_save
CALLS = {
    'stringify': lambda x, d: json_stringify(x),
    'pretty_truncate': lambda x, d: json_stringify({'a': [x]}, pretty=True, truncate=True),
    'json_write': lambda x, d: json_write(x, os.path.join(d, 'x.json')),
    'sft_metadata': lambda x, d: torch_save({'m': {'w': np.zeros(2, np.float32)}, 'meta': [x]},
                                            os.path.join(d, 'x.sft')),
}
"""


def _walk(build, calls):
    """{call name: its exception, as 'Type message'}, after checking that no
    call left a file behind."""
    code = _WALK_PRELUDE + build + "\n" + calls + "\n" + _WALK_RUN
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"exit status {out.returncode}: {out.stderr[-2000:]}"
    results = {}
    for line in out.stdout.strip().split("\n"):
        name, result, files = line.split(" | ")
        assert files == "[]", f"{name} left {files}"  # nothing written, no temporary file left
        results[name] = result
    return results


@pytest.mark.parametrize("shape", sorted(_DEEP))
def test_deep_values_raise_recursion_error(shape):
    results = _walk(_DEEP[shape], _JSON_CALLS)
    assert results == dict.fromkeys(["json_write", "pretty_truncate", "sft_metadata", "stringify"],
                                    "RecursionError maximum recursion depth exceeded while encoding JSON")


@pytest.mark.parametrize("shape", sorted(_SELF))
def test_self_references_raise_value_error(shape):
    results = _walk(_SELF[shape], _JSON_CALLS)
    assert len(results) == 4
    for name, result in results.items():
        assert result.startswith("ValueError circular reference detected at data"), (name, result)


def test_circular_reference_names_where(tmp_path):
    a = np.empty((), dtype=object)
    a[()] = a
    with pytest.raises(ValueError, match=r"^circular reference detected at data$"):
        json_stringify(a)
    b = np.empty(1, dtype=object)
    b[0] = b
    with pytest.raises(ValueError, match=r"^circular reference detected at data(\[0\])+$"):
        json_stringify(b)
    # shallow object arrays still write as the lists they hold
    c = np.empty(2, dtype=object)
    c[0] = np.arange(2)
    c[1] = {"k": np.empty((), dtype=object)}
    c[1]["k"][()] = (1.5, "s")
    assert json_stringify(c) == json.dumps([[0, 1], {"k": [1.5, "s"]}])


_PT_DEEP = {
    "list": "x = chain(lambda v: [v])",
    "dict": "x = chain(lambda v: {'k': v})",
    "tuple": "x = chain(lambda v: (v,))",
    "odict": "x = chain(lambda v: collections.OrderedDict(k=v))",
    "odict_attr": "def od(v):\n    o = collections.OrderedDict(); o._metadata = {'m': v}; return o\nx = chain(od)",
    "np_scalar_list": "x = chain(lambda v: [np.float32(0.5), v])",
}


@pytest.mark.parametrize("shape", sorted(_PT_DEEP))
def test_pt_writer_deep_values_raise_recursion_error(shape):
    calls = "from mlutils.io import torch_save\nCALLS = {'pt': lambda x, d: torch_save({'a': x}, os.path.join(d, 'x.pt'))}"
    assert _walk(_PT_DEEP[shape], calls)["pt"].startswith("RecursionError maximum recursion depth exceeded")


def test_pt_writer_self_references(tmp_path, torch):
    from collections import OrderedDict

    from mlutils.io import torch_save

    t = ([],)
    t[0].append(t)
    with pytest.raises(ValueError, match="tuple that contains itself"):
        torch_save(t, tmp_path / "t.pt")
    a = np.empty((), dtype=object)
    a[()] = a
    with pytest.raises(TypeError, match="dtype object"):
        torch_save({"a": a}, tmp_path / "a.pt")
    assert os.listdir(tmp_path) == []
    # what pickle can express (a list or dict holding itself, attributes
    # pointing back) is written, and torch reads the same shape back
    lst = [1]
    lst.append(lst)
    d = {"x": 2}
    d["self"] = d
    od = OrderedDict(w=torch.ones(2))
    od._metadata = OrderedDict(parent=od)
    torch_save({"l": lst, "d": d, "od": od}, tmp_path / "ok.pt")
    back = torch.load(tmp_path / "ok.pt", weights_only=True)
    assert back["l"][0] == 1 and back["l"][1] is back["l"]
    assert back["d"]["x"] == 2 and back["d"]["self"] is back["d"]
    assert torch.equal(back["od"]["w"], torch.ones(2)) and back["od"]._metadata["parent"] is back["od"]


def test_truncate_json_deep_text():
    # a text scanner, no recursion: any depth is rewritten exactly
    for text in ("[" * 200000 + "0.123456789" + "]" * 200000,
                 '{"a": ' * 200000 + "1" + "}" * 200000):
        assert truncate_json(text) == text.replace("0.123456789", "0.1235")
    with pytest.raises(ValueError, match="depth"):
        json_parse("[" * 200000 + "]" * 200000)


def test_lone_surrogate_is_value_error():
    with pytest.raises(ValueError):
        json_stringify(["\ud800"])


def test_parse_errors_have_line_and_column():
    # the position is the stdlib's, except inside a bad token where jansson
    # points at the character it stopped on
    cases = ['{"a": 1,}', "[1, 2", "{'a': 1}", '{"a" 1}', "", "tru", '[1] x', '"\\x"', '[1,\n 2,\n\n  x]']
    for text in cases:
        with pytest.raises(ValueError) as ei:
            json_parse(text)
        err = ei.value
        assert isinstance(err, json.JSONDecodeError)
        assert isinstance(err, mlutils.JSONDecodeError)
        with pytest.raises(json.JSONDecodeError) as std:
            json.loads(text)
        if text in ("tru", '"\\x"'):
            assert std.value.pos < err.pos <= std.value.pos + 2
        else:
            assert (err.pos, err.lineno, err.colno) == (std.value.pos, std.value.lineno, std.value.colno), text
        assert err.doc == text
        assert f"line {err.lineno} column {err.colno} (char {err.pos})" in str(err)
    with pytest.raises(json.JSONDecodeError) as ei:
        json_parse('{\n  "a": 1,\n  "b": @\n}')
    assert ei.value.lineno == 3 and ei.value.colno == 8


def test_parse_error_quoting_part_of_a_utf8_sequence():
    # jansson quotes the bytes near an invalid escape and may cut a character
    # in two: still a JSONDecodeError (it was a UnicodeDecodeError)
    for text in ['"\\u\u20ac"', '["\\u12\u00e9"]', '"\\u0000nInfinity\\u\u20a9-true]']:
        for arg in (text, text.encode()):
            with pytest.raises(mlutils.JSONDecodeError) as ei:
                json_parse(arg)
            assert ei.value.doc == text and 0 <= ei.value.pos <= len(text)
            with pytest.raises(json.JSONDecodeError):
                json.loads(text)


def test_duplicate_keys_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        json_parse('{"a": 1, "a": 2}')


def test_parse_type_errors():
    with pytest.raises(TypeError):
        json_parse(12)
    with pytest.raises(ValueError):
        json_parse(b"\xff\xfe")
    assert json_parse(bytearray(b"[1]")) == [1]
    assert json_parse(memoryview(b'{"a": 2}')) == {"a": 2}
    assert json_parse(b'\xef\xbb\xbf{"bom": 1}') == {"bom": 1}


def test_truncate_while_writing_matches_original_regex():
    def original(text):
        return re.sub(r"\d+\.\d{8,}", lambda m: "{:.4f}".format(float(m.group())), text)

    values = [0.123456789, 1.23456789e-05, 123456.123456789, -2.000000005, 0.5, 3.0, 1e-10,
              12.99999999, 0.1 + 0.2, 1 / 3, 2 / 3, 100.00005, 1e300 / 7]
    data = {"metrics": values, "n": 12345678901, "name": "run"}
    ours = json_stringify(data, truncate=True)
    assert ours == original(json.dumps(data, ensure_ascii=False))
    assert json_stringify(data, truncate=True, pretty=True) == original(json.dumps(data, ensure_ascii=False, indent=4))


def test_truncate_leaves_strings_alone():
    data = {"s": "v0.123456789", "x": 0.123456789}
    assert json_parse(json_stringify(data, truncate=True)) == {"s": "v0.123456789", "x": 0.1235}
    text = json.dumps(data)
    assert truncate_json(text) == '{"s": "v0.123456789", "x": 0.1235}'
    assert truncate_json(text.encode()) == b'{"s": "v0.123456789", "x": 0.1235}'
    with pytest.raises(TypeError):
        truncate_json(1.5)


def test_truncate_is_locale_independent():
    code = (
        "import locale\n"
        "for name in ('de_DE.UTF-8', 'fr_FR.UTF-8', 'C.UTF-8'):\n"
        "    try:\n        locale.setlocale(locale.LC_ALL, name); break\n"
        "    except locale.Error: pass\n"
        "from mlutils.io import json_stringify\n"
        "print(json_stringify([0.123456789], truncate=True))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[0.1235]"


def test_truncate_with_a_decimal_comma_locale(tmp_path):
    # a locale with a decimal comma, compiled for this test when the machine has none
    import shutil

    if shutil.which("localedef") is None or not os.path.exists("/usr/share/i18n/locales/de_DE"):
        pytest.skip("no localedef / de_DE locale source to build a decimal-comma locale")
    subprocess.run(["localedef", "-i", "de_DE", "-f", "UTF-8", str(tmp_path / "de_DE.UTF-8")],
                   check=False, capture_output=True)
    if not (tmp_path / "de_DE.UTF-8").exists():
        pytest.skip("localedef could not build de_DE.UTF-8")
    # near-ties and values past 2**40 / 1e4 take the exact (printf) path
    values = [0.12345000000001, 123456789.123456789, 2.00005000001, 0.123456789, -7.99995000001]
    code = (
        "import locale, json\n"
        "locale.setlocale(locale.LC_ALL, 'de_DE.UTF-8')\n"
        "assert locale.localeconv()['decimal_point'] == ','\n"
        "from mlutils.io import json_stringify\n"
        "from mlutils.utils import truncate_json\n"
        f"v = {values!r}\n"
        "print(json_stringify(v, truncate=True))\n"
        "print(truncate_json(json.dumps(v)))\n"
    )
    env = dict(os.environ, LOCPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    want = "[" + ", ".join("{:.4f}".format(v) for v in values) + "]"
    assert out.stdout.split("\n")[:2] == [want, want]


def test_truncate_json_releases_the_gil():
    # rewriting a big text is pure C: another thread keeps running
    from _gil import assert_releases_gil

    text = "[" + ", ".join(["1.123456789"] * 1000000) + "]"
    assert_releases_gil(lambda: truncate_json(text), calls=2)


def test_json_read_write(tmp_path):
    p = tmp_path / "x.json"
    assert json_read(p) is None
    assert json_read(p, default={"d": 1}) == {"d": 1}
    json_write({"a": [1, 2]}, p)
    assert json.loads(p.read_text()) == {"a": [1, 2]}
    json_write({"a": 0.123456789}, str(p), truncate=True, pretty=True)
    assert p.read_text() == json.dumps({"a": 0.1235}, indent=4)
    assert json_read(p) == {"a": 0.1235}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_json_write_is_atomic_on_failure(tmp_path):
    p = tmp_path / "keep.json"
    json_write({"old": True}, p)
    with pytest.raises(TypeError):
        json_write({"bad": object()}, p)
    assert json_read(p) == {"old": True}
    with pytest.raises(OSError):
        json_write({"a": 1}, tmp_path / "missing-dir" / "x.json")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["keep.json"]


def test_json_write_respects_umask(tmp_path):
    old = os.umask(0o027)
    try:
        json_write([1], tmp_path / "m.json")
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o640


def test_json_write_keeps_the_permissions_of_the_file_it_replaces(tmp_path):
    p = tmp_path / "secret.json"
    p.write_text("{}")
    os.chmod(p, 0o600)
    old = os.umask(0o022)
    try:
        json_write({"token": "x"}, p)
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o600 and json_read(p) == {"token": "x"}
    os.chmod(p, 0o664)
    json_write([1], p)
    assert p.stat().st_mode & 0o777 == 0o664


def test_json_write_through_a_symlink(tmp_path):
    # as open(path, "w") does: the link stays, the file it points to is replaced
    (tmp_path / "runs").mkdir()
    real = tmp_path / "runs" / "metrics.json"
    real.write_text("[0]")
    link = tmp_path / "latest.json"
    link.symlink_to(os.path.join("runs", "metrics.json"))
    json_write([1, 2], link)
    assert link.is_symlink() and json_read(real) == [1, 2] and json_read(link) == [1, 2]
    assert sorted(os.listdir(tmp_path / "runs")) == ["metrics.json"]


def test_json_write_leaves_the_umask_of_other_threads_alone(tmp_path):
    # reading the umask by setting it let files of other threads be created
    # 0644 under a 077 umask while an atomic write ran
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else str(tmp_path)
    code = (
        "import os, sys, tempfile, threading, time\n"
        "from mlutils.io import json_write\n"
        f"d = tempfile.mkdtemp(dir={base!r})\n"
        "os.umask(0o077)\n"
        "stop, bad = [], []\n"
        "def writer(k):\n"
        "    while not stop:\n"
        "        json_write([k], os.path.join(d, 'w%d.json' % k))\n"
        "def creator():\n"
        "    deadline = time.time() + 2\n"
        "    while time.time() < deadline and not bad:\n"
        "        p = os.path.join(d, 'c')\n"
        "        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o666)\n"
        "        mode = os.fstat(fd).st_mode & 0o777\n"
        "        os.close(fd); os.unlink(p)\n"
        "        if mode != 0o600: bad.append(oct(mode))\n"
        "    stop.append(1)\n"
        "ts = [threading.Thread(target=writer, args=(k,)) for k in range(3)] + [threading.Thread(target=creator)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "modes = {oct(os.stat(os.path.join(d, f)).st_mode & 0o777) for f in os.listdir(d)}\n"
        "for f in os.listdir(d): os.unlink(os.path.join(d, f))\n"
        "os.rmdir(d)\n"
        "print(bad[:1], sorted(modes))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] ['0o600']"


def test_json_write_to_a_long_file_name(tmp_path):
    # the temporary file beside it must not exceed the name limit where the target does not
    p = tmp_path / ("a" * 250 + ".json")
    p.write_text("{}")
    json_write({"a": 1}, p)
    assert json_read(p) == {"a": 1}
    assert os.listdir(tmp_path) == [p.name]


def test_json_write_kill_leaves_old_file(tmp_path):
    """A writer killed mid-loop never leaves a half-written file."""
    p = tmp_path / "big.json"
    json_write({"gen": -1, "payload": []}, p)
    code = (
        "import sys\nfrom mlutils.io import json_write\n"
        "p = sys.argv[1]\npayload = list(range(200000))\ni = 0\n"
        "while True:\n    json_write({'gen': i, 'payload': payload}, p); i += 1\n"
        "    if i == 2: print('ready', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(p)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    import time
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    data = json_read(p)
    assert data["gen"] >= 1 and len(data["payload"]) == 200000


def _until_no_memory_error(fail_alloc, call):
    """Runs call() with the 1st, 2nd, ... core allocation failing until it
    succeeds; returns (its result, how many runs raised MemoryError)."""
    n = 0
    while True:
        fail_alloc(n)
        try:
            return call(), n
        except MemoryError:
            n += 1
        finally:
            fail_alloc(-1)


def test_alloc_failures_raise_memory_error(fail_alloc, tmp_path):
    text = '[NaN, "\\u0000", 0.123456789, {"k": [1, "x"]}]'
    got, failures = _until_no_memory_error(fail_alloc, lambda: json_parse(text))
    assert failures >= 1
    assert json.dumps(got) == json.dumps(json.loads(text))
    value = [0.123456789, "x" * 300, {"k": [1, 2.5]}]
    got, failures = _until_no_memory_error(fail_alloc, lambda: json_stringify(value, truncate=True))
    assert failures >= 1 and got == json.dumps([0.1235, "x" * 300, {"k": [1, 2.5]}])
    big = json.dumps([0.123456789] * 1000)
    got, failures = _until_no_memory_error(fail_alloc, lambda: truncate_json(big))
    assert failures >= 1 and got == json.dumps([0.1235] * 1000)
    # an atomic write that runs out of memory leaves the old file alone
    p = tmp_path / "m.json"
    p.write_text("[0]")

    def write():
        try:
            json_write(value, p)
        finally:
            assert os.listdir(tmp_path) == ["m.json"]

    _, failures = _until_no_memory_error(fail_alloc, write)
    assert failures >= 1 and json_read(p) == [0.123456789, "x" * 300, {"k": [1, 2.5]}]


# ---- hypothesis: arbitrary JSON values round-trip exactly like the stdlib

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8).filter(lambda k: '\x00' not in k), children, max_size=5),
    max_leaves=30,
)


def _no_surrogates(v):
    if isinstance(v, str):
        return not any(0xD800 <= ord(c) <= 0xDFFF for c in v)
    if isinstance(v, list):
        return all(_no_surrogates(x) for x in v)
    if isinstance(v, dict):
        return all(_no_surrogates(k) and _no_surrogates(x) for k, x in v.items())
    return True


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(json_values)
def test_hypothesis_roundtrip(value):
    if not _no_surrogates(value):
        with pytest.raises(ValueError):
            json_stringify(value)
        return
    text = json_stringify(value)
    assert text == json.dumps(value, ensure_ascii=False)
    assert json_parse(text) == json.loads(text)
    assert json_parse(json.dumps(value)) == value


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=64) | st.text(alphabet='{}[]",:0123456789.eE+-nultrfaseNIy\\ \n\x00', max_size=40))
def test_hypothesis_parser_never_crashes(data):
    """Arbitrary input: either the stdlib's answer (when both accept it) or a ValueError."""
    try:
        got = json_parse(data)
    except ValueError:
        return
    try:
        want = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        pytest.fail(f"accepted text the stdlib rejects: {data!r}")
    if isinstance(want, float) and math.isnan(want):
        assert math.isnan(got)
    else:
        assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


def _original_truncate(text):
    return re.sub(r"\d+\.\d{8,}", lambda m: "{:.4f}".format(float(m.group())), text)


@settings(max_examples=2000, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False)
       | st.integers(-10**9, 10**9).map(lambda i: i / 10000 + 0.00005)
       | st.integers(-10**12, 10**12).map(lambda i: i * 1e-8))
def test_hypothesis_truncate_matches_original(x):
    data = [x, {"v": x}]
    assert json_stringify(data, truncate=True) == _original_truncate(json.dumps(data))
    assert truncate_json(json.dumps(data)) == _original_truncate(json.dumps(data))
