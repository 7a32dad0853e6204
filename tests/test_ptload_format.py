"""ptload on hand-built files (no torch needed, so the sanitizer run covers
the parser): valid layouts, and every rejection the loader promises."""
import collections
import os
import pickle
import struct
import sys
import zlib

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _pthelpers as H  # noqa: E402

from mlutils import _ptload  # noqa: E402
from mlutils import TorchFormatError, UnsafePickleError  # noqa: E402


def write(tmp_path, data, name="m.pt"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


F32 = np.arange(12, dtype="<f4")
I64 = np.array([5, -7, 2 ** 40], dtype="<i8")


def simple_file(**kw):
    pkl = H.state_dict_pickle([
        ("w", "torch.FloatStorage", "0", 12, 0, (3, 4), (4, 1)),
        ("b", "torch.LongStorage", "1", 3, 0, (3,), (1,)),
    ])
    return H.pt_file(pkl, {"0": F32.tobytes(), "1": I64.tobytes()}, **kw)


@pytest.mark.parametrize("kw", [
    {}, {"zip64": True}, {"prefix": "model"}, {"align": None}, {"zip64": True, "align": None}, {"deflate": ("data/0", "data/1", "data.pkl")},
    {"order": lambda r: r[::-1]}, {"byteorder": None},
])
@pytest.mark.parametrize("mmap", [True, False])
def test_hand_built_state_dict(tmp_path, kw, mmap):
    p = write(tmp_path, simple_file(**kw))
    sd = _ptload.load(p, framework="np", mmap=mmap)
    assert type(sd) is collections.OrderedDict
    assert list(sd) == ["w", "b"]
    assert sd._metadata == {"": {"version": 1}}
    np.testing.assert_array_equal(sd["w"], F32.reshape(3, 4))
    np.testing.assert_array_equal(sd["b"], I64)
    assert sd["w"].dtype == np.float32 and sd["b"].dtype == np.int64
    _ptload.verify(p)
    idx = _ptload.read_index(p)
    assert idx == [
        {"name": "w", "dtype": "float32", "shape": [3, 4], "nbytes": 48, "storage": "0"},
        {"name": "b", "dtype": "int64", "shape": [3], "nbytes": 24, "storage": "1"},
    ]


def test_zero_copy_views_the_mapping(tmp_path):
    p = write(tmp_path, simple_file())
    sd = _ptload.load(p, framework="np")
    # the array is a view of the storage array, which is a view of the file mapping
    assert not sd["w"].flags.owndata and sd["w"].base is not None
    assert sd["w"].base.base is not None  # the mapping's owner
    sd["w"][0, 0] = 42.0  # private mapping: writes never reach the file
    assert _ptload.load(p, framework="np")["w"][0, 0] == 0.0
    # copies: mmap=False, and misaligned records
    assert _ptload.load(p, framework="np", mmap=False)["w"].base.flags.owndata
    p2 = write(tmp_path, simple_file(align=None), "u.pt")
    sd2 = _ptload.load(p2, framework="np")
    assert sd2["w"].base.flags.owndata and sd2["w"].flags.aligned
    np.testing.assert_array_equal(sd2["w"], F32.reshape(3, 4))


def test_views_offsets_strides_and_shared_storage(tmp_path):
    pkl = H.state_dict_pickle([
        ("a", "torch.FloatStorage", "0", 12, 0, (3, 4), (4, 1)),
        ("t", "torch.FloatStorage", "0", 12, 1, (3, 2), (1, 4)),   # non-contiguous view
        ("s", "torch.FloatStorage", "0", 12, 11, (), ()),           # scalar at the end
        ("e", "torch.FloatStorage", "0", 12, 0, (0, 5), (5, 1)),     # empty
    ])
    p = write(tmp_path, H.pt_file(pkl, {"0": F32.tobytes()}))
    sd = _ptload.load(p, framework="np")
    full = F32.reshape(3, 4)
    np.testing.assert_array_equal(sd["t"], np.lib.stride_tricks.as_strided(F32[1:], (3, 2), (4, 16)))
    assert sd["s"].shape == () and sd["s"] == 11.0
    assert sd["e"].shape == (0, 5)
    np.testing.assert_array_equal(sd["a"], full)
    assert np.shares_memory(sd["a"], sd["t"])
    sd["a"][0, 1] = -1
    assert sd["t"][0, 0] == -1


def test_v3_dtypes_and_values(tmp_path):
    bf = np.array([0x3F80, 0x4000, 0xC040], dtype="<u2")  # 1, 2, -3 in bfloat16
    u16 = np.array([1, 65535], dtype="<u2")
    f8 = np.array([0x38, 0x40], dtype="u1")
    pkl = (H.proto() + b"}" + b"(" +
           H.ustr("bf") + H.tensor_v2("torch.BFloat16Storage", "0", 3, 0, (3,), (1,)) +
           H.ustr("u16") + H.tensor_v3("1", 4, "uint16", 0, (2,), (1,)) +
           H.ustr("f8") + H.tensor_v3("2", 2, "float8_e4m3fn", 0, (2,), (1,)) + b"u.")
    p = write(tmp_path, H.pt_file(pkl, {"0": bf.tobytes(), "1": u16.tobytes(), "2": f8.tobytes()}))
    d = _ptload.load(p, framework="np")
    assert type(d) is dict
    import ml_dtypes

    assert d["bf"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(d["bf"].astype(np.float32), [1, 2, -3])
    assert d["u16"].dtype == np.uint16 and list(d["u16"]) == [1, 65535]
    np.testing.assert_array_equal(d["f8"].astype(np.float32), [1.0, 2.0])


def test_big_endian_is_byteswapped(tmp_path):
    pkl = H.state_dict_pickle([("w", "torch.FloatStorage", "0", 12, 0, (12,), (1,)),
                               ("c", "torch.ComplexFloatStorage", "1", 2, 0, (2,), (1,))])
    c = np.array([1 + 2j, -3.5 + 0.25j], dtype=">c8")  # each half big-endian
    p = write(tmp_path, H.pt_file(pkl, {"0": F32.astype(">f4").tobytes(), "1": c.tobytes()}, byteorder=b"big"))
    for mmap in (True, False):
        sd = _ptload.load(p, framework="np", mmap=mmap)
        np.testing.assert_array_equal(sd["w"], F32)
        np.testing.assert_array_equal(sd["c"], c.astype("<c8"))


def test_misc_values(tmp_path):
    body = (H.proto() + b"}(" +
            H.ustr("size") + H.glob("torch", "Size") + H.tup(H.ints((2, 3))) + H.REDUCE +
            H.ustr("dev") + H.glob("torch", "device") + H.tup(H.ustr("cuda"), H.pint(1)) + H.REDUCE +
            H.ustr("dt") + H.glob("torch", "bfloat16") +
            H.ustr("set") + H.glob("__builtin__", "set") + H.tup(b"](" + H.pint(1) + H.pint(2) + b"e") + H.REDUCE +
            H.ustr("bytes") + H.glob("_codecs", "encode") + H.tup(H.ustr("a\xffb"), H.ustr("latin1")) + H.REDUCE +
            H.ustr("big") + H.pint(2 ** 80 + 3) +
            H.ustr("neg") + H.pint(-(2 ** 70)) +
            H.ustr("f") + H.pfloat(0.1) +
            H.ustr("t") + H.tup(H.TRUE, H.FALSE, H.NONE) +
            H.ustr("l") + b"]q\x01(K\x01h\x01e" +   # a list holding itself
            H.ustr("cplx") + H.glob("builtins", "complex") + H.tup(H.pfloat(1.5), H.pint(2)) + H.REDUCE +
            H.ustr("cnt") + H.glob("collections", "Counter") + H.tup(b"}" + H.ustr("x") + H.pint(3) + b"s") + H.REDUCE +
            b"u.")
    p = write(tmp_path, H.pt_file(body))
    d = _ptload.load(p, framework="np")
    assert d["size"] == (2, 3) and d["dev"] == "cuda:1"
    import ml_dtypes

    assert d["dt"] == np.dtype(ml_dtypes.bfloat16)
    assert d["set"] == {1, 2} and d["bytes"] == b"a\xffb"
    assert d["big"] == 2 ** 80 + 3 and d["neg"] == -(2 ** 70) and d["f"] == 0.1
    assert d["t"] == (True, False, None)
    assert d["l"][0] == 1 and d["l"][1] is d["l"]
    assert d["cplx"] == complex(1.5, 2)
    assert type(d["cnt"]) is collections.Counter and d["cnt"]["x"] == 3
    assert _ptload.read_index(p) == []


def test_python_pickle_protocol2_plain_values(tmp_path):
    obj = {"a": [1, 2.5, "x", None, True], "b": (1, (2, 3)), "c": {"n": -5}, "e": 10 ** 30}
    p = write(tmp_path, H.pt_file(pickle.dumps(obj, protocol=2)))
    assert _ptload.load(p, framework="np") == obj


def test_legacy_hand_built(tmp_path):
    obj = H.proto() + H.odict() + b"(" + H.ustr("w") + H.tensor_v2("torch.FloatStorage", "9402", 12, 2, (2, 5), (5, 1),
                                                                   legacy=True) + b"u" + H.STOP
    p = write(tmp_path, H.legacy_file(obj, [("9402", 12, F32.tobytes())]))
    sd = _ptload.load(p, framework="np")
    np.testing.assert_array_equal(sd["w"], F32[2:].reshape(2, 5))
    assert _ptload.read_index(p)[0]["storage"] == "9402"
    # sys_info saying big-endian changes nothing: torch's legacy reader never looks at it and reads
    # the storage bytes as little-endian (tests/test_ptload_torch.py checks this against torch.load)
    p2 = write(tmp_path, H.legacy_file(obj, [("9402", 12, F32.tobytes())], little_endian=False), "b.pt")
    for mmap in (True, False):
        np.testing.assert_array_equal(_ptload.load(p2, framework="np", mmap=mmap)["w"], F32[2:].reshape(2, 5))


# ------------------------------------------------------------- rejections

def expect(tmp_path, data, exc, *words):
    p = write(tmp_path, data)
    for fn in (lambda: _ptload.load(p, framework="np"), lambda: _ptload.verify(p), lambda: _ptload.read_index(p)):
        with pytest.raises(exc) as ei:
            fn()
        msg = str(ei.value)
        for w in words:
            assert w in msg, msg
    return ei.value


def test_unsafe_is_also_pickle_error():
    assert issubclass(UnsafePickleError, TorchFormatError)
    assert issubclass(UnsafePickleError, pickle.UnpicklingError)


def test_os_system_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    pkl = H.proto() + H.glob("os", "system") + H.tup(H.ustr(f"touch {marker}")) + H.REDUCE + H.STOP
    e = expect(tmp_path, H.pt_file(pkl), UnsafePickleError, "os.system", "byte 2")
    assert not marker.exists()
    assert isinstance(e, pickle.UnpicklingError)
    # the same pickle as a legacy object
    legacy = H.legacy_file(pkl, [])
    expect(tmp_path, legacy, UnsafePickleError, "os.system")
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("__builtin__", "eval"), ("builtins", "eval"), ("builtins", "getattr"),
                                         ("numpy.core.multiarray", "_reconstruct"), ("posix", "system"),
                                         ("torch", "load"), ("subprocess", "Popen"), ("torch.nn.parameter", "Foo")])
