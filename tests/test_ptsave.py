"""mlutils._ptsave: .pt files read back exactly by the real torch.load, laid
out byte for byte as torch.save lays them out, written atomically."""
import collections
import io
import math
import os
import pickle
import pickletools
import struct
import zipfile

import numpy as np
import pytest

from mlutils import _core, _ptsave

ALL_TORCH_DTYPES = [
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "bool", "complex64", "complex128", "uint16", "uint32", "uint64", "float8_e4m3fn",
    "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2",
    "complex32", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
]
# What weights_only accepts (B5), plus nothing else.
ALLOWED_OPS = {
    "PROTO", "GLOBAL", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET", "MARK", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3", "EMPTY_TUPLE", "EMPTY_DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "APPEND",
    "APPENDS", "BININT1", "BININT2", "BININT", "LONG1", "BINFLOAT", "BINUNICODE", "NONE", "NEWTRUE",
    "NEWFALSE", "REDUCE", "BUILD", "BINPERSID", "STOP",
}


# ----------------------------------------------------------------- helpers

def storage_bytes(t):
    st = t.untyped_storage()
    import torch
    return torch.empty(0, dtype=torch.uint8).set_(st).numpy().tobytes()


def assert_same_tensor(got, want):
    assert type(got) is type(want)
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    assert got.stride() == want.stride()
    assert got.storage_offset() == want.storage_offset()
    assert got.requires_grad == want.requires_grad
    assert got.is_conj() == want.is_conj()
    assert storage_bytes(got) == storage_bytes(want.detach().cpu())


def assert_same(got, want):
    import torch
    if isinstance(want, torch.Tensor):
        assert_same_tensor(got, want)
    elif isinstance(want, dict):
        assert type(got) is type(want)
        assert list(got.keys()) == list(want.keys())
        for k in want:
            assert_same(got[k], want[k])
        assert getattr(got, "_metadata", None) == getattr(want, "_metadata", None)
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want)
        for a, b in zip(got, want):
            assert_same(a, b)
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got)
    else:
        assert type(got) is type(want) and got == want


def load_all_ways(torch, path):
    """torch.load plain, with mmap, and with mmap + computed storage offsets."""
    from torch.utils.serialization import config

    plain = torch.load(path, weights_only=True)
    mapped = torch.load(path, mmap=True, weights_only=True)
    old = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True
    try:
        computed = torch.load(path, mmap=True, weights_only=True)
    finally:
        config.load.calculate_storage_offsets = old
    return plain, mapped, computed


def torch_file(torch, obj, tmp_path, name):
    d = tmp_path / "torch"
    d.mkdir(exist_ok=True)
    torch.save(obj, d / name)
    return (d / name).read_bytes()


def our_file(obj, tmp_path, name):
    d = tmp_path / "ours"
    d.mkdir(exist_ok=True)
    _ptsave.save(obj, d / name)
    return d / name


def assert_layout_identical(ours, theirs):
    """Byte identity with torch.save, its .data/serialization_id record included."""
    if ours != theirs:
        zt = zipfile.ZipFile(io.BytesIO(theirs))
        zo = zipfile.ZipFile(io.BytesIO(ours))
        key = lambda i: (i.filename, i.header_offset, i.CRC, i.file_size, i.compress_type, i.flag_bits)
        assert [key(i) for i in zo.infolist()] == [key(i) for i in zt.infolist()]
        assert zo.read(zo.infolist()[-1]) == zt.read(zt.infolist()[-1])
        assert ours == theirs
    assert zipfile.ZipFile(io.BytesIO(ours)).testzip() is None


def data_pkl(blob):
    z = zipfile.ZipFile(io.BytesIO(blob))
    return z.read(z.namelist()[0])


def state_dict_model(torch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8, 4, bias=True), torch.nn.LayerNorm(4),
    )
    model[4].weight.data = model[4].weight.data.to(torch.bfloat16).float()
    return model


def random_tensor(torch, dtype_name, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype_name)
    itemsize = torch.empty(0, dtype=dt).element_size()
    n = int(np.prod(shape)) * itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(dt).reshape(shape)


# ----------------------------------------------------------------- torch peers

def test_state_dict_identical_to_torch_save(torch, tmp_path):
    sd = state_dict_model(torch).state_dict()
    assert sd._metadata["1"]["version"] == 2  # BatchNorm: a real _metadata
    theirs = torch_file(torch, sd, tmp_path, "model.pt")
    path = our_file(sd, tmp_path, "model.pt")
    assert_layout_identical(path.read_bytes(), theirs)
    for got in load_all_ways(torch, path):
        assert_same(got, sd)


