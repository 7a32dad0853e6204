"""Benchmark: mlutils' .pt loader against torch.load(weights_only=True).

Writes a ~1 GiB state dict (a few hundred tensors, mixed sizes and dtypes)
with torch.save to /tmp, times each loader in this process (best of 3, page
cache warm), measures the peak RSS of each full load in a fresh subprocess,
prints a markdown table and deletes the file.

    python3 bench/bench_ptload.py [--gib 1.0]
"""
import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mlutils import _ptload  # noqa: E402


def make_state_dict(total_bytes):
    g = torch.Generator().manual_seed(0)
    sd = collections.OrderedDict()
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.float32, torch.bfloat16]
    used, i = 0, 0
    sizes = [(4096, 1024), (1024,), (1024, 1024), (256, 4096), (8192, 512), (64,), (3, 3, 64, 64)]
    while used < total_bytes:
        shape = sizes[i % len(sizes)]
        dt = dtypes[i % len(dtypes)]
        t = torch.empty(shape, dtype=dt)
        if dt.is_floating_point:
            t.normal_(generator=g)
        else:
            t.random_(0, 1000, generator=g)
        sd[f"layers.{i // len(sizes)}.p{i % len(sizes)}"] = t
        used += t.numel() * t.element_size()
        i += 1
    sd._metadata = {"": {"version": 1}}
    return sd


LOADERS = {
    "torch.load(weights_only=True)": "torch.load(p, weights_only=True)",
    "torch.load(weights_only=True, mmap=True)": "torch.load(p, weights_only=True, mmap=True)",
    "mlutils load (pt, mmap)": "_ptload.load(p)",
    "mlutils load (np, mmap)": "_ptload.load(p, framework='np')",
    "mlutils load (pt, mmap=False)": "_ptload.load(p, mmap=False)",
    "mlutils load (np, mmap=False)": "_ptload.load(p, framework='np', mmap=False)",
}

RSS_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {root!r})
from mlutils import _ptload
p = {path!r}
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
def rss():
    return status('VmRSS:')
base = rss()
obj = {expr}
# touch every tensor byte, so a lazy (mmap) load is measured fully loaded too
n = 0
for v in obj.values():
    if isinstance(v, torch.Tensor):
        n += int(v.reshape(-1).view(torch.uint8)[::4096].sum())
    else:
        n += int(v.reshape(-1).view('u1')[::4096].sum())
peak = status('VmHWM:')  # this process's own peak (ru_maxrss would include the parent's, across exec)
print(peak - base)
"""


def touch(obj):
    """Reads one byte of every page of every tensor (so lazy loads really load)."""
    n = 0
    for v in obj.values():
        if isinstance(v, torch.Tensor):
            n += int(v.reshape(-1).view(torch.uint8)[::4096].sum())
        else:
            n += int(v.reshape(-1).view("u1")[::4096].sum())
    return n


def time_load(expr, p):
    best, best_touch = float("inf"), float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        obj = eval(expr, {"torch": torch, "_ptload": _ptload, "p": p})
        t1 = time.perf_counter()
        touch(obj)
        t2 = time.perf_counter()
        del obj
        best = min(best, t1 - t0)
        best_touch = min(best_touch, t2 - t0)
    return best, best_touch


def peak_rss(expr, p):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = RSS_SCRIPT.format(root=root, path=p, expr=expr)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    args = ap.parse_args()
    fd, p = tempfile.mkstemp(suffix=".pt", dir="/tmp")
    os.close(fd)
    try:
        sd = make_state_dict(int(args.gib * (1 << 30)))
        n_tensors = len(sd)
        torch.save(sd, p)
        del sd
        size = os.path.getsize(p)
        rows = []
        for name, expr in LOADERS.items():
            rows.append((name, time_load(expr, p), peak_rss(expr, p)))
        ref, ref_touch = rows[0][1]
        print(f"file: {size / (1 << 30):.2f} GiB, {n_tensors} tensors (float32/bfloat16/float16/int64), "
              f"torch {torch.__version__}\n")
        print("| loader | load (s) | load / torch.load(weights_only=True) | load + touch every page (s) | ratio "
              "| peak RSS of a full load (GiB) | RSS / file size |")
        print("|---|---|---|---|---|---|---|")
        for name, (t, tt), rss in rows:
            print(f"| {name} | {t:.3f} | {t / ref:.3f} | {tt:.3f} | {tt / ref_touch:.3f} "
                  f"| {rss / (1 << 30):.2f} | {rss / size:.2f} |")
    finally:
        os.unlink(p)


if __name__ == "__main__":
    main()
