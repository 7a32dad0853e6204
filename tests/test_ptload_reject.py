"""Every rejection of the .pt reader, one hand-built file each: the error is a
TorchFormatError (UnsafePickleError for what weights_only forbids) whose
message names the problem (global, opcode, argument, record, byte offset)."""
import os
import struct
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _pthelpers as H  # noqa: E402

from mlutils import TorchFormatError, UnsafePickleError, _core, _ptload  # noqa: E402

F32 = np.arange(12, dtype="<f4").tobytes()
PID = H.pid("torch.FloatStorage", "0", 12)
UPID = H.pid("torch.storage.UntypedStorage", "0", 48)
OD = H.odict()
INTS = H.ints((12,)) + H.ints((1,))
F = H.FALSE


def call(module, name, *args):
    return H.glob(module, name) + H.tup(*args) + H.REDUCE


def v2(*args):
    return H.glob("torch._utils", "_rebuild_tensor_v2") + b"(" + b"".join(args) + b"t" + H.REDUCE


def v3(*args):
    return H.glob("torch._utils", "_rebuild_tensor_v3") + b"(" + b"".join(args) + b"t" + H.REDUCE


TENSOR = v2(PID, H.pint(0), INTS, F, OD)


def lst(*items):
    return b"]" + (b"(" + b"".join(items) + b"e" if items else b"")


def check(tmp_path, data, exc, words):
    p = tmp_path / "m.pt"
    p.write_bytes(data)
    for fn in (lambda: _ptload.load(p, framework="np"), lambda: _ptload.read_index(p), lambda: _ptload.verify(p)):
        with pytest.raises(exc) as ei:
            fn()
        msg = str(ei.value)
        for w in words:
            assert w in msg, msg


PICKLE_CASES = {
    # tensor rebuilds
    "storage-not-storage": (v2(H.pint(1), H.pint(0), INTS, F, OD), ["storage argument is a", "byte"]),
    "offset-not-int": (v2(PID, H.ustr("x"), INTS, F, OD), ["storage offset is not an int"]),
    "size-stride-lengths": (v2(PID, H.pint(0), H.ints((3, 4)), H.ints((1,)), F, OD), ["size and stride"]),
    "extent-overflow": (v2(PID, H.pint(0), H.ints((2 ** 40,)), H.ints((2 ** 40,)), F, OD), ["overflows"]),
    "v2-arg-count": (call("torch._utils", "_rebuild_tensor_v2", H.pint(1)), ["_rebuild_tensor_v2 takes"]),
    "v1-arg-count": (call("torch._utils", "_rebuild_tensor", H.pint(1)), ["_rebuild_tensor takes 4"]),
    "requires-grad-not-bool": (v2(PID, H.pint(0), INTS, H.ustr("yes"), OD), ["requires_grad is not a bool"]),
    "hooks-not-empty": (v2(PID, H.pint(0), INTS, F, H.pint(1)), ["backward hooks"]),
    "v3-no-dtype": (v3(UPID, H.pint(0), INTS, F, OD, H.pint(1)), ["needs a torch dtype"]),
    "tensor-metadata": (v2(PID, H.pint(0), INTS, F, OD, H.dict_of([(H.ustr("_x"), H.TRUE)])), ["metadata"]),
    "parameter-args": (call("torch._utils", "_rebuild_parameter", H.pint(1)), ["_rebuild_parameter takes"]),
    "parameter-hooks": (call("torch._utils", "_rebuild_parameter", TENSOR, F, H.pint(1)), ["hooks must be empty"]),
    "parameter-state": (call("torch._utils", "_rebuild_parameter_with_state", TENSOR, F, OD, H.pint(1)),
                        ["parameter state must be a dict"]),
    "from-type-args": (call("torch._tensor", "_rebuild_from_type_v2", H.pint(1)), ["_rebuild_from_type_v2 takes"]),
    "nn-parameter-args": (call("torch.nn.parameter", "Parameter", H.pint(1)), ["Parameter takes"]),
    # other allowed globals called wrongly
    "reduce-args-not-tuple": (H.glob("collections", "OrderedDict") + H.pint(1) + H.REDUCE, ["arguments are a int"]),
    "odict-items-not-pairs": (call("collections", "OrderedDict", lst(H.tup(H.pint(1)))), ["items must be pairs"]),
    "odict-bad-args": (call("collections", "OrderedDict", H.pint(1)), ["unsupported arguments to"]),
    "set-args": (call("builtins", "set", H.pint(1)), ["set() takes a list"]),
    "size-not-ints": (call("torch", "Size", H.tup(H.ustr("a"))), ["torch.Size takes ints"]),
    "size-two-args": (call("torch", "Size", H.pint(1), H.pint(2)), ["torch.Size takes one tuple"]),
    "device-args": (call("torch", "device", H.pint(1)), ["torch.device takes"]),
    "bytearray-args": (call("builtins", "bytearray", H.pint(1)), ["bytearray"]),
    "complex-args": (call("builtins", "complex", H.ustr("a"), H.ustr("b")), ["complex takes two numbers"]),
    # persistent ids
    "pid-key-not-str": (b"(" + H.ustr("storage") + H.glob("torch", "FloatStorage") + H.pint(0) + H.ustr("cpu")
                        + H.pint(12) + b"tQ", ["key and location must be strings"]),
    "pid-size-not-int": (b"(" + H.ustr("storage") + H.glob("torch", "FloatStorage") + H.ustr("0") + H.ustr("cpu")
                         + H.ustr("x") + b"tQ", ["storage size is not an int"]),
    "pid-size-overflow": (H.pid("torch.DoubleStorage", "0", 2 ** 62), ["storage size overflows"]),
    "pid-key-path": (H.pid("torch.FloatStorage", "../0", 12), ["not a plain name"]),
    # opcodes
    "protocol-6": (b"\x80\x06" + H.NONE, ["unsupported pickle protocol 6", "byte"]),
    "setitems-odd": (b"}(" + H.pint(1) + b"u", ["odd number of items"]),
    "newobj-parameter-args": (H.glob("torch.nn.parameter", "Parameter") + H.tup(H.pint(1)) + b"\x81",
                              ["Parameter takes"]),
    "build-tensor-state": (TENSOR + H.dict_of([(H.ustr("a"), H.pint(1))]) + H.BUILD, ["tensor state"]),
    "build-odict-not-dict": (OD + H.pint(1) + H.BUILD, ["OrderedDict state must be one dict"]),
    # conversion to Python values
    "attr-name-not-str": (OD + H.dict_of([(H.pint(1), H.pint(2))]) + H.BUILD, ["attribute name is a int"]),
    "codecs-above-255": (call("_codecs", "encode", H.ustr("\u0100"), H.ustr("latin1")), ["code points above 255"]),
    "set-unhashable": (call("builtins", "set", lst(lst())), ["not hashable"]),
    "bare-storage": (PID, ["bare storage"]),
}


