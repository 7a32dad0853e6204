"""Tensors saved as conjugate or negative views: torch.save writes
``_rebuild_tensor_v2/v3(..., {'conj': True} / {'neg': True})`` (torch's lazy
conjugate and negative bits).  Files from the real torch.save and from our
writer load with torch.load(weights_only=True)'s values (torch tensors with the
same bits, NumPy copies with the bits applied); a hostile metadata argument is
a TorchFormatError naming the problem."""
import io
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _pthelpers as H  # noqa: E402

from mlutils import TorchFormatError, _ptload, _ptsave  # noqa: E402
from mlutils import io as mio  # noqa: E402

FORMATS = ["zip", "legacy"]
COMPLEX = ["complex64", "complex128"]


def neg_view(torch, t):
    """A complex tensor with the negative bit set (torch has no public call that makes one)."""
    if not hasattr(torch, "_neg_view"):
        pytest.skip("this torch has no _neg_view")
    return torch._neg_view(t)


def resolved(t):
    return t.detach().resolve_conj().resolve_neg()


def raw_bytes(torch, t):
    c = resolved(t).contiguous().reshape(-1)
    return b"" if c.numel() == 0 else bytes(c.view(torch.uint8).numpy().tobytes())


def flag_objects(torch, dtype):
    """name -> tensor: every kind of flagged tensor torch.save writes for one complex dtype.  One
    complex storage viewed as a real dtype cannot share a file with a complex view (torch.save
    refuses), so each real-dtype view has a base of its own."""
    g = torch.Generator().manual_seed(3)
    dt = getattr(torch, dtype)

    def fresh(*shape):
        return torch.randn(*shape, dtype=dt, generator=g)

    base = fresh(4, 5)
    return {
        "base": base,                          # shares its storage with the three below
        "conj": base.conj(),                   # {'conj': True}
        "conj_t": base.t().conj(),             # a strided conjugate view
        "conj_slice": base[1:3, ::2].conj(),
        "neg_real": fresh(6).conj().imag,      # {'neg': True} on the real dtype (float32 / float64)
        "neg_real_slice": fresh(3, 4).conj().imag[1:, ::3],
        "real_of_conj": fresh(3).conj().real,  # no flag: .real of a conjugate view is not negated
        "conj_neg": neg_view(torch, fresh(5)).conj(),  # {'neg': True, 'conj': True}
        "neg": neg_view(torch, fresh(2, 2)),   # {'neg': True} on the complex dtype
        "scalar": fresh(()).conj(),
        "empty": fresh(0, 3).conj(),
    }


def check_flags_written(torch, obj):
    """The object really holds what the test is about (a torch change would make it vacuous)."""
    md = {k: torch._utils.get_tensor_metadata(v) for k, v in obj.items()}
    assert md["conj"] == {"conj": True} and md["neg_real"] == {"neg": True}
    assert md["conj_neg"] == {"conj": True, "neg": True} and md["base"] == {} and md["real_of_conj"] == {}


def assert_like_torch(torch, ours, ref):
    """Torch tensors: the values, bits, view geometry and storage of torch.load's."""
    assert list(ours) == list(ref)
    for k, r in ref.items():
        o = ours[k]
        assert o.dtype == r.dtype and o.shape == r.shape, k
        assert o.stride() == r.stride() and o.storage_offset() == r.storage_offset(), k
        assert (o.is_conj(), o.is_neg()) == (r.is_conj(), r.is_neg()), k
        if r.dtype != torch.complex32:  # torch.equal has no complex32 kernel: the bytes below decide
            assert torch.equal(o, r), k
        assert raw_bytes(torch, o) == raw_bytes(torch, r), k


def assert_np_like_torch(torch, arrs, ref):
    """NumPy arrays: torch.load's logical values, bit for bit."""
    assert list(arrs) == list(ref)
    for k, r in ref.items():
        a = arrs[k]
        assert isinstance(a, np.ndarray) and a.shape == tuple(r.shape), k
        assert a.tobytes() == raw_bytes(torch, r), k
        if r.dtype in (torch.complex64, torch.complex128, torch.float32, torch.float64):
            np.testing.assert_array_equal(a, resolved(r).numpy())


