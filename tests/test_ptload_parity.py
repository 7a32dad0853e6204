"""Hostile but loadable .pt files, each compared with torch.load(weights_only=True): the same
values, or a TorchFormatError where torch fails too; verify() says OK exactly when the loads
succeed (it runs the same checks), and no load raises anything but our errors."""
import collections
import io
import os
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _pthelpers as H  # noqa: E402
from test_ptload_torch import assert_same  # noqa: E402

from mlutils import TorchFormatError, _ptload  # noqa: E402

F2 = np.array([1.5, 2.5], "<f4").tobytes()


def write(tmp_path, data, name="m.pt"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def all_paths(p):
    return {"pt": lambda: _ptload.load(p), "pt-copy": lambda: _ptload.load(p, mmap=False),
            "np": lambda: _ptload.load(p, framework="np"), "index": lambda: _ptload.read_index(p),
            "verify": lambda: _ptload.verify(p)}


def same_as_torch(torch, p, np_ok=True):
    """Every path loads p like torch.load does, or every path raises TorchFormatError where torch raises."""
    try:
        ref = torch.load(p, weights_only=True)
    except Exception:  # noqa: BLE001 - torch's own error types vary
        for name, fn in all_paths(p).items():
            with pytest.raises(TorchFormatError):
                fn()
        return None
    for mmap in (True, False):
        assert_same(torch, _ptload.load(p, mmap=mmap), ref)
    _ptload.verify(p)
    _ptload.read_index(p)
    if np_ok:
        npv = _ptload.load(p, framework="np")
        for k, t in ref.items():
            assert npv[k].shape == tuple(t.shape)
            np.testing.assert_array_equal(npv[k], t.numpy())
    return ref


def two_decls(first, second, second_numel=2, legacy=False):
    key = "1" if legacy else "0"
    body = (H.proto() + b"}(" + H.ustr("a") + H.tensor_v2(first, key, 2, 0, (2,), (1,), legacy=legacy)
            + H.ustr("b") + H.tensor_v2(second, key, second_numel, 0, (second_numel,), (1,), legacy=legacy)
            + b"u" + H.STOP)
    if legacy:
        return H.legacy_file(body, [(key, 2, F2)])
    return H.pt_file(body, {key: F2})


@pytest.mark.parametrize("first,second,numel", [
    ("torch.FloatStorage", "torch.IntStorage", 2), ("torch.IntStorage", "torch.FloatStorage", 2),
    ("torch.FloatStorage", "torch.HalfStorage", 4), ("torch.HalfStorage", "torch.FloatStorage", 1),
    ("torch.FloatStorage", "torch.ByteStorage", 8),
])
@pytest.mark.parametrize("legacy", [False, True])
def test_storage_key_declared_twice(torch, tmp_path, first, second, numel, legacy):
    """torch keeps the FIRST declaration of a key for every tensor over it."""
    p = write(tmp_path, two_decls(first, second, numel, legacy))
    ref = same_as_torch(torch, p)
    if ref is not None:
        assert ref["a"].dtype == ref["b"].dtype
        idx = {e["name"]: e["dtype"] for e in _ptload.read_index(p)}
        assert idx["a"] == idx["b"] == str(ref["a"].dtype).replace("torch.", "")


def test_storage_key_declared_twice_v3(torch, tmp_path):
    """_rebuild_tensor_v3 carries its own dtype: torch uses it over the first declaration."""
    body = (H.proto() + b"}(" + H.ustr("a") + H.tensor_v2("torch.FloatStorage", "0", 2, 0, (2,), (1,))
            + H.ustr("b") + H.tensor_v3("0", 8, "int32", 0, (2,), (1,)) + b"u" + H.STOP)
    ref = same_as_torch(torch, write(tmp_path, H.pt_file(body, {"0": F2})))
    assert ref["b"].dtype == torch.int32


def test_legacy_sys_info_big_endian(torch, tmp_path):
    """A legacy file whose sys_info says big-endian: torch reads the bytes as little-endian anyway."""
    sd = collections.OrderedDict(w=torch.arange(6, dtype=torch.float32) + 0.5, i=torch.arange(3, dtype=torch.int64),
                                 h=torch.tensor([1.0, -2.0], dtype=torch.float16))
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    key = H.ustr("little_endian")
    at = data.index(key) + len(key)
    at += 2 if data[at:at + 1] == b"q" else 0  # BINPUT of the key
    assert data[at:at + 1] == H.TRUE
    big = data[:at] + H.FALSE + data[at + 1:]
    p = write(tmp_path, big)
    ref = same_as_torch(torch, p)
    assert torch.equal(ref["w"], sd["w"])  # torch really ignores the flag


def add_central_entry(data, name, lfh_offset, size, crc):
    """data: a zip without comment; adds a stored central-directory entry for `name` whose local
    header is at lfh_offset (which the caller put there)."""
    e = len(data) - 22
    n, cd_size, cd_off = struct.unpack_from("<HIi", data, e + 10)[0], *struct.unpack_from("<II", data, e + 12)
    nb = name.encode()
    entry = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, crc, size, size, len(nb), 0, 0, 0, 0,
                        0, lfh_offset) + nb
    return (data[:cd_off + cd_size] + entry
            + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n + 1, n + 1, cd_size + len(entry), cd_off, 0))


