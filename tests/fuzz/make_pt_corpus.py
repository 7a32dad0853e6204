"""Regenerates the seed corpora of pt_zip and pt_pickle from files written by
the real torch.save (run by hand: python3 tests/fuzz/make_pt_corpus.py)."""
import collections
import io
import os
import sys
import zipfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import _pthelpers as H  # noqa: E402


def saved(obj, zip_format=True):
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


def objects():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "state_dict": lin.state_dict(),
        "checkpoint": {"model": lin.state_dict(), "opt": opt.state_dict(), "epoch": 2, "size": torch.Size([1, 2]),
                       "dev": torch.device("cpu"), "dtype": torch.float16, "s": {1, 2}, "b": b"\x00\x01",
                       "big": 2 ** 70},
        "views": {"a": base, "t": base.t(), "s": base[1:, ::2], "scalar": base[2, 3], "empty": base[:0]},
        "dtypes": {str(d): torch.randint(0, 100, (3,), generator=g).to(d) for d in
                   (torch.bfloat16, torch.float16, torch.int8, torch.bool, torch.complex64, torch.float64)},
        "v3": {"u16": torch.arange(4, dtype=torch.int32).to(torch.uint16), "f8": torch.zeros(2, dtype=torch.float8_e4m3fn)},
        "params": lin.state_dict(keep_vars=True),
        "flags": flag_views(g),
    }


def flag_views(g):
    """Conjugate and negative views: torch.save gives their rebuilds a metadata dict of flags."""
    c64 = torch.randn(2, 3, dtype=torch.complex64, generator=g)
    return {"c64": c64, "conj": c64.conj(), "conj_t": c64.t().conj(),
            "neg": torch.randn(4, dtype=torch.complex128, generator=g).conj().imag,
            "conj_neg": torch._neg_view(torch.randn(3, dtype=torch.complex128, generator=g)).conj()}


def main():
    zdir = os.path.join(HERE, "corpus_pt_zip")
    pdir = os.path.join(HERE, "corpus_pt_pickle")
    os.makedirs(zdir, exist_ok=True)
    os.makedirs(pdir, exist_ok=True)
    for name, obj in objects().items():
        data = saved(obj)
        open(os.path.join(zdir, name + ".pt"), "wb").write(data)
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            recs = [(i.filename, z.read(i.filename)) for i in z.infolist()]
        pkl = next(d for n, d in recs if n.endswith("/data.pkl"))
        open(os.path.join(pdir, name + ".pkl"), "wb").write(pkl)
        if name != "v3":
            open(os.path.join(pdir, name + ".legacy"), "wb").write(saved(obj, zip_format=False))
        if name in ("state_dict", "views"):
            open(os.path.join(zdir, name + ".deflated.pt"), "wb").write(
                H.zip_build([(n, d, 8) for n, d in recs]))
            open(os.path.join(zdir, name + ".zip64.pt"), "wb").write(
                H.zip_build([(n, d, 0) for n, d in recs[::-1]], zip64=True, align=64))
    # a few forbidden ones, so the rejection paths are seeds too
    open(os.path.join(pdir, "os_system.pkl"), "wb").write(
        H.proto() + H.glob("os", "system") + H.tup(H.ustr("true")) + H.REDUCE + H.STOP)
    open(os.path.join(pdir, "setitem_list.pkl"), "wb").write(H.proto() + b"]K\x01K\x02s.")
    open(os.path.join(pdir, "flags_refused.pkl"), "wb").write(flags_refused())


def flags_refused():
    """Tensor flag dicts the reader refuses: 'conj' on float32 (found once the dtype is known), an
    unknown key, a non-bool value."""
    def v2(cls, md):
        return (H.glob("torch._utils", "_rebuild_tensor_v2") + b"(" + H.pid(cls, "0", 2) + H.pint(0) + H.ints((2,))
                + H.ints((1,)) + H.FALSE + H.odict() + md + b"t" + H.REDUCE)
    return (H.proto() + b"(" + v2("torch.FloatStorage", H.dict_of([(H.ustr("conj"), H.TRUE)]))
            + v2("torch.FloatStorage", H.dict_of([(H.ustr("neg"), H.TRUE), (H.ustr("grad"), H.TRUE)]))
            + v2("torch.FloatStorage", H.dict_of([(H.ustr("neg"), H.pint(1))])) + b"t" + H.STOP)


if __name__ == "__main__":
    main()