def load_all_ways(torch, p, ref):
    for mmap in (True, False):
        assert_like_torch(torch, _ptload.load(p, mmap=mmap), ref)
        assert_np_like_torch(torch, _ptload.load(p, framework="np", mmap=mmap), ref)
    assert_like_torch(torch, mio.torch_load(p), ref)
    got = {e["name"]: (e["dtype"], e["shape"]) for e in _ptload.read_index(p)}
    assert got == {k: (str(t.dtype)[6:], list(t.shape)) for k, t in ref.items()}
    _ptload.verify(p)


@pytest.mark.parametrize("dtype", COMPLEX)
@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_saved_flags_load_like_torch(torch, tmp_path, fmt, dtype):
    obj = flag_objects(torch, dtype)
    check_flags_written(torch, obj)
    p = tmp_path / "f.pt"
    torch.save(obj, p, _use_new_zipfile_serialization=(fmt == "zip"))
    ref = torch.load(p, weights_only=True)
    assert ref["conj"].is_conj() and ref["neg_real"].is_neg()
    load_all_ways(torch, p, ref)
    # the logical values, from the tensors saved
    ours = _ptload.load(p)
    for k, t in obj.items():
        assert torch.equal(ours[k], t), k


@pytest.mark.parametrize("dtype", COMPLEX)
def test_shared_storage_keeps_each_views_values(torch, tmp_path, dtype):
    """A conjugate view and its base over one storage: torch tensors share it as torch.load's do
    (the bit is on the view alone); NumPy gives the base as stored and the view as a copy."""
    dt = getattr(torch, dtype)
    base = torch.arange(6, dtype=torch.float64).to(dt) * (1 + 2j)
    p = tmp_path / "s.pt"
    torch.save({"base": base, "conj": base.conj(), "again": base}, p)
    ours = _ptload.load(p)
    assert not ours["base"].is_conj() and ours["conj"].is_conj()
    assert ours["conj"].untyped_storage().data_ptr() == ours["base"].untyped_storage().data_ptr()
    assert torch.equal(ours["conj"], base.conj()) and torch.equal(ours["base"], base)
    assert ours["again"] is ours["base"]
    ours["base"][1] = 7 - 3j  # one storage: the view sees the write, conjugated
    assert ours["conj"][1].item() == 7 + 3j
    arrs = _ptload.load(p, framework="np")
    np.testing.assert_array_equal(arrs["base"], base.numpy())
    np.testing.assert_array_equal(arrs["conj"], base.numpy().conj())
    assert not np.shares_memory(arrs["conj"], arrs["base"])


def test_complex32_flags_use_rebuild_v3(torch, tmp_path):
    """complex32 has no storage class: its flags come in _rebuild_tensor_v3's metadata; the numpy
    arrays are raw views (complex32 as uint32, float16 as float16) with the sign bits flipped.
    (Both bits on complex32 load too, but torch cannot resolve them to compare: no neg_conj kernel.)"""
    g = torch.Generator().manual_seed(5)
    c = torch.randn(4, dtype=torch.complex64, generator=g).to(torch.complex32)
    obj = {"conj": c.conj(), "neg": neg_view(torch, c.clone())}
    p = tmp_path / "c32.pt"
    torch.save(obj, p)
    h = tmp_path / "h.pt"
    torch.save({"neg_half": c.clone().conj().imag}, h)
    for path in (p, h):
        ref = torch.load(path, weights_only=True)
        load_all_ways(torch, path, ref)
    arr = _ptload.load(h, framework="np")["neg_half"]
    np.testing.assert_array_equal(arr, -c.imag.numpy())
    c64 = c.to(torch.complex64).numpy()
    arrs = _ptload.load(p, framework="np")
    for k, want in (("conj", c64.conj()), ("neg", -c64)):
        half = arrs[k].view("<f2").astype("<f4")  # raw complex32 bits as (re, im) float16 pairs
        np.testing.assert_array_equal(half[..., 0::2] + 1j * half[..., 1::2], want)