def test_save_bytes_matches_buffer_save(torch):
    sd = state_dict_model(torch).state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    ours = _ptsave.save_bytes(sd)
    assert_layout_identical(ours, buf.getvalue())
    assert zipfile.ZipFile(io.BytesIO(ours)).namelist()[0] == "archive/data.pkl"
    assert_same(torch.load(io.BytesIO(ours), weights_only=True), sd)


@pytest.mark.parametrize("dtype", ALL_TORCH_DTYPES)
def test_every_dtype(torch, tmp_path, dtype):
    t = random_tensor(torch, dtype, (3, 5), seed=ALL_TORCH_DTYPES.index(dtype))
    obj = {"t": t, "view": t[1:, 2:4], "scalar": t[2, 3], "empty": t[:0]}
    theirs = torch_file(torch, obj, tmp_path, "d.pt")
    path = our_file(obj, tmp_path, "d.pt")
    assert_layout_identical(path.read_bytes(), theirs)
    for got in load_all_ways(torch, path):
        assert_same(got, obj)
        # the views share the one storage they came from
        assert got["view"].untyped_storage().data_ptr() == got["t"].untyped_storage().data_ptr()


def test_sharing_views_and_layouts(torch, tmp_path):
    base = torch.arange(120, dtype=torch.float32)
    m = base.view(4, 5, 6)
    other = torch.randn(7, 3)
    obj = collections.OrderedDict(
        m=m,
        t=m.transpose(0, 2),                 # non-contiguous: whole storage written once
        sl=base[7:19:3],
        tied=m,                              # the same tensor object: BINGET
        big_dim=base.view(2, 3, 4, 5),       # >3 dims: MARK ... TUPLE
        expanded=other[:, :1].expand(7, 9),  # zero stride
        other=other,
        zero_dim=torch.tensor(3.5),
        empty=torch.empty(0, 4),
        empty_storage=torch.empty(0, dtype=torch.int64),
        req=torch.ones(3, requires_grad=True),
        conj=torch.tensor([1 + 2j, 3 - 1j]).conj(),
        neg=torch.tensor([1 + 2j, 3 - 1j]).conj().imag,
    )
    theirs = torch_file(torch, obj, tmp_path, "share.pt")
    path = our_file(obj, tmp_path, "share.pt")
    assert_layout_identical(path.read_bytes(), theirs)
    names = zipfile.ZipFile(path).namelist()
    assert sorted(n for n in names if "/data/" in n) == sorted(f"share/data/{i}" for i in range(8))
    for got in load_all_ways(torch, path):
        assert_same(got, obj)
        ptr = got["m"].untyped_storage().data_ptr()
        for k in ("t", "sl", "tied", "big_dim"):
            assert got[k].untyped_storage().data_ptr() == ptr
        assert got["tied"] is got["m"]
        assert got["expanded"].untyped_storage().data_ptr() == got["other"].untyped_storage().data_ptr()


def test_parameters_and_nesting(torch, tmp_path):
    model = state_dict_model(torch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 3, 3)).sum().backward()
    opt.step()
    obj = {
        "model": model.state_dict(keep_vars=True),   # Parameters: _rebuild_parameter
        "optimizer": opt.state_dict(),                # int keys, nested lists/dicts, floats, tuples
        "step": 12, "neg": -1, "big": 2**40, "huge": -(2**70), "ratio": float("nan"),
        "inf": float("-inf"), "name": "ß-run/ü", "flags": (True, False, None), "empty": ((), [], {}),
    }
    theirs = torch_file(torch, obj, tmp_path, "ckpt.pth")
    path = our_file(obj, tmp_path, "ckpt.pth")
    assert_layout_identical(path.read_bytes(), theirs)
    for got in load_all_ways(torch, path):
        assert_same(got, obj)
        assert isinstance(got["model"]["0.weight"], torch.nn.Parameter)


