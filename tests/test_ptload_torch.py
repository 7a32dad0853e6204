"""ptload against files written by the real torch.save, compared bit for bit
with torch.load(weights_only=True)."""
import collections
import io
import os
import sys
import zipfile

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _pthelpers as H  # noqa: E402

from mlutils import _ptload  # noqa: E402
from mlutils import TorchFormatError  # noqa: E402

FORMATS = ["zip", "legacy"]


def save(torch, obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def raw_bytes(torch, t):
    """The tensor's logical elements as bytes (independent of strides; conj/neg bits resolved)."""
    c = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    if c.numel() == 0:
        return b""
    return bytes(c.view(torch.uint8).numpy().tobytes())


def assert_same(torch, ours, ref, path="root"):
    """Structure, types, dtypes, views and bytes equal."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, torch.Tensor), path
        assert type(ours) is type(ref), (path, type(ours), type(ref))
        assert ours.dtype == ref.dtype, path
        assert ours.shape == ref.shape, path
        assert ours.stride() == ref.stride(), path
        assert ours.storage_offset() == ref.storage_offset(), path
        assert ours.requires_grad == ref.requires_grad, path
        assert (ours.is_conj(), ours.is_neg()) == (ref.is_conj(), ref.is_neg()), path
        assert ours.untyped_storage().nbytes() == ref.untyped_storage().nbytes(), path
        assert raw_bytes(torch, ours) == raw_bytes(torch, ref), path
        return
    assert type(ours) is type(ref), (path, type(ours), type(ref))
    if isinstance(ref, dict):
        assert list(ours.keys()) == list(ref.keys()), path
        for k in ref:
            assert_same(torch, ours[k], ref[k], f"{path}[{k!r}]")
        if hasattr(ref, "_metadata"):
            assert ours._metadata == ref._metadata, path
    elif isinstance(ref, (list, tuple)):
        assert len(ours) == len(ref), path
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(torch, a, b, f"{path}[{i}]")
    else:
        assert ours == ref, path


def all_dtypes(torch):
    names = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
             "complex64", "complex128", "uint16", "uint32", "uint64", "float8_e5m2", "float8_e4m3fn",
             "float8_e5m2fnuz", "float8_e4m3fnuz", "float8_e8m0fnu", "complex32", "float4_e2m1fn_x2", "bits8",
             "bits16"]
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


def sample(torch, dt, shape=(3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape))
    raw = torch.randint(0, 256, (n * torch.empty((), dtype=dt).element_size(),), dtype=torch.uint8, generator=g)
    if dt == torch.bool:
        return (raw[:n] & 1).bool().reshape(shape)
    return raw.view(dt).reshape(shape)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype(torch, tmp_path, fmt):
    sd = collections.OrderedDict()
    dtypes = all_dtypes(torch)
    if fmt == "legacy":  # torch's own legacy reader fails on dtypes without a typed storage class
        dtypes = dtypes[:12]
    for i, dt in enumerate(dtypes):
        sd[str(dt).replace("torch.", "")] = sample(torch, dt, seed=i)
        sd[str(dt).replace("torch.", "") + ".empty"] = sample(torch, dt, (0, 4))
        sd[str(dt).replace("torch.", "") + ".scalar"] = sample(torch, dt, ())
    p = save(torch, sd, tmp_path / "d.pt", fmt)
    ref = torch.load(p, weights_only=True)
    for mmap in (True, False):
        assert_same(torch, _ptload.load(p, mmap=mmap), ref)
    # framework "np": same bytes, numpy or ml_dtypes dtypes
    arrs = _ptload.load(p, framework="np")
    for k, t in ref.items():
        a = arrs[k]
        assert isinstance(a, np.ndarray) and a.shape == tuple(t.shape)
        assert a.tobytes() == raw_bytes(torch, t), k
        if t.dtype in (torch.float32, torch.int64, torch.bool, torch.complex128, torch.uint16):
            np.testing.assert_array_equal(a, t.numpy())
    idx = {e["name"]: e for e in _ptload.read_index(p)}
    for k, t in ref.items():
        assert idx[k]["dtype"] == str(t.dtype).replace("torch.", "")
        assert idx[k]["shape"] == list(t.shape)
        assert idx[k]["nbytes"] == t.numel() * t.element_size()
    _ptload.verify(p)


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_and_shared_storage(torch, tmp_path, fmt):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    obj = {
        "base": base,
        "t": base.t(),
        "slice": base[1:5:2, 3:9:3],
        "row": base[4],
        "elem": base[5, 7],
        "tied": base,
        "other": torch.ones(3, dtype=torch.float16)[1:],
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
    }
    p = save(torch, obj, tmp_path / "v.pt", fmt)
    ref = torch.load(p, weights_only=True)
    ours = _ptload.load(p)
    assert_same(torch, ours, ref)
    ptrs = {k: ours[k].untyped_storage().data_ptr() for k in ("base", "t", "slice", "row", "elem", "tied")}
    assert len(set(ptrs.values())) == 1  # one buffer per storage key
    assert ours["tied"] is ours["base"]   # the same object is memoised like torch.load does
    ours["base"][0, 1] = -5
    assert ours["t"][1, 0] == -5
    npv = _ptload.load(p, framework="np")
    assert np.shares_memory(npv["base"], npv["slice"])
    np.testing.assert_array_equal(npv["slice"], ref["slice"].numpy())


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_with_optimizer_and_metadata(torch, tmp_path, fmt):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 2, bias=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    ckpt = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 3, "step": 1234, "lr": 1e-3, "name": "run-é", "none": None, "flag": True,
        "history": [0.5, 0.25, (1, 2)], "big": 2 ** 70, "neg": -(2 ** 40),
        "size": torch.Size([2, 3]), "device": torch.device("cpu"), "cuda": torch.device("cuda", 1),
        "dtype": torch.bfloat16, "tags": {"a", "b"}, "blob": b"\x00\xffbytes", "ba": bytearray(b"xy"),
        "c": complex(1, -2),
        "nested": {"deep": [{"t": torch.zeros(2, dtype=torch.int8)}]},
    }
    p = save(torch, ckpt, tmp_path / "c.pt", fmt)
    ref = torch.load(p, weights_only=True)
    ours = _ptload.load(p)
    assert_same(torch, ours, ref)
    assert ours["model"]._metadata["1"] == {"version": 2}  # BatchNorm's _version
    assert isinstance(ours["size"], torch.Size) and ours["cuda"] == torch.device("cuda", 1)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                 torch.nn.Linear(8, 2, bias=False))
    model2.load_state_dict(ours["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(ours["optimizer"])
    # framework "np" keeps the structure with arrays and plain values
    npv = _ptload.load(p, framework="np")
    assert type(npv["model"]) is collections.OrderedDict and npv["size"] == (2, 3)
    assert npv["device"] == "cpu" and npv["cuda"] == "cuda:1" and npv["blob"] == b"\x00\xffbytes"
    names = [e["name"] for e in _ptload.read_index(p)]
    assert "model.0.weight" in names and "optimizer.state.0.exp_avg" in names and "nested.deep.0.t" in names


@pytest.mark.parametrize("fmt", FORMATS)
def test_parameters_and_requires_grad(torch, tmp_path, fmt):
    lin = torch.nn.Linear(3, 2)
    obj = {"sd": lin.state_dict(keep_vars=True), "rg": torch.ones(2, requires_grad=True),
           "frozen": torch.nn.Parameter(torch.zeros(2), requires_grad=False)}
    p = save(torch, obj, tmp_path / "p.pt", fmt)
    ref = torch.load(p, weights_only=True)
    ours = _ptload.load(p)
    assert_same(torch, ours, ref)
    assert isinstance(ours["sd"]["weight"], torch.nn.Parameter)
    assert not ours["frozen"].requires_grad


def computed_offsets_agree(torch, path, ref):
    """Whether torch.load(mmap=True) with calculate_storage_offsets reads `ref` from path."""
    from torch.utils.serialization import config

    old = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True
    try:
        got = torch.load(path, weights_only=True, mmap=True)
    finally:
        config.load.calculate_storage_offsets = old
    return all(torch.equal(got[k], ref[k]) for k in ref)


def test_zip_variants_load_like_torch(torch, tmp_path):
    """Deflated records, reversed record order (old lexicographic writers), zip64 entries, big endian."""
    sd = {"w": torch.randn(4, 5), "i": torch.arange(7, dtype=torch.int32), "c": torch.randn(3, dtype=torch.complex64),
          "h": torch.randn(6).half(), "v": torch.randn(10)[2:8:2]}
    p = tmp_path / "orig.pt"
    torch.save(sd, p)
    ref = torch.load(p, weights_only=True)
    with zipfile.ZipFile(p) as z:
        recs = [(i.filename, z.read(i.filename)) for i in z.infolist()]

    def build(name, order=None, deflate=False, zip64=False):
        rs = recs if order is None else order(recs)
        data = H.zip_build([(n, d, 8 if deflate and "/data" in n else 0) for n, d in rs], zip64=zip64, align=64)
        out = tmp_path / name
        out.write_bytes(data)
        return out

    variants = [build("defl.pt", deflate=True), build("rev.pt", order=lambda r: r[::-1]),
                build("z64.pt", zip64=True)]
    assert not computed_offsets_agree(torch, variants[1], ref)  # the reversed order fools torch
    for v in variants:
        assert_same(torch, torch.load(v, weights_only=True), ref)  # torch reads them too
        assert_same(torch, _ptload.load(v), ref)
        # verify() refuses exactly the files that torch's computed offsets (.format_version) misread
        if v.name != "defl.pt" and not computed_offsets_agree(torch, v, ref):
            with pytest.raises(TorchFormatError, match="torch computes byte"):
                _ptload.verify(v)
        else:
            _ptload.verify(v)
    # big endian: swap every storage by its element size and say so in 'byteorder'
    sizes = {}
    for k, t in ref.items():
        sizes[t.untyped_storage().data_ptr()] = t.element_size() // (2 if t.is_complex() else 1)
    keys = {}
    pkl = dict(recs)[next(n for n, _ in recs if n.endswith("data.pkl"))]
    idx = _ptload.read_index(p)
    unit = {e["storage"]: {"float32": 4, "int32": 4, "complex64": 4, "float16": 2}[e["dtype"]] for e in idx}
    big = []
    for n, d in recs:
        key = n.split("/data/")[-1] if "/data/" in n else None
        if key in unit:
            d = np.frombuffer(d, dtype=f"<u{unit[key]}").byteswap().tobytes()
        if n.endswith("/byteorder"):
            d = b"big"
        big.append((n, d, 0))
        keys[n] = key
    bp = tmp_path / "big.pt"
    bp.write_bytes(H.zip_build(big, align=64))
    assert pkl
    assert_same(torch, torch.load(bp, weights_only=True), ref)
    assert_same(torch, _ptload.load(bp), ref)


def test_truncated_real_file(torch, tmp_path):
    p = tmp_path / "t.pt"
    torch.save({"w": torch.randn(100, 100)}, p)
    data = p.read_bytes()
    for cut in (len(data) - 1, len(data) - 100, len(data) // 2, 100):
        q = tmp_path / f"cut{cut}.pt"
        q.write_bytes(data[:cut])
        with pytest.raises(TorchFormatError):
            _ptload.load(q)
        with pytest.raises(Exception):
            torch.load(q, weights_only=True)


def test_prefix_from_file_name_and_buffer(torch, tmp_path):
    t = torch.randn(3)
    p = tmp_path / "x.tar.pth"
    torch.save({"t": t}, p)
    with zipfile.ZipFile(p) as z:
        assert z.namelist()[0].startswith("x.tar/")
    assert torch.equal(_ptload.load(p)["t"], t)
    buf = io.BytesIO()
    torch.save({"t": t}, buf)  # buffer saves use the 'archive' prefix
    q = tmp_path / "b.pt"
    q.write_bytes(buf.getvalue())
    assert torch.equal(_ptload.load(q)["t"], t)


def test_numpy_fallback_structure_matches(torch, tmp_path):
    sd = torch.nn.Linear(3, 4).state_dict()
    p = tmp_path / "l.pt"
    torch.save(sd, p)
    npv = _ptload.load(p, framework="np")
    assert list(npv) == list(sd) and all(isinstance(v, np.ndarray) for v in npv.values())
    np.testing.assert_array_equal(npv["weight"], sd["weight"].numpy())


def test_load_unsafe_warns_and_delegates(torch, tmp_path):
    p = tmp_path / "u.pt"
    torch.save({"x": collections.Counter("aab"), "t": torch.ones(1)}, p)
    with pytest.warns(UserWarning, match="arbitrary code"):
        out = _ptload.load_unsafe(p)
    assert out["x"]["a"] == 2


@pytest.mark.slow
def test_large_file(torch, tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = collections.OrderedDict()
    for i in range(40):
        sd[f"layer{i}.weight"] = torch.randn(1024, 1024 + i, generator=g, dtype=torch.float32)
        sd[f"layer{i}.bias"] = torch.randn(1024, generator=g).to(torch.bfloat16)
    sd["emb"] = torch.randint(-100, 100, (8192, 1024), generator=g, dtype=torch.int16)
    p = tmp_path / "large.pt"
    torch.save(sd, p)
    assert os.path.getsize(p) > 150 << 20
    ref = torch.load(p, weights_only=True, mmap=True)
    for mmap in (True, False):
        ours = _ptload.load(p, mmap=mmap)
        assert list(ours) == list(ref)
        for k in ref:
            assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape
            assert torch.equal(ours[k].view(torch.uint8) if ours[k].dtype != torch.int16 else ours[k],
                               ref[k].view(torch.uint8) if ref[k].dtype != torch.int16 else ref[k])
        del ours
    _ptload.verify(p)


def test_requires_grad_on_integer_tensor_is_a_format_error(torch, tmp_path):
    pkl = H.proto() + b"}" + H.ustr("i") + H.tensor_v2("torch.LongStorage", "0", 2, 0, (2,), (1,),
                                                       requires_grad=True) + b"s" + H.STOP
    p = tmp_path / "i.pt"
    p.write_bytes(H.pt_file(pkl, {"0": np.array([1, 2], "<i8").tobytes()}))
    with pytest.raises(RuntimeError, match="floating point"):
        torch.load(p, weights_only=True)  # torch refuses it
    # so does every path here, verify() included (one check in the core)
    for fn in (lambda: _ptload.load(p), lambda: _ptload.load(p, framework="np"), lambda: _ptload.read_index(p),
               lambda: _ptload.verify(p)):
        with pytest.raises(TorchFormatError, match="storage '0' requires grad but is int64"):
            fn()


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensor_python_attributes(torch, tmp_path, fmt):
    t = torch.ones(2)
    t.foo = {"a": 1}
    p = torch.nn.Parameter(torch.zeros(3))
    p.bar = 3
    path = save(torch, {"t": t, "p": p}, tmp_path / "a.pt", fmt)
    ref = torch.load(path, weights_only=True)
    ours = _ptload.load(path)
    assert_same(torch, ours, ref)
    assert ours["t"].foo == ref["t"].foo == {"a": 1} and ours["p"].bar == ref["p"].bar == 3
    # NumPy arrays cannot hold attributes: the values load, the attributes are dropped
    npv = _ptload.load(path, framework="np")
    np.testing.assert_array_equal(npv["t"], [1, 1])


def test_attribute_that_cannot_be_set(torch, tmp_path):
    state = b"}" + H.ustr("requires_grad") + H.ustr("yes") + b"s"
    pkl = (H.proto() + b"}" + H.ustr("t") + H.glob("torch._tensor", "_rebuild_from_type_v2") + b"(" +
           H.glob("torch._utils", "_rebuild_tensor_v2") + H.glob("torch", "Tensor") +
           b"(" + H.pid("torch.FloatStorage", "0", 2) + H.pint(0) + H.ints((2,)) + H.ints((1,)) + H.FALSE +
           H.odict() + b"t" + state + b"tR" + b"s" + H.STOP)
    p = tmp_path / "s.pt"
    p.write_bytes(H.pt_file(pkl, {"0": np.ones(2, "<f4").tobytes()}))
    with pytest.raises(TorchFormatError, match="requires_grad") as ei:
        _ptload.load(p)
    assert ei.value.__cause__ is not None


def test_format_version_layout_that_fools_computed_offsets(torch, tmp_path):
    """A torch.save file re-zipped in another record order keeps .format_version: torch's
    calculate_storage_offsets then silently reads other bytes for data/1.., our load() reads
    each record where it is, and verify() refuses the file, naming the record and both offsets."""
    from torch.utils.serialization import config

    sd = collections.OrderedDict((f"w{i}", torch.arange(16, dtype=torch.float32) + 100 * i) for i in range(3))
    src = tmp_path / "src.pt"
    torch.save(sd, src)
    _ptload.verify(src)  # torch's own layout agrees with its computed offsets
    z = zipfile.ZipFile(src)
    recs = [(i.filename, z.read(i), 0) for i in z.infolist()]
    data = [r for r in recs if "/data/" in r[0]]
    other = [r for r in recs if "/data/" not in r[0]]
    moved = tmp_path / "moved.pt"
    moved.write_bytes(H.zip_build(other[:1] + data[::-1] + other[1:], align=64))  # data/2, data/1, data/0
    ours = _ptload.load(moved)
    for k in sd:
        assert torch.equal(ours[k], sd[k])
    old = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True
    try:
        fooled = torch.load(moved, weights_only=True, mmap=True)
    finally:
        config.load.calculate_storage_offsets = old
    assert not all(torch.equal(fooled[k], sd[k]) for k in sd)  # the hazard is real
    with pytest.raises(TorchFormatError, match=r"record 'data/1' starts at byte \d+, but torch computes byte \d+"):
        _ptload.verify(moved)


CORPUS = os.path.join(os.path.dirname(__file__), "fuzz", "corpus_pt_zip")
LEGACY = os.path.join(os.path.dirname(__file__), "fuzz", "corpus_pt_pickle")
TORCH_FILES = ([os.path.join(CORPUS, f) for f in sorted(os.listdir(CORPUS))]
               + [os.path.join(LEGACY, f) for f in sorted(os.listdir(LEGACY)) if f.endswith(".legacy")])


def assert_same_np(torch, ours, ref, path="root"):
    """framework="np" against torch.load: arrays with the tensors' bytes, plain values alike."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, np.ndarray), path
        assert ours.shape == tuple(ref.shape), path
        assert ours.tobytes() == raw_bytes(torch, ref), path
    elif isinstance(ref, dict):
        assert list(ours) == list(ref), path
        for k in ref:
            assert_same_np(torch, ours[k], ref[k], f"{path}[{k!r}]")
    elif isinstance(ref, (list, tuple)) and not isinstance(ref, torch.Size):
        assert len(ours) == len(ref), path
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same_np(torch, a, b, f"{path}[{i}]")
    elif isinstance(ref, torch.Size):
        assert tuple(ours) == tuple(ref), path
    elif isinstance(ref, torch.device):
        assert ours == str(ref), path
    elif isinstance(ref, torch.dtype):
        assert str(ours).replace("torch.", "") in (str(ref).replace("torch.", ""), str(np.dtype(ours))), path
    else:
        assert ours == ref, path


def tensors_of(torch, obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        out.update(tensors_of(torch, v, f"{prefix}.{k}" if prefix else str(k)))
    return out


@pytest.mark.parametrize("path", TORCH_FILES, ids=os.path.basename)
def test_torch_written_corpus_files_match_torch(torch, path):
    """The torch.save files of the fuzz corpus: every API gives what torch.load gives."""
    ref = torch.load(path, weights_only=True)
    for mmap in (True, False):
        assert_same(torch, _ptload.load(path, mmap=mmap), ref)
        assert_same_np(torch, _ptload.load(path, framework="np", mmap=mmap), ref)
    want = {k: (str(t.dtype).replace("torch.", ""), list(t.shape)) for k, t in tensors_of(torch, ref).items()}
    got = {e["name"]: (e["dtype"], e["shape"]) for e in _ptload.read_index(path)}
    assert got == want


@pytest.mark.parametrize("path", TORCH_FILES[:4] + TORCH_FILES[-2:], ids=os.path.basename)
def test_mutated_torch_files_against_torch(torch, tmp_path, path):
    """Random byte mutations of torch.save files: where torch.load succeeds, load() gives the same
    values or a TorchFormatError; where torch.load fails, verify() fails too (nothing else raised)."""
    data = open(path, "rb").read()
    rng = np.random.default_rng(len(data) + 1)
    q = tmp_path / "m.pt"
    agree = 0
    for _ in range(120):
        m = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            m[int(rng.integers(0, len(m)))] = int(rng.integers(0, 256))
        q.write_bytes(bytes(m))
        try:
            ref = torch.load(q, weights_only=True)
        except Exception:  # noqa: BLE001 - torch's errors vary; ours must be a TorchFormatError
            with pytest.raises(TorchFormatError):
                _ptload.verify(q)
            continue
        try:
            ours = _ptload.load(q, mmap=False)
        except TorchFormatError:
            continue
        assert_same(torch, ours, ref)
        agree += 1
    assert agree > 0