def test_disallowed_globals(tmp_path, module, name):
    pkl = H.proto() + H.glob(module, name) + H.tup(H.ustr("1")) + H.REDUCE + H.STOP
    expect(tmp_path, H.pt_file(pkl), UnsafePickleError, f"{module}.{name}")


def test_reduce_of_non_callable(tmp_path):
    expect(tmp_path, H.pt_file(H.proto() + H.ustr("os") + H.tup() + H.REDUCE + H.STOP), UnsafePickleError, "REDUCE")
    expect(tmp_path, H.pt_file(H.proto() + H.glob("torch", "float32") + H.tup() + H.REDUCE + H.STOP),
           UnsafePickleError, "REDUCE")


@pytest.mark.parametrize("body,word", [
    (b"}" + b"}" + H.BUILD, "BUILD"),                          # BUILD on a plain dict
    (b"]" + b"}" + H.BUILD, "BUILD"),                          # BUILD on a list
    (b"]" + H.pint(1) + H.pint(2) + b"s", "SETITEM"),          # SETITEM on a list
    (H.tup(H.pint(1)) + b"(" + H.pint(1) + H.pint(2) + b"u", "SETITEMS"),  # SETITEMS on a tuple
    (b"}" + H.pint(1) + b"a", "APPEND"),                       # APPEND on a dict
    (b"\x8f(" + H.pint(1) + b"e", "APPENDS"),                  # APPENDS on a set
    (b"(" + H.ustr("module") + H.ustr("x") + b"tQ", "typename"),  # persistent id not 'storage'
    (H.ustr("x") + b"Q", "persistent id"),
    (H.glob("collections", "OrderedDict") + H.tup(H.pint(1)) + b"\x81", "NEWOBJ"),
])
def test_container_and_build_misuse(tmp_path, body, word):
    expect(tmp_path, H.pt_file(H.proto() + body + H.STOP), UnsafePickleError, word)


