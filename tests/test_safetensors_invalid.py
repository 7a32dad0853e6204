"""Untrusted safetensors input: the invalid corpus, hypothesis round trips
and mutations, allocation failures."""
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
def test_largest_dimensions_written_and_read_like_the_library(dim, tmp_path):
    """Dimensions up to 2**64-1 (in an empty tensor): our writer, our reader and the library agree."""
    blob = S.save({"e": S.RawTensor("U8", (0, dim), b"")})
    assert _ours_accepts(blob) == _lib_accepts(blob, tmp_path) == {"e": [0, dim]}
    assert S.read_header(tmp_path / "x.safetensors")[1][0]["shape"] == [0, dim]
    # materialising it is the frameworks' limit (int64 sizes), not the file's: a clear error
    if dim >= 2**63:
        with safetensors.safe_open(str(tmp_path / "x.safetensors"), "np") as f, pytest.raises(ValueError):
            f.get_tensor("e")
        with pytest.raises(mlutils.SafetensorsError, match="at most 2\\^63-1"):
            S.load(blob)
    else:
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
