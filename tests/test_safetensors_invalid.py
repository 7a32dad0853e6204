"""Untrusted safetensors input: the invalid corpus, hypothesis round trips
and mutations, allocation failures."""
import json
import os
import pathlib
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlutils
from mlutils import _core
from mlutils import _safetensors as S

safetensors = pytest.importorskip("safetensors")
stn = pytest.importorskip("safetensors.numpy")

CORPUS = pathlib.Path(__file__).parent / "cases" / "safetensors" / "invalid"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())


def test_corpus_is_there():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES)
def test_invalid_case(case, tmp_path):
    data = (CORPUS / case / "input").read_bytes()
    want = (CORPUS / case / "error").read_text(encoding="utf-8").strip()
    path = CORPUS / case / "input"
    for call in (lambda: S.verify(path), lambda: S.load(data), lambda: S.read_header(path),
                 lambda: S.load_file(path), lambda: S.safe_open(path)):
        with pytest.raises(mlutils.SafetensorsError) as e:
            call()
        assert want in str(e.value)
        assert isinstance(e.value, ValueError)
    # the reference rejects every one of them too
    with pytest.raises(Exception):
        with safetensors.safe_open(str(path), "np") as f:
            f.keys()


def test_open_errors_are_oserrors(tmp_path):
    with pytest.raises(FileNotFoundError):
        S.load_file(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError):
        S.verify(tmp_path)


def test_json_whitespace_around_header_is_accepted(tmp_path):
    # the reference has never required the header to begin with '{'
    text = b'\n {"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}} \t'
    text += b" " * (-len(text) % 8)
    blob = struct.pack("<Q", len(text)) + text + b"\x01\x02"
    assert S.load(blob)["a"].tolist() == [1, 2]
    assert stn.load(blob)["a"].tolist() == [1, 2]


def test_unknown_entry_fields_are_ignored():
    text = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":[1]}}'
    text += b" " * (-len(text) % 8)
    blob = struct.pack("<Q", len(text)) + text + b"\x05"
    assert S.load(blob)["a"].tolist() == [5] == stn.load(blob)["a"].tolist()


def test_hostile_names_are_shortened_in_messages():
    name = "n" * 5000
    text = ('{"%s":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}' % name).encode()
    text += b" " * (-len(text) % 8)
    with pytest.raises(mlutils.SafetensorsError) as e:
        S.load(struct.pack("<Q", len(text)) + text + b"\0" * 4)
    assert len(str(e.value)) < 400 and "..." in str(e.value)


def test_allocation_failures_on_parse_and_save(fail_alloc):
    blob = S.save({f"t{i}": np.arange(i + 1, dtype=np.float32) for i in range(8)}, {"a": "b", "c": "d"})
    want = S.load(blob)
    failures = 0
    for n in range(200):
        fail_alloc(n)
        try:
            got = S.load(blob)
        except MemoryError:
            failures += 1
            continue
        finally:
            fail_alloc(-1)
        assert {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in want.items()}
        break
    else:
        pytest.fail("the parse never succeeded")
    assert failures > 10  # every allocation of the parse was tried
    failures = 0
    for n in range(200):
        fail_alloc(n)
        try:
            out = S.save(want, {"a": "b", "c": "d"})
        except MemoryError:
            failures += 1
            continue
        finally:
            fail_alloc(-1)
        assert out == blob
        break
    assert failures > 2


def test_empty_with_empty_metadata():
    # The library writes `{},"__metadata__":{}}` here, which it cannot read
    # back; ours is the valid header it means.
    theirs = stn.save({}, {})
    with pytest.raises(Exception):
        stn.load(theirs)
    ours = S.save({}, {})
    assert ours == struct.pack("<Q", 24) + b'{"__metadata__":{}}' + b" " * 5
    assert stn.load(ours) == {} and S.load(ours) == {}


def test_nul_in_names():
    """jansson cannot hold NUL in object keys, so our reader refuses such names; the
    writer refuses them too (it never writes what it cannot read back), where the
    library writes and reads them."""
    blob = stn.save({"a\x00b": np.zeros(1, np.uint8)})
    assert list(stn.load(blob)) == ["a\x00b"]
    with pytest.raises(mlutils.SafetensorsError, match="NUL byte in object key"):
        S.load(blob)
    with pytest.raises(mlutils.SafetensorsError, match="NUL character"):
        S.save({"a\x00b": np.zeros(1, np.uint8)})
    with pytest.raises(mlutils.SafetensorsError, match="metadata key"):
        S.save({"a": np.zeros(1, np.uint8)}, metadata={"k\x00": "v"})
    # NUL in a metadata value is fine both ways
    blob = S.save({"a": np.zeros(1, np.uint8)}, metadata={"k": "v\x00w"})
    assert blob == stn.save({"a": np.zeros(1, np.uint8)}, metadata={"k": "v\x00w"})
    assert _meta_of(blob) == {"k": "v\x00w"}