@pytest.mark.parametrize("op", [b"\x95" + b"\0" * 8, b"\x93", b"B\x01\0\0\0x", b"C\x01x", b"i", b"o", b"0", b"2",
                                b"\x82\x01", b"\x92", b"gx\n", b"px\n", b"d", b"l", b"\x8c\x01x", b"S'x'\n", b"I1\n",
                                b"\x94", b"\x90", b"\x8e" + b"\0" * 8])
def test_unsupported_opcodes(tmp_path, op):
    e = expect(tmp_path, H.pt_file(H.proto() + H.NONE + op + H.STOP), UnsafePickleError, "opcode", "byte 3")
    assert f"0x{op[0]:02x}" in str(e)


def test_protocol4_pickle_rejected(tmp_path):
    expect(tmp_path, H.pt_file(pickle.dumps({"a": 1}, protocol=4)), UnsafePickleError, "0x95")


@pytest.mark.parametrize("extra,word", [
    ([("constants.pkl", H.proto() + H.NONE + H.STOP)], "TorchScript"),
    ([("code/__torch__.py", b"def f(): pass")], "TorchScript"),
    ([(".data/version", b"6\n")], "TorchScript"),
])
def test_torchscript_rejected(tmp_path, extra, word):
    expect(tmp_path, simple_file(extra=extra), UnsafePickleError, word)