def test_parameters_and_requires_grad_keep_the_bits(torch, tmp_path):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, dtype=torch.complex64, generator=g)
    leaf = torch.randn(3, dtype=torch.complex128, generator=g, requires_grad=True)
    obj = {
        "param": torch.nn.Parameter(x.conj()),
        "param_neg": torch.nn.Parameter(torch.randn(3, dtype=torch.complex128, generator=g).conj().imag),
        "grad": leaf.conj(),
    }
    for fmt in FORMATS:
        p = tmp_path / f"{fmt}.pt"
        torch.save(obj, p, _use_new_zipfile_serialization=(fmt == "zip"))
        ref = torch.load(p, weights_only=True)
        for mmap in (True, False):
            ours = _ptload.load(p, mmap=mmap)
            for k, r in ref.items():
                o = ours[k]
                assert type(o) is type(r) and o.requires_grad == r.requires_grad, k
                assert (o.is_conj(), o.is_neg()) == (r.is_conj(), r.is_neg()), k
                assert torch.equal(o.detach(), r.detach()), k
        assert_np_like_torch(torch, _ptload.load(p, framework="np"), ref)


@pytest.mark.parametrize("dtype", COMPLEX)
def test_our_writer_writes_what_torch_writes(torch, tmp_path, dtype):
    """mlutils' torch_save writes the flags as torch.save does (byte for byte, same file name):
    torch.load and our reader both give the tensors' values."""
    obj = flag_objects(torch, dtype)
    ours_p = tmp_path / "ours" / "f.pt"
    torch_p = tmp_path / "torch" / "f.pt"
    ours_p.parent.mkdir()
    torch_p.parent.mkdir()
    mio.torch_save(obj, ours_p)
    torch.save(obj, torch_p)
    assert ours_p.read_bytes() == torch_p.read_bytes()
    ref = torch.load(ours_p, weights_only=True)
    for k, t in obj.items():
        assert torch.equal(ref[k], t) and ref[k].is_conj() == t.is_conj() and ref[k].is_neg() == t.is_neg(), k
    load_all_ways(torch, ours_p, ref)
    # in memory too, and a parameter of a conjugate view
    x = torch.randn(3, dtype=getattr(torch, dtype))
    data = _ptsave.save_bytes({"p": torch.nn.Parameter(x.conj()), "c": x.conj()})
    back = torch.load(io.BytesIO(data), weights_only=True)
    assert type(back["p"]) is torch.nn.Parameter and back["p"].is_conj() and back["c"].is_conj()
    assert torch.equal(back["p"].detach(), x.conj()) and torch.equal(back["c"], x.conj())
    p = tmp_path / "p.pt"
    p.write_bytes(data)
    ours = _ptload.load(p)
    assert type(ours["p"]) is torch.nn.Parameter and ours["p"].is_conj()
    assert torch.equal(ours["p"].detach(), x.conj()) and torch.equal(ours["c"], x.conj())


# ------------------------------------------------------------- hostile dicts

F32 = np.arange(12, dtype="<f4").tobytes()
C64 = np.arange(12, dtype="<f4").tobytes()  # 6 complex64 elements
BOOLS = bytes(12)
OD = H.odict()


def v2(cls, numel, md):
    return (H.glob("torch._utils", "_rebuild_tensor_v2") + b"(" + H.pid(cls, "0", numel) + H.pint(0)
            + H.ints((numel,)) + H.ints((1,)) + H.FALSE + OD + md + b"t" + H.REDUCE)


def v3(dtype, md):
    return (H.glob("torch._utils", "_rebuild_tensor_v3") + b"(" + H.pid("torch.storage.UntypedStorage", "0", 12)
            + H.pint(0) + H.ints((1,)) + H.ints((1,)) + H.FALSE + OD + H.glob("torch", dtype) + md + b"t"
            + H.REDUCE)


