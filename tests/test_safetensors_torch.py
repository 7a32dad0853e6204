"""safetensors with torch tensors, against safetensors.torch."""
import json
import struct

import numpy as np
import pytest

import mlutils
from mlutils import _safetensors as S

pytest.importorskip("safetensors")

TORCH_DTYPES = [
    "bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16",
    "bfloat16", "float32", "float64", "complex64", "float8_e5m2", "float8_e4m3fn", "float8_e8m0fnu",
    "float8_e4m3fnuz", "float8_e5m2fnuz", "float4_e2m1fn_x2",
]


def rand(torch, name, shape, seed=0):
    """Random bits of torch dtype `name`."""
    dt = getattr(torch, name)
    g = torch.Generator().manual_seed(seed)
    esize = torch.empty(0, dtype=dt).element_size()
    n = int(np.prod(shape)) * esize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    if name == "bool":
        raw = raw & 1
    return raw.view(dt).reshape(shape)


def bits(t):
    import torch

    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1).view(torch.uint8)


def same(a, b):
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and bytes(bits(a.contiguous()).numpy()) == bytes(bits(b.contiguous()).numpy())


@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_torch_dtypes_identical_and_readable_both_ways(torch, name, tmp_path):
    import safetensors.torch as stt

    if not hasattr(torch, name):
        pytest.skip(f"torch {torch.__version__} has no {name}")
    sd = {"w.10": rand(torch, name, (4, 6), 1), "w.2": rand(torch, name, (2,), 2), "e": rand(torch, name, (0, 2), 3),
          "b": torch.arange(3, dtype=torch.int32)}
    if name != "float4_e2m1fn_x2":
        sd["s"] = rand(torch, name, (), 4)
    for meta in (None, {"format": "pt"}):
        assert S.save(sd, meta) == stt.save(sd, meta)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    S.save_file(sd, ours, {"format": "pt"})
    stt.save_file(sd, str(theirs), {"format": "pt"})
    assert ours.read_bytes() == theirs.read_bytes()
    lib = stt.load_file(str(ours))
    mine = S.load_file(theirs, framework="pt")
    mine_torch = S.load(theirs.read_bytes(), framework="torch")
    assert list(mine) == list(lib)  # offset order
    for k, v in sd.items():
        assert same(lib[k], v) and same(mine[k], v) and same(mine_torch[k], v), k
    from safetensors import safe_open

    with S.safe_open(theirs, framework="pt") as f, safe_open(str(ours), framework="pt") as g:
        assert f.keys() == g.keys()
        assert f.metadata() == g.metadata() == {"format": "pt"}
        for k in sd:
            assert same(f.get_tensor(k), g.get_tensor(k))
        if name != "float4_e2m1fn_x2":
            assert same(f.get_slice("w.10")[1:3], g.get_slice("w.10")[1:3])
            assert f.get_slice("w.10").get_dtype() == g.get_slice("w.10").get_dtype()


def test_f4_halves_last_dimension_and_odd_is_refused(torch, tmp_path):
    t = rand(torch, "float4_e2m1fn_x2", (3, 5))
    p = tmp_path / "f4.safetensors"
    S.save_file({"q": t}, p)
    _, entries = S.read_header(p)
    assert entries[0]["shape"] == [3, 10] and entries[0]["dtype"] == "F4"
    assert S.load_file(p)["q"].shape == (3, 5)  # numpy: raw bytes, last dim halved
    odd = tmp_path / "odd.safetensors"
    S.save_file({"q": S.RawTensor("F4", (2, 3), np.arange(3, dtype=np.uint8))}, odd)
    with pytest.raises(mlutils.SafetensorsError, match="odd last dimension"):
        S.load_file(odd, framework="pt")
    assert S.load_file(odd)["q"].shape == (3,)  # numpy: the packed bytes


def test_f6_has_no_torch_dtype(torch, tmp_path):
    p = tmp_path / "f6.safetensors"
    S.save_file({"q": S.RawTensor("F6_E3M2", (4,), np.arange(3, dtype=np.uint8))}, p)
    with pytest.raises(mlutils.SafetensorsError, match="no torch equivalent"):
        S.load_file(p, framework="pt")


def test_noncontiguous_and_parameters(torch):
    import safetensors.torch as stt

    base, other = torch.randn(8, 6), torch.randn(5, 7)
    p = torch.nn.Parameter(torch.randn(3, 3))
    sd = {"t": base.t(), "sl": other[::2, 1:4], "p": p}
    with pytest.raises(ValueError, match="non contiguous"):
        stt.save(sd)  # the library refuses non-contiguous tensors
    with pytest.raises(mlutils.SafetensorsError, match="share memory"):
        S.save({"t": base.t(), "sl": base[::2, 1:4]})
    ours = S.save(sd)
    assert ours == stt.save({k: v.detach().contiguous() for k, v in sd.items()})


