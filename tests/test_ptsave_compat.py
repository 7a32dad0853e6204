"""What mlutils._ptsave writes also loads on torch 2.1-2.6, emulated here
without the old torch: those readers find records by name (through the zip
directory, in any order), need only data.pkl, version, byteorder (optional)
and data/<key>, ignore every other record (.format_version,
.storage_alignment, .data/serialization_id), check each record's size against
numel x element size, map records at LFH offset + 30 + name + extra when
mmap=True, and accept only the weights_only globals that existed by 1.13."""
import collections
import io
import pickle
import struct
import zipfile

import numpy as np
import pytest

from mlutils import _ptsave

# The storage classes (torch 1.13-2.6 `torch._storage_classes`, legacy names) and their NumPy dtypes.
OLD_STORAGES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?", "ComplexFloatStorage": "<c8", "ComplexDoubleStorage": "<c16",
}
# Records a torch 2.1-2.6 reader never reads (added by 2.7, or informational).
NEW_RECORDS = (".format_version", ".storage_alignment", ".data/serialization_id")
OLD_MAX_VERSION = 6  # the lowest kMaxSupportedFileFormatVersion of the readers in question


class OldReaderError(Exception):
    pass


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    if not isinstance(hooks, collections.OrderedDict) or hooks:
        raise OldReaderError("backward hooks must be an empty OrderedDict")
    isz = storage.dtype.itemsize
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if end > storage.size:
        raise OldReaderError("view out of bounds")
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=[s * isz for s in stride])


class _OldStorage:
    def __init__(self, name):
        self.dtype = np.dtype(OLD_STORAGES[name])


class _OldUnpickler(pickle.Unpickler):
    """The globals and persistent ids a torch 1.13-2.6 weights_only load understands (for the
    dtypes those versions share with every later one)."""

    def __init__(self, data, read_record):
        super().__init__(io.BytesIO(data))
        self.read_record = read_record
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in OLD_STORAGES:
            return _OldStorage(name)
        raise OldReaderError(f"Unsupported global: GLOBAL {module}.{name}")

    def persistent_load(self, pid):
        typename, cls, key, location, numel = pid
        if typename != "storage" or not isinstance(cls, _OldStorage) or location != "cpu":
            raise OldReaderError(f"bad persistent id {pid!r}")
        if key not in self.storages:
            raw = self.read_record(f"data/{key}")
            if len(raw) != numel * cls.dtype.itemsize:  # "record size mismatch with dst size"
                raise OldReaderError(f"record size {len(raw)} mismatch with dst size {numel * cls.dtype.itemsize}")
            self.storages[key] = np.frombuffer(raw, dtype=cls.dtype)
        return self.storages[key]


def old_torch_load(blob, mmap=False):
    """torch 2.1-2.6 `_load` over `blob`, records looked up by name only."""
    z = zipfile.ZipFile(io.BytesIO(blob))
    infos = {i.filename: i for i in z.infolist()}
    names = sorted(infos)  # the order an older writer used: the reader must not care
    prefix = z.infolist()[0].filename.split("/")[0] + "/"
    for n in names:  # getAllRecords
        if not n.startswith(prefix):
            raise OldReaderError(f"{n} is outside {prefix}")

    def read_record(name):
        info = infos[prefix + name]
        if name in NEW_RECORDS:
            raise AssertionError(f"an old reader has no use for {name}")
        if not mmap:
            return z.read(info)
        # mmap=True (2.1+): the record is used in place at get_record_offset
        h = info.header_offset
        sig, = struct.unpack_from("<I", blob, h)
        name_len, extra_len = struct.unpack_from("<HH", blob, h + 26)
        assert sig == 0x04034B50 and info.compress_type == zipfile.ZIP_STORED
        start = h + 30 + name_len + extra_len
        return blob[start:start + info.file_size]

    version = int(read_record("version"))
    if not 1 <= version <= OLD_MAX_VERSION:
        raise OldReaderError(f"version {version}")
    byteorder = read_record("byteorder").decode() if prefix + "byteorder" in infos else "little"
    if byteorder != "little":
        raise OldReaderError(byteorder)
    return _OldUnpickler(read_record("data.pkl"), read_record).load()