def test_record_size_mismatch(tmp_path):
    pkl = H.state_dict_pickle([("w", "torch.FloatStorage", "0", 12, 0, (12,), (1,))])
    expect(tmp_path, H.pt_file(pkl, {"0": F32.tobytes()[:40]}), TorchFormatError, "mismatch", "40", "48")
    # numel far larger than the record (heap overflow in old torch)
    pkl = H.state_dict_pickle([("w", "torch.FloatStorage", "0", 2 ** 40, 0, (12,), (1,))])
    expect(tmp_path, H.pt_file(pkl, {"0": F32.tobytes()}), TorchFormatError, "mismatch")


@pytest.mark.parametrize("off,size,stride", [(1, (12,), (1,)), (0, (13,), (1,)), (0, (4, 4), (4, 1)),
                                             (0, (2, 2), (2 ** 62, 1)), (12, (1,), (1,)), (2 ** 63 - 1, (1,), (1,))])
def test_view_out_of_bounds(tmp_path, off, size, stride):
    pkl = H.state_dict_pickle([("w", "torch.FloatStorage", "0", 12, off, size, stride)])
    expect(tmp_path, H.pt_file(pkl, {"0": F32.tobytes()}), TorchFormatError, "byte")


def test_shared_key_with_different_sizes(tmp_path):
    pkl = H.state_dict_pickle([("a", "torch.FloatStorage", "0", 12, 0, (12,), (1,)),
                               ("b", "torch.FloatStorage", "0", 6, 0, (6,), (1,))])
    expect(tmp_path, H.pt_file(pkl, {"0": F32.tobytes()}), TorchFormatError, "storage '0'")


def test_missing_storage_record(tmp_path):
    pkl = H.state_dict_pickle([("w", "torch.FloatStorage", "7", 12, 0, (12,), (1,))])
    expect(tmp_path, H.pt_file(pkl, {"0": F32.tobytes()}), TorchFormatError, "data/7")


@pytest.mark.parametrize("body,word", [
    (H.NONE + b"h\x05", "memo"),                    # GET of an undefined entry
    (H.NONE + b"j\x00\x01\x00\x00", "memo"),
    (H.NONE + b"r\xff\xff\xff\x7f", "memo index"),  # PUT far past the pickle
    (b"R", "underflow"),                            # stack underflow
    (H.pint(1) + b"s", "underflow"),
    (b"q\x00", "underflow"),
    (b"t", "MARK"),
    (H.NONE + b"(" + H.BUILD, "underflow"),         # a mark hides the stack
])
def test_memo_and_stack_misuse(tmp_path, body, word):
    expect(tmp_path, H.pt_file(H.proto() + body + H.STOP), TorchFormatError, word)


@pytest.mark.parametrize("pkl", [H.proto() + H.NONE, H.proto() + b"X\xff\0\0\0ab", H.proto() + b"c" + b"os",
                                 b"", H.proto() + b"\x8a\x09" + b"\1\2"])
def test_truncated_pickle(tmp_path, pkl):
    expect(tmp_path, H.pt_file(pkl), TorchFormatError, "truncated")