@pytest.mark.parametrize("name", list(PICKLE_CASES))
def test_pickle_rejections(tmp_path, name):
    body, words = PICKLE_CASES[name]
    check(tmp_path, H.pt_file(H.proto() + body + H.STOP, {"0": F32}), TorchFormatError, words)


def test_untyped_storage_with_v2_reads_as_uint8_like_torch(tmp_path, torch):
    """torch.load types an UntypedStorage declaration as uint8, also for a
    _rebuild_tensor_v2 tensor (no dtype of its own): so do we."""
    p = tmp_path / "u.pt"
    p.write_bytes(H.pt_file(H.proto() + v2(UPID, H.pint(0), INTS, F, OD) + H.STOP, {"0": F32}))
    want = torch.load(p, weights_only=True)
    assert want.dtype == torch.uint8
    got = _ptload.load(p)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert np.array_equal(_ptload.load(p, framework="np"), want.numpy())
    _ptload.verify(p)


def test_uint16_tensor_and_its_uint8_view_like_torch(tmp_path, torch):
    """A genuine torch.save file: one storage declared UntypedStorage (uint16,
    v3) first and ByteStorage (uint8 view, v2) after it."""
    a = torch.tensor([1, 2, 300, 4], dtype=torch.int32).view(torch.uint16)
    for order in (("a", "b"), ("b", "a")):
        p = tmp_path / ("".join(order) + ".pt")
        torch.save({k: {"a": a, "b": a.view(torch.uint8)}[k] for k in order}, p)
        want = torch.load(p, weights_only=True)
        got = _ptload.load(p)
        for k in order:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (order, k)
        _ptload.verify(p)


def test_from_type_v2_of_other_types_is_unsafe(tmp_path):
    body = call("torch._tensor", "_rebuild_from_type_v2", H.glob("torch._utils", "_rebuild_tensor_v2"),
                H.glob("collections", "OrderedDict"), H.tup(), H.dict_of([]))
    check(tmp_path, H.pt_file(H.proto() + body + H.STOP), UnsafePickleError, ["_rebuild_from_type_v2", "byte"])