def local_header(name, payload):
    nb = name.encode()
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, zlib.crc32(payload), len(payload), len(payload),
                       len(nb), 0) + nb


def test_overlapping_records_are_refused(torch, tmp_path):
    """data/1 lies inside data/0's bytes: torch.load gives independent tensors; a mapping would alias
    them (a write to one changing the other), so every path refuses the file, naming both records."""
    inner_payload = np.array([7, 8, 9, 10], "<f4").tobytes()
    inner = local_header("archive/data/1", inner_payload) + inner_payload
    pad = (-(len(inner)) % 16)
    data0 = bytes(16) + inner + bytes(pad + 16)
    n0 = len(data0) // 4
    body = (H.proto() + b"}(" + H.ustr("a") + H.tensor_v2("torch.FloatStorage", "0", n0, 0, (n0,), (1,))
            + H.ustr("b") + H.tensor_v2("torch.FloatStorage", "1", 4, 0, (4,), (1,)) + b"u" + H.STOP)
    z = H.pt_file(body, {"0": data0}, align=64)
    lfh0 = z.index(b"archive/data/0") - 30
    start0 = lfh0 + 30 + struct.unpack_from("<HH", z, lfh0 + 26)[0] + struct.unpack_from("<HH", z, lfh0 + 26)[1]
    assert z[start0 + 16:start0 + 20] == b"PK\x03\x04"
    p = write(tmp_path, add_central_entry(z, "archive/data/1", start0 + 16, len(inner_payload),
                                          zlib.crc32(inner_payload)))
    ref = torch.load(p, weights_only=True)
    assert ref["b"].tolist() == [7, 8, 9, 10]
    ref["a"].zero_()
    assert ref["b"].tolist() == [7, 8, 9, 10]  # torch: independent tensors
    for name, fn in all_paths(p).items():
        with pytest.raises(TorchFormatError, match=r"zip records 'archive/data/0' .* and 'archive/data/1' .* overlap"):
            fn()


def test_record_inside_data_pkl_is_refused(tmp_path):
    """The whole class: any two records whose bytes overlap, not only storages."""
    pkl = H.state_dict_pickle([("w", "torch.FloatStorage", "0", 2, 0, (2,), (1,))])
    inner = local_header("archive/data/0", F2) + F2
    z = H.pt_file(pkl + inner, {}, align=None)
    start = z.index(inner)
    p = write(tmp_path, add_central_entry(z, "archive/data/0", start, len(F2), zlib.crc32(F2)))
    for name, fn in all_paths(p).items():
        with pytest.raises(TorchFormatError, match="'archive/data.pkl' .* and 'archive/data/0' .* overlap"):
            fn()