def test_memo_beyond_256_and_batches(torch, tmp_path):
    obj = {f"k{i}": (torch.full((2,), float(i)) if i % 7 == 0 else [i, str(i), (i, -i)]) for i in range(2500)}
    obj["list"] = list(range(2001))
    theirs = torch_file(torch, obj, tmp_path, "many.pt")
    path = our_file(obj, tmp_path, "many.pt")
    assert_layout_identical(path.read_bytes(), theirs)
    ops = {op.name for op, _, _ in pickletools.genops(data_pkl(path.read_bytes()))}
    assert {"LONG_BINPUT", "SETITEMS", "APPENDS"} <= ops
    got = torch.load(path, weights_only=True, mmap=True)
    assert_same(got, obj)


def test_thousands_of_records_identical(torch, tmp_path):
    """The serialization id follows torch's record-name set through several of its rehashes."""
    arrays = {str(i): np.full(1 + i % 3, i, dtype=np.int32) for i in range(5200)}
    theirs = torch_file(torch, {k: torch.from_numpy(v) for k, v in arrays.items()}, tmp_path, "many.pt")
    assert_layout_identical(our_file(arrays, tmp_path, "many.pt").read_bytes(), theirs)


def test_archive_names_follow_torch(torch, tmp_path):
    for name in ["model.pt", "noext", "a.b.c", "x y.pth", "é.pt", "..pt"]:
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        torch.save({"a": torch.ones(1)}, d / name)
        theirs = zipfile.ZipFile(d / name).namelist()[0]
        assert _ptsave.archive_name(str(d / name)) + "/data.pkl" == theirs
        _ptsave.save({"a": torch.ones(1)}, d / ("o" + name))
    assert _ptsave.archive_name(".pt") == "archive"  # torch refuses this name; we do not


def test_numpy_arrays(torch, tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    raw = rng.integers(0, 256, 64, dtype=np.uint8)
    obj = {
        "f32": base,
        "view": base[1:5, ::2],
        "t": base.T,
        "rev": base[::-1],                                   # negative strides: copied
        "be": np.arange(5, dtype=">i4"),                     # byte-swapped: copied
        "bf16": rng.integers(0, 256, 64, dtype=np.uint8).view(ml_dtypes.bfloat16),
        "raw": raw,
        "f8": raw.view(ml_dtypes.float8_e4m3fn)[3:9],
        "f8b": raw[:8].view(ml_dtypes.float8_e5m2),
        "u16": np.arange(10, dtype=np.uint16), "u64": np.array([2**64 - 1], dtype=np.uint64),
        "c64": (base[0] + 1j * base[1]).astype(np.complex64), "b": base > 0,
        "f16": base.astype(np.float16), "i8": np.arange(-4, 4, dtype=np.int8), "zero_d": np.array(7, dtype=np.int64),
        "scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), np.uint8(200), np.float64(2.5), np.str_("s"),
                    ml_dtypes.bfloat16(1.25)],
    }
    path = our_file(obj, tmp_path, "np.pt")
    for got in load_all_ways(torch, path):
        for k, v in obj.items():
            if k == "scalars":
                assert got[k] == [1.5, -3, True, 200, 2.5, "s", 1.25]
                assert [type(x) for x in got[k]] == [float, int, bool, int, float, str, float]
                continue
            native = np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("="))
            assert got[k].dtype == getattr(torch, native.dtype.name) and tuple(got[k].shape) == v.shape
            assert got[k].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() == native.tobytes()
        ptr = got["f32"].untyped_storage().data_ptr()
        assert got["view"].untyped_storage().data_ptr() == ptr and got["t"].untyped_storage().data_ptr() == ptr
        assert got["view"].stride() == (8, 2) and got["view"].storage_offset() == 8
        assert got["raw"].untyped_storage().data_ptr() == got["f8"].untyped_storage().data_ptr()
        assert got["f8b"].untyped_storage().data_ptr() == got["f8"].untyped_storage().data_ptr()
        assert got["f8"].storage_offset() == 3
    assert "numpy" not in data_pkl(path.read_bytes()).decode("latin-1")


def test_numpy_matches_torch_from_numpy(torch):
    arr = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    assert_layout_identical(_ptsave.save_bytes({"a": arr}), _torch_bytes(torch, {"a": torch.from_numpy(arr)}))


def _torch_bytes(torch, obj):
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def test_mixed_dtype_views_of_one_storage_refused(torch):
    t = torch.zeros(4)
    with pytest.raises(ValueError, match=r"different types.*obj\['b'\]"):
        _ptsave.save_bytes({"a": t, "b": t.view(torch.int32)})
    with pytest.raises(RuntimeError):
        torch.save({"a": t, "b": t.view(torch.int32)}, io.BytesIO())
    a = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match="different types"):
        _ptsave.save_bytes([a, a.view(np.int32)])


