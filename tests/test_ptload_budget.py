"""The pickle VM's work and memory are bounded by its input: a small deflated data.pkl that
expands into millions of containers, tensor records, memo slots or byte strings either loads or
stops with TorchFormatError ("expands beyond its size"), and the peak memory of verify(),
read_index() and load() stays within a small multiple of the decompressed pickle."""
import os
import struct
import subprocess
import sys

import pytest

from mlutils import _ptload

sys.path.insert(0, os.path.dirname(__file__))
import _pthelpers as H  # noqa: E402

N = 2_000_000  # bytes of decompressed pickle
MULTIPLE = 64  # the core charges at most 64 bytes of memory per pickle byte (PK_COST_PER_BYTE)
SLACK = 24 << 20  # allocator and interpreter noise
T = H.tensor_v2("torch.FloatStorage", "0", 2, 0, (2,), (1,))
LATIN1 = H.ustr("latin1")


def hostile():
    big = H.ustr("x" * 100_000)
    return {
        "empty-lists": H.proto() + b"(" + b"]" * N + b"t" + H.STOP,
        "empty-dicts": H.proto() + b"(" + b"}" * N + b"t" + H.STOP,
        "nested-tuples": H.proto() + H.NONE + b"\x85" * N + H.STOP,
        "nones": H.proto() + b"(" + H.NONE * N + b"t" + H.STOP,
        "memo-gets": H.proto() + b"]q\x00(" + b"h\x00" * (N // 2) + b"e" + H.STOP,
        "memo-slot-far": H.proto() + H.NONE + b"r" + struct.pack("<I", N // 2) + b"(" + H.NONE * N + b"t" + H.STOP,
        "parameter-copies": H.proto() + b"(" + H.glob("torch.nn.parameter", "Parameter") + b"q\x01" + T + b"q\x02"
        + b"h\x01h\x02\x85R" * (N // 6) + b"t" + H.STOP,
        "bytes-of-one-str": H.proto() + b"(" + big + b"q\x00" + H.glob("_codecs", "encode") + b"q\x01" + LATIN1
        + b"q\x02" + b"h\x01h\x00h\x02\x86R" * (N // 8) + b"t" + H.STOP,
        "devices-of-one-str": H.proto() + b"(" + big + b"q\x00" + H.glob("torch", "device") + b"q\x01"
        + b"h\x01h\x00\x85R" * (N // 6) + b"t" + H.STOP,
        "set-copies": H.proto() + b"(" + b"](" + H.pint(1) * 20_000 + b"eq\x00" + H.glob("builtins", "set") + b"q\x01"
        + b"h\x01h\x00\x85R" * (N // 6) + b"t" + H.STOP,
    }


CHILD = """
import resource, sys
from mlutils import _ptload, TorchFormatError
path, what = sys.argv[1], sys.argv[2]
fn = {"verify": _ptload.verify, "index": _ptload.read_index,
      "load": lambda p: _ptload.load(p, framework="np")}[what]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    fn(path)
    outcome = "ok"
except TorchFormatError as e:
    outcome = "error:" + str(e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
print(outcome)
"""


@pytest.mark.parametrize("name", list(hostile()))
def test_hostile_pickle_stays_within_budget(tmp_path, name):
    pkl = hostile()[name]
    data = H.pt_file(pkl, {"0": bytes(8)}, deflate=("data.pkl",))
    assert len(data) < 64 << 10 and len(pkl) > N  # small on disk, millions of opcodes inside
    p = tmp_path / "h.pt"
    p.write_bytes(data)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for what in ("verify", "index", "load"):
        r = subprocess.run([sys.executable, "-c", CHILD, str(p), what], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        grown, outcome = r.stdout.split("\n", 1)
        assert outcome.startswith("ok") or "expands beyond its size" in outcome, (what, outcome)
        assert int(grown) <= MULTIPLE * len(pkl) + SLACK, (what, int(grown) >> 20, len(pkl) >> 20, outcome)


@pytest.mark.parametrize("kind", ["tensors", "parameters"])
def test_dense_real_checkpoints_fit_the_budget(torch, tmp_path, kind):
    """The bound leaves room for the densest real pickles: a bare list of many small tensors or
    parameters (about 75 and 100 pickle bytes per tensor) loads like torch.load."""
    make = (lambda i: torch.full((1,), float(i))) if kind == "tensors" else \
        (lambda i: torch.nn.Parameter(torch.full((1,), float(i))))
    obj = [make(i) for i in range(20000)]
    p = tmp_path / "dense.pt"
    torch.save(obj, p)
    ref = torch.load(p, weights_only=True)
    ours = _ptload.load(p)
    assert len(ours) == len(ref) and all(type(a) is type(b) and torch.equal(a, b) for a, b in zip(ours, ref))
    _ptload.verify(p)
