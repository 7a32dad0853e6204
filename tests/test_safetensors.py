"""safetensors: our reader and writer against the real `safetensors` package
(numpy and raw-spec APIs here; torch in test_safetensors_torch.py)."""
import gc
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import mlutils
from mlutils import _core, _safetensors as S

safetensors = pytest.importorskip("safetensors")
stn = pytest.importorskip("safetensors.numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")

# Every dtype of the format: (code, numpy dtype we load it as, library TensorSpec name or None)
ALL = [
    ("BOOL", np.dtype(bool), "bool"),
    ("U8", np.dtype(np.uint8), "uint8"),
    ("I8", np.dtype(np.int8), "int8"),
    ("I16", np.dtype(np.int16), "int16"),
    ("U16", np.dtype(np.uint16), "uint16"),
    ("I32", np.dtype(np.int32), "int32"),
    ("U32", np.dtype(np.uint32), "uint32"),
    ("I64", np.dtype(np.int64), "int64"),
    ("U64", np.dtype(np.uint64), "uint64"),
    ("F16", np.dtype(np.float16), "float16"),
    ("F32", np.dtype(np.float32), "float32"),
    ("F64", np.dtype(np.float64), "float64"),
    ("C64", np.dtype(np.complex64), "complex64"),
    ("BF16", np.dtype(ml_dtypes.bfloat16), "bfloat16"),
    ("F8_E5M2", np.dtype(ml_dtypes.float8_e5m2), "float8_e5m2"),
    ("F8_E4M3", np.dtype(ml_dtypes.float8_e4m3fn), "float8_e4m3fn"),
    ("F8_E8M0", np.dtype(ml_dtypes.float8_e8m0fnu), "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", np.dtype(ml_dtypes.float8_e4m3fnuz), "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", np.dtype(ml_dtypes.float8_e5m2fnuz), "float8_e5m2fnuz"),
    ("F4", np.dtype(np.uint8), "float4_e2m1fn_x2"),
    ("F6_E2M3", np.dtype(np.uint8), None),
    ("F6_E3M2", np.dtype(np.uint8), None),
]
NUMPY_LIB = ["BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "F32", "F64", "C64"]
BITS = dict(S.DTYPES)


def test_dtype_table_matches_format_order():
    assert [c for c, _ in S.DTYPES] == [
        "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
        "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
        "F64", "I64", "U64"]
    assert sorted(c for c, _, _ in ALL) == sorted(BITS)


def test_dtype_rows_match_the_library_and_numpy():
    rows = _core.safetensors_dtypes()
    assert all(isinstance(r, _core.SafetensorsDtype) for r in rows)
    assert [(r.name, r.bits) for r in rows] == list(S.DTYPES)
    # NumPy's own types: exactly those of the library's numpy table
    assert {r.name: np.dtype(r.numpy) for r in rows if r.numpy} == {c: np.dtype(t) for c, t in stn._TYPES.items()}
    for r in rows:
        if r.numpy is not None:
            assert np.dtype(r.numpy).itemsize * 8 == r.bits, r.name
        if r.ml_dtypes is not None:
            assert r.numpy is None
            assert np.dtype(getattr(ml_dtypes, r.ml_dtypes)).itemsize * 8 == r.bits, r.name
        # what each code loads as (ALL) follows from the row
        want = dict((c, dt) for c, dt, _ in ALL)[r.name]
        assert S._np_dtypes()[0][r.name] == want, r.name
        assert S._RAW[r.name].itemsize * 8 == (r.bits if r.bits % 8 == 0 else 8), r.name


def rng_array(dt, shape, seed=0):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape)) * dt.itemsize
    raw = rng.integers(0, 256, size=n, dtype=np.uint8)
    if dt == np.dtype(bool):
        raw = raw & 1
    return raw.view(dt).reshape(shape)


def spec(code, shape, data):
    """A library TensorSpec over the raw bytes in `data` (a uint8 array)."""
    name = dict((c, n) for c, _, n in ALL)[code]
    if code == "F4":
        shape = list(shape[:-1]) + [shape[-1] // 2]
    return safetensors.TensorSpec(dtype=name, shape=list(shape), data_ptr=data.ctypes.data, data_len=data.nbytes)


def raw_bytes(code, shape, seed=0):
    n = int(np.prod(shape, dtype=np.int64)) * BITS[code] // 8
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)