def test_legacy_view_metadata(tmp_path):
    pid6 = (b"(" + H.ustr("storage") + H.glob("torch", "FloatStorage") + H.ustr("1") + H.ustr("cpu") + H.pint(12)
            + H.tup(H.ustr("1"), H.pint(0), H.pint(4)) + b"tQ")
    obj = H.proto() + pid6 + H.STOP
    check(tmp_path, H.legacy_file(obj, [("1", 12, F32)]), TorchFormatError, ["view_metadata"])


def legacy_raw(protocol=1001, sys_info=None, keys=None):
    out = H.proto() + H.pint(H.LEGACY_MAGIC) + H.STOP + H.proto() + H.pint(protocol) + H.STOP
    out += H.proto() + (sys_info if sys_info is not None else H.dict_of([])) + H.STOP
    out += H.proto() + H.NONE + H.STOP
    out += H.proto() + (keys if keys is not None else lst()) + H.STOP
    return out


@pytest.mark.parametrize("data,words", [
    (legacy_raw(protocol=1000), ["invalid protocol version"]),
    (legacy_raw(sys_info=H.pint(1)), ["sys_info is not a dict"]),
    (legacy_raw(keys=H.pint(1)), ["key list is not a list"]),
    (legacy_raw(keys=lst(H.pint(1))), ["key list holds a int"]),
    (legacy_raw(keys=lst(H.ustr("9"))), ["storage key '9' is not used"]),
])
def test_legacy_rejections(tmp_path, data, words):
    check(tmp_path, data, TorchFormatError, words)


def simple(**kw):
    pkl = H.state_dict_pickle([("w", "torch.FloatStorage", "0", 12, 0, (12,), (1,))])
    return H.pt_file(pkl, {"0": F32}, **kw)


def test_record_rejections(tmp_path):
    check(tmp_path, simple(extra=[(".data/version", b"x")]), TorchFormatError, ["'.data/version' is not a number"])
    check(tmp_path, simple(version=b"99\n"), TorchFormatError, ["unsupported archive version 99"])
    check(tmp_path, simple(version=None), TorchFormatError, ["no 'version' record"])
    check(tmp_path, simple(byteorder=b"x" * 100), TorchFormatError, ["'archive/byteorder' is too large"])
    long_key = "k" * 5000
    pkl = H.state_dict_pickle([("w", "torch.FloatStorage", long_key, 12, 0, (12,), (1,))])
    check(tmp_path, H.pt_file(pkl, {"0": F32}), TorchFormatError, ["storage key is too long"])
    check(tmp_path, H.zip_build([("data.pkl", b"x", 0)]), TorchFormatError, ["not in a subdirectory: 'data.pkl'"])


def patch_cd(data, field_off, fmt, value):
    """Patches field `field_off` of the first central directory entry."""
    b = bytearray(data)
    cd = b.index(b"PK\x01\x02")
    struct.pack_into(fmt, b, cd + field_off, value)
    return bytes(b)