def test_truncated_and_corrupt_zip(tmp_path):
    good = simple_file()
    for cut in (len(good) // 2, len(good) - 10, 30, 3):
        expect(tmp_path, good[:cut], TorchFormatError)
    expect(tmp_path, good[: len(good) // 2], TorchFormatError, "central directory")
    i = good.rindex(b"PK\x05\x06")
    expect(tmp_path, good[:i] + b"XX" + good[i + 2:], TorchFormatError, "central directory")
    # central directory offset pointing past the data
    bad = bytearray(good)
    struct.pack_into("<I", bad, i + 16, len(good))
    expect(tmp_path, bytes(bad), TorchFormatError, "central directory")
    # local header that does not match the directory
    bad = bytearray(good)
    bad[30] ^= 0x20
    expect(tmp_path, bytes(bad), TorchFormatError, "local header")
    # entry count that cannot fit
    bad = bytearray(good)
    struct.pack_into("<HH", bad, i + 8, 9000, 9000)
    expect(tmp_path, bytes(bad), TorchFormatError, "entries")


def test_zip64_damage(tmp_path):
    good = simple_file(zip64=True)
    i = good.rindex(b"PK\x06\x07")
    bad = bytearray(good)
    struct.pack_into("<Q", bad, i + 8, 2 ** 62)
    expect(tmp_path, bytes(bad), TorchFormatError, "zip64")
    j = good.rindex(b"PK\x06\x06")
    bad = bytearray(good)
    bad[j] = 0
    expect(tmp_path, bytes(bad), TorchFormatError, "zip64")


def test_entries_outside_prefix(tmp_path):
    data = H.zip_build([("archive/data.pkl", H.state_dict_pickle([]), 0), ("archive/version", b"3\n", 0),
                        ("other/data/0", b"x", 0)])
    expect(tmp_path, data, TorchFormatError, "outside the archive prefix")
    data = H.zip_build([("data.pkl", H.state_dict_pickle([]), 0), ("version", b"3\n", 0)])
    expect(tmp_path, data, TorchFormatError, "subdirectory")


def test_duplicate_records(tmp_path):
    pkl = H.state_dict_pickle([])
    data = H.zip_build([("a/data.pkl", pkl, 0), ("a/version", b"3\n", 0), ("a/data.pkl", pkl, 0)])
    expect(tmp_path, data, TorchFormatError, "two records")


@pytest.mark.parametrize("kw,word", [
    ({"version": None}, "version"), ({"version": b"99\n"}, "version"), ({"version": b"x"}, "version"),
    ({"byteorder": b"middle"}, "byteorder"),
])
def test_bad_small_records(tmp_path, kw, word):
    expect(tmp_path, simple_file(**kw), TorchFormatError, word)


def test_missing_data_pkl(tmp_path):
    expect(tmp_path, H.zip_build([("a/version", b"3\n", 0)]), TorchFormatError, "data.pkl")


def test_zip_bomb_capped(tmp_path):
    pkl = H.state_dict_pickle([("w", "torch.FloatStorage", "0", 12, 0, (12,), (1,))])
    good = H.pt_file(pkl, {"0": F32.tobytes()}, deflate=("data/0",))
    # make data/0 inflate to 48 + 4 MiB while the directory still says 48
    bomb = b"\0" * (48 + (4 << 20))
    comp = zlib.compress(bomb, 9)[2:-4]
    recs = [("a/data.pkl", pkl, 0), ("a/version", b"3\n", 0), ("a/data/0", None, 8)]
    out = bytearray()
    cd = bytearray()
    for name, data, method in recs:
        nb = name.encode()
        payload, usize = (comp, 48) if data is None else (data, len(data))
        off = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, 0, len(payload), usize, len(nb), 0) + nb
        out += payload
        cd += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, 0, len(payload), usize, len(nb),
                          0, 0, 0, 0, 0, off) + nb
    cdo = len(out)
    out += cd + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 3, 3, len(cd), cdo, 0)
    p = write(tmp_path, bytes(out))
    with pytest.raises(TorchFormatError, match="past its declared"):
        _ptload.load(p, framework="np")
    with pytest.raises(TorchFormatError, match="past its declared"):
        _ptload.verify(p)
    assert good  # the well-formed deflated variant loads (test_hand_built_state_dict)


def test_zip_bomb_declared_size(tmp_path):
    # a declared uncompressed size DEFLATE cannot reach from the compressed size
    good = bytearray(simple_file(deflate=("data/0",)))
    name = b"archive/data/0"
    c = good.index(b"PK\x01\x02" + good[good.index(b"PK\x01\x02") + 4:][:0])  # first central entry
    while True:
        n = struct.unpack_from("<H", good, c + 28)[0]
        if good[c + 46:c + 46 + n] == name:
            break
        c = good.index(b"PK\x01\x02", c + 4)
    struct.pack_into("<I", good, c + 24, 0xFFFFFFF0)
    expect(tmp_path, bytes(good), TorchFormatError, "zip bomb")


def test_corrupt_deflate_stream(tmp_path):
    good = bytearray(simple_file(deflate=("data/0",)))
    name = b"archive/data/0"
    h = good.index(name) - 30  # first occurrence: the local header
    n, m = struct.unpack_from("<HH", good, h + 26)
    i = h + 30 + n + m
    good[i:i + 6] = b"\xff" * 6
    p = write(tmp_path, bytes(good))
    with pytest.raises(TorchFormatError):
        _ptload.verify(p)
    with pytest.raises(TorchFormatError):
        _ptload.load(p, framework="np")


def test_not_a_torch_file(tmp_path):
    expect(tmp_path, b"hello world", TorchFormatError, "not a PyTorch file")
    with pytest.raises(TorchFormatError, match="empty"):
        _ptload.load(write(tmp_path, b"", "e.pt"))
    with pytest.raises(OSError):
        _ptload.load(tmp_path / "missing.pt")
    with pytest.raises(IsADirectoryError):  # as open() and the safetensors reader raise it
        _ptload.load(tmp_path)


