"""ptload on truncated files: a file cut at any byte, or cut by another
process while it is being loaded, gives TorchFormatError, never a crash.
The metadata is read with pread (not through the mapping), so only tensor
bytes touched after the load can still meet a vanished page, as with
torch.load(mmap=True)."""
import os
import sys
import textwrap

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _pthelpers as H  # noqa: E402
from _race import run_while_cutting  # noqa: E402

from mlutils import TorchFormatError, _ptload  # noqa: E402

CORPUS = os.path.join(os.path.dirname(__file__), "fuzz", "corpus_pt_zip")
F32 = np.arange(12, dtype="<f4")


def hand_zip(**kw):
    pkl = H.state_dict_pickle([("w", "torch.FloatStorage", "0", 12, 0, (3, 4), (4, 1))])
    return H.pt_file(pkl, {"0": F32.tobytes()}, **kw)


def hand_legacy():
    obj = H.proto() + H.dict_of([(H.ustr("w"), H.tensor_v2("torch.FloatStorage", "1", 12, 0, (12,), (1,), legacy=True))]) + H.STOP
    return H.legacy_file(obj, [("1", 12, F32.tobytes())])


def files():
    out = [("zip", hand_zip()), ("zip64", hand_zip(zip64=True)),
           ("deflated", hand_zip(deflate=("data/0", "data.pkl"))), ("legacy", hand_legacy())]
    with open(os.path.join(CORPUS, "views.deflated.pt"), "rb") as f:  # written by torch.save
        out.append(("torch", f.read()))
    return out


@pytest.mark.parametrize("name,data", files(), ids=[n for n, _ in files()])
def test_every_truncation_is_a_format_error(tmp_path, name, data):
    p = tmp_path / "m.pt"
    p.write_bytes(data)
    assert _ptload.read_index(p)  # the whole file is valid
    for cut in range(1, len(data)):
        p.write_bytes(data[:cut])
        for fn in (lambda: _ptload.load(p, framework="np"), lambda: _ptload.load(p, framework="np", mmap=False),
                   lambda: _ptload.read_index(p), lambda: _ptload.verify(p)):
            with pytest.raises(TorchFormatError) as ei:
                fn()
            msg = str(ei.value)
            assert any(w in msg for w in ("truncated", "byte", "central directory", "record", "not a PyTorch file")), (cut, msg)
    p.write_bytes(b"")
    with pytest.raises(TorchFormatError, match="empty"):
        _ptload.load(p, framework="np")


CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from mlutils import _ptload, TorchFormatError
    from mlutils.__main__ import describe
    path, seconds = sys.argv[1], float(sys.argv[2])
    ok = bad = checked = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for fn in (lambda: _ptload.load(path, framework="np", mmap=False), lambda: _ptload.read_index(path),
                   lambda: _ptload.verify(path), lambda: describe(path),
                   lambda: len(_ptload.load(path, framework="np"))):  # views: checked, never touched here
            g = cut_generation()
            try:
                obj = fn()
            except TorchFormatError:
                bad += 1
            else:
                ok += 1
                if isinstance(obj, dict) and "w" in obj and stable_since(g):  # copies, no cut overlapped
                    assert np.array_equal(obj["w"], np.arange(12, dtype="<f4").reshape(3, 4))
                    checked += 1
    print(ok, bad, checked)
""")


def test_file_cut_by_another_process_during_loads(tmp_path):
    """A writer keeps cutting and restoring the file (same inode) while a child process loads it
    (copies, index, verify, the CLI's describe, and mmap loads whose views are not touched):
    every load either succeeds or raises TorchFormatError, with the right values when no cut
    overlapped it; no SIGBUS."""
    pkl = H.state_dict_pickle([("w", "torch.FloatStorage", "0", 12, 0, (3, 4), (4, 1))])
    big = np.zeros(1 << 16, dtype="<f4")  # a large data.pkl-adjacent record widens the window
    data = H.pt_file(pkl, {"0": F32.tobytes(), "1": big.tobytes()})
    p = tmp_path / "m.pt"
    p.write_bytes(data)
    run_while_cutting(p, CHILD)