def test_dtype_tables_agree_with_torch(torch):
    from mlutils._ptsave import _describe

    legacy = {str(k)[6:]: v for k, v in torch.storage._dtype_to_storage_type_map().items()}
    v3 = {str(d)[6:] for d in torch.storage._new_dtypes()}
    for name in ALL_TORCH_DTYPES:
        t = torch.zeros(16, dtype=torch.uint8).view(getattr(torch, name))
        pkl = data_pkl(_ptsave.save_bytes(t))
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(pkl)]
        if name in v3:
            assert ("GLOBAL", "torch.storage UntypedStorage") in ops and ("GLOBAL", f"torch {name}") in ops
        else:
            assert ("GLOBAL", f"torch {legacy[name]}") in ops
        assert _describe(t).dtype == name
    assert set(ALL_TORCH_DTYPES) == set(legacy) - {"qint8", "qint32", "quint8", "quint4x2", "quint2x4"} | v3


# ----------------------------------------------------------------- errors

class Custom:
    pass


@pytest.mark.parametrize("bad, where, what", [
    ({"optimizer": {"state": {3: {1, 2}}}}, r"obj\['optimizer'\]\['state'\]\[3\]", "set"),
    ({"a": [1, b"x"]}, r"obj\['a'\]\[1\]", "bytes"),
    ({"a": (1, 2, Custom())}, r"obj\['a'\]\[2\]", "Custom"),
    ({"a": collections.defaultdict(list)}, r"obj\['a'\]", "defaultdict"),
    ({"a": 1j}, r"obj\['a'\]", "complex"),
    ([np.array([object()], dtype=object)], r"obj\[0\]", "object"),
    ([np.zeros(2, dtype="U3")], r"obj\[0\]", "<U3"),
    ({"k": collections.namedtuple("P", "x")(1)}, r"obj\['k'\]", "P"),
    ({"m": np.ma.masked_array([1, 2], mask=[0, 1])}, r"obj\['m'\]", "MaskedArray"),
])
def test_unsupported_types_name_type_and_path(bad, where, what, tmp_path):
    with pytest.raises(TypeError, match=where) as ei:
        _ptsave.save_bytes(bad)
    assert what in str(ei.value)
    target = tmp_path / "keep.pt"
    _ptsave.save({"ok": 1}, target)
    before = target.read_bytes()
    with pytest.raises(TypeError):
        _ptsave.save(bad, target)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.pt"]  # no temp file left behind


def test_ml_dtypes_without_torch_equivalent():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with pytest.raises(TypeError, match=r"int4.*obj\['q'\]"):
        _ptsave.save_bytes({"q": np.zeros(4, dtype=ml_dtypes.int4)})


def test_unsupported_tensors(torch):
    class Sub(torch.Tensor):
        pass

    t = torch.ones(2)
    t.note = "x"
    for bad, msg in [(torch.ones(2).as_subclass(Sub), "subclass"), (torch.ones(2, device="meta"), "meta"),
                     (torch.ones(2).to_sparse(), "layout"), (t, "attributes"),
                     (torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8), "quantized")]:
        with pytest.raises(TypeError, match=rf"{msg}.* at obj\['x'\]\[1\]"):
            _ptsave.save_bytes({"x": [0, bad]})


def test_recursion_and_overflow():
    t = ([],)
    t[0].append(t)
    with pytest.raises(ValueError, match="contains itself"):
        _ptsave.save_bytes(t)
    with pytest.raises(OverflowError):
        _ptsave.save_bytes(2**3000)
    deep = []
    for _ in range(100000):
        deep = [deep]
    with pytest.raises(RecursionError):
        _ptsave.save_bytes(deep)


def test_bad_paths(tmp_path):
    with pytest.raises(OSError):
        _ptsave.save({}, tmp_path / "missing" / "x.pt")
    with pytest.raises(ValueError):
        _ptsave.save({}, str(tmp_path) + "/")


def test_allocation_failures_raise_memory_error(fail_alloc):
    obj = {"a": [1, 2.5, "x" * 100], "b": np.arange(1000, dtype=np.float32), "c": {"d": (None, True)}}
    want = _ptsave.save_bytes(obj)
    n, failures = 0, 0
    while True:
        fail_alloc(n)
        try:
            got = _ptsave.save_bytes(obj)
        except MemoryError:
            failures += 1
            n += 1
            continue
        finally:
            fail_alloc(-1)
        assert got == want
        break
    assert failures > 3