def checkpoint(n_tensors=12):
    """A state dict with more than 10 storages (numeric and lexicographic orders differ), a view,
    shared storage, every dtype the old readers know, optimizer state and metadata."""
    dtypes = list(OLD_STORAGES.values())
    sd = collections.OrderedDict()
    for i in range(n_tensors):
        dt = np.dtype(dtypes[i % len(dtypes)])
        sd[f"layer{i}.weight"] = (np.arange(3 * (i + 1)) % 2 if dt == np.bool_ else np.arange(3 * (i + 1))).astype(dt).reshape(3, -1)
    sd["layer0.weight_t"] = sd["layer0.weight"].T  # non-contiguous; numpy arrays are saved as copies
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("layer1", {"version": 2})])
    opt = {"state": {0: {"step": 10, "exp_avg": np.ones(4, np.float32)}},
           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "amsgrad": False}]}
    return {"model": sd, "optimizer": opt, "epoch": 7, "name": "run", "best": None}


def assert_same(got, want):
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    elif isinstance(want, dict):
        assert type(got) is type(want) and list(got) == list(want)
        for k in want:
            assert_same(got[k], want[k])
        assert getattr(got, "_metadata", None) == getattr(want, "_metadata", None)
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want)
        for a, b in zip(got, want):
            assert_same(a, b)
    else:
        assert type(got) is type(want) and got == want


@pytest.mark.parametrize("mmap", [False, True])
def test_old_readers_load_what_we_write(mmap):
    obj = checkpoint()
    blob = _ptsave.save_bytes(obj)
    names = zipfile.ZipFile(io.BytesIO(blob)).namelist()
    data = [n for n in names if "/data/" in n]
    assert data != sorted(data)  # numeric order (2.7+), unlike the lexicographic order of older writers
    assert all(f"archive/{r}" in names for r in NEW_RECORDS)
    assert_same(old_torch_load(blob, mmap=mmap), obj)


def test_old_readers_need_none_of_the_new_records():
    """The file minus every record added after 2.0 still holds the whole checkpoint for a name-based reader."""
    obj = checkpoint()
    blob = _ptsave.save_bytes(obj)
    src = zipfile.ZipFile(io.BytesIO(blob))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in sorted(src.namelist()):
            if name.split("/", 1)[1] not in NEW_RECORDS:
                dst.writestr(name, src.read(name))
    assert_same(old_torch_load(out.getvalue()), obj)


def test_old_reader_emulation_rejects_what_old_torch_rejects():
    """The emulation is strict: newer globals and mismatched sizes fail in it, as in torch."""
    blob = _ptsave.save_bytes({"x": np.arange(3, dtype=np.uint16)})  # uint16 needs _rebuild_tensor_v3 (2.3+)
    with pytest.raises(OldReaderError, match="_rebuild_tensor_v3|UntypedStorage"):
        old_torch_load(blob)
    blob = bytearray(_ptsave.save_bytes({"x": np.arange(3, dtype=np.float32)}))
    z = zipfile.ZipFile(io.BytesIO(bytes(blob)))
    pkl = z.read("archive/data.pkl")
    bad = pkl.replace(b"cpuq\x06K\x03", b"cpuq\x06K\x04")
    assert bad != pkl
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for n in z.namelist():
            dst.writestr(n, bad if n.endswith("data.pkl") else z.read(n))
    with pytest.raises(OldReaderError, match="mismatch"):
        old_torch_load(out.getvalue())


def test_torch_loads_without_the_new_records(torch, tmp_path):
    """The current torch.load, given our file stripped of .format_version, .storage_alignment and
    .data/serialization_id and re-zipped in lexicographic order (what a 2.1-2.6 reader relies on),
    reads the same checkpoint, plain and with mmap, and with computed offsets turned on (which
    .format_version gates)."""
    from torch.utils.serialization import config

    sd = collections.OrderedDict((f"w{i}", torch.arange(i + 1, dtype=torch.float32)) for i in range(12))
    ours = tmp_path / "ours.pt"
    _ptsave.save(sd, ours)
    src = zipfile.ZipFile(ours)
    stripped = tmp_path / "stripped.pt"
    with zipfile.ZipFile(stripped, "w", zipfile.ZIP_STORED) as dst:
        for name in sorted(src.namelist()):
            if name.split("/", 1)[1] not in NEW_RECORDS:
                dst.writestr(name, src.read(name))
    old = config.load.calculate_storage_offsets
    try:
        for calc in (False, True):
            config.load.calculate_storage_offsets = calc
            for mmap in (False, True):
                got = torch.load(stripped, weights_only=True, mmap=mmap)
                assert list(got) == list(sd)
                for k in sd:
                    assert torch.equal(got[k], sd[k])
    finally:
        config.load.calculate_storage_offsets = old