def flags_dict(*pairs):
    return H.dict_of([(H.ustr(k) if isinstance(k, str) else k, v) for k, v in pairs])


FLOAT = ("torch.FloatStorage", 3)
CPLX = ("torch.ComplexFloatStorage", 6)
BOOL = ("torch.BoolStorage", 12)

HOSTILE = {
    "unknown-key": (FLOAT, flags_dict(("_x", H.TRUE)), ["unknown tensor metadata flag '_x'"]),
    "unknown-after-known": (CPLX, flags_dict(("conj", H.TRUE), ("neg", H.TRUE), ("grad", H.TRUE)),
                            ["unknown tensor metadata flag 'grad'"]),
    "key-case": (CPLX, flags_dict(("CONJ", H.TRUE)), ["unknown tensor metadata flag 'CONJ'"]),
    "key-not-str": (FLOAT, flags_dict((H.pint(1), H.TRUE)), ["tensor metadata key is a int, not a str"]),
    "key-bytes": (FLOAT, flags_dict((H.glob("_codecs", "encode") + H.tup(H.ustr("neg"), H.ustr("latin1")) + H.REDUCE,
                                     H.TRUE)), ["tensor metadata key is a bytes, not a str"]),
    "value-int": (CPLX, flags_dict(("conj", H.pint(1))), ["flag 'conj' is a int, not a bool"]),
    "value-none": (FLOAT, flags_dict(("neg", H.NONE)), ["flag 'neg' is a None, not a bool"]),
    "value-str": (FLOAT, flags_dict(("neg", H.ustr("True"))), ["flag 'neg' is a str, not a bool"]),
    "value-dict": (FLOAT, flags_dict(("neg", flags_dict(("neg", H.TRUE)))), ["flag 'neg' is a dict, not a bool"]),
    "not-a-dict": (FLOAT, H.tup(H.ustr("neg"), H.TRUE), ["tensor metadata is a tuple, not a dict"]),
    "a-list": (FLOAT, b"]", ["tensor metadata is a list, not a dict"]),
    "a-bool": (FLOAT, H.TRUE, ["tensor metadata is a bool, not a dict"]),
    "dict-with-state": (FLOAT, OD + flags_dict(("neg", H.TRUE)) + H.BUILD, ["tensor metadata is a dict with attributes"]),
    "long-key": (FLOAT, flags_dict(("k" * 5000, H.TRUE)), ["flag '" + "k" * 40 + "...'"]),
    "huge-dict": (FLOAT, H.dict_of([(H.ustr("neg"), H.TRUE)] * 5000 + [(H.ustr(f"k{i}"), H.TRUE) for i in range(5000)]),
                  ["unknown tensor metadata flag 'k0'"]),
    # a flag on a dtype it cannot apply to (torch.load refuses 'conj' on a real dtype too)
    "conj-on-float": (FLOAT, flags_dict(("conj", H.TRUE)), ["tensor at byte", "has the conj flag (a conjugate view) but is float32"]),
    "conj-false-on-float": (FLOAT, flags_dict(("conj", H.FALSE)), ["has the conj flag (a conjugate view) but is float32"]),
    "neg-on-bool": (BOOL, flags_dict(("neg", H.TRUE)), ["has the neg flag (a negative view) but is bool",
                                                         "torch cannot negate bool"]),
    "neg-false-on-bool": (BOOL, flags_dict(("neg", H.FALSE)), ["cannot negate bool"]),
}