# ----------------------------------------------------------------- pickle without torch

def test_plain_values_pickle_like_python():
    """Without tensors, data.pkl is exactly what Python's pickler writes at protocol 2."""
    od = collections.OrderedDict([("x", 1), ("y", [1.5, "a"])])
    od._metadata = collections.OrderedDict({"": {"version": 1}})
    shared = ["s"]
    obj = {"od": od, "shared": (shared, shared), "ints": [0, 255, 256, 65535, 65536, -1, -(2**31), 2**31 - 1,
                                                         2**31, -(2**31) - 1, 2**63, -(2**63), 2**64, 2**2000],
           "strs": ["", "é", "\ud800", "x" * 300], "floats": [0.0, -0.0, 1e308, float("inf")],
           "more": {i: str(i) for i in range(1003)}, 5: None, (1, 2): True, 2.5: False,
           "batches": [{i: i for i in range(n)} for n in (1, 999, 1000, 1001, 2000)]
           + [list(range(n)) for n in (1, 2, 1000, 1001, 2000, 2001)]
           + [collections.OrderedDict((i, i) for i in range(n)) for n in (1, 2, 1000, 1001, 2000, 2001)]}
    assert data_pkl(_ptsave.save_bytes(obj)) == pickle.dumps(obj, protocol=2)
    for op, _, _ in pickletools.genops(pickle.dumps(obj, protocol=2)):
        assert op.name in ALLOWED_OPS


def test_hypothesis_matches_python_pickle():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    leaves = st.none() | st.booleans() | st.integers(min_value=-(2**600), max_value=2**600) | st.floats() | st.text(max_size=20)
    keys = st.text(max_size=8) | st.integers() | st.booleans() | st.none()
    def odict(items, meta):
        od = collections.OrderedDict(items)
        if meta is not None:
            od._metadata = meta
        return od

    values = st.recursive(leaves, lambda c: st.lists(c, max_size=5) | st.dictionaries(keys, c, max_size=5)
                          | st.tuples(c) | st.tuples(c, c, c, c)
                          | st.builds(odict, st.lists(st.tuples(keys, c), max_size=4), st.none() | c),
                          max_leaves=30)

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(values)
    def check(v):
        assert data_pkl(_ptsave.save_bytes(v)) == pickle.dumps(v, protocol=2)

    check()


# ----------------------------------------------------------------- zip layout

def test_padding_formula_and_alignment():
    pad = _core._ptsave_padding
    assert pad(0, len("batch_norm2d/data.pkl"), 100) == 9  # formats.md B3 example
    for off in range(0, 300, 7):
        for n in range(1, 40):
            p = pad(off, n, 10)
            assert 0 <= p < 64 and (off + 30 + n + 4 + p) % 64 == 0
    big = 0xFFFFFFFF
    assert (big + 30 + 5 + 4 + 4 + 8 + pad(big, 5, 10)) % 64 == 0
    assert (30 + 5 + 4 + 4 + 16 + pad(0, 5, big)) % 64 == 0
    assert (big + 30 + 5 + 4 + 4 + 24 + pad(big, 5, big)) % 64 == 0
    assert pad(0, 5, 10, 1) == 0


def test_records_and_alignment_in_python_zipfile():
    arrays = {f"a{i}": np.arange(i * 13 + 1, dtype=np.float32) for i in range(9)}
    blob = _ptsave.save_bytes(arrays)
    z = zipfile.ZipFile(io.BytesIO(blob))
    assert z.testzip() is None
    names = z.namelist()
    assert names[:4] == ["archive/data.pkl", "archive/.format_version", "archive/.storage_alignment", "archive/byteorder"]
    assert names[4:-2] == [f"archive/data/{i}" for i in range(9)]
    assert names[-2:] == ["archive/version", "archive/.data/serialization_id"]
    assert z.read("archive/version") == b"3\n" and z.read("archive/.storage_alignment") == b"64"
    for info in z.infolist():
        assert info.compress_type == zipfile.ZIP_STORED
        name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26:info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        assert start % 64 == 0
        assert blob[start:start + info.file_size] == z.read(info)
    for i in range(9):
        assert z.read(f"archive/data/{i}") == arrays[f"a{i}"].tobytes()
    assert blob[-98:-94] == b"PK\x06\x06" and blob[-42:-38] == b"PK\x06\x07" and blob[-22:-18] == b"PK\x05\x06"