def _meta_of(blob):
    return _core.st_from_bytes(blob).metadata()


# ---------------------------------------------------------------- hypothesis

NP_DTYPES = [np.bool_, np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
             np.uint64, np.float16, np.float32, np.float64, np.complex64]

# jansson cannot hold NUL inside object keys: such names are refused on read
# (test_nul_in_names below), so the round trip leaves them out.
names = st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__" and "\x00" not in s)


@st.composite
def state_dicts(draw):
    n = draw(st.integers(0, 6))
    keys = draw(st.lists(names, min_size=n, max_size=n, unique=True))
    out = {}
    for k in keys:
        dt = np.dtype(draw(st.sampled_from(NP_DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        nbytes = int(np.prod(shape)) * dt.itemsize
        raw = np.frombuffer(draw(st.binary(min_size=nbytes, max_size=nbytes)), np.uint8).copy()
        if dt == np.bool_:
            raw &= 1
        out[k] = raw.view(dt).reshape(shape)
    return out


def _encodable(s):
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state_dicts(), st.one_of(st.none(), st.dictionaries(names, st.text(max_size=8), max_size=1)))
def test_hypothesis_round_trip_matches_library(sd, meta):
    if not all(_encodable(k) for k in sd) or (meta and not all(_encodable(k) and _encodable(v) for k, v in meta.items())):
        return
    ours = S.save(sd, meta)
    if sd or meta != {}:  # see test_empty_with_empty_metadata
        assert ours == stn.save(sd, meta)
    back = S.load(ours)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and back[k].tobytes() == v.tobytes()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_hypothesis_mutations_never_crash(data):
    blob = bytearray(S.save({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int8)}, {"k": "v"}))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    try:
        ours = S.load(bytes(blob))
    except mlutils.SafetensorsError:
        ours = None
    try:
        theirs = stn.load(bytes(blob))
    except Exception:
        theirs = None
    if ours is not None:
        # whatever we accept, the reference accepts with the same content
        # (it may accept duplicate keys, which we refuse)
        assert theirs is not None
        assert set(ours) == set(theirs)
        for k in ours:
            assert ours[k].tobytes() == theirs[k].tobytes() and ours[k].shape == theirs[k].shape


# ---------------------------------------------------------------- fuzz replay

def test_fuzz_corpus_replays_clean_under_sanitizers(tmp_path):
    """Builds tests/fuzz/st_header.c with gcc + ASan/UBSan and replays its seeds."""
    import shutil
    import subprocess

    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    root = pathlib.Path(__file__).parent.parent
    # the harness carries its own sanitizers; make itself must not run under a preloaded ASan
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    r = subprocess.run(["make", "-s", "fuzz-replay-st"], cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "st_header: replayed" in r.stdout


# ---------------------------------------------------------------- the reference's grammar and limits

def _blob(text, data=b""):
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _lib_accepts(blob, tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    try:
        with safetensors.safe_open(str(path), "np") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception:  # the library's SafetensorsError is not exported the same way everywhere
        return None


def _ours_accepts(blob):
    try:
        m = _core.st_from_bytes(blob)
    except mlutils.SafetensorsError:
        return None
    return {e.name: list(e.shape) for e in m.entries()}


NUMBER_TOKENS = ["0", "1", "-0", "-1", "00", "01", "-01", "+1", "1.0", "0.0", "-0.0", "1e0", "1E0", "1e+0",
                 "9223372036854775807", "9223372036854775808", "18446744073709551615",
                 "18446744073709551616", "99999999999999999999999", "1e400", "0x1", "1_0", " 1", "1 "]


@pytest.mark.parametrize("tok", NUMBER_TOKENS)
@pytest.mark.parametrize("where", ["dim", "begin", "end", "ignored"])
def test_integer_grammar_matches_the_library(tok, where, tmp_path):
    """Every integer field (shape, data_offsets) reads numbers exactly as the library's serde u64."""
    shape, offs, extra = "[0,0]", "[0,0]", ""
    if where == "dim":
        shape = "[0,%s]" % tok
    elif where == "begin":
        offs = "[%s,0]" % tok
    elif where == "end":
        offs = "[0,%s]" % tok
    else:
        extra = ',"x":%s' % tok
    blob = _blob('{"a":{"dtype":"U8","shape":%s,"data_offsets":%s%s}}' % (shape, offs, extra))
    assert _ours_accepts(blob) == _lib_accepts(blob, tmp_path)


@pytest.mark.parametrize("dim", [2**63 - 1, 2**63, 2**64 - 1])
def test_largest_dimensions_read_like_the_library(dim, tmp_path):
    """Dimensions up to 2**64-1 (in an empty tensor): our reader and the library agree on
    the header; our writer writes only what NumPy and torch can hold (below 2**63)."""
    blob = _blob('{"e":{"dtype":"U8","shape":[0,%d],"data_offsets":[0,0]}}' % dim)
    assert _ours_accepts(blob) == _lib_accepts(blob, tmp_path) == {"e": [0, dim]}
    assert S.read_header(tmp_path / "x.safetensors")[1][0]["shape"] == [0, dim]
    # materialising it is the frameworks' limit (int64 sizes), not the file's: a clear error
    if dim >= 2**63:
        with safetensors.safe_open(str(tmp_path / "x.safetensors"), "np") as f, pytest.raises(ValueError):
            f.get_tensor("e")
        with pytest.raises(mlutils.SafetensorsError, match="at most 2\\^63-1") as e:
            S.load(blob)
        # so our writer refuses it, in the same words
        with pytest.raises(mlutils.SafetensorsError) as w:
            S.save({"e": S.RawTensor("U8", (0, dim), b"")})
        assert str(w.value) == str(e.value)
    else:
        assert S.save({"e": S.RawTensor("U8", (0, dim), b"")}) == blob
        with safetensors.safe_open(str(tmp_path / "x.safetensors"), "np") as f:
            assert f.get_tensor("e").shape == (0, dim)
        assert S.load(blob)["e"].shape == (0, dim)
    # one past: refused by our writer, and the same text refused by both readers
    with pytest.raises(mlutils.SafetensorsError, match="outside"):
        S.save({"e": S.RawTensor("U8", (0, 2**64), b"")})
    past = _blob('{"e":{"dtype":"U8","shape":[0,18446744073709551616],"data_offsets":[0,0]}}')
    assert _ours_accepts(past) is None and _lib_accepts(past, tmp_path) is None


def test_nesting_limit_matches_the_library(tmp_path):
    for depth, ok in ((125, True), (126, False)):  # + root and tensor objects: 127 read, 128 refused
        blob = _blob('{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":%s}}' % ("[" * depth + "]" * depth))
        want = {"a": [0]} if ok else None
        assert _ours_accepts(blob) == _lib_accepts(blob, tmp_path) == want, depth


def test_null_metadata_is_no_metadata(tmp_path):
    blob = _blob('{"__metadata__":null,"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\x07")
    assert _ours_accepts(blob) == _lib_accepts(blob, tmp_path) == {"a": [1]}
    with safetensors.safe_open(str(tmp_path / "x.safetensors"), "np") as f:
        assert f.metadata() is None
    assert S.read_header(tmp_path / "x.safetensors")[0] is None


def test_header_size_limit_both_sides_like_the_library(tmp_path):
    """N = 100,000,000 is the largest header: written by both writers byte for byte,
    read by both readers; one more byte (8 more for the padded writers) is refused."""
    limit = 100_000_000
    empty = np.zeros(0, np.uint8)
    base = len(b'{"__metadata__":{"k":""},"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}')
    value = "v" * (limit - base)
    ours = S.save({"a": empty}, metadata={"k": value})
    assert struct.unpack("<Q", ours[:8])[0] == limit and len(ours) == 8 + limit
    assert ours == stn.save({"a": empty}, metadata={"k": value})
    assert _ours_accepts(ours) == {"a": [0]}
    path = tmp_path / "max.safetensors"
    path.write_bytes(ours)
    with safetensors.safe_open(str(path), "np") as f:
        assert f.metadata()["k"] == value
    del ours
    with pytest.raises(mlutils.SafetensorsError, match="header too large"):
        S.save({"a": empty}, metadata={"k": value + "v"})
    with pytest.raises(Exception, match="(?i)too large"):
        stn.save({"a": empty}, metadata={"k": value + "v"})
    # the same limit reached through a tensor's name
    arr = np.zeros(1, np.uint8)
    name_base = len(b'{"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}')
    name = "n" * (limit - name_base)
    ours = S.save({name: arr})
    assert ours == stn.save({name: arr}) and struct.unpack("<Q", ours[:8])[0] == limit
    assert _ours_accepts(ours) == {name: [1]}
    del ours
    with pytest.raises(mlutils.SafetensorsError, match="header too large"):
        S.save({name + "n": arr})
    with pytest.raises(Exception, match="(?i)too large"):
        stn.save({name + "n": arr})
    # the reader: N = limit + 1 (whitespace after the JSON is valid) is refused by both
    blob = _blob('{}')
    text = b"{}" + b" " * (limit + 1 - 2)
    past = struct.pack("<Q", limit + 1) + text
    assert _ours_accepts(past) is None and _lib_accepts(past, tmp_path) is None
    at = struct.pack("<Q", limit) + text[:-1]
    assert _ours_accepts(at) == _lib_accepts(at, tmp_path) == {}
    assert _ours_accepts(blob) == {}


# ---------------------------------------------------------------- the same problem, the same class, both formats

def _path_readers():
    """(id, suffix, call) for every reader that takes a path, of both formats."""
    from mlutils import _ptload
    from mlutils import io as mio
    from mlutils.__main__ import describe

    return [
        ("st.load_file", ".safetensors", lambda p: S.load_file(p)),
        ("st.safe_open", ".safetensors", lambda p: S.safe_open(p)),
        ("st.read_header", ".safetensors", lambda p: S.read_header(p)),
        ("st.verify", ".safetensors", lambda p: S.verify(p)),
        ("st.torch_load", ".safetensors", lambda p: mio.torch_load(p, framework="np")),
        ("st.describe", ".safetensors", lambda p: describe(str(p))),
        ("pt.load", ".pt", lambda p: _ptload.load(p, framework="np")),
        ("pt.load-copy", ".pt", lambda p: _ptload.load(p, framework="np", mmap=False)),
        ("pt.read_index", ".pt", lambda p: _ptload.read_index(p)),
        ("pt.verify", ".pt", lambda p: _ptload.verify(p)),
        ("pt.torch_load", ".pt", lambda p: mio.torch_load(p, framework="np")),
        ("pt.describe", ".pt", lambda p: describe(str(p))),
    ]


def _make(kind, tmp_path, suffix, cleanup):
    """A path of `kind` named with `suffix`; (path, what the message must say).
    cleanup: a list that gets the callables that remove what lies outside tmp_path."""
    import socket
    import tempfile

    p = tmp_path / ("x" + suffix)
    if kind == "missing":
        return p, "No such file"
    if kind == "directory":
        p.mkdir()
        return p, "Is a directory"
    if kind == "fifo":
        os.mkfifo(p)  # no writer: opening it must not wait for one
        return p, "is a FIFO, not a regular file"
    if kind == "device":
        p.symlink_to("/dev/null")  # followed, as open() follows it
        return p, "is a character device, not a regular file"
    if kind == "socket":
        short = pathlib.Path(tempfile.mkdtemp(dir="/tmp")) / "s"  # AF_UNIX paths are short
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(short))
        cleanup += [s.close, short.unlink, short.parent.rmdir]
        p.symlink_to(short)
        return p, "is a socket, not a regular file"
    p.write_bytes({"empty": b"", "short": b"\x01\x00\x00"}[kind])
    return p, ""


# What each problem raises, whatever the format: the path's kind is an OSError
# where Python has one (as open() raises it) and a ValueError otherwise; bad
# bytes are the format's own error (a ValueError).
SAME_CLASS = {"missing": FileNotFoundError, "directory": IsADirectoryError, "fifo": ValueError,
              "device": ValueError, "socket": ValueError, "empty": "format", "short": "format"}


@pytest.mark.parametrize("kind", sorted(SAME_CLASS))
def test_same_problem_same_exception_for_both_formats(tmp_path, kind):
    import signal

    def alarm(*_):
        raise TimeoutError(f"reading a {kind} hung")

    old = signal.signal(signal.SIGALRM, alarm)
    cleanup = []
    try:
        for name, suffix, call in _path_readers():
            d = tmp_path / name
            d.mkdir()
            p, words = _make(kind, d, suffix, cleanup)
            signal.alarm(20)
            try:
                with pytest.raises(Exception) as ei:
                    call(p)
            finally:
                signal.alarm(0)
            e = ei.value
            want = SAME_CLASS[kind]
            if want == "format":
                want = mlutils.SafetensorsError if suffix == ".safetensors" else mlutils.TorchFormatError
                assert isinstance(e, ValueError), (name, e)
            assert type(e) is want, (name, type(e), e)
            assert words in str(e), (name, e)
            if kind in ("fifo", "device", "socket"):
                assert str(p) in str(e), (name, e)  # the message names the path
    finally:
        signal.signal(signal.SIGALRM, old)
        for f in cleanup:
            f()


# ---------------------------------------------------------------- a file cut under an open reader

_CUT_CHILD = """
import os, sys
import numpy as np
from mlutils import SafetensorsError
from mlutils import _safetensors as S
path, framework = sys.argv[1], sys.argv[2]
f = S.safe_open(path, framework=framework)
os.truncate(path, os.path.getsize(path) // 2)  # another process cuts the file
for what, call in [("get_tensor", lambda: f.get_tensor("w")), ("odd", lambda: f.get_tensor("odd")),
                   ("get_slice", lambda: f.get_slice("w")[1:3]), ("get_slice-all", lambda: f.get_slice("w")[:]),
                   ("get_slice-fancy", lambda: f.get_slice("w")[[0, 5]])]:
    try:
        t = call()
        print(what, "ok", float(t.sum()))  # touches every byte
    except SafetensorsError as e:
        print(what, "SafetensorsError", e)
    sys.stdout.flush()
print("metadata", f.metadata())
"""


def _misaligned_file(path):
    """F32 'w' (64 KiB, aligned) and F32 'odd' at an odd offset (the torch path copies it)."""
    w = np.arange(1 << 14, dtype="<f4")
    odd = np.arange(4, dtype="<f4")
    hdr = ('{"__metadata__":{"k":"v"},"w":{"dtype":"F32","shape":[128,128],"data_offsets":[0,%d]},'
           '"pad":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]},'
           '"odd":{"dtype":"F32","shape":[4],"data_offsets":[%d,%d]}}'
           % (w.nbytes, w.nbytes, w.nbytes + 1, w.nbytes + 1, w.nbytes + 17)).encode()
    hdr += b" " * (-len(hdr) % 8)
    path.write_bytes(struct.pack("<Q", len(hdr)) + hdr + w.tobytes() + b"\x07" + odd.tobytes())


@pytest.mark.parametrize("framework", ["np", "pt"])
def test_file_cut_after_safe_open_is_an_error_not_sigbus(tmp_path, framework):
    """safe_open, then another process truncates the file, then tensors are
    read: each read raises SafetensorsError naming the cut (it used to kill
    the process with SIGBUS: the reads went through the mapping)."""
    if framework == "pt":
        pytest.importorskip("torch")
    import subprocess
    import sys

    p = tmp_path / "m.safetensors"
    _misaligned_file(p)
    assert S.load_file(p)["odd"].tolist() == [0, 1, 2, 3]
    r = subprocess.run([sys.executable, "-c", _CUT_CHILD, str(p), framework], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["get_tensor", "odd", "get_slice", "get_slice-all", "get_slice-fancy",
                                               "metadata"]
    for ln in lines[:-1]:
        assert "SafetensorsError" in ln and "shrank" in ln, ln
    assert lines[-1] == "metadata {'k': 'v'}"


def test_file_cut_then_restored_reads_again(tmp_path):
    """The check is of the size the file had when opened: a file cut and
    restored (same inode) reads again; closing keeps arrays valid."""
    p = tmp_path / "m.safetensors"
    _misaligned_file(p)
    data = p.read_bytes()
    f = S.safe_open(p)
    with open(p, "r+b") as fh:
        fh.truncate(100)
        with pytest.raises(mlutils.SafetensorsError, match="shrank from %d to 100 bytes" % len(data)):
            f.get_tensor("w")
        fh.seek(0)
        fh.write(data)
    w = f.get_tensor("w")
    f.close()
    assert w[127, 127] == (1 << 14) - 1
    with pytest.raises(mlutils.SafetensorsError, match="closed"):
        f.get_tensor("w")


_RACE_CHILD = """
import sys, time
import numpy as np
from mlutils import SafetensorsError
from mlutils import _safetensors as S
from mlutils.__main__ import describe
path, seconds = sys.argv[1], float(sys.argv[2])
want = np.arange(1 << 14, dtype="<f4").reshape(128, 128)
ok = bad = checked = 0

def sliced():
    global checked
    g = cut_generation()
    with S.safe_open(path) as f:
        f.get_tensor("w")  # a view, checked but never touched here: the file may be cut after
        part = f.get_slice("w")[3:100]  # a copy: safe to touch
    if stable_since(g):  # no cut overlapped the read: the values must be right
        assert np.array_equal(part, want[3:100])
        checked += 1

end = time.monotonic() + seconds
while time.monotonic() < end:
    for fn in (lambda: S.verify(path), lambda: S.read_header(path), lambda: describe(path),
               lambda: S.load_file(path), sliced):
        try:
            fn()
        except SafetensorsError:
            bad += 1
        else:
            ok += 1
print(ok, bad, checked)
"""


def test_file_cut_by_another_process_during_reads(tmp_path):
    """A writer keeps cutting and restoring the file (same inode) while a
    child process opens and reads it: every call succeeds or raises
    SafetensorsError, with the right values when no cut overlapped it; no
    SIGBUS (the header and slices are read with pread, not through the
    mapping)."""
    from _race import run_while_cutting

    p = tmp_path / "m.safetensors"
    _misaligned_file(p)
    run_while_cutting(p, _RACE_CHILD)


def test_close_while_another_thread_reads(tmp_path):
    """close() during a read running without the GIL: the read finishes on its
    own file (the descriptor is closed after it, so its number cannot be
    reused meanwhile by a file opened in between); later reads raise."""
    import threading
    import time

    from mlutils import _core

    n = (1 << 30) + (1 << 20)  # reads go in 1 GiB calls: the second one comes after close()
    h = json.dumps({"a": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    h += b" " * (-len(h) % 8)
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        f.truncate(8 + len(h) + n)  # sparse: zeros
    other = tmp_path / "other.bin"
    with open(other, "wb") as f:
        f.seek(1 << 30)
        f.write(b"\xab" * (2 << 20))
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        m = _core.st_open(str(big))
        out = {}

        def reader():
            try:
                out["r"] = m.read(0, 0, n)
            except Exception as e:  # noqa: BLE001 - recorded and checked below
                out["e"] = e

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.02)
        m.close()
        fd = os.open(other, os.O_RDONLY)  # likely the number the map's file had
        t.join()
        os.close(fd)
        if "e" in out:  # only when close() came first
            assert isinstance(out["e"], mlutils.SafetensorsError) and "closed" in str(out["e"]), out["e"]
        else:
            r = np.frombuffer(out["r"], dtype=np.uint8)
            assert r.size == n and not r.any(), "the read saw another file's bytes"
        with pytest.raises(mlutils.SafetensorsError, match="closed"):
            m.read(0, 0, 16)
        del m
    assert len(os.listdir("/proc/self/fd")) == fds_before  # no descriptor left open


@pytest.mark.parametrize("name,data", [("g.safetensors", b"garbage" * 10), ("e.safetensors", b""),
                                       ("g.pt", b"garbage" * 10), ("e.pt", b"")])
@pytest.mark.parametrize("as_path", [False, True])
def test_format_errors_name_the_file(tmp_path, name, data, as_path):
    """A bad file's format error says which file, in both formats, for a str or an os.PathLike path."""
    from mlutils import io

    p = tmp_path / name
    p.write_bytes(data)
    exc = mlutils.SafetensorsError if name.endswith(".safetensors") else mlutils.TorchFormatError
    with pytest.raises(exc) as e:
        io.torch_load(p if as_path else str(p), framework="np")
    assert str(e.value).startswith(f"'{p}': "), str(e.value)
    assert str(p) not in str(e.value)[len(str(p)) + 4:]  # named once


# ---- errors of an open map name its file, as the open's errors do

def _lib_file(path, writer="numpy"):
    """A file written by the safetensors library (safetensors.numpy or, writer="torch",
    safetensors.torch): two tensors and metadata; the data section's length (the file is cut
    inside it)."""
    w, b = np.arange(64, dtype=np.float32).reshape(8, 8), np.arange(8, dtype=np.float64)
    if writer == "torch":
        torch = pytest.importorskip("torch")
        from safetensors.torch import save_file as torch_save_file

        torch_save_file({"w": torch.from_numpy(w), "b": torch.from_numpy(b)}, str(path), metadata={"k": "v"})
    else:
        stn.save_file({"w": w, "b": b}, str(path), metadata={"k": "v"})
    return 64 * 4 + 8 * 8


def _names(e, p):
    """The message is "'p': text", p named once."""
    msg = str(e.value)
    assert msg.startswith(f"'{p}': "), msg
    assert str(p) not in msg[len(str(p)) + 4:], msg


# Every read safe_open offers, through each path get_slice's indexing takes; s: a slice of "w"
# taken while the file was open and whole.  Each checks the file before touching its mapping.
READS = {
    "get_tensor": lambda f, s: f.get_tensor("w"),
    "get_slice-basic": lambda f, s: f.get_slice("w")[1:3, ::2],
    "get_slice-int": lambda f, s: f.get_slice("b")[2],
    "get_slice-rows": lambda f, s: f.get_slice("w")[[0, 5]],
    "get_slice-mask": lambda f, s: f.get_slice("b")[np.arange(8) % 2 == 0],
    "get_slice-fancy": lambda f, s: f.get_slice("w")[:, [1, 2]],
    "get_slice-ellipsis": lambda f, s: f.get_slice("w")[..., 3],
    "slice-taken-before": lambda f, s: s[0],
    "slice-taken-before-rows": lambda f, s: s[[1, 7]],
    "slice-taken-before-fancy": lambda f, s: s[[[0]], [1]],
}
AFTER_CUT = READS


@pytest.mark.parametrize("what", list(AFTER_CUT))
@pytest.mark.parametrize("framework", ["np", "pt"])
@pytest.mark.parametrize("as_path", [False, True])
@pytest.mark.parametrize("writer", ["numpy", "torch"])
def test_reads_after_the_file_shrank_name_it(tmp_path, what, framework, as_path, writer):
    """A file cut after safe_open (str or os.PathLike path): each read's SafetensorsError names it."""
    if framework == "pt":
        pytest.importorskip("torch")
    from mlutils import io

    p = tmp_path / "shard-00003-of-00020.safetensors"
    data_len = _lib_file(p, writer)
    with io.safe_open(p if as_path else str(p), framework=framework) as f:
        s = f.get_slice("w")
        os.truncate(p, os.path.getsize(p) - data_len + 16)
        with pytest.raises(mlutils.SafetensorsError, match="shrank") as e:
            AFTER_CUT[what](f, s)
        _names(e, p)
        assert f.keys() == ["b", "w"] and f.metadata() == {"k": "v"}  # the header was read at the open


CLOSED = dict(READS, **{
    "get_slice": lambda f, s: f.get_slice("w"),
    "get_slice-missing": lambda f, s: f.get_slice("zz"),
    "get_tensor-missing": lambda f, s: f.get_tensor("zz"),
    "keys": lambda f, s: f.keys(),
    "offset_keys": lambda f, s: f.offset_keys(),
    "metadata": lambda f, s: f.metadata(),
})


@pytest.mark.parametrize("what", list(CLOSED))
@pytest.mark.parametrize("framework", ["np", "pt"])
@pytest.mark.parametrize("as_path", [False, True])
@pytest.mark.parametrize("writer", ["numpy", "torch"])
@pytest.mark.parametrize("how", ["close", "with"])
def test_a_closed_map_names_its_file(tmp_path, what, framework, as_path, writer, how):
    """close() or the end of the with block, then any call: a SafetensorsError naming the file."""
    if framework == "pt":
        pytest.importorskip("torch")
    from mlutils import io

    p = tmp_path / "m.safetensors"
    _lib_file(p, writer)
    if how == "with":
        with io.safe_open(p if as_path else str(p), framework=framework) as f:
            s = f.get_slice("w")
    else:
        f = io.safe_open(p if as_path else str(p), framework=framework)
        s = f.get_slice("w")
        f.close()
    with pytest.raises(mlutils.SafetensorsError, match="the file is closed") as e:
        CLOSED[what](f, s)
    _names(e, p)
    f.close()  # closing again is no error
    assert s.get_shape() == [8, 8] and s.get_dtype() == "F32"  # what the header said stays known


@pytest.mark.parametrize("as_path", [False, True])
def test_a_missing_tensor_names_the_file(tmp_path, as_path):
    from mlutils import io

    p = tmp_path / "m.safetensors"
    _lib_file(p)
    with io.safe_open(p if as_path else str(p), framework="np") as f:
        for fn in (lambda: f.get_tensor("zz"), lambda: f.get_slice("zz")):
            with pytest.raises(mlutils.SafetensorsError, match="no tensor named 'zz'") as e:
                fn()
            _names(e, p)


def _map_errors(m, cut):
    """(call, exception type, words) of every error a SafetensorsMap raises after it was opened;
    cut: the file has shrunk (else it is closed at the end)."""
    out = [(lambda: m.read(5, 0, 1), IndexError, "out of range"),
           (lambda: m.array(-1, np.float64), IndexError, "out of range"),
           (lambda: m.read(0, 0, 10 ** 6), ValueError, "not within tensor"),
           (lambda: m.array(0, np.float32), ValueError, "8-byte dtype"),
           (lambda: m.array(0, object), TypeError, "Python objects")]
    if cut:
        out += [(lambda: m.read(0, 0, 64), mlutils.SafetensorsError, "shrank while reading tensor data"),
                (lambda: m.array(0, np.float64), mlutils.SafetensorsError, "shrank from"),
                (m.check, mlutils.SafetensorsError, "shrank from")]
    else:
        out += [(m.close, None, None),
                (lambda: m.read(0, 0, 8), mlutils.SafetensorsError, "the file is closed"),
                (lambda: m.array(0, np.float64), mlutils.SafetensorsError, "the file is closed"),
                (lambda: m.array(0, np.float64, copy_unaligned=True), mlutils.SafetensorsError, "the file is closed"),
                (m.check, mlutils.SafetensorsError, "the file is closed")]
    return out


@pytest.mark.parametrize("cut", [True, False])
@pytest.mark.parametrize("as_path", [False, True])
def test_map_errors_after_the_open_name_the_file(tmp_path, cut, as_path):
    """The binding's map: short pread, shrunk file, closed map and bad arguments, each in its own
    exception type, each naming the file; error() words the wrapper's errors the same way."""
    p = tmp_path / "m.safetensors"
    _lib_file(p)
    m = _core.st_open(p if as_path else str(p))
    assert m.entries()[0].name == "b"  # offset order: F64 first
    if cut:
        os.truncate(p, m.data_start + 16)
    for call, exc, words in _map_errors(m, cut):
        if exc is None:
            call()
            continue
        with pytest.raises(exc, match=words) as e:
            call()
        _names(e, p)
    e = m.error("text")
    assert type(e) is mlutils.SafetensorsError and str(e) == f"'{p}': text"
    assert str(m.error(f"in {p} already")) == f"in {p} already"  # a text naming the file keeps its words


def test_maps_of_bytes_keep_their_messages(tmp_path):
    """A map made from bytes has no file: the same errors, worded as before."""
    m = _core.st_from_bytes(S.save({"b": np.arange(8, dtype=np.float64)}))
    want = {"out of range": "tensor index out of range",
            "not within tensor": "read: bytes [0, 1000000) are not within tensor 'b' (64 bytes)",
            "8-byte dtype": "tensor 'b' is F64: a 8-byte dtype is needed, not dtype('float32')",
            "Python objects": "a tensor cannot be read as dtype('O'): it holds Python objects",
            "the file is closed": "the file is closed"}
    for call, exc, words in _map_errors(m, cut=False):
        if exc is None:
            call()
            continue
        with pytest.raises(exc) as e:
            call()
        assert str(e.value) == want[words]
    assert str(m.error("text")) == "text"


@pytest.mark.parametrize("as_path", [False, True])
def test_conversion_errors_name_the_file(tmp_path, torch, as_path):
    """What a valid file holds but NumPy or torch cannot take, found at get_tensor: named too."""
    from mlutils import io

    # our writer refuses the last two (tests/test_safetensors_write_limits.py): made by hand
    cases = [("f6", S.save({"t": S.RawTensor("F6_E2M3", (4,), b"\0\0\0")}), "pt", "no torch equivalent"),
             ("f4", S.save({"t": S.RawTensor("F4", (2, 3), b"\0\0\0")}), "pt", "odd last dimension"),
             ("huge", _blob('{"t":{"dtype":"U8","shape":[0,%d],"data_offsets":[0,0]}}' % 2 ** 63), "np",
              r"at most 2\^63-1"),
             ("deep", _blob('{"t":{"dtype":"U8","shape":[%s],"data_offsets":[0,1]}}' % ",".join(["1"] * 65),
                            b"\0"), "np", "NumPy allows 64")]
    for name, blob, framework, words in cases:
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with io.safe_open(p if as_path else str(p), framework=framework) as f:
            with pytest.raises(mlutils.SafetensorsError, match=words) as e:
                f.get_tensor("t")
            _names(e, p)
        if framework == "pt":
            with pytest.raises(mlutils.SafetensorsError, match=words) as e:
                S.load_file(p if as_path else str(p), framework="pt")
            _names(e, p)
            with pytest.raises(mlutils.SafetensorsError, match=words) as e:
                S.load(p.read_bytes(), framework="pt")
            assert not str(e.value).startswith("'"), str(e.value)  # bytes: no file to name