def check_refused(tmp_path, data, words):
    p = tmp_path / "m.pt"
    p.write_bytes(data)
    for fn in (lambda: _ptload.load(p), lambda: _ptload.load(p, framework="np"), lambda: _ptload.read_index(p),
               lambda: _ptload.verify(p)):
        with pytest.raises(TorchFormatError) as ei:
            fn()
        for w in words:
            assert w in str(ei.value), str(ei.value)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_metadata_is_a_format_error(tmp_path, name):
    (cls, numel), md, words = HOSTILE[name]
    data = {"torch.BoolStorage": BOOLS, "torch.FloatStorage": F32}.get(cls, C64)
    check_refused(tmp_path, H.pt_file(H.proto() + v2(cls, numel, md) + H.STOP, {"0": data}), words)


@pytest.mark.parametrize("dtype,md,words", [
    ("uint16", flags_dict(("neg", H.TRUE)), ["cannot negate uint16"]),
    ("float8_e4m3fn", flags_dict(("neg", H.TRUE)), ["cannot negate float8_e4m3fn"]),
    ("bfloat16", flags_dict(("conj", H.TRUE)), ["conj flag (a conjugate view) but is bfloat16"]),
    ("complex32", flags_dict(("neg", H.pint(1))), ["flag 'neg' is a int"]),
])
def test_hostile_metadata_v3(tmp_path, dtype, md, words):
    check_refused(tmp_path, H.pt_file(H.proto() + v3(dtype, md) + H.STOP, {"0": F32}), words)


def test_hostile_metadata_in_a_legacy_file(tmp_path):
    obj = H.proto() + (H.glob("torch._utils", "_rebuild_tensor_v2") + b"(" + H.pid("torch.FloatStorage", "1", 3, legacy=True)
                       + H.pint(0) + H.ints((3,)) + H.ints((1,)) + H.FALSE + OD + flags_dict(("nag", H.TRUE)) + b"t"
                       + H.REDUCE) + H.STOP
    check_refused(tmp_path, H.legacy_file(obj, [("1", 3, F32[:12])]), ["unknown tensor metadata flag 'nag'"])


def test_refusals_where_torch_also_refuses(torch, tmp_path):
    """'conj' on a real dtype: torch.load fails as well (we raise TorchFormatError, nothing else)."""
    p = tmp_path / "m.pt"
    p.write_bytes(H.pt_file(H.proto() + v2("torch.FloatStorage", 3, flags_dict(("conj", H.TRUE))) + H.STOP,
                            {"0": F32}))
    with pytest.raises(Exception):  # noqa: B017 - torch's own error type varies between versions
        torch.load(p, weights_only=True)
    with pytest.raises(TorchFormatError):
        _ptload.load(p)


VALID = {
    "none": (H.NONE, (0, 0)),
    "empty": (flags_dict(), (0, 0)),
    # torch sets the bit of a key whatever its value (it writes only True)
    "conj-false": (flags_dict(("conj", H.FALSE)), (1, 0)),
    "neg-false": (flags_dict(("neg", H.FALSE)), (0, 1)),
    "key-twice": (flags_dict(("conj", H.TRUE), ("conj", H.FALSE), ("neg", H.FALSE)), (1, 1)),
    "ordered-dict": (OD + b"(" + H.ustr("conj") + H.TRUE + b"u", (1, 0)),
    "large": (H.dict_of([(H.ustr("neg"), H.TRUE)] * 20000), (0, 1)),  # linear work, like torch
}


@pytest.mark.parametrize("name", list(VALID))
def test_odd_but_valid_dicts_load_like_torch(torch, tmp_path, name):
    md, want = VALID[name]
    p = tmp_path / "m.pt"
    p.write_bytes(H.pt_file(H.proto() + v2("torch.ComplexFloatStorage", 6, md) + H.STOP, {"0": C64}))
    ref = torch.load(p, weights_only=True)
    ours = _ptload.load(p)
    assert (ours.is_conj(), ours.is_neg()) == (ref.is_conj(), ref.is_neg()) == tuple(map(bool, want))
    assert torch.equal(ours, ref)
    np.testing.assert_array_equal(_ptload.load(p, framework="np"), resolved(ref).numpy())