@pytest.mark.parametrize("limit", [1, 200, 700])
def test_zip64_paths_with_lowered_limit(limit, tmp_path):
    """A lowered zip64 threshold takes every zip64 branch; Python's zipfile and torch.load agree."""
    arrays = {"small": np.arange(3, dtype=np.int16), "big": np.arange(300, dtype=np.float64),
              "empty": np.zeros(0, dtype=np.float32), "after": np.arange(40, dtype=np.uint8)}
    path = tmp_path / "z64.pt"
    _ptsave.save(arrays, path, _zip64_limit=limit)
    blob = path.read_bytes()
    z = zipfile.ZipFile(path)
    assert z.testzip() is None
    for i, k in enumerate(arrays):
        assert z.read(f"z64/data/{i}") == arrays[k].tobytes()
    infos = z.infolist()
    for info in infos:
        name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26:info.header_offset + 30])
        extra = blob[info.header_offset + 30 + name_len:info.header_offset + 30 + name_len + extra_len]
        needs = info.file_size >= limit or info.header_offset >= limit
        assert extra.startswith(b"\x01\x00") == needs
        start = info.header_offset + 30 + name_len + extra_len
        assert start % 64 == 0
        end = start + info.file_size
        if info.file_size:
            assert blob[end:end + 4] == b"PK\x07\x08"
            dd = 24 if needs else 16
            nxt = [i.header_offset for i in infos if i.header_offset > info.header_offset]
            if nxt:
                assert nxt[0] == end + dd
    if os.environ.get("MLUTILS_NO_TORCH") != "1":
        torch = pytest.importorskip("torch")
        for got in (torch.load(path, weights_only=True), torch.load(path, weights_only=True, mmap=True)):
            for k, v in arrays.items():
                assert got[k].numpy().tobytes() == v.tobytes()


# ----------------------------------------------------------------- atomicity

