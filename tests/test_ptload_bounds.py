"""Every bound of the zip reader at exactly the limit (loads, same values) and one byte past
(TorchFormatError naming the structure): record data against the central directory, a local
header against the directory, the directory against the end record, the zip64 extra field
against its entry, the zip64 end record against its locator."""
import os
import struct
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _pthelpers as H  # noqa: E402

from mlutils import TorchFormatError, _ptload  # noqa: E402

F32 = np.arange(12, dtype="<f4")
PKL = H.state_dict_pickle([("w", "torch.FloatStorage", "0", 12, 0, (12,), (1,))])


def last_data(recs):
    """data/0 last, right before the central directory."""
    return [r for r in recs if r[0] != "data/0"] + [r for r in recs if r[0] == "data/0"]


def base(**kw):
    return H.pt_file(PKL, {"0": F32.tobytes()}, align=None, order=last_data, **kw)


def cd_of(data, name):
    i = data.index(b"PK\x01\x02")
    while data[i + 46:i + 46 + len(name)] != name.encode():
        i = data.index(b"PK\x01\x02", i + 4)
    return i


def patch(data, at, fmt, value):
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def loads_exactly(tmp_path, data):
    p = tmp_path / "ok.pt"
    p.write_bytes(data)
    for mmap in (True, False):
        np.testing.assert_array_equal(_ptload.load(p, framework="np", mmap=mmap)["w"], F32)
    _ptload.verify(p)


def refused(tmp_path, data, words):
    p = tmp_path / "bad.pt"
    p.write_bytes(data)
    for fn in (lambda: _ptload.load(p, framework="np"), lambda: _ptload.load(p, framework="np", mmap=False),
               lambda: _ptload.read_index(p), lambda: _ptload.verify(p)):
        with pytest.raises(TorchFormatError, match=words):
            fn()


def test_record_data_ends_at_the_directory(tmp_path):
    data = base()
    cd = cd_of(data, "archive/data/0")
    lfh, = struct.unpack_from("<I", data, cd + 42)
    n, = struct.unpack_from("<H", data, lfh + 26)
    start = lfh + 30 + n
    cd_off = data.index(b"PK\x01\x02")
    assert start + 48 == cd_off  # the payload's last byte is the byte before the directory
    loads_exactly(tmp_path, data)
    # one byte more, declared in the directory (and the local header): it would read the directory's first byte
    bad = patch(patch(data, cd + 20, "<I", 49), cd + 24, "<I", 49)
    refused(tmp_path, bad, "'archive/data/0' runs past the end of the data")


def test_local_header_ends_at_the_directory(tmp_path):
    """An empty last record: its local header ends exactly where the directory starts."""
    data = H.pt_file(PKL, {"0": F32.tobytes()}, align=None, extra=[("zz", b"")])
    cd = cd_of(data, "archive/zz")
    lfh, = struct.unpack_from("<I", data, cd + 42)
    assert lfh + 30 + len("archive/zz") == data.index(b"PK\x01\x02")
    loads_exactly(tmp_path, data)
    refused(tmp_path, patch(data, lfh + 28, "<H", 1), "local header of zip entry 'archive/zz' does not match")
    # the directory says the header starts one byte later: it no longer fits before the directory
    refused(tmp_path, patch(data, cd + 42, "<I", lfh + 1), "'archive/zz' has its local header outside the file")


def test_directory_ends_at_the_end_record(tmp_path):
    data = base()
    e = data.rindex(b"PK\x05\x06")
    size, off = struct.unpack_from("<II", data, e + 12)
    assert off + size == e
    loads_exactly(tmp_path, data)
    refused(tmp_path, patch(data, e + 12, "<I", size + 1), "central directory lies outside the file")
    refused(tmp_path, patch(data, e + 16, "<I", off + 1), "central directory")


def test_directory_entry_ends_at_the_directory_end(tmp_path):
    """The last entry's name ends exactly at the directory's end; one byte more of name runs past."""
    data = base()
    e = data.rindex(b"PK\x05\x06")
    last = data.rindex(b"PK\x01\x02", 0, e)
    n, = struct.unpack_from("<H", data, last + 28)
    assert last + 46 + n == e
    refused(tmp_path, patch(data, last + 28, "<H", n + 1), "runs past the directory")


def test_zip64_extra_field_bounds(tmp_path):
    data = H.pt_file(PKL, {"0": F32.tobytes()}, align=None, zip64=True)
    cd = cd_of(data, "archive/data/0")
    n, xl = struct.unpack_from("<HH", data, cd + 28)
    x = cd + 46 + n
    assert xl == 28 and struct.unpack_from("<HH", data, x) == (1, 24)  # exactly the entry's extra bytes
    loads_exactly(tmp_path, data)
    refused(tmp_path, patch(data, x + 2, "<H", 25), "zip extra field runs past its entry")
    refused(tmp_path, patch(data, x + 2, "<H", 23), "zip64 extra field is too short")


def test_zip64_end_record_bounds(tmp_path):
    data = H.pt_file(PKL, {"0": F32.tobytes()}, align=None, zip64=True)
    loc = data.rindex(b"PK\x06\x07")
    e64, = struct.unpack_from("<Q", data, loc + 8)
    assert e64 + 56 == loc  # the zip64 end record ends where the locator starts
    loads_exactly(tmp_path, data)
    refused(tmp_path, patch(data, loc + 8, "<Q", e64 + 1), "zip64")
    refused(tmp_path, patch(data, loc + 8, "<Q", loc - 55), "zip64 locator at byte \\d+ points outside the file")


@pytest.mark.parametrize("zip64", [False, True])
def test_every_cut_to_the_byte(tmp_path, zip64):
    """The file cut at each structure's last byte and one before: never a load, a clear error."""
    data = H.pt_file(PKL, {"0": F32.tobytes()}, align=None, zip64=zip64)
    ends = [data.index(b"PK\x01\x02"), data.rindex(b"PK\x05\x06"), len(data) - 1]
    if zip64:
        ends += [data.rindex(b"PK\x06\x06"), data.rindex(b"PK\x06\x07")]
    for cut in sorted({c for e in ends for c in (e - 1, e, e + 1) if 0 < c < len(data)}):
        refused(tmp_path, data[:cut], ".")
    loads_exactly(tmp_path, data)