def test_integer_and_bfloat16_negation_matches_torch(torch, tmp_path):
    """'neg' on dtypes torch can negate but no torch call saves: values like torch.load's (ints wrap)."""
    entries = [("i8", "torch.CharStorage", np.array([-128, -1, 0, 5], dtype="i1").tobytes(), 4),
               ("u8", "torch.ByteStorage", np.array([0, 1, 200, 255], dtype="u1").tobytes(), 4),
               ("i64", "torch.LongStorage", np.array([-2 ** 63, 3], dtype="<i8").tobytes(), 2),
               ("bf16", "torch.BFloat16Storage", np.array([0x3F80, 0x8000, 0x4000, 0], dtype="<u2").tobytes(), 4),
               ("f16", "torch.HalfStorage", np.array([1.5, -0.0, np.inf, 0], dtype="<f2").tobytes(), 4)]
    body = H.proto() + b"}("
    storages = {}
    for i, (name, cls, data, n) in enumerate(entries):
        body += H.ustr(name) + (H.glob("torch._utils", "_rebuild_tensor_v2") + b"(" + H.pid(cls, str(i), n) + H.pint(0)
                                + H.ints((n,)) + H.ints((1,)) + H.FALSE + OD + flags_dict(("neg", H.TRUE)) + b"t"
                                + H.REDUCE)
        storages[str(i)] = data
    p = tmp_path / "n.pt"
    p.write_bytes(H.pt_file(body + b"u" + H.STOP, storages))
    ref = torch.load(p, weights_only=True)
    assert all(t.is_neg() for t in ref.values())
    load_all_ways(torch, p, ref)


def test_a_shared_flag_dict_flags_each_tensor(torch, tmp_path):
    """One memoised flag dict given to two tensors (torch does not write that, a crafted file may):
    each tensor gets the bits."""
    first = v2("torch.ComplexFloatStorage", 6, flags_dict(("conj", H.TRUE)) + b"q\x00")
    second = v2("torch.ComplexFloatStorage", 6, b"h\x00")
    p = tmp_path / "m.pt"
    p.write_bytes(H.pt_file(H.proto() + b"(" + first + second + b"t" + H.STOP, {"0": C64}))
    ref = torch.load(p, weights_only=True)
    ours = _ptload.load(p)
    assert all(t.is_conj() for t in ref) and all(t.is_conj() for t in ours)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    want = np.frombuffer(C64, dtype="<c8").conj()
    for a in _ptload.load(p, framework="np"):
        np.testing.assert_array_equal(a, want)


# ------------------------------------------------------------ the writer's side

def test_writer_refuses_flags_the_reader_refuses(torch, tmp_path, monkeypatch):
    """A negative view of a dtype torch cannot negate (torch._neg_view makes one): torch.save
    writes it, our reader refuses it, so torch_save refuses it in the reader's words, naming where
    in the object; so too a metadata key or value the reader does not take."""
    bad = neg_view(torch, torch.zeros(3, dtype=torch.bool))
    assert torch._utils.get_tensor_metadata(bad) == {"neg": True}
    with pytest.raises(ValueError, match=r"has the neg flag \(a negative view\) but is bool .* at obj\['m'\]\[1\]"):
        mio.torch_save({"m": [torch.ones(1), bad]}, tmp_path / "b.pt")
    assert not (tmp_path / "b.pt").exists()
    real = torch.zeros(2)
    monkeypatch.setattr(torch._utils, "get_tensor_metadata", lambda t: {"conj": True} if t is real else {})
    with pytest.raises(ValueError, match=r"has the conj flag \(a conjugate view\) but is float32 .* at obj\['r'\]"):
        _ptsave.save_bytes({"r": real})
    for md, words in (({"grad": True}, "tensor metadata 'grad': True cannot be saved"),
                      ({"neg": 1}, "tensor metadata 'neg': 1 cannot be saved")):
        monkeypatch.setattr(torch._utils, "get_tensor_metadata", lambda t, md=md: md)
        with pytest.raises(ValueError, match=words):
            _ptsave.save_bytes({"x": torch.zeros(2)})
