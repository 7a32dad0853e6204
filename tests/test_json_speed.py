"""The fast paths of the JSON helpers keep their contracts: json_stringify's
own argument parsing, json_read's one-read C path and the key cache of the
conversion (checked against the standard library's json)."""
import json
import os

import pytest

import mlutils
from mlutils import _core
from mlutils.io import json_parse, json_read, json_stringify, json_write


def test_stringify_arguments_like_a_python_function():
    d = {"a": [1.5, 0.12345678]}
    assert json_stringify(d) == json_stringify(data=d) == json.dumps(d, ensure_ascii=False)
    assert json_stringify(d, True) == json_stringify(d, truncate=1) == '{"a": [1.5, 0.1235]}'
    assert json_stringify(d, False, True) == json.dumps(d, indent=4)
    assert json_stringify(d, raw=True) == json.dumps(d).encode()
    assert json_stringify(d, pretty=[], raw="") == json.dumps(d)  # truthiness, as before
    with pytest.raises(TypeError, match="unexpected keyword argument 'indent'"):
        json_stringify(d, indent=4)
    with pytest.raises(TypeError, match="multiple values for argument 'data'"):
        json_stringify(d, data=d)
    with pytest.raises(TypeError, match="missing required argument 'data'"):
        json_stringify(pretty=True)
    with pytest.raises(TypeError, match="at most 4 arguments"):
        json_stringify(d, 0, 0, 0, 0)

    class Bad:
        def __bool__(self):
            raise RuntimeError("no truth")

    with pytest.raises(RuntimeError, match="no truth"):
        json_stringify(d, pretty=Bad())


def test_json_write_passes_its_keywords(tmp_path):
    p = tmp_path / "x.json"
    json_write({"a": 0.123456789}, p, truncate=True, pretty=True)
    assert p.read_text() == '{\n    "a": 0.1235\n}'
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        json_write({}, p, sort_keys=True)


def records(n):
    return [{"step": i, "loss": i / 7, "tag": "é%d" % i, "ok": i % 2 == 0, "x": None,
             "nested": {"step": i, "clé": [i, 0.5]}} for i in range(n)]


def test_read_matches_json_load(tmp_path):
    for i, obj in enumerate([records(50), {"a": 1}, [], "text", 1.5, None, {"k%d" % i: i for i in range(1000)}]):
        p = tmp_path / f"{i}.json"
        p.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
        assert json_read(p) == json.load(open(p, encoding="utf-8"))
        assert json_read(str(p)) == json_read(os.fsencode(p)) == obj


def test_repeated_keys_share_one_str(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(records(10)))
    for out in (json_read(p), json_parse(p.read_bytes())):
        keys = [list(r) for r in out]
        assert all(k is k0 for ks in keys for k, k0 in zip(ks, keys[0]))
        assert out == records(10)


def test_many_distinct_and_colliding_keys():
    # more distinct keys than cache slots, long keys past the cached length,
    # non-ASCII keys and keys that differ only in their last byte
    obj = {("k" * (i % 90)) + "%d" % i + ("é" if i % 3 == 0 else ""): i for i in range(3000)}
    text = json.dumps([obj, obj], ensure_ascii=False)
    assert json_parse(text) == [obj, obj]
    assert json_parse(json.dumps({"ab": 1, "ac": 2, "a\u00e9": 3, "\U0001f600": 4})) == \
        {"ab": 1, "ac": 2, "a\u00e9": 3, "\U0001f600": 4}


def test_read_errors(tmp_path):
    assert json_read(tmp_path / "missing.json", default={"d": 1}) == {"d": 1}
    with pytest.raises(IsADirectoryError):
        json_read(tmp_path)
    p = tmp_path / "bad.json"
    p.write_text('{"a": 1,\n "a": 2}')
    with pytest.raises(mlutils.JSONDecodeError) as ei:
        json_read(p)
    assert isinstance(ei.value, json.JSONDecodeError) and ei.value.lineno == 2
    p.write_bytes(b"\xef\xbb\xbf[1, NaN]")  # BOM and NaN, as json.load(bytes) takes them
    out = json_read(p)
    assert out[0] == 1 and out[1] != out[1]
    with pytest.raises(TypeError):
        json_read(3.5)


def test_parse_only_hook_is_jansson_alone():
    assert _core._json_parse_only(b'{"a": [1, 2.5, "x"]}') is True
    assert _core._json_parse_only(b'{"a": ') is False


def test_read_non_regular_and_empty_files(tmp_path):
    # a regular file is read up to its fstat size in one call; anything else
    # (a pipe here) is still read to EOF.  The open blocks until the writer
    # thread opens the pipe: this only finishes because the read runs
    # without the GIL.
    import threading

    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    big = {"k": ["x" * 1000] * 300}  # more than one pipe buffer

    def writer():
        with open(fifo, "w") as f:
            json.dump(big, f)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert json_read(fifo) == big
    finally:
        t.join()
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    with pytest.raises(mlutils.JSONDecodeError):
        json_read(empty)