# ---------------------------------------------------------------- writer identity

@pytest.mark.parametrize("meta", [None, {}, {"format": "np"}, {"k\u00e9\n\x01\"\\/": "v\x1f\u2028"}])
@pytest.mark.parametrize("code", NUMPY_LIB)
def test_numpy_bytes_identical_to_library(code, meta):
    dt = dict((c, d) for c, d, _ in ALL)[code]
    tensors = {
        "b.10": rng_array(dt, (3, 5), 1),
        "b.2": rng_array(dt, (7,), 2),
        "a": rng_array(dt, (), 3),
        "empty": rng_array(dt, (0, 4), 4),
        "z": np.arange(6, dtype=np.float32).reshape(2, 3),
        "\u00e9t\u00e9/\"q\"\t": rng_array(dt, (2, 1, 2), 5),
    }
    ours = S.save(tensors, meta)
    assert ours == stn.save(tensors, meta)


@pytest.mark.parametrize("code", [c for c, _, n in ALL if n is not None])
def test_all_dtypes_bytes_identical_to_library_serialize(code):
    shapes = {"x": (4, 6), "s": (), "e": (0, 2), "v": (8,)} if code != "F4" else {"x": (4, 6), "e": (0, 2), "v": (8,)}
    raws = {k: raw_bytes(code, sh, i) for i, (k, sh) in enumerate(shapes.items())}
    ours = S.save({k: S.RawTensor(code, shapes[k], raws[k]) for k in shapes}, {"format": "pt"})
    theirs = safetensors.serialize({k: spec(code, shapes[k], raws[k]) for k in shapes}, metadata={"format": "pt"})
    assert ours == bytes(theirs)
    # and it reads back bit for bit
    back = safetensors.deserialize(ours)
    assert {k: (v["dtype"], list(v["shape"]), bytes(v["data"])) for k, v in back} == {
        k: (code, list(shapes[k]), raws[k].tobytes()) for k in shapes}


def test_mixed_dtype_order_identical_to_library():
    # one tensor of every dtype the library writes, names chosen so dtype order and name order disagree
    tensors, specs, raws = {}, {}, []
    for i, (code, _, lib) in enumerate(ALL):
        name = f"t{len(ALL) - i:02d}"
        shape = (2, 4)
        raw = raw_bytes(code, shape, i)
        raws.append(raw)
        tensors[name] = S.RawTensor(code, shape, raw)
        if lib is not None:
            specs[name] = spec(code, shape, raw)
        else:
            del tensors[name]
    assert S.save(tensors) == bytes(safetensors.serialize(specs))


def test_several_metadata_keys_sorted_and_same_content(tmp_path):
    meta = {"z": "1", "a": "2", "\u00e9": "3", "B": "4", "format": "pt"}
    t = {"w": np.ones((2, 2), np.float32)}
    ours = S.save(t, meta)
    theirs = stn.save(t, meta)
    n = struct.unpack("<Q", ours[:8])[0]
    header = ours[8:8 + n].decode()
    assert list(json.loads(header)["__metadata__"]) == sorted(meta)  # sorted by byte
    assert json.loads(header) == json.loads(theirs[8:8 + struct.unpack("<Q", theirs[:8])[0]])
    assert ours[8 + n:] == theirs[-16:]
    p = tmp_path / "m.safetensors"
    S.save_file(t, p, meta)
    with safetensors.safe_open(str(p), "np") as f:
        assert f.metadata() == meta
    assert S.save(t, meta) == ours  # deterministic


def test_header_padding_example_from_format():
    # the format's own worked example: 64-byte header, then 72 with 7 spaces
    t = {"attn.0": np.zeros((1, 2, 3), np.float32)}
    b = S.save(t)
    assert b[:8] == struct.pack("<Q", 64) and len(b) == 96
    b = S.save({"attn0": np.zeros((1, 1, 2, 3), np.float32)})
    assert b[:8] == struct.pack("<Q", 72) and b[8 + 65:8 + 72] == b" " * 7
    assert S.save({}) == bytes.fromhex("0800000000000000") + b"{}      "