def test_zip_rejections(tmp_path):
    good = simple()
    check(tmp_path, patch_cd(good, 8, "<H", 1), TorchFormatError, ["is encrypted"])
    check(tmp_path, patch_cd(good, 10, "<H", 12), TorchFormatError, ["compression method 12"])
    check(tmp_path, patch_cd(good, 20, "<I", 0xFFFFFFFF), TorchFormatError, ["zip64 extra field but has none"])
    z64 = simple(zip64=True)
    cd = z64.index(b"PK\x01\x02")
    short = bytearray(z64)
    struct.pack_into("<H", short, cd + 46 + len(b"archive/data.pkl") + 2, 8)  # zip64 extra shorter than needed
    check(tmp_path, bytes(short), TorchFormatError, ["zip64 extra field is too short", "byte"])
    struct.pack_into("<H", short, cd + 46 + len(b"archive/data.pkl") + 2, 100)  # past the entry's extra bytes
    check(tmp_path, bytes(short), TorchFormatError, ["zip extra field runs past its entry", "byte"])
    # classic end record saying "look in zip64" without the zip64 records
    e = good.rindex(b"PK\x05\x06")
    b = bytearray(good)
    struct.pack_into("<I", b, e + 16, 0xFFFFFFFF)
    check(tmp_path, bytes(b), TorchFormatError, ["needs zip64 records but has none"])
    b = bytearray(good)
    struct.pack_into("<HHI", b, e + 8, 0, 0, 0)
    check(tmp_path, bytes(b), TorchFormatError, ["no entries"])
    b = bytearray(good)
    struct.pack_into("<HH", b, e + 4, 1, 1)
    check(tmp_path, bytes(b), TorchFormatError, ["multi-disk"])
    # a deflated record whose stream stops early
    d = simple(deflate=("data/0",))
    i = d.index(b"archive/data/0", d.index(b"PK\x01\x02"))
    cdh = i - 46
    csize = struct.unpack_from("<I", d, cdh + 20)[0]
    lfh = struct.unpack_from("<I", d, cdh + 42)[0]
    start = lfh + 30 + struct.unpack_from("<H", d, lfh + 26)[0] + struct.unpack_from("<H", d, lfh + 28)[0]
    b = bytearray(d)
    b[start + csize // 2:start + csize] = b"\0" * (csize - csize // 2)  # stored-block header of length 0, then junk
    p = tmp_path / "d.pt"
    p.write_bytes(bytes(b))
    with pytest.raises(TorchFormatError, match="deflated record 'archive/data/0'"):
        _ptload.load(p, framework="np", mmap=False)


def test_bad_arguments_to_the_binding(tmp_path):
    hooks = _ptload._NumpyHooks().hooks
    p = tmp_path / "m.pt"
    p.write_bytes(simple())
    with pytest.raises(TypeError, match="3 arguments"):
        _core._pt_load(str(p), "mmap")
    with pytest.raises(ValueError, match="mode must be"):
        _core._pt_load(str(p), 0, hooks)  # modes are named, not numbered
    with pytest.raises(ValueError, match="mode must be"):
        _core._pt_load(str(p), "bogus", hooks)
    with pytest.raises(TypeError, match="tensor, dtype, size and device"):
        _core._pt_load(str(p), "mmap", tuple(hooks))  # hooks are read by name, not position
    assert _core._pt_load(str(p), "copy", hooks) is not None
    with pytest.raises(IsADirectoryError):  # as open() and the safetensors reader raise it
        _ptload.load(tmp_path, framework="np")
    with pytest.raises(FileNotFoundError):
        _ptload.load(tmp_path / "missing.pt", framework="np")


def _corrupt_deflated_storage():
    """A valid file whose deflated storage record holds no deflate stream: the open (zip, pickle)
    passes, reading the storage fails."""
    data = bytearray(H.pt_file(H.state_dict_pickle([("w", "torch.FloatStorage", "0", 12, 0, (3, 4), (4, 1))]),
                               {"0": F32}, deflate=("data/0",)))
    h = bytes(data).index(b"archive/data/0") - 30  # its local header
    csize, = struct.unpack_from("<I", data, h + 18)
    n, m = struct.unpack_from("<HH", data, h + 26)
    data[h + 30 + n + m:h + 30 + n + m + csize] = b"\xff" * csize
    return bytes(data)


# Rejections made after the file was opened and its pickle read: while building the values
# (what fails there names the value) and while reading the storages.
AFTER_OPEN = {name: PICKLE_CASES[name] for name in ("attr-name-not-str", "codecs-above-255", "set-unhashable",
                                                     "bare-storage")}
AFTER_OPEN["dict-key-unhashable"] = (b"}" + lst() + H.pint(1) + b"s", ["not hashable"])


@pytest.mark.parametrize("name", list(AFTER_OPEN) + ["deflated-storage"])
@pytest.mark.parametrize("as_path", [False, True])
def test_rejections_after_the_open_name_the_file(tmp_path, name, as_path):
    """As the open's errors, those found later in a load name the file: "'path': text"."""
    if name == "deflated-storage":
        data, words, calls = _corrupt_deflated_storage(), ["is corrupt"], ("mmap", "copy")
    else:
        body, words = AFTER_OPEN[name]
        data, calls = H.pt_file(H.proto() + body + H.STOP, {"0": F32}), ("mmap", "copy", "index")
    p = tmp_path / "rank3.pt"
    p.write_bytes(data)
    for call in calls:
        fn = _ptload.read_index if call == "index" else lambda q: _ptload.load(q, framework="np", mmap=call == "mmap")
        with pytest.raises(TorchFormatError) as ei:
            fn(p if as_path else str(p))
        msg = str(ei.value)
        assert msg.startswith(f"'{p}': ") and all(w in msg for w in words), (call, msg)
        assert str(p) not in msg[len(str(p)) + 4:], msg  # named once
