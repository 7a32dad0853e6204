"""Benchmark: mlutils._ptsave.save vs torch.save on a ~1 GiB state dict.

Run: python3 bench/bench_ptsave.py [--gib 1.0] [--repeat 2]
Prints a markdown table of times and ratios against torch.save measured in
the same run, on the same disk (/tmp).  Temporary files are deleted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    sd = make_state_dict(args.gib)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    tmp = tempfile.mkdtemp(prefix="mlutils_bench_ptsave_", dir="/tmp")
    try:
        # same basename (the archive name comes from it), separate folders
        os.mkdir(os.path.join(tmp, "ours"))
        os.mkdir(os.path.join(tmp, "theirs"))
        ours = os.path.join(tmp, "ours", "model.pt")
        theirs = os.path.join(tmp, "theirs", "model.pt")

        def fresh(path):
            if os.path.exists(path):
                os.unlink(path)

        def torch_save():
            torch.save(sd, theirs)

        def torch_save_fsync():
            torch.save(sd, theirs)
            fsync_path(theirs)

        def our_save():
            _ptsave.save(sd, ours)   # atomic: temp file, fsync, rename, fsync folder

        writers = [("torch.save(path)", torch_save, theirs),
                   ("torch.save(path) + fsync", torch_save_fsync, theirs),
                   ("mlutils save(path) (atomic, fsync)", our_save, ours)]
        times = {name: [] for name, _, _ in writers}
        for _ in range(args.repeat):          # interleaved, each into a fresh file
            for name, fn, path in writers:
                fresh(path)
                os.sync()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        t_torch = min(times["torch.save(path)"])
        rows = [(name, min(times[name]), min(times[name]) / t_torch) for name, _, _ in writers]
        t_bytes_torch = best(lambda: torch.save(sd, __import__("io").BytesIO()), 1)
        t_bytes_ours = best(lambda: _ptsave.save_bytes(sd), 1)
        rows.append(("torch.save(BytesIO)", t_bytes_torch, t_bytes_torch / t_torch))
        rows.append(("mlutils save_bytes", t_bytes_ours, t_bytes_ours / t_torch))

        import filecmp
        same = filecmp.cmp(ours, theirs, shallow=False)
        print(f"state dict: {len(sd)} tensors, {nbytes / 2**30:.2f} GiB; "
              f"file byte-identical to torch.save's: {same}")
        print(f"best of {args.repeat}, interleaved (save_bytes / BytesIO: 1 run)\n")
        print("| writer | seconds | GiB/s | time vs torch.save(path) |")
        print("|---|---:|---:|---:|")
        for name, t, ratio in rows:
            print(f"| {name} | {t:.3f} | {nbytes / 2**30 / t:.2f} | {ratio:.2f}x |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