def view_file(offset, size, stride, numel=2, cls="torch.FloatStorage"):
    body = H.proto() + b"}" + H.ustr("a") + H.tensor_v2(cls, "0", numel, offset, size, stride) + b"s" + H.STOP
    return H.pt_file(body, {"0": F2})


@pytest.mark.parametrize("offset,size,stride", [
    (0, (2 ** 32, 2 ** 32), (0, 0)),         # numel overflows int64: torch raises
    (0, (2 ** 62, 2), (0, 0)),               # likewise
    (2 ** 40, (0,), (1,)),                    # empty view far past the storage: torch loads it
    (2 ** 63 - 1, (0, 3), (1, 2)),           # the largest offset
    (1, (3, 0), (5, 1)),
    (0, (2 ** 31, 2 ** 30), (0, 0)),          # 2**61 elements of a stride-0 view: torch loads it
])
def test_views_like_torch(torch, tmp_path, offset, size, stride):
    p = write(tmp_path, view_file(offset, size, stride))
    if int(np.prod(size, dtype=object)) * 4 <= sys.maxsize:
        same_as_torch(torch, p)
        return
    try:
        ref = torch.load(p, weights_only=True)["a"]
    except RuntimeError:
        same_as_torch(torch, p)
        return
    for mmap in (True, False):  # too large to compare byte for byte: compare the view and its corners
        ours = _ptload.load(p, mmap=mmap)["a"]
        assert (ours.shape, ours.stride(), ours.storage_offset(), ours.dtype) == \
            (ref.shape, ref.stride(), ref.storage_offset(), ref.dtype)
        assert ours[0, 0] == ref[0, 0] and ours[-1, -1] == ref[-1, -1]
    _ptload.verify(p)
    # NumPy cannot hold an array of more than 2**63 bytes, even a stride-0 one: a clear error
    with pytest.raises(TorchFormatError, match="cannot build the tensor"):
        _ptload.load(p, framework="np")


