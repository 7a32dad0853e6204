"""mlutils safetensors vs the `safetensors` package, same run, page cache warm.

    python3 bench/bench_safetensors.py [--mib 1024] [--repeat 3]

A state dict of a few hundred tensors of mixed sizes and dtypes (~1 GiB) is
saved and loaded by both; times are the best of --repeat.  Our save_file
writes a temporary file, fsyncs it, renames it and fsyncs the folder; the
library renames without any fsync, so a second save row adds an fsync to
theirs for a like-for-like durable save.  "load + touch"
reads one byte per page of every array, since our load maps the file and
reads nothing until asked.  Peak resident memory of a full load (every page
touched) is measured in a fresh subprocess for each.  Files live in /tmp and
are deleted at the end.  Prints a markdown table of ratios (ours / theirs:
below 1 is faster or smaller).
"""
import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import safetensors.numpy as stn  # noqa: E402

from mlutils import _safetensors as S  # noqa: E402

DTYPES = [np.float32, np.float16, np.float32, np.int64, np.uint8, np.float64, np.int32, np.float16]


def make_state_dict(total_mib):
    """Transformer-like: big matrices, small vectors, a few embeddings."""
    rng = np.random.default_rng(0)
    sd, size, i = {}, 0, 0
    budget = total_mib << 20
    while size < budget:
        dt = np.dtype(DTYPES[i % len(DTYPES)])
        kind = i % 5
        if kind == 0:
            shape = (int(rng.integers(1024, 4096)), int(rng.integers(1024, 2048)))
        elif kind in (1, 2):
            shape = (int(rng.integers(1, 4096)),)
        elif kind == 3:
            shape = (int(rng.integers(64, 512)), int(rng.integers(64, 512)))
        else:
            shape = (int(rng.integers(2, 8)), int(rng.integers(256, 1024)), 16)
        a = rng.integers(0, 255, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8).view(dt).reshape(shape)
        sd[f"model.layers.{i // 5}.part{kind}.weight"] = a
        size += a.nbytes
        i += 1
    return sd


def best(fn, repeat, flush=False):
    times = []
    for _ in range(repeat):
        gc.collect()
        if flush:  # earlier writes' background writeback must not land in this timing
            os.sync()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        del out
    return min(times)


def touch(d):
    """Reads one byte per 4 KiB page of every array."""
    s = 0
    for a in d.values():
        if a.nbytes:
            s += int(a.reshape(-1).view(np.uint8)[::4096].sum())
    return s


PEAK = r"""
import sys
sys.path.insert(0, {root!r})
def hwm():
    # VmHWM: ru_maxrss would carry the parent's peak across exec
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
import numpy as np
which, path = sys.argv[1], sys.argv[2]
if which == "ours":
    from mlutils import _safetensors as S
    d = S.load_file(path)
else:
    import safetensors.numpy as stn
    d = stn.load_file(path)
s = 0
for a in d.values():
    if a.nbytes:
        s += int(a.reshape(-1).view(np.uint8)[::4096].sum())
print(hwm())
"""

BASE = r"""
import sys
sys.path.insert(0, {root!r})
def hwm():
    # VmHWM: ru_maxrss would carry the parent's peak across exec
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
import numpy as np
if sys.argv[1] == "ours":
    from mlutils import _safetensors as S
else:
    import safetensors.numpy as stn
print(hwm())
"""


def peak_rss(which, path):
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    out = subprocess.check_output([sys.executable, "-c", PEAK.format(root=root), which, path], text=True)
    base = subprocess.check_output([sys.executable, "-c", BASE.format(root=root), which], text=True)
    return int(out.strip()), int(base.strip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    sd = make_state_dict(args.mib)
    nbytes = sum(a.nbytes for a in sd.values())
    tmp = tempfile.mkdtemp(prefix="mlu_bench_st_", dir="/tmp")
    ours_p, theirs_p = os.path.join(tmp, "ours.safetensors"), os.path.join(tmp, "theirs.safetensors")
    rows = []
    try:
        t_save_ours = best(lambda: S.save_file(sd, ours_p), args.repeat, flush=True)
        t_save_theirs = best(lambda: stn.save_file(sd, theirs_p), args.repeat, flush=True)

        def theirs_durable():
            stn.save_file(sd, theirs_p)
            fd = os.open(theirs_p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        t_save_theirs_sync = best(theirs_durable, args.repeat, flush=True)
        with open(ours_p, "rb") as f, open(theirs_p, "rb") as g:
            identical = f.read() == g.read()
        size = os.path.getsize(ours_p)
        # warm the page cache for both readers
        touch(S.load_file(ours_p))
        t_load_ours = best(lambda: S.load_file(ours_p), args.repeat)
        t_load_theirs = best(lambda: stn.load_file(ours_p), args.repeat)
        t_touch_ours = best(lambda: touch(S.load_file(ours_p)), args.repeat)
        t_touch_theirs = best(lambda: touch(stn.load_file(ours_p)), args.repeat)
        peak_ours, base_ours = peak_rss("ours", ours_p)
        peak_theirs, base_theirs = peak_rss("theirs", ours_p)
        rows = [
            ("save_file (ours fsyncs, theirs does not)", f"{t_save_ours * 1e3:.1f} ms", f"{t_save_theirs * 1e3:.1f} ms",
             t_save_ours / t_save_theirs),
            ("save_file, both durable (theirs + fsync)", f"{t_save_ours * 1e3:.1f} ms",
             f"{t_save_theirs_sync * 1e3:.1f} ms", t_save_ours / t_save_theirs_sync),
            ("load_file to numpy", f"{t_load_ours * 1e3:.1f} ms", f"{t_load_theirs * 1e3:.1f} ms", t_load_ours / t_load_theirs),
            ("load_file + touch every page", f"{t_touch_ours * 1e3:.1f} ms", f"{t_touch_theirs * 1e3:.1f} ms", t_touch_ours / t_touch_theirs),
            ("peak RSS of a full load", f"{peak_ours / 2**20:.0f} MiB", f"{peak_theirs / 2**20:.0f} MiB", peak_ours / peak_theirs),
            ("peak RSS minus interpreter", f"{(peak_ours - base_ours) / 2**20:.0f} MiB",
             f"{(peak_theirs - base_theirs) / 2**20:.0f} MiB", (peak_ours - base_ours) / max(1, peak_theirs - base_theirs)),
        ]
    finally:
        for p in (ours_p, theirs_p):
            if os.path.exists(p):
                os.remove(p)
        os.rmdir(tmp)

    import safetensors

    print(f"state dict: {len(sd)} tensors, {nbytes / 2**20:.0f} MiB; file {size / 2**20:.0f} MiB; "
          f"safetensors {safetensors.__version__}; outputs byte-identical: {identical}")
    print(f"peak RSS of our full load / file size: {peak_ours / size:.3f} "
          f"(interpreter alone: {base_ours / 2**20:.0f} MiB)")
    print()
    print("| operation | mlutils | safetensors | ratio |")
    print("| --- | --- | --- | --- |")
    for name, a, b, r in rows:
        print(f"| {name} | {a} | {b} | {r:.2f} |")


if __name__ == "__main__":
    main()