def test_legacy_rejections(tmp_path):
    obj = H.proto() + H.odict() + b"(" + H.ustr("w") + H.tensor_v2("torch.FloatStorage", "1", 12, 0, (12,), (1,),
                                                                   legacy=True) + b"u" + H.STOP
    expect(tmp_path, H.legacy_file(obj, [("1", 11, F32.tobytes()[:44])]), TorchFormatError, "elements")
    expect(tmp_path, H.legacy_file(obj, [("1", 12, F32.tobytes()[:20])]), TorchFormatError, "truncated")
    expect(tmp_path, H.legacy_file(obj, []), TorchFormatError, "no data")
    expect(tmp_path, H.legacy_file(obj, [("1", 12, F32.tobytes()), ("1", 12, F32.tobytes())]), TorchFormatError,
           "twice")
    bad_magic = H.legacy_file(obj, [("1", 12, F32.tobytes())]).replace(b"\x6c\xfc\x9c", b"\x6d\xfc\x9c", 1)
    expect(tmp_path, bad_magic, TorchFormatError, "magic")
    five = H.proto() + H.odict() + b"(" + H.ustr("w") + H.tensor_v2("torch.FloatStorage", "1", 12, 0, (12,), (1,)) + \
        b"u" + H.STOP  # zip-style 5-tuple pid in a legacy file
    expect(tmp_path, H.legacy_file(five, [("1", 12, F32.tobytes())]), TorchFormatError, "fields")


def test_nesting_and_unhashable(tmp_path):
    deep = H.proto() + b"]" * 5000 + b"a" * 4999 + H.STOP
    expect(tmp_path, H.pt_file(deep), TorchFormatError, "nested deeper")
    expect(tmp_path, H.pt_file(H.proto() + b"}" + b"]" + H.pint(1) + b"s" + H.STOP), TorchFormatError, "hashable")
    expect(tmp_path, H.pt_file(H.proto() + b"X\x02\0\0\0\xff\xfe" + H.STOP), TorchFormatError, "UTF-8")


def test_allowed_but_unsupported(tmp_path):
    pkl = H.proto() + H.glob("torch._utils", "_rebuild_qtensor") + H.STOP
    e = expect(tmp_path, H.pt_file(pkl), TorchFormatError, "not supported")
    assert not isinstance(e, UnsafePickleError)


def test_alloc_failures(tmp_path, fail_alloc):
    from mlutils import _core

    for data in (simple_file(deflate=("data/0", "data.pkl")), simple_file(zip64=True),
                 H.legacy_file(H.proto() + H.odict() + b"(" + H.ustr("w") + H.tensor_v2(
                     "torch.FloatStorage", "1", 12, 0, (12,), (1,), legacy=True) + b"u" + H.STOP,
                     [("1", 12, F32.tobytes())])):
        p = write(tmp_path, data)
        n = 0
        while True:
            fail_alloc(n)
            try:
                sd = _ptload.load(p, framework="np")
            except MemoryError:
                n += 1
                assert n < 500
                continue
            finally:
                _core._fail_alloc_after(-1)
            np.testing.assert_array_equal(sd["w"].reshape(-1)[:12], F32)
            break
        assert n > 3  # the injection really hit several allocations


CORPUS = os.path.join(os.path.dirname(__file__), "fuzz", "corpus_pt_zip")
LEGACY_SEEDS = os.path.join(os.path.dirname(__file__), "fuzz", "corpus_pt_pickle")


def torch_written_files():
    files = [os.path.join(CORPUS, f) for f in sorted(os.listdir(CORPUS))]
    files += [os.path.join(LEGACY_SEEDS, f) for f in sorted(os.listdir(LEGACY_SEEDS)) if f.endswith(".legacy")]
    return files


@pytest.mark.parametrize("path", torch_written_files(), ids=os.path.basename)
def test_torch_written_seed_files_without_torch(path):
    """Files written by torch.save (kept in the fuzz corpus) load with NumPy only."""
    for mmap in (True, False):
        obj = _ptload.load(path, framework="np", mmap=mmap)
        assert obj is not None
    idx = _ptload.read_index(path)
    assert idx and all(e["nbytes"] >= 0 and e["name"] for e in idx)
    if path.endswith(".zip64.pt") and len({e["storage"] for e in idx}) > 1:
        # re-zipped in another order but still carrying .format_version: torch's computed offsets
        # would read other bytes, so verify() refuses it (load() reads each record where it is)
        with pytest.raises(TorchFormatError, match=r"record 'data/\d+' starts at byte \d+, but torch computes"):
            _ptload.verify(path)
    else:
        _ptload.verify(path)


@pytest.mark.parametrize("path", torch_written_files()[:6], ids=os.path.basename)
def test_mutated_torch_files_fail_cleanly(tmp_path, path):
    data = open(path, "rb").read()
    rng = np.random.default_rng(len(data))
    q = tmp_path / "m.pt"
    for _ in range(150):
        m = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, len(m)))
            m[i] = int(rng.integers(0, 256))
        if rng.random() < 0.2:
            m = m[: int(rng.integers(1, len(m)))]
        q.write_bytes(bytes(m))
        for fn in (lambda: _ptload.load(q, framework="np"), lambda: _ptload.read_index(q)):
            try:
                fn()
            except (TorchFormatError, MemoryError):
                pass