def test_unaligned_file_to_torch(torch, tmp_path):
    from test_safetensors import _unaligned_file

    blob, want = _unaligned_file()
    p = tmp_path / "u.safetensors"
    p.write_bytes(blob)
    got = S.load_file(p, framework="pt")
    for k, v in want.items():
        assert np.array_equal(got[k].numpy(), v)
        assert got[k].data_ptr() % got[k].element_size() == 0  # torch gets aligned copies


def test_shared_tensors_refused_by_default(torch):
    w = torch.randn(4, 4)
    with pytest.raises(mlutils.SafetensorsError, match="dedupe=True") as e:
        S.save({"embed.weight": w, "lm_head.weight": w})
    assert "clone" in str(e.value)
    # disjoint chunks of one storage are not shared
    qkv = torch.randn(6, 4)
    q, k = qkv[:3], qkv[3:]
    S.save({"q": q, "k": k})


def test_dedupe_matches_save_model(torch, tmp_path):
    import safetensors.torch as stt

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.lm_head = torch.nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.embed.weight
            self.norm = torch.nn.LayerNorm(4)

    m = Tied()
    theirs = tmp_path / "theirs.safetensors"
    ours = tmp_path / "ours.safetensors"
    stt.save_model(m, str(theirs))
    S.save_file(m.state_dict(), ours, dedupe=True)
    assert ours.read_bytes() == theirs.read_bytes()
    m2 = Tied()
    missing, unexpected = stt.load_model(m2, str(ours))
    assert not missing and not unexpected
    assert m2.lm_head.weight.data_ptr() == m2.embed.weight.data_ptr()
    assert torch.equal(m2.embed.weight, m.embed.weight)
    # metadata passed in is kept, and a user key is not overwritten
    b = S.save(m.state_dict(), {"format": "pt", "lm_head.weight": "mine"}, dedupe=True)
    n = struct.unpack("<Q", b[:8])[0]
    hdr = json.loads(b[8:8 + n])
    assert hdr["__metadata__"] == {"format": "pt", "lm_head.weight": "mine"}
    assert "lm_head.weight" not in hdr


def test_dedupe_partial_views(torch):
    w = torch.randn(6, 4)
    with pytest.raises(mlutils.SafetensorsError, match="none covers the whole storage"):
        S.save({"a": w[:4], "b": w[2:]}, dedupe=True)
    b = S.save({"full": w, "part": w[1:3]}, dedupe=True)
    got = S.load(b, framework="pt")
    assert list(got) == ["full"] and torch.equal(got["full"], w)


def test_errors_on_unsupported_torch_tensors(torch):
    with pytest.raises(TypeError, match="no safetensors equivalent"):
        S.save({"c": torch.zeros(2, dtype=torch.complex128)})
    with pytest.raises(mlutils.SafetensorsError, match="not dense"):
        S.save({"s": torch.eye(3).to_sparse()})


def test_device_argument(torch, tmp_path):
    p = tmp_path / "d.safetensors"
    S.save_file({"a": torch.ones(3)}, p)
    assert S.load_file(p, framework="pt", device="cpu")["a"].device.type == "cpu"
    with pytest.raises(ValueError, match="framework='pt'"):
        S.load_file(p, framework="np", device="cuda")
    if torch.cuda.is_available():
        g = S.load_file(p, framework="pt", device="cuda:0")["a"]
        assert g.device.type == "cuda" and torch.equal(g.cpu(), torch.ones(3))
        assert S.save({"a": g}) == S.save({"a": torch.ones(3)})


def _size1_views(torch):
    """Dense tensors whose size-1 or empty dimensions carry odd strides."""
    return {
        "step2_first": torch.arange(10.0)[::2][:1],
        "expanded_scalar": torch.tensor(2.5).expand(1),
        "expanded_2d": torch.tensor(1.0, dtype=torch.float64).expand(1, 1),
        "empty_step3": torch.arange(10.0)[::3][:0],
        "empty_odd": torch.empty_strided((0, 3), (7, 5), dtype=torch.int16),
        "zero_stride": torch.empty_strided((1,), (0,)).fill_(3.0),
        "row_of_matrix": torch.arange(6, dtype=torch.int16).reshape(2, 3)[1:, ::2][:, 1:],
        "bf16_step": torch.arange(8.0).to(torch.bfloat16)[::4][:1],
        "u8_step": torch.arange(6, dtype=torch.uint8)[1::3][:1],
    }


def test_size1_strided_views_save_like_the_library(torch, tmp_path):
    from safetensors.torch import load_file as lib_load_file
    from safetensors.torch import save as lib_save

    views = _size1_views(torch)
    for name, t in views.items():
        assert t.is_contiguous() and (t.numel() <= 1 or t.dim() > 1), name
        assert S.save({name: t}) == lib_save({name: t}), name
    # all together, through a file, and back through both readers
    assert S.save(views) == lib_save(views)
    S.save_file(views, tmp_path / "v.safetensors")
    for got in (S.load_file(tmp_path / "v.safetensors", framework="pt"), lib_load_file(tmp_path / "v.safetensors")):
        for name, t in views.items():
            assert got[name].shape == t.shape and torch.equal(got[name], t), name