def test_save_file_matches_library_file(tmp_path):
    t = {f"layer.{i}.w": np.random.default_rng(i).standard_normal((i + 1, 3)).astype(np.float32) for i in range(12)}
    t["ids"] = np.arange(10, dtype=np.int64)
    S.save_file(t, tmp_path / "ours.safetensors", {"format": "np"})
    stn.save_file(t, str(tmp_path / "theirs.safetensors"), {"format": "np"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_noncontiguous_and_bigendian_inputs():
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    view = base[::2, 1::3]
    assert not view.flags.c_contiguous
    be = np.arange(5, dtype=">i4")
    t = {"v": view, "be": be, "fortran": np.asfortranarray(base)}
    ours = S.save(t)
    ref = stn.save({"v": np.ascontiguousarray(view), "be": be.astype("<i4"), "fortran": np.ascontiguousarray(base)})
    assert ours == ref
    back = S.load(ours)
    np.testing.assert_array_equal(back["v"], view)
    np.testing.assert_array_equal(back["be"], be)


# ---------------------------------------------------------------- reading

@pytest.mark.parametrize("code", NUMPY_LIB)
def test_we_read_library_files(code, tmp_path):
    dt = dict((c, d) for c, d, _ in ALL)[code]
    t = {"m": rng_array(dt, (5, 3), 7), "s": rng_array(dt, (), 8), "e": rng_array(dt, (2, 0), 9)}
    p = tmp_path / "lib.safetensors"
    stn.save_file(t, str(p), metadata={"a": "b"})
    got = S.load_file(p)
    assert list(got) == sorted(t)  # one dtype: offset order is name order
    for k, v in t.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert got[k].tobytes() == v.tobytes()
    assert S.load(p.read_bytes()).keys() == got.keys()
    with S.safe_open(p) as f:
        assert f.metadata() == {"a": "b"}
        assert f.keys() == sorted(t)


@pytest.mark.parametrize("code", [c for c, _, _ in ALL])
def test_all_dtypes_round_trip_bit_exact(code, tmp_path):
    dt = dict((c, d) for c, d, _ in ALL)[code]
    p = tmp_path / "x.safetensors"
    if BITS[code] % 8:
        shapes = {"a": (3, 8), "b": (16,), "flat": (2, 3, 4) if code == "F4" else (4, 2)}
        data = {k: raw_bytes(code, sh, i) for i, (k, sh) in enumerate(shapes.items())}
        S.save_file({k: S.RawTensor(code, shapes[k], data[k]) for k in shapes}, p)
        got = S.load_file(p)
        for k, sh in shapes.items():
            assert got[k].dtype == np.uint8
            assert got[k].tobytes() == data[k].tobytes()
            # shape rule: last dimension scaled by bits/8 when whole
            want = sh[:-1] + (sh[-1] * BITS[code] // 8,) if sh[-1] * BITS[code] % 8 == 0 else (data[k].size,)
            assert got[k].shape == want
        _, entries = S.read_header(p)
        assert {e["name"]: tuple(e["shape"]) for e in entries} == shapes
        with safetensors.safe_open(str(p), "np") as f:  # the library accepts our header
            assert sorted(f.keys()) == sorted(shapes)
            assert f.get_slice("a").get_shape() == [3, 8]
        return
    t = {"a": rng_array(dt, (4, 3), 1), "s": rng_array(dt, (), 2), "e": rng_array(dt, (0,), 3)}
    S.save_file(t, p)
    got = S.load_file(p)
    for k, v in t.items():
        assert got[k].dtype == dt and got[k].shape == v.shape
        assert got[k].tobytes() == v.tobytes()
    assert S.save(got) == p.read_bytes()


def test_without_ml_dtypes_raw_views(monkeypatch, tmp_path):
    import sys

    bits = np.array([0x3F80, 0x4000, 0xFFFF], np.uint16)
    p = tmp_path / "bf.safetensors"
    S.save_file({"w": S.RawTensor("BF16", (3,), bits), "f8": S.RawTensor("F8_E4M3", (2,), np.array([1, 2], np.uint8))}, p)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    monkeypatch.setattr(S, "_np_table_cache", None)
    monkeypatch.setattr(S, "_np_code_cache", None)
    got = S.load_file(p)
    assert got["w"].dtype == np.uint16 and got["w"].tolist() == bits.tolist()
    assert got["f8"].dtype == np.uint8 and got["f8"].tolist() == [1, 2]
    monkeypatch.setattr(S, "_np_table_cache", None)
    monkeypatch.setattr(S, "_np_code_cache", None)


def _unaligned_file():
    """A hand-built file (as older/MLX writers make them): a 1-byte tensor
    first, so the F32, F64 and C64 tensors after it are misaligned."""
    u8 = np.array([7], np.uint8)
    f32 = np.arange(5, dtype=np.float32) + 0.5
    f64 = np.arange(3, dtype=np.float64) - 0.25
    c64 = np.array([1 + 2j, -3j], np.complex64)
    i16 = np.array([-2, 300], np.int16)
    parts = [("u", "U8", u8), ("f", "F32", f32), ("d", "F64", f64), ("c", "C64", c64), ("i", "I16", i16)]
    hdr, off, data = {}, 0, b""
    for name, code, a in parts:
        hdr[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        data += a.tobytes()
    text = json.dumps(hdr).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data, {n: a for n, _, a in parts}


def test_unaligned_tensors_read_correctly(tmp_path):
    blob, want = _unaligned_file()
    p = tmp_path / "unaligned.safetensors"
    p.write_bytes(blob)
    lib = stn.load_file(str(p))
    for got in (S.load_file(p), S.load(blob)):
        assert not got["f"].flags.aligned  # zero-copy, marked unaligned
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v)
            np.testing.assert_array_equal(got[k], lib[k])
        assert float(got["f"].sum()) == float(want["f"].sum())
    with S.safe_open(p) as f:
        np.testing.assert_array_equal(f.get_slice("d")[1:], want["d"][1:])


@pytest.mark.parametrize("framework", ["np", "pt"])
def test_slices_read_what_numpy_indexing_selects(tmp_path, framework):
    """get_slice reads the bytes a selection spans with pread and copies the
    selection out of them: every kind of index (negative steps, integers,
    None, Ellipsis, empty, lists and masks) gives NumPy's values, C-ordered
    and writable; the library agrees where it takes the index."""
    if framework == "pt":
        pytest.importorskip("torch")
    a = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    odd = np.arange(13, dtype=np.uint8)
    p = tmp_path / "s.safetensors"
    S.save_file({"a": a, "odd": odd}, p)
    basic = [4, (1, 2), (1, 2, 3), slice(1, 3), slice(None, None, -1), (slice(None), 2), (Ellipsis, 3), (),
             (slice(4, 1, -2), slice(None), slice(None, None, -3)), (np.int64(2), slice(1, 3)), (slice(3, 3),),
             (0, slice(None), slice(0, 1)), (-1, -2)]
    with S.safe_open(p, framework=framework) as f, safetensors.safe_open(str(p), framework) as g:
        sl, gl = f.get_slice("a"), g.get_slice("a")
        for idx in basic + [(None, 1), ([0, 2],), (a[:, 0, 0] > 50,), (Ellipsis,)]:
            got = np.asarray(sl[idx])
            want = np.array(a[idx], copy=True)
            assert got.shape == want.shape and np.array_equal(got, want), idx
            assert got.flags.c_contiguous and got.flags.writeable, idx
        compared = 0
        for idx in basic:
            try:
                lib = np.asarray(gl[idx])
            except Exception:  # an index the library does not take (negative steps)
                continue
            assert np.array_equal(np.asarray(sl[idx]), lib), idx
            compared += 1
        assert compared >= 10
        np.testing.assert_array_equal(np.asarray(f.get_slice("odd")[::-3]), odd[::-3])


def test_safe_open_lazy_api(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    p = tmp_path / "s.safetensors"
    S.save_file({"a": a, "b": np.ones(3, np.int8)}, p)
    with S.safe_open(p, framework="np") as f, safetensors.safe_open(str(p), "np") as g:
        assert f.keys() == g.keys() == ["a", "b"]
        assert f.metadata() is None and g.metadata() is None
        sl, gl = f.get_slice("a"), g.get_slice("a")
        assert sl.get_shape() == gl.get_shape() == [2, 3, 4]
        assert sl.get_dtype() == gl.get_dtype() == "F32"
        for idx in [(slice(None), slice(1, 3)), (1,), (slice(0, 1), slice(None), slice(2, 4)), (Ellipsis, 0)]:
            np.testing.assert_array_equal(sl[idx], a[idx])
            if Ellipsis not in idx:
                np.testing.assert_array_equal(sl[idx], gl[idx])
        np.testing.assert_array_equal(f.get_tensor("a"), g.get_tensor("a"))
        with pytest.raises(mlutils.SafetensorsError, match="no tensor named 'zz'"):
            f.get_tensor("zz")
    with pytest.raises(mlutils.SafetensorsError, match="closed"):
        f.keys()


def test_arrays_outlive_file_and_reader(tmp_path):
    a = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    p = tmp_path / "k.safetensors"
    S.save_file({"a": a}, p)
    with S.safe_open(p) as f:
        t = f.get_tensor("a")
    loaded = S.load_file(p)["a"]
    os.remove(p)
    del f
    gc.collect()
    np.testing.assert_array_equal(t, a)
    np.testing.assert_array_equal(loaded, a)
    assert type(t.base).__name__ == "SafetensorsMap"


def test_arrays_are_writable_and_file_never_changes(tmp_path):
    a = np.arange(16, dtype=np.int32)
    p = tmp_path / "w.safetensors"
    S.save_file({"a": a}, p)
    before = p.read_bytes()
    got = S.load_file(p)["a"]
    got[:] = -1
    assert p.read_bytes() == before
    np.testing.assert_array_equal(S.load_file(p)["a"], a)


def test_atomic_overwrite_keeps_old_mapping(tmp_path):
    p = tmp_path / "ckpt.safetensors"
    S.save_file({"a": np.full(1000, 1.0, np.float32)}, p)
    old = S.load_file(p)["a"]
    S.save_file({"a": np.full(1000, 2.0, np.float32), "b": np.zeros(3, np.uint8)}, p)
    assert float(old.sum()) == 1000.0  # the old mapping is untouched by the new write
    new = stn.load_file(str(p))
    assert float(new["a"].sum()) == 2000.0 and "b" in new
    assert [x for x in os.listdir(tmp_path) if x.endswith(".tmp")] == []


def test_large_file_both_directions(tmp_path):
    rng = np.random.default_rng(3)
    t = {f"w{i}": rng.standard_normal((1024, 1024 + i)).astype(np.float32) for i in range(12)}  # ~48 MiB
    p = tmp_path / "big.safetensors"
    S.save_file(t, p)
    lib = stn.load_file(str(p))
    q = tmp_path / "big_lib.safetensors"
    stn.save_file(t, str(q))
    assert p.read_bytes() == q.read_bytes()
    ours = S.load_file(q)
    for k in t:
        assert np.array_equal(lib[k], t[k]) and np.array_equal(ours[k], t[k])


# ---------------------------------------------------------------- writer errors

def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(mlutils.SafetensorsError, match="__metadata__"):
        S.save({"__metadata__": np.zeros(1)})
    with pytest.raises(TypeError, match="str to str"):
        S.save({"a": np.zeros(1)}, {"epoch": 3})
    with pytest.raises(TypeError, match="str to str"):
        S.save({"a": np.zeros(1)}, {1: "x"})
    with pytest.raises(TypeError, match="tensor names must be str"):
        S.save({1: np.zeros(1)})
    with pytest.raises(TypeError, match="NumPy array or torch tensor"):
        S.save({"a": [1, 2]})
    with pytest.raises(TypeError, match="no safetensors equivalent"):
        S.save({"a": np.zeros(2, np.complex128)})
    with pytest.raises(TypeError, match="no safetensors equivalent"):
        S.save({"a": np.array(["x"], object)})
    with pytest.raises(mlutils.SafetensorsError, match="need 12 bytes but the data has 4"):
        S.save({"a": S.RawTensor("F32", (3,), np.zeros(4, np.uint8))})
    with pytest.raises(mlutils.SafetensorsError, match="not a whole number of bytes"):
        S.save({"a": S.RawTensor("F4", (3,), np.zeros(2, np.uint8))})
    with pytest.raises(ValueError, match="unknown safetensors dtype"):
        S.save({"a": S.RawTensor("F128", (3,), np.zeros(2, np.uint8))})
    with pytest.raises(TypeError):
        S.save([np.zeros(1)])
    with pytest.raises(ValueError, match="framework"):
        S.load(S.save({}), framework="jax")
    # a failed write leaves no file and no temporary behind
    with pytest.raises(mlutils.SafetensorsError):
        S.save_file({"__metadata__": np.zeros(1)}, tmp_path / "no.safetensors")
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError):
        S.save_file({"a": np.zeros(1)}, tmp_path / "missing_dir" / "x.safetensors")


def test_header_too_large_is_refused():
    with pytest.raises(mlutils.SafetensorsError, match="header too large"):
        S.save({"a": np.zeros(1, np.uint8)}, {"big": "x" * 100_000_000})


def test_shared_numpy_memory():
    base = np.arange(12, dtype=np.float32)
    with pytest.raises(mlutils.SafetensorsError, match="dedupe=True"):
        S.save({"a": base, "b": base[:6]})
    # disjoint views of one buffer are not shared (as the library decides)
    S.save({"a": base[:6], "b": base[6:]})
    b = S.save({"b": base, "a": base[:6], "c": base}, dedupe=True)
    got = S.load(b)
    assert list(got) == ["b"]  # 'b' is the smallest name covering the whole buffer
    assert _header_of(b).get("__metadata__") == {"a": "b", "c": "b"}
    with pytest.raises(mlutils.SafetensorsError, match="none covers the whole storage"):
        S.save({"x": base[:8], "y": base[4:]}, dedupe=True)


def _header_of(blob):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n])


def _rss_file():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_safe_open_reads_only_what_is_asked(tmp_path):
    big = np.random.default_rng(1).standard_normal((4096, 2048)).astype(np.float32)  # 32 MiB
    p = tmp_path / "lazy.safetensors"
    S.save_file({"big": big, "small": np.arange(10, dtype=np.int64)}, p)
    gc.collect()
    before = _rss_file()
    with S.safe_open(p) as f:
        row = f.get_slice("big")[5]
        small = f.get_tensor("small")
        t = f.get_tensor("big")  # mapped, not read
        after = _rss_file()
    np.testing.assert_array_equal(row, big[5])
    assert small.tolist() == list(range(10))
    assert after - before < 4 << 20  # far less than the 32 MiB tensor
    assert float(t[-1, -1]) == float(big[-1, -1])


def test_raw_tensor_shape_must_hold_ints():
    # int() used to truncate a float dimension (2.9 -> 2) and take True for 1
    with pytest.raises(TypeError, match="holds a float"):
        S.save({"a": S.RawTensor("U8", (2.9,), b"ab")})
    with pytest.raises(TypeError, match="holds a bool"):
        S.save({"a": S.RawTensor("U8", (True, 2), b"ab")})
    with pytest.raises(mlutils.SafetensorsError, match="outside"):
        S.save({"a": S.RawTensor("U8", (-1,), b"ab")})
    with pytest.raises(mlutils.SafetensorsError, match="outside"):
        S.save({"a": S.RawTensor("U8", (2**64, 0), b"")})
    with pytest.raises(TypeError, match="sequence of ints"):
        S.save({"a": S.RawTensor("U8", 2, b"ab")})
    with pytest.raises(ValueError, match="unknown safetensors dtype"):
        S.save({"a": S.RawTensor(["U8"], (2,), b"ab")})
    # numpy integers are integers
    out = S.load(S.save({"a": S.RawTensor("U8", (np.int64(2), np.uint8(1)), b"ab")}))
    assert out["a"].shape == (2, 1) and out["a"].tobytes() == b"ab"


def test_load_from_bytes_releases_the_gil():
    # validating and copying a big blob is pure C: another thread keeps running
    from _gil import assert_releases_gil

    blob = S.save({"a": np.zeros(32 * 2**20, np.float32)})  # 128 MiB
    assert_releases_gil(lambda: _core.st_from_bytes(blob), calls=3)


def test_map_array_refuses_dtypes_holding_objects():
    # file bytes read as object pointers crashed on first use
    m = _core.st_from_bytes(S.save({"a": np.arange(3, dtype=np.float64) + 12345.0}))
    for dt in (np.dtype(object), np.dtype([("x", object)]), np.dtype([("x", "i4"), ("y", object)])[["y"]]):
        with pytest.raises(TypeError, match="holds Python objects"):
            m.array(0, dt)
    assert m.array(0, np.float64).tolist() == [12345.0, 12346.0, 12347.0]


def test_map_is_a_gc_heap_type():
    # an instance is tracked and reports the reference to its heap type
    m = _core.st_from_bytes(S.save({"a": np.zeros(2)}))
    assert gc.is_tracked(m) and type(m) in gc.get_referents(m)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_arrays_keep_the_mapping_not_the_file(tmp_path):
    """The reader keeps the file open only while it may still read it: arrays
    from load_file, read_header, verify and a closed safe_open hold no file
    descriptor (thousands of loaded shards must not run out of them)."""
    p = tmp_path / "s.safetensors"
    S.save_file({"a": np.arange(10, dtype=np.float32)}, p)
    before = len(os.listdir("/proc/self/fd"))
    kept = [S.load_file(p) for _ in range(50)]
    S.read_header(p)
    S.verify(p)
    with S.safe_open(p) as f:
        kept.append(f.get_tensor("a"))
        assert len(os.listdir("/proc/self/fd")) == before + 1  # open while safe_open is
    assert len(os.listdir("/proc/self/fd")) == before
    assert all(float(k["a"][9]) == 9.0 for k in kept[:-1]) and float(kept[-1][9]) == 9.0


_SLICE_KEYS = [0, -1, 5, slice(None), slice(3, 250, 7), slice(None, None, -3), [0, -1, 5, 5, 2], np.array([299, 0, 1]),
               np.array([[1, 2], [3, 4]]), np.arange(300) % 3 == 0, (slice(None), 0), (slice(None), 2, 1),
               ([4, 2], slice(1, 3)), ([4, 2], None, 1), (slice(10, 20), Ellipsis, 2), (7, Ellipsis),
               (slice(0, 300, 100), slice(None, None, -1)), (np.array([3, 3, 1]), 1, slice(None, None, 2)), ([],),
               (slice(5, 5),)]


@pytest.mark.parametrize("chunk", [64, 16 << 20])
def test_slices_read_by_rows_equal_numpy(tmp_path, monkeypatch, chunk):
    """Selections of rows (lists, bools, strided slices, a column) are read
    row by row in bounded chunks; every form gives NumPy's result."""
    import safetensors.numpy as SN

    from mlutils import _safetensors as S

    monkeypatch.setattr(S, "_ROW_CHUNK", chunk)
    a = np.random.default_rng(0).standard_normal((300, 7, 5)).astype(np.float32)
    p = tmp_path / "a.safetensors"
    SN.save_file({"a": a}, str(p))
    with S.safe_open(str(p), framework="np") as f:
        sl = f.get_slice("a")
        for k in _SLICE_KEYS:
            got, want = sl[k], a[k]
            assert got.shape == want.shape and np.array_equal(got, want), k
        for bad in ([300], np.arange(299) > 0, (0, 0, 0, 0)):
            with pytest.raises(IndexError):
                sl[bad]


def test_sparse_slice_reads_only_its_rows(tmp_path):
    """Picking two rows, every 1000th row or one column out of a 200 MB table
    costs tens of MiB, not the table (peak RSS of a fresh process)."""
    import safetensors.numpy as SN

    p = tmp_path / "t.safetensors"
    SN.save_file({"t": np.zeros((50000, 1000), np.float32)}, str(p))
    code = ("import resource, sys\nfrom mlutils._safetensors import safe_open\n"
            "with safe_open(sys.argv[1], framework='np') as f:\n"
            "    sl = f.get_slice('t')\n"
            "    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "    x, y, z = sl[[0, -1]], sl[::1000], sl[:, 0]\n"
            "    assert x.shape == (2, 1000) and y.shape == (50, 1000) and z.shape == (50000,)\n"
            "    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 80, f"peak RSS grew {out.stdout.strip()} MiB for a selection under 1 MiB"
