"""Benchmark: mlutils._ptsave.save vs torch.save on a ~1 GiB state dict.

Run: python3 bench/bench_ptsave.py [--gib 1.0] [--repeat 2]
Prints a markdown table of times and ratios against torch.save measured in
the same run, on the same disk (/tmp).  Temporary files are deleted.
"""
from __future__ import annotations

import argparse
import filecmp
import io
import os
import shutil
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import _harness as H  # noqa: E402
from mlutils import _ptsave  # noqa: E402  (this checkout's build)


def make_state_dict(gib: float) -> "collections.OrderedDict[str, torch.Tensor]":
    """A few hundred tensors of mixed sizes and dtypes adding up to about `gib` GiB."""
    import collections

    g = torch.Generator().manual_seed(0)
    sd: collections.OrderedDict = collections.OrderedDict()
    target = int(gib * 2**30)
    total, i = 0, 0
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    while total < target:
        layer = i // 6
        kind = i % 6
        if kind == 0:
            t = torch.randn(4096, 1024, generator=g).to(dtypes[layer % 4])      # big matrices
        elif kind == 1:
            t = torch.randn(1024, 1024, generator=g).to(dtypes[layer % 4])
        elif kind == 2:
            t = torch.randn(1024, generator=g)                                   # biases / norms
        elif kind == 3:
            t = torch.randint(0, 1000, (257,), generator=g)                      # int64 buffers
        elif kind == 4:
            t = torch.randn(3, 5, generator=g).to(torch.float16)                 # tiny odd sizes
        else:
            t = torch.tensor(layer)                                              # scalars
        sd[f"layers.{layer}.p{kind}"] = t
        total += t.numel() * t.element_size()
        i += 1
    sd._metadata = collections.OrderedDict((f"layers.{k}", {"version": 1}) for k in range(i // 6 + 1))
    return sd


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)

    sd = make_state_dict(args.gib)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    tmp = tempfile.mkdtemp(prefix="mlutils_bench_ptsave_", dir="/tmp")
    try:
        # same basename (the archive name comes from it), separate folders
        os.mkdir(os.path.join(tmp, "ours"))
        os.mkdir(os.path.join(tmp, "theirs"))
        ours = os.path.join(tmp, "ours", "model.pt")
        theirs = os.path.join(tmp, "theirs", "model.pt")

        def fresh(name):
            for path in (ours, theirs):
                if os.path.exists(path):
                    os.unlink(path)
            os.sync()

        def torch_save_durable():
            torch.save(sd, theirs)
            fsync_path(theirs)
            fsync_path(os.path.dirname(theirs))

        def ours_plain():
            _ptsave.save(sd, ours, durable=False)

        cases = [("mlutils save(path) (atomic, fsync)", lambda: _ptsave.save(sd, ours)),
                 ("torch.save(path) + fsync of file and folder", torch_save_durable),
                 ("mlutils save(path, durable=False)", ours_plain),
                 ("torch.save(path)", lambda: torch.save(sd, theirs)),
                 ("mlutils save_bytes", lambda: _ptsave.save_bytes(sd)),
                 ("torch.save(BytesIO)", lambda: torch.save(sd, io.BytesIO()))]
        times = H.interleaved(cases, args.repeat, before=fresh)
        _ptsave.save(sd, ours)
        torch.save(sd, theirs)
        same = filecmp.cmp(ours, theirs, shallow=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    pairs = [("durable (fsync of file and folder)", cases[0][0], cases[1][0]),
             ("plain (no fsync)", cases[2][0], cases[3][0]),
             ("in memory", cases[4][0], cases[5][0])]
    rows = [(what, o, H.cell(times[o]), t, H.cell(times[t]), H.ratio(times[t], times[o]),
             f"{nbytes / 2**30 / H.median(times[o]):.2f}")
            for what, o, t in pairs]
    H.table(["save", "mlutils", "time", "torch", "time", "torch / mlutils", "mlutils GiB/s"], rows,
            f"state dict: {len(sd)} tensors, {nbytes / 2**30:.2f} GiB, torch {torch.__version__}; "
            f"file byte-identical to torch.save's: {same}", repeat=args.repeat)


if __name__ == "__main__":
    main()
