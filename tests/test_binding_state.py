"""The binding layer's module state: every type and exception it owns is
visited by the module's GC traverse (so none can leak or dangle)."""
import gc

from mlutils import _core

OWNED = [
    "MlutilsError", "JSONDecodeError", "SafetensorsError", "TorchFormatError",
    "UnsafePickleError", "SamplerStateError", "PatternError",
    "SafetensorsMap", "SafetensorsEntry", "SamplerCursor", "SamplerPosition", "PatternTable", "NcclComm", "NcclLibrary", "CudaDeviceCount", "HostPool", "CudaOffloadEngine",
]


def test_module_state_traverse_visits_every_owned_object():
    referents = gc.get_referents(_core)
    ids = {id(o) for o in referents}
    missing = [name for name in OWNED if id(getattr(_core, name)) not in ids]
    assert missing == []


# ------------------------------------------------- one status -> exception path

import errno
import os

import pytest

import mlutils


@pytest.mark.parametrize("status, domain, cls", [
    ("ENOMEM", "value", MemoryError),
    ("EINVAL", "value", ValueError),
    ("ETYPE", "value", TypeError),
    ("EOVERFLOW", "value", OverflowError),
    ("EFORMAT", "value", ValueError),
    ("EFORMAT", "safetensors", _core.SafetensorsError),
    ("EFORMAT", "torch", _core.TorchFormatError),
    ("EFORMAT", "pattern", _core.PatternError),
    ("EINVAL", "pattern", _core.PatternError),
    ("EUNSAFE", "torch", _core.UnsafePickleError),
    ("ENOTSUP", "value", RuntimeError),
    ("EDEVICE", "value", RuntimeError),
    ("ETIMEDOUT", "value", TimeoutError),
    ("ENOTSUP", "library", ImportError),
    ("EFORMAT", "self_check", AssertionError),
    ("EINVAL", "json", ValueError),
    ("ENOMEM", "library", MemoryError),
])
def test_status_table(status, domain, cls):
    with pytest.raises(cls) as ei:
        _core._raise_status(status, "what went wrong", domain=domain)
    assert str(ei.value) == "what went wrong"
    if domain == "value" and status == "EFORMAT":
        assert type(ei.value) is ValueError  # no area: the plain builtin
    assert issubclass(_core.SafetensorsError, mlutils.MlutilsError)


def test_status_ok_is_a_system_error():
    with pytest.raises(SystemError):
        _core._raise_status("OK", "nothing")


def test_os_error_carries_errno_and_filename(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError) as ei:
        _core._raise_status("EIO", "open", errno=errno.ENOENT, subject=str(missing))
    assert ei.value.errno == errno.ENOENT
    assert ei.value.filename == str(missing)
    assert ei.value.strerror == os.strerror(errno.ENOENT)  # as open() words it
    with pytest.raises(PermissionError) as ei:
        _core._raise_status("EIO", "create the temporary file", errno=errno.EACCES)
    assert ei.value.filename is None
    assert ei.value.strerror == "create the temporary file: " + os.strerror(errno.EACCES)


def test_os_error_gives_a_pathlike_file_name_as_fspath(tmp_path):
    """open() gives os.fspath of a PathLike as the file name (str stays str, bytes bytes)."""
    import pathlib

    missing = tmp_path / "missing.json"
    for given, want in ((pathlib.Path(missing), str(missing)), (os.fsencode(missing), os.fsencode(missing))):
        with pytest.raises(FileNotFoundError) as ei:
            _core._raise_status("EIO", "open", errno=errno.ENOENT, subject=given)
        assert ei.value.filename == want and type(ei.value.filename) is type(want)
        with pytest.raises(FileNotFoundError) as peer:
            open(given, "rb")
        assert str(ei.value) == str(peer.value)