def test_pt_without_torch_falls_back_to_numpy(tmp_path, monkeypatch):
    p = write(tmp_path, simple_file())
    monkeypatch.setattr(_ptload, "optional_torch", lambda: None)  # as on a machine without torch
    sd = _ptload.load(p)  # framework "pt" by default
    assert isinstance(sd["w"], np.ndarray)
    np.testing.assert_array_equal(sd["w"], F32.reshape(3, 4))
    with pytest.raises(ValueError, match="torch"):
        _ptload.load(p, device="cuda")


def test_read_index_deep_and_cyclic(tmp_path):
    # 900 nested lists around one tensor, plus a list that holds itself
    t = H.tensor_v2("torch.FloatStorage", "0", 12, 0, (12,), (1,))
    body = H.proto() + b"]" * 900 + t + b"a" * 900 + H.STOP
    p = write(tmp_path, H.pt_file(body, {"0": F32.tobytes()}))
    idx = _ptload.read_index(p)
    assert len(idx) == 1 and idx[0]["name"] == ".".join(["0"] * 900)
    body = H.proto() + b"]q\x00(h\x00" + t + b"e" + H.STOP
    p = write(tmp_path, H.pt_file(body, {"0": F32.tobytes()}), "c.pt")
    assert [e["name"] for e in _ptload.read_index(p)] == ["1"]


def test_parameter_forms_and_unsupported_calls(tmp_path):
    t = H.tensor_v2("torch.FloatStorage", "0", 12, 0, (12,), (1,))
    pkl = (H.proto() + b"(" + H.glob("torch.nn.parameter", "Parameter") + H.tup(t, H.FALSE) + H.REDUCE +
           H.glob("torch.nn.parameter", "Parameter") + H.tup(t) + b"\x81" +
           H.glob("torch._utils", "_rebuild_parameter") + H.tup(t, H.TRUE, H.odict()) + H.REDUCE + b"t" + H.STOP)
    p = write(tmp_path, H.pt_file(pkl, {"0": F32.tobytes()}))
    a, b, c = _ptload.load(p, framework="np")
    for x in (a, b, c):
        np.testing.assert_array_equal(x, F32)
    assert [e["name"] for e in _ptload.read_index(p)] == ["0", "1", "2"]
    e = expect(tmp_path, H.pt_file(H.proto() + H.glob("torch", "Tensor") + H.tup() + H.REDUCE + H.STOP),
               TorchFormatError, "not supported")
    assert not isinstance(e, UnsafePickleError)


def test_mark_hides_outer_frames(tmp_path):
    # APPENDS right after two MARKs has no list in its own frame (Python's pickle agrees)
    body = H.proto() + b"](" + b"(" + H.pint(1) + b"e" + H.STOP
    with pytest.raises(Exception):
        pickle.loads(body)
    expect(tmp_path, H.pt_file(body), TorchFormatError, "underflow")


def _plain_values():
    from hypothesis import strategies as st

    leaf = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 100), max_value=2 ** 100)
            | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(min_size=1, max_size=20)
            | st.builds(bytearray, st.binary(max_size=8)) | st.complex_numbers(allow_nan=False))
    return st.recursive(
        leaf,
        lambda kids: (st.lists(kids, max_size=5) | st.tuples(kids, kids) | st.dictionaries(st.text(max_size=5), kids,
                                                                                            max_size=5)
                      | st.frozensets(st.integers(), max_size=4).map(set)),
        max_leaves=25)


def test_plain_pickles_match_python_unpickler(tmp_path):
    """Differential: any protocol-2 pickle of plain data loads exactly as pickle.loads reads it."""
    from hypothesis import given, settings, HealthCheck

    path = tmp_path / "h.pt"

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(_plain_values())
    def check(value):
        data = pickle.dumps(value, protocol=2)
        path.write_bytes(H.pt_file(data))
        ours = _ptload.load(path, framework="np")
        assert ours == pickle.loads(data)
        assert type(ours) is type(value)

    check()


def test_read_index_shared_containers_stay_linear(tmp_path):
    # t0 = (tensor,), t_{k+1} = (t_k, t_k): 2**60 paths, 61 containers
    t = H.tensor_v2("torch.FloatStorage", "0", 12, 0, (12,), (1,))
    body = H.proto() + t + b"\x85q\x00"
    for k in range(60):
        body += b"h" + bytes([k]) + b"h" + bytes([k]) + b"\x86q" + bytes([k + 1])
    body += H.STOP
    # each pair is left on the stack above the previous ones; STOP returns the last one
    p = write(tmp_path, H.pt_file(body, {"0": F32.tobytes()}))
    idx = _ptload.read_index(p)
    assert [e["name"] for e in idx] == [".".join(["0"] * 61)]
    _ptload.verify(p)
    obj = _ptload.load(p, framework="np")
    assert obj[0] is obj[1]


def test_quadratic_copies_are_refused(tmp_path):
    # one list of 20000 ints, then 20000 OrderedDict(list-of-pairs)/set(list) copies of it
    pairs = b"](" + (H.tup(H.pint(1), H.pint(2))) * 20000 + b"eq\x00"
    body = H.proto() + pairs + b"]" + b"(" + (H.glob("__builtin__", "set") + b"h\x00\x85R") * 20000 + b"e" + H.STOP
    expect(tmp_path, H.pt_file(body), TorchFormatError, "expands")


