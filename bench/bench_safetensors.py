"""mlutils safetensors vs the `safetensors` package (numpy and torch loaders, safe_open), same run.

    python3 bench/bench_safetensors.py [--mib 1024] [--repeat 5]

A state dict of a few hundred tensors of mixed sizes and dtypes is saved and
loaded by both, page cache warm.  Every figure is the median of --repeat
interleaved repeats with its min-max spread (bench/_harness.py).

Saves compare like with like: durable (our save_file: temp file, fsync,
rename, fsync of the folder) against the library's save_file followed by an
fsync of the file and of the folder; plain (our save_file(durable=False):
temp file and rename, no fsync) against the library's save_file.  Loads are timed three ways: "load"
alone (a memory-mapped loader reads nothing yet), "load + touch" (one byte
per page of every tensor), and "load + copy" into preallocated torch
parameters (param.copy_ per tensor), the cost a training script pays.  Peak
resident memory of a full load (every page touched) is VmHWM of a fresh
subprocess for each loader.  Files live in /tmp and are deleted at the end.
"""
import argparse
import os
import sys
import tempfile
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import safetensors.numpy as stn  # noqa: E402
import safetensors.torch as stt  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

import _harness as H  # noqa: E402
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


def touch(d):
    """Reads one byte per 4 KiB page of every tensor."""
    s = 0
    for a in d.values():
        if isinstance(a, torch.Tensor):
            if a.numel():
                s += int(a.reshape(-1).view(torch.uint8)[::4096].sum())
        elif a.nbytes:
            s += int(a.reshape(-1).view(np.uint8)[::4096].sum())
    return s


def copy_into(params, d):
    """param.copy_(tensor) for every tensor: what load_state_dict does."""
    for k, a in d.items():
        params[k].copy_(a if isinstance(a, torch.Tensor) else torch.from_numpy(a))


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_open_all(p):
    with safe_open(p, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


LOADERS = {
    "mlutils load_file (np, mmap)": ("from mlutils import _safetensors as S", "S.load_file(p)"),
    "mlutils load_file (pt, mmap)": ("from mlutils import _safetensors as S", "S.load_file(p, framework='pt')"),
    "safetensors.numpy.load_file": ("import safetensors.numpy as stn", "stn.load_file(p)"),
    "safetensors.torch.load_file": ("import safetensors.torch as stt", "stt.load_file(p)"),
    "safetensors safe_open(pt) + get_tensor each": (
        "from safetensors import safe_open\n"
        "def so(p):\n"
        "    with safe_open(p, framework='pt') as f:\n"
        "        return {k: f.get_tensor(k) for k in f.keys()}", "so(p)"),
}

PEAK = r"""
import sys
sys.path.insert(0, sys.argv[3])
from bench_safetensors import touch  # numpy and torch with it, in the baseline too
{imports}
p = sys.argv[1]
if sys.argv[2] == "load":
    touch({expr})
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*not writable.*")

    sd = make_state_dict(args.mib)
    nbytes = sum(a.nbytes for a in sd.values())
    n_tensors = len(sd)
    tmp = tempfile.mkdtemp(prefix="mlu_bench_st_", dir="/tmp")
    ours_p, theirs_p = os.path.join(tmp, "ours.safetensors"), os.path.join(tmp, "theirs.safetensors")
    try:
        def ours_plain():
            S.save_file(sd, ours_p, durable=False)

        def theirs_durable():
            stn.save_file(sd, theirs_p)
            fsync_path(theirs_p)
            fsync_path(tmp)

        def fresh(name):
            for p in (ours_p, theirs_p):
                if os.path.exists(p):
                    os.remove(p)
            os.sync()  # earlier writes' writeback must not land in this timing

        save = H.interleaved([
            ("ours durable", lambda: S.save_file(sd, ours_p)),
            ("theirs durable", theirs_durable),
            ("ours plain", ours_plain),
            ("theirs plain", lambda: stn.save_file(sd, theirs_p)),
        ], args.repeat, before=fresh)
        S.save_file(sd, ours_p)
        stn.save_file(sd, theirs_p)
        with open(ours_p, "rb") as f, open(theirs_p, "rb") as g:
            identical = f.read() == g.read()
        size = os.path.getsize(ours_p)
        del sd

        fns = {
            "mlutils load_file (np, mmap)": lambda: S.load_file(ours_p),
            "mlutils load_file (pt, mmap)": lambda: S.load_file(ours_p, framework="pt"),
            "safetensors.numpy.load_file": lambda: stn.load_file(ours_p),
            "safetensors.torch.load_file": lambda: stt.load_file(ours_p),
            "safetensors safe_open(pt) + get_tensor each": lambda: safe_open_all(ours_p),
        }
        params = {k: torch.empty_like(v) for k, v in stt.load_file(ours_p).items()}  # the "model"
        touch(S.load_file(ours_p))  # page cache warm
        cases = []
        for name, fn in fns.items():
            cases.append((name + "|load", fn))
            cases.append((name + "|touch", lambda fn=fn: touch(fn())))
            cases.append((name + "|copy", lambda fn=fn: copy_into(params, fn())))
        load = H.interleaved(cases, args.repeat)
        del params
        base = H.peak_rss(PEAK.format(imports="", expr="None"), [ours_p, "base", HERE])
        peaks = {name: H.peak_rss(PEAK.format(imports=imp, expr=expr), [ours_p, "load", HERE])
                 for name, (imp, expr) in LOADERS.items()}
    finally:
        for p in (ours_p, theirs_p):
            if os.path.exists(p):
                os.remove(p)
        os.rmdir(tmp)

    import safetensors

    title = (f"state dict: {n_tensors} tensors, {nbytes / 2**20:.0f} MiB; file {size / 2**20:.0f} MiB; "
             f"safetensors {safetensors.__version__}, torch {torch.__version__} (1 thread); "
             f"outputs byte-identical: {identical}")
    rows = [
        ("save, durable (fsync of file and folder)", "mlutils save_file", H.cell(save["ours durable"]),
         "safetensors save_file + fsync", H.cell(save["theirs durable"]),
         H.ratio(save["theirs durable"], save["ours durable"])),
        ("save, plain (no fsync)", "mlutils save_file(durable=False)", H.cell(save["ours plain"]),
         "safetensors save_file", H.cell(save["theirs plain"]),
         H.ratio(save["theirs plain"], save["ours plain"])),
    ]
    H.table(["save", "mlutils", "time", "peer", "time", "peer / mlutils"], rows, title, repeat=args.repeat)

    ref = "safetensors.torch.load_file"
    rows = []
    for name in fns:
        rows.append((name, H.cell(load[name + "|load"]), H.cell(load[name + "|touch"]),
                     H.cell(load[name + "|copy"]),
                     H.ratio(load[ref + "|copy"], load[name + "|copy"]),
                     f"{peaks[name] / 2**20:.0f} MiB ({(peaks[name] - base) / size:.2f}x file over interpreter)"))
    H.table(["loader", "load", "load + touch every page", "load + copy into params", f"copy row: {ref} / this",
             "peak RSS, load + touch (subprocess VmHWM)"], rows,
            f"interpreter with numpy + torch imported: {base / 2**20:.0f} MiB", repeat=None)


if __name__ == "__main__":
    main()