def test_json_domain_builds_a_decode_error_from_the_document():
    """MLU_EFORMAT in the JSON domain: JSONDecodeError(msg, doc, pos) as json.loads makes it,
    the byte offset turned into a character index of the document."""
    import json

    doc = "[\"\u00e9\u20ac\",\n x]"
    at = len(doc[:doc.index("x")].encode())
    with pytest.raises(_core.JSONDecodeError) as ei:
        _core._raise_status("EFORMAT", "bad token", domain="json", subject=doc.encode(), offset=at)
    err = ei.value
    assert isinstance(err, json.JSONDecodeError) and isinstance(err, mlutils.MlutilsError)
    assert (err.msg, err.doc, err.pos, err.lineno, err.colno) == ("bad token", doc, doc.index("x"), 2, 2)
    with pytest.raises(json.JSONDecodeError) as ei:  # no document: still the class, at 0
        _core._raise_status("EFORMAT", "bad", domain="json")
    assert (ei.value.doc, ei.value.pos) == ("", 0)


def test_library_domain_appends_what_was_tried():
    with pytest.raises(ImportError) as ei:
        _core._raise_status("ENOTSUP", "libx could not be loaded", domain="library", subject="Looked in: here")
    assert str(ei.value) == "libx could not be loaded. Looked in: here"


def test_readers_name_the_file(tmp_path):
    """json_read_file and the .pt reader raise OSError through the same path:
    errno, the subclass it picks, and the file name they were given."""
    from mlutils import io as mio
    missing = str(tmp_path / "nope")
    # framework="np": the reader's own path, with or without torch installed
    for read in (_core.json_read_file, lambda p: mio.torch_load(p, framework="np")):
        with pytest.raises(FileNotFoundError) as ei:
            read(missing)
        assert ei.value.errno == errno.ENOENT
        assert ei.value.filename == missing


# ------------------------------------------------- named contracts across the boundary

def test_ptsave_reads_tensor_descriptions_by_field_name():
    """The C writer reads what mlutils._ptsave describes by name: any object
    with those attributes (here in another order, not a tuple) works."""
    torch = pytest.importorskip("torch")
    import io
    import types

    from mlutils import _ptsave

    def describe(t):
        d = _ptsave._describe(t)
        if d.kind == "param":
            return types.SimpleNamespace(requires_grad=d.requires_grad, data=d.data, kind="param")
        return types.SimpleNamespace(**{f: getattr(d, f) for f in reversed(d._fields)}, kind="tensor")

    def storage_bytes(s):
        b = _ptsave._storage_bytes(s)
        return types.SimpleNamespace(nbytes=b.nbytes, address=b.address, owner=b.owner)

    obj = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)[:, 1:],
           "p": torch.nn.Parameter(torch.ones(3))}
    data = _core._ptsave_write(obj, None, "archive", torch.Tensor, describe, storage_bytes)
    assert data == _ptsave.save_bytes(obj)
    back = torch.load(io.BytesIO(data), weights_only=True)
    assert torch.equal(back["w"], obj["w"]) and isinstance(back["p"], torch.nn.Parameter)


def test_ptsave_description_of_unknown_kind_is_refused():
    torch = pytest.importorskip("torch")
    import types

    bad = lambda t: types.SimpleNamespace(kind="sparse")  # noqa: E731
    with pytest.raises(SystemError, match="kind sparse"):
        _core._ptsave_write(torch.ones(2), None, "archive", torch.Tensor, bad, None)


def test_safetensors_entries_have_named_fields():
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save

    data = save({"b": np.ones((2, 3), np.float32), "a": np.zeros(1, np.int8)})
    entries = _core.st_from_bytes(data).entries()
    assert all(type(e) is _core.SafetensorsEntry for e in entries)
    by_name = {e.name: e for e in entries}
    assert by_name["b"].dtype == "F32" and by_name["b"].shape == (2, 3)
    assert by_name["b"].end - by_name["b"].begin == 24
    assert by_name["a"].dtype == "I8" and by_name["a"].shape == (1,)
    name, dtype, shape, begin, end = entries[0]  # still unpacks as a tuple
    assert (name, dtype, shape, begin, end) == tuple(entries[0])


