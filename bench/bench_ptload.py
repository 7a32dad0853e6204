"""Benchmark: mlutils' .pt loader against torch.load(weights_only=True).

Writes a ~1 GiB state dict (a few hundred tensors, mixed sizes and dtypes)
with torch.save to /tmp, times each loader in this process (median of
--repeat interleaved repeats with min-max spread, page cache warm) three ways:
the load alone, load + touch one byte of every page, and load + copy into a
preallocated torch model's parameters (load_state_dict), the cost a training
script pays.  The peak RSS of each full load is VmHWM of a fresh subprocess.
Prints markdown tables and deletes the file.

    python3 bench/bench_ptload.py [--gib 1.0] [--repeat 5]
"""
import argparse
import collections
import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import _harness as H  # noqa: E402
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
from mlutils import _ptload
p = sys.argv[1]
obj = {expr}
# touch every tensor byte, so a lazy (mmap) load is measured fully loaded too
n = 0
for v in obj.values():
    if isinstance(v, torch.Tensor):
        n += int(v.reshape(-1).view(torch.uint8)[::4096].sum())
    else:
        n += int(v.reshape(-1).view('u1')[::4096].sum())
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


class Model(torch.nn.Module):
    """A module whose parameters have the state dict's names, shapes and dtypes (preallocated)."""

    def __init__(self, sd):
        super().__init__()
        self.params = torch.nn.ParameterDict(
            {k.replace(".", "_"): torch.nn.Parameter(torch.empty_like(v), requires_grad=False)
             for k, v in sd.items()})
        self.names = {k: k.replace(".", "_") for k in sd}

    def load(self, obj):
        sd = {"params." + self.names[k]: as_torch(v, self.params[self.names[k]]) for k, v in obj.items()}
        self.load_state_dict(sd, strict=True)


def as_torch(v, like):
    """A torch view of a loaded tensor (numpy bfloat16 has no torch dtype: viewed through its bytes)."""
    if isinstance(v, torch.Tensor):
        return v
    if v.dtype.kind in "biufc":
        return torch.from_numpy(v)
    return torch.from_numpy(v.reshape(-1).view(np.uint8)).view(like.dtype).reshape(like.shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore", message=".*not writable.*")
    fd, p = tempfile.mkstemp(suffix=".pt", dir="/tmp")
    os.close(fd)
    try:
        sd = make_state_dict(int(args.gib * (1 << 30)))
        n_tensors = len(sd)
        torch.save(sd, p)
        model = Model(sd)
        del sd
        size = os.path.getsize(p)
        touch(torch.load(p, weights_only=True, mmap=True))  # page cache warm
        cases = []
        for name, expr in LOADERS.items():
            def fn(expr=expr):
                return eval(expr, {"torch": torch, "_ptload": _ptload, "p": p})
            cases.append((name + "|load", fn))
            cases.append((name + "|touch", lambda fn=fn: touch(fn())))
            cases.append((name + "|copy", lambda fn=fn: model.load(fn())))
        times = H.interleaved(cases, args.repeat)
        del model
        base = H.peak_rss("import sys, torch\nfrom mlutils import _ptload", [p])
        peaks = {name: H.peak_rss(RSS_SCRIPT.format(expr=expr), [p]) for name, expr in LOADERS.items()}
    finally:
        os.unlink(p)
    ref = "torch.load(weights_only=True, mmap=True)"
    rows = []
    for name in LOADERS:
        rows.append((name, H.cell(times[name + "|load"]), H.cell(times[name + "|touch"]),
                     H.cell(times[name + "|copy"]), H.ratio(times[ref + "|copy"], times[name + "|copy"]),
                     f"{peaks[name] / (1 << 30):.2f} GiB ({(peaks[name] - base) / size:.2f}x file over interpreter)"))
    H.table(["loader", "load", "load + touch every page", "load + copy into model (load_state_dict)",
             "copy row: torch.load(mmap=True) / this", "peak RSS, load + touch (subprocess VmHWM)"], rows,
            f"file: {size / (1 << 30):.2f} GiB, {n_tensors} tensors (float32/bfloat16/float16/int64), "
            f"torch {torch.__version__} (1 thread); interpreter with torch: {base / (1 << 20):.0f} MiB",
            repeat=args.repeat)


if __name__ == "__main__":
    main()