def test_tensor_with_python_attribute_everywhere(torch, tmp_path):
    """torch.save of a tensor carrying a Python attribute: every API and CLI command reads it."""
    t = torch.arange(3, dtype=torch.float32)
    t.note = "x"
    p = tmp_path / "a.pt"
    torch.save(t, p)
    ref = torch.load(p, weights_only=True)
    ours = _ptload.load(p)
    assert torch.equal(ours, ref) and ours.note == ref.note == "x"
    np.testing.assert_array_equal(_ptload.load(p, framework="np"), [0, 1, 2])
    _ptload.verify(p)
    assert _ptload.read_index(p) == [{"name": "", "dtype": "float32", "shape": [3], "nbytes": 12, "storage": "0"}]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for args in (["verify", str(p)], ["inspect", str(p)], ["convert", str(p), str(tmp_path / "a.safetensors")]):
        r = subprocess.run([sys.executable, "-m", "mlutils", *args], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == 0, (args, r.stderr)
    from safetensors.numpy import load_file

    assert [v.tolist() for v in load_file(str(tmp_path / "a.safetensors")).values()] == [[0, 1, 2]]


def test_attribute_torch_refuses_fails_verify_too(torch, tmp_path):
    """An attribute that cannot be set on a tensor (a read-only property): torch.load fails, and so
    do load() and verify() (which sets it on a probe tensor when torch is importable)."""
    state = b"}" + H.ustr("shape") + H.ustr("x") + b"s"
    body = (H.proto() + H.glob("torch._tensor", "_rebuild_from_type_v2") + b"(" +
            H.glob("torch._utils", "_rebuild_tensor_v2") + H.glob("torch", "Tensor") +
            b"(" + H.pid("torch.FloatStorage", "0", 2) + H.pint(0) + H.ints((2,)) + H.ints((1,)) + H.FALSE +
            H.odict() + b"t" + state + b"tR" + H.STOP)
    p = write(tmp_path, H.pt_file(body, {"0": F2}))
    with pytest.raises(Exception):
        torch.load(p, weights_only=True)
    for fn in (lambda: _ptload.load(p), lambda: _ptload.verify(p), lambda: _ptload.read_index(p)):
        with pytest.raises(TorchFormatError, match="cannot set attribute 'shape'"):
            fn()


def test_mmap_views_do_not_alias_across_records(torch, tmp_path):
    """With the default mapping, each storage is its own bytes: writing one tensor changes no other,
    as with torch.load."""
    sd = {"a": torch.zeros(16), "b": torch.ones(16)}
    p = tmp_path / "s.pt"
    torch.save(sd, p)
    ours = _ptload.load(p)
    ours["a"] += 5
    assert torch.equal(ours["b"], torch.ones(16))
    assert torch.equal(torch.load(p, weights_only=True)["a"], torch.zeros(16))  # a private mapping


def torch_file(torch, tmp_path):
    p = tmp_path / "src.pt"
    torch.save({"w": torch.arange(4, dtype=torch.float32), "b": torch.ones(2, dtype=torch.int64)}, p)
    return p.read_bytes()


def cd_entry(data, name):
    i = data.index(b"PK\x01\x02")
    while data[i + 46:i + 46 + len(name)] != name.encode():
        i = data.index(b"PK\x01\x02", i + 4)
    return i


def patched(data, at, fmt, value):
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def fix_crc(data, name):
    """Rewrites the directory CRC-32 of stored record `name` to match its (edited) bytes."""
    cd = cd_entry(data, name)
    size, = struct.unpack_from("<I", data, cd + 24)
    lfh, = struct.unpack_from("<I", data, cd + 42)
    n, x = struct.unpack_from("<HH", data, lfh + 26)
    start = lfh + 30 + n + x
    return patched(data, cd + 16, "<I", zlib.crc32(data[start:start + size]))


def test_zip_fields_torch_refuses(torch, tmp_path):
    """Fields of a real torch.save file that make torch.load fail make every path here fail too
    (found by comparing mutated files with torch.load)."""
    data = torch_file(torch, tmp_path)
    cd = cd_entry(data, "src/data/0")
    cases = {
        "disk-start": (patched(data, cd + 34, "<H", 3), "multi-disk"),
        "masked-headers": (patched(data, cd + 8, "<H", 0x2008), "encrypted"),
        "strong-encryption": (patched(data, cd + 8, "<H", 0x0048), "encrypted"),
    }
    pkl_at = data.index(b"PK\x03\x04")
    body = data.index(b"X\x01\x00\x00\x00w", pkl_at)  # the key 'w' in data.pkl (stored record)
    cases["pickle-utf8"] = (fix_crc(patched(data, body + 5, "B", 0xFF), "src/data.pkl"), "not valid UTF-8")
    sid = data.find(b"src/.data/serialization_id")
    if sid >= 0:
        lfh = data.rindex(b"PK\x03\x04", 0, sid)
        n, x = struct.unpack_from("<HH", data, lfh + 26)
        cases["serialization-id"] = (fix_crc(patched(data, lfh + 30 + n + x, "B", 0xFF), "src/.data/serialization_id"),
                                     "serialization_id")
    for name, (bad, words) in cases.items():
        p = write(tmp_path, bad, f"{name}.pt")
        with pytest.raises(Exception):
            torch.load(p, weights_only=True)
        for fn in all_paths(p).values():
            with pytest.raises(TorchFormatError, match=words):
                fn()


def test_directory_attribute_is_refused(torch, tmp_path):
    """A record whose external attributes say "directory": torch.load hands back bytes it never
    read for it (differing run to run); every path here refuses the file."""
    data = torch_file(torch, tmp_path)
    p = write(tmp_path, patched(data, cd_entry(data, "src/data/0") + 38, "<I", 0x10))
    for name, fn in all_paths(p).items():
        with pytest.raises(TorchFormatError, match="'src/data/0' is marked as a directory"):
            fn()