def test_st_serialize_reads_entries_by_field_name():
    np = pytest.importorskip("numpy")
    import types

    from safetensors.numpy import load

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    entry = types.SimpleNamespace(data=a.reshape(-1).view(np.uint8), shape=(2, 3), dtype="F32", name="a")
    out = load(_core.st_serialize([entry], None))
    assert np.array_equal(out["a"], a)
    with pytest.raises(TypeError, match="name, dtype, shape"):
        _core.st_serialize([("a", "F32", (2, 3), a.reshape(-1).view(np.uint8))], None)  # no positions
    with pytest.raises(TypeError, match="shape \\(a tuple\\)"):
        _core.st_serialize([types.SimpleNamespace(name="a", dtype="F32", shape=[2, 3], data=b"")], None)


def test_sampler_position_has_named_fields():
    c = _core.SamplerCursor(10, seed=7, shuffle=True)
    c.take(3)
    pos = c.position()
    assert type(pos) is _core.SamplerPosition
    assert (pos.seed, pos.epoch, pos.index, pos.count) == (7, c.epoch, 3, 10)
    assert (pos.base, pos.consumed) == (c.base, c.consumed)
    assert tuple(pos) == (pos.seed, pos.epoch, pos.base, pos.index, pos.count, pos.consumed)


def test_cuda_device_count_has_named_fields():
    devices = _core.cuda_device_count()
    assert type(devices) is _core.CudaDeviceCount
    assert devices.count >= 0 and isinstance(devices.reason, str)
    assert (devices.reason == "") == (devices.count > 0)
    assert tuple(devices) == (devices.count, devices.reason)


def test_pt_load_calls_the_tensor_hook_by_keyword(tmp_path):
    """The .pt reader passes the tensor hook every argument by name: a hook
    with keyword-only parameters in another order gets the same values."""
    np = pytest.importorskip("numpy")
    from mlutils import _ptload, _ptsave

    p = tmp_path / "m.pt"
    p.write_bytes(_ptsave.save_bytes({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}))
    base = _ptload._NumpyHooks().hooks
    seen = {}

    def tensor(*, neg, conj, is_parameter, requires_grad, stride, shape, offset, name, key, storage):
        seen.update(name=name, shape=shape, stride=stride, offset=offset, key=key, conj=conj, neg=neg)
        return base.tensor(storage, key, name, offset, shape, stride, requires_grad, is_parameter, conj, neg)

    out = _core._pt_load(str(p), "copy", base._replace(tensor=tensor))
    assert seen == {"name": "float32", "shape": (2, 3), "stride": (3, 1), "offset": 0, "key": "0", "conj": 0,
                    "neg": 0}
    assert np.array_equal(out["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_pt_load_calls_the_device_hook_by_keyword(tmp_path):
    """torch.device values reach the device hook as keywords type= and index=
    (None when the pickle gave no index), never as a positional pair."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import _pthelpers as H
    from mlutils import _ptload

    body = (H.proto() + b"}(" +
            H.ustr("a") + H.glob("torch", "device") + H.tup(H.ustr("cuda"), H.pint(1)) + H.REDUCE +
            H.ustr("b") + H.glob("torch", "device") + H.tup(H.ustr("cpu")) + H.REDUCE +
            H.ustr("c") + H.glob("torch", "device") + H.tup(H.ustr("cuda:2")) + H.REDUCE +
            b"u.")
    p = tmp_path / "dev.pt"
    p.write_bytes(H.pt_file(body))
    calls = []

    def device(*, index, type):
        calls.append((type, index))
        return f"{type}|{index}"

    hooks = _ptload._NumpyHooks().hooks
    out = _core._pt_load(str(p), "copy", hooks._replace(device=device))
    assert out == {"a": "cuda|1", "b": "cpu|None", "c": "cuda:2|None"}
    assert sorted(calls) == [("cpu", None), ("cuda", 1), ("cuda:2", None)]
    # the hooks mlutils passes take the same keywords (and refuse a positional pair)
    assert _core._pt_load(str(p), "copy", hooks) == {"a": "cuda:1", "b": "cpu", "c": "cuda:2"}
    with pytest.raises(TypeError):
        hooks.device("cuda", 1)
    torch = pytest.importorskip("torch")
    got = _ptload.load(p)
    assert got == {"a": torch.device("cuda", 1), "b": torch.device("cpu"), "c": torch.device("cuda", 2)}
