"""The safetensors writer writes nothing our reader refuses, and says why in the reader's words.

Each case is a tensor whose header the format can spell but which our
reader refuses (at parse time, or when it builds the NumPy array / torch
tensor): the same file made by hand is read and refused, and the writer,
given that tensor, refuses it with the same message.  The edges just inside
each limit are written and read back."""
import json
import struct

import numpy as np
import pytest

import mlutils
from mlutils import _safetensors as S


def _blob(name, dtype, shape, nbytes):
    """A file holding one tensor, made by hand (our writer is not trusted here)."""
    text = json.dumps({name: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]}},
                      separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"\0" * nbytes


def _bits_of(dtype, shape):
    """Bytes the data of shape x dtype holds; 0 when that does not fit (the tensor is refused first)."""
    n = int(np.prod(shape, dtype=object)) * S._BITS[dtype]
    return n // 8 if n % 8 == 0 and n < 1 << 64 else 0


# (dtype, shape): refused by the reader, so by the writer.
REFUSED = {
    "dim-2^63": ("U8", (0, 2**63)),
    "dim-2^64-1": ("F32", (0, 2**64 - 1)),
    "dim-2^63-first": ("I64", (2**63, 0)),
    "65-dims": ("U8", (1,) * 65),
    "65-dims-empty": ("U8", (1,) * 64 + (0,)),
    "numpy-bytes-2^63": ("U8", (0, 2**62, 2)),            # NumPy: size x itemsize, zeros left out
    "numpy-bytes-f64": ("F64", (0, 2**60)),
    "numpy-bytes-f64-max-dim": ("F64", (0, 2**63 - 1)),
    "numpy-bytes-f4-rows": ("F4", (2**63 - 1, 2, 0)),     # F4 loads as bytes: (2**63-1, 2, 0) bytes
    "element-count": ("U8", (2**32, 2**32, 0)),           # refused when the header is parsed
    "bit-size": ("F64", (2**62,)),
    "misaligned-f4": ("F4", (3,)),
    "misaligned-f6": ("F6_E2M3", (2, 3)),
}

# (dtype, shape): just inside the limits: written, read back with this shape.
ACCEPTED = {
    "dim-2^63-1": ("U8", (0, 2**63 - 1)),
    "64-dims": ("U8", (1,) * 64),
    "numpy-bytes-2^63-1": ("U8", (0, 2**63 - 1, 1)),
    "numpy-bytes-f64-edge": ("F64", (0, 2**60 - 1)),
    "f4-packed-huge": ("F4", (0, 2**63 - 1)),   # odd last dimension: one dimension of 0 packed bytes
    "f4-rows-edge": ("F4", (2**62 - 1, 2, 0)),
}


def _reader_message(blob, framework="np"):
    with pytest.raises(mlutils.SafetensorsError) as e:
        S.load(blob, framework)
    return str(e.value)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_writer_refuses_what_the_reader_refuses_in_its_words(case, tmp_path):
    dtype, shape = REFUSED[case]
    nbytes = _bits_of(dtype, shape)
    blob = _blob("t", dtype, shape, nbytes)
    want = _reader_message(blob)
    assert want.startswith("tensor 't'"), want
    raw = S.RawTensor(dtype, shape, b"\0" * nbytes)
    with pytest.raises(mlutils.SafetensorsError) as e:
        S.save({"t": raw})
    assert str(e.value) == want
    assert isinstance(e.value, ValueError)
    p = tmp_path / "t.safetensors"
    with pytest.raises(mlutils.SafetensorsError) as e:
        S.save_file({"t": raw}, p)
    assert str(e.value) == want
    assert not p.exists()
    # the reader says the same from a file, after naming it
    p.write_bytes(blob)
    with pytest.raises(mlutils.SafetensorsError) as e:
        S.load_file(p)
    assert str(e.value) == f"'{p}': {want}"


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_torch_reader_refuses_them_in_the_same_words(case, torch):
    dtype, shape = REFUSED[case]
    blob = _blob("t", dtype, shape, _bits_of(dtype, shape))
    assert _reader_message(blob, "pt") == _reader_message(blob, "np")


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_edges_inside_the_limits_are_written_and_read(case):
    dtype, shape = ACCEPTED[case]
    nbytes = _bits_of(dtype, shape)
    blob = S.save({"t": S.RawTensor(dtype, shape, b"\0" * nbytes)})
    assert blob == _blob("t", dtype, shape, nbytes)
    got = S.load(blob)["t"]
    assert got.nbytes == nbytes
    if S._BITS[dtype] % 8 == 0:
        assert got.shape == shape


def test_long_names_are_shortened_the_same_way():
    name = "n" * 500
    blob = _blob(name, "U8", (0, 2**63), 0)
    want = _reader_message(blob)
    assert "..." in want and len(want) < 300
    with pytest.raises(mlutils.SafetensorsError) as e:
        S.save({name: S.RawTensor("U8", (0, 2**63), b"")})
    assert str(e.value) == want


def test_sub_byte_last_dimension_is_scaled_without_overflow():
    """F4/F6 load as bytes: the last dimension times bits/8, computed without wrapping
    at 2**64 (2**62 + 2 F4 elements are 2**61 + 1 bytes, not 1)."""
    for dtype, last, want in (("F4", 2**62 + 2, 2**61 + 1), ("F4", 2**63 - 2, 2**62 - 1),
                              ("F6_E2M3", 2**62 + 4, 3 * 2**60 + 3)):
        blob = _blob("t", dtype, (0, last), 0)
        assert S.load(blob)["t"].shape == (0, want), (dtype, last)
        assert S.save({"t": S.RawTensor(dtype, (0, last), b"")}) == blob