SNIPPETS = [
    H.NONE, H.TRUE, H.FALSE, H.pint(0), H.pint(2), H.pint(300), H.pint(-1), H.pint(2 ** 70), H.pfloat(1.5),
    b")", b"]", b"}", b"\x8f", b"(", b"t", b"a", b"e", b"s", b"u", b"\x85", b"\x86", b"\x87", b"q\x00", b"q\x01",
    b"h\x00", b"h\x01", b"R", b"b", b"Q", b"\x81", H.ustr("storage"), H.ustr("0"), H.ustr("cpu"), H.ustr("k"),
    H.ustr("latin1"), H.glob("collections", "OrderedDict"), H.glob("collections", "Counter"),
    H.glob("torch._utils", "_rebuild_tensor_v2"), H.glob("torch._utils", "_rebuild_tensor_v3"),
    H.glob("torch._utils", "_rebuild_parameter"), H.glob("torch._tensor", "_rebuild_from_type_v2"),
    H.glob("torch", "FloatStorage"), H.glob("torch.storage", "UntypedStorage"), H.glob("torch", "Size"),
    H.glob("torch", "device"), H.glob("torch", "bfloat16"), H.glob("torch", "Tensor"), H.glob("_codecs", "encode"),
    H.glob("builtins", "set"), H.glob("builtins", "bytearray"), H.glob("builtins", "complex"),
    H.glob("torch.nn.parameter", "Parameter"), H.pid("torch.FloatStorage", "0", 2),
    H.tensor_v2("torch.FloatStorage", "0", 2, 0, (2,), (1,)), H.odict(),
]


def test_random_opcode_sequences_fail_cleanly(tmp_path):
    """Any sequence of allowed opcodes either loads or raises TorchFormatError: never another error or a crash."""
    from hypothesis import given, settings, HealthCheck, strategies as st

    path = tmp_path / "r.pt"

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.sampled_from(SNIPPETS), max_size=30))
    def check(parts):
        path.write_bytes(H.pt_file(H.proto() + b"".join(parts) + H.STOP, {"0": b"\0" * 8}))
        for fn in (lambda: _ptload.load(path, framework="np"), lambda: _ptload.read_index(path),
                   lambda: _ptload.verify(path)):
            try:
                fn()
            except TorchFormatError:
                pass

    check()


def _payload_offset(data, name):
    h = data.index(name.encode()) - 30  # first occurrence: the local header
    n, m = struct.unpack_from("<HH", data, h + 26)
    return h + 30 + n + m


@pytest.mark.parametrize("deflate", [(), ("data/0",)])
def test_verify_checks_crc(tmp_path, deflate):
    good = simple_file(deflate=deflate)
    _ptload.verify(write(tmp_path, good, "g.pt"))
    bad = bytearray(good)
    if deflate:  # corrupt the stored CRC instead of the (compressed) payload
        c = bad.index(b"PK\x01\x02" )
        while bad[c + 46:c + 46 + 14] != b"archive/data/0":
            c = bad.index(b"PK\x01\x02", c + 4)
        struct.pack_into("<I", bad, c + 16, 0x12345678)
    else:
        bad[_payload_offset(good, "archive/data/0") + 5] ^= 0x40
    p = write(tmp_path, bytes(bad))
    with pytest.raises(TorchFormatError, match="CRC-32 mismatch in record 'archive/data/0'"):
        _ptload.verify(p)
    _ptload.load(p, framework="np")  # like torch.load, loading does not check CRCs


def test_verify_accepts_crc_zero(tmp_path):
    bad = bytearray(simple_file())
    c = bad.index(b"PK\x01\x02")
    while c >= 0:
        struct.pack_into("<I", bad, c + 16, 0)
        nxt = bad.find(b"PK\x01\x02", c + 4)
        c = nxt
    p = write(tmp_path, bytes(bad))
    _ptload.verify(p)
    np.testing.assert_array_equal(_ptload.load(p, framework="np")["w"], F32.reshape(3, 4))


def test_torch_size_values_do_not_leak(tmp_path):
    """torch.Size values (REDUCE of torch.Size) release their argument tuple: loading the same
    file again and again keeps memory flat."""
    import tracemalloc

    size = H.glob("torch", "Size") + H.tup(H.ints([1000, 2000, 3000])) + H.REDUCE
    p = write(tmp_path, H.pt_file(H.proto() + b"(" + size * 2000 + b"t" + H.STOP))
    first = _ptload.load(p, framework="np")
    assert first[0] == (1000, 2000, 3000) and len(first) == 2000
    del first
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(10):
            _ptload.load(p, framework="np")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 200_000, grown  # a leaked 3-tuple per Size would be 1.28 MB