KILL_CHILD = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from mlutils import _ptsave
target = sys.argv[1]
big = np.zeros(48 * 2**20 // 8, dtype=np.float64)
for version in range(1, 10**6):
    big[:] = version
    print("start", version, flush=True)
    _ptsave.save({"version": version, "big": big}, target)
    print("done", version, flush=True)
"""


def test_sigkill_mid_save_keeps_a_complete_file(torch, tmp_path):
    """SIGKILL at a random moment of repeated saves: the target is always a whole earlier file."""
    import random
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "ckpt.pt"
    _ptsave.save({"version": 0, "big": np.zeros(16, dtype=np.float64)}, target)
    root = os.path.dirname(os.path.dirname(_core.__file__))
    rng = random.Random(1234)
    previous = 0
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(target), root],
                                stdout=subprocess.PIPE, text=True)
        lines = []
        try:
            deadline = rng.uniform(0.3, 1.5)
            t0 = None
            while True:
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line.split())
                if lines[-1][0] == "start":
                    t0 = t0 or time.monotonic()
                    if time.monotonic() - t0 > deadline:
                        time.sleep(rng.uniform(0.0, 0.1))
                        break
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            lines += [ln.split() for ln in proc.stdout.read().splitlines() if ln]
            proc.stdout.close()
        done = [int(v) for op, v in lines if op == "done"]
        started = [int(v) for op, v in lines if op == "start"]
        assert started
        # the last completed save, or the one in flight if its rename landed before the kill
        allowed = {done[-1] if done else previous, started[-1]}
        got = torch.load(target, weights_only=True, mmap=True)
        assert got["version"] in allowed
        assert bool((got["big"] == got["version"]).all())
        previous = got["version"]
        for name in os.listdir(tmp_path):
            if name != "ckpt.pt":
                assert name.startswith(".ckpt.pt.") and name.endswith(".tmp")
                os.unlink(tmp_path / name)  # the killed writer's temp file


# ----------------------------------------------------------------- a real zip64 file

@pytest.mark.slow
def test_real_file_over_4gib_matches_torch(torch, tmp_path):
    """A 4 GiB + 4 KiB record and a record past 4 GiB: torch reads both, and
    every byte outside the big payload equals torch.save's."""
    import shutil

    big_n = 2**32 + 4096
    if shutil.disk_usage(tmp_path).free < 3 * big_n:
        pytest.skip("needs about 13 GB of free disk")
    big = torch.zeros(big_n, dtype=torch.uint8)  # calloc'd: untouched pages cost no memory
    marks = [0, 1, 2**31, 2**32 - 1, 2**32, big_n - 1]
    for i, m in enumerate(marks):
        big[m] = i + 1
    obj = {"a": torch.arange(5, dtype=torch.int16), "big": big, "c": torch.arange(7, dtype=torch.float64)}
    ours = our_file(obj, tmp_path, "huge.pt")

    z = zipfile.ZipFile(ours)
    infos = {i.filename: i for i in z.infolist()}
    assert infos["huge/data/1"].file_size == big_n
    assert infos["huge/data/2"].header_offset > 2**32
    assert z.read("huge/data/2") == obj["c"].numpy().tobytes()
    with z.open("huge/data/0") as f:
        assert f.read() == obj["a"].numpy().tobytes()
    for got in load_all_ways(torch, ours):
        assert got["big"].shape == (big_n,)
        assert [int(got["big"][m]) for m in marks] == [1, 2, 3, 4, 5, 6]
        assert torch.equal(got["a"], obj["a"]) and torch.equal(got["c"], obj["c"])
        del got

    import filecmp

    theirs = tmp_path / "torch" / "huge.pt"
    theirs.parent.mkdir(exist_ok=True)
    torch.save(obj, theirs)
    del big
    assert filecmp.cmp(ours, theirs, shallow=False)  # zip64 headers, descriptors, id: all the same
    # and our reader maps the zip64 record of torch's file without copying it
    from mlutils import _ptload

    got = _ptload.load(theirs, framework="np")
    assert got["big"].shape == (big_n,) and not got["big"].base.flags.owndata
    assert [int(got["big"][m]) for m in marks] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(got["c"], obj["c"].numpy())
    assert [e["nbytes"] for e in _ptload.read_index(theirs)] == [10, big_n, 56]


def test_memmap_arrays_are_saved(torch, tmp_path):
    mm = np.memmap(tmp_path / "raw.bin", dtype=np.float32, mode="w+", shape=(4, 4))
    mm[:] = np.arange(16, dtype=np.float32).reshape(4, 4)
    got = torch.load(io.BytesIO(_ptsave.save_bytes({"mm": mm, "row": mm[2]})), weights_only=True)
    assert got["mm"].tolist() == mm.tolist() and got["row"].tolist() == mm[2].tolist()
    assert got["row"].untyped_storage().data_ptr() == got["mm"].untyped_storage().data_ptr()


def test_gil_released_and_no_copy_of_tensor_data(tmp_path):
    """Another thread runs while the bytes are written, and peak memory does
    not grow by the tensor's size (its memory goes straight to the file)."""
    import subprocess
    import sys

    code = r"""
import resource, sys, threading, numpy as np
sys.path.insert(0, sys.argv[2])
from mlutils import _ptsave
big = np.ones(256 * 2**20 // 4, dtype=np.float32)
view = big[::2]                      # non-contiguous: the whole buffer is written as is
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ticks = 0
t = threading.Thread(target=_ptsave.save, args=({"big": big, "view": view}, sys.argv[1]))
t.start()
while t.is_alive():
    ticks += 1
t.join()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(ticks, (after - before) // 1024)
"""
    root = os.path.dirname(os.path.dirname(_core.__file__))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g.pt"), root], check=True,
                         capture_output=True, text=True).stdout.split()
    ticks, grew_mib = int(out[0]), int(out[1])
    assert ticks > 1000
    assert grew_mib < 64
    assert (tmp_path / "g.pt").stat().st_size > 256 * 2**20


@pytest.mark.skipif(os.environ.get("MLUTILS_NO_TORCH") == "1", reason="sanitizer run")
def test_cuda_tensors_are_written_as_cpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    base = torch.arange(24, dtype=torch.float32, device="cuda")
    obj = {"m": base.view(4, 6), "t": base.view(4, 6).t(), "p": torch.nn.Parameter(torch.ones(3, device="cuda"))}
    path = our_file(obj, tmp_path, "gpu.pt")
    m_cpu = base.cpu().view(4, 6)
    cpu = {"m": m_cpu, "t": m_cpu.t(), "p": torch.nn.Parameter(torch.ones(3))}
    theirs = torch_file(torch, cpu, tmp_path, "gpu.pt")
    assert_layout_identical(path.read_bytes(), theirs)  # location "cpu", storage shared once
    for got in load_all_ways(torch, path):
        assert_same(got, cpu)
