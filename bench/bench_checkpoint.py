"""Benchmark: how long a training step stalls for a checkpoint (mlutils.train async vs sync vs torch.save + fsync).

Run: python3 bench/bench_checkpoint.py [--mib 1024] [--repeat 5]
     (or MLUTILS_BENCH_CKPT_MIB=256 for a quick run)

The state is a model of float32 linear layers of about `--mib` MiB with a
plain SGD optimizer (no extra state).  Each repeat times, interleaved:

* ``async``: ``mlutils.train``'s save as the loop does it with
  ``async_save=True``: the step waits for a host copy of the state only (the
  write, fsync and rotation run in the background; their time is reported
  apart and waited for before the next method runs);
* ``sync``: the loop's synchronous save (atomic ``torch_save``: temp file,
  fsync, rename, fsync of the folder);
* ``torch.save``: ``torch.save`` into a file, then ``fsync``.

Prints a markdown table: median of the repeats with min-max, and each stall
as a share of torch.save's.  Files go to a temporary folder (``--dir``),
deleted at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mlutils.train as mt  # noqa: E402  (this checkout's build)
from mlutils.train.loop import _Loop  # noqa: E402


def make_model(mib: int) -> torch.nn.Module:
    """Linear layers of 1024x1024 float32 (4 MiB each) adding up to about `mib` MiB."""
    torch.manual_seed(0)
    n = max(mib // 4, 1)
    return torch.nn.Sequential(*(torch.nn.Linear(1024, 1024, bias=False) for _ in range(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=int(os.environ.get("MLUTILS_BENCH_CKPT_MIB", "1024")))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args()

    model = make_model(args.mib)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = mt.TorchEngine(model, opt, lambda m, b: m(b).sum())
    root = tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    loops = {}
    for name, use_async in (("async", True), ("sync", False)):
        cfg = mt.TrainConfig(checkpoint_dir=os.path.join(root, name), keep_last=1, async_save=use_async,
                             read_commands=False, progress=False, metrics_stdout=False)
        loops[name] = _Loop([], mt.Engines(engine), None, cfg)
    times: dict = {"async": [], "sync": [], "torch.save": [], "async (background write)": []}
    try:
        for rep in range(args.repeat):
            for name in ("async", "sync", "torch.save"):
                if name == "torch.save":
                    path = os.path.join(root, f"torch-{rep}.pt")
                    t0 = time.perf_counter()
                    with open(path, "wb") as f:
                        torch.save(engine.state_dict(), f)
                        f.flush()
                        os.fsync(f.fileno())
                    times[name].append(time.perf_counter() - t0)
                    os.remove(path)
                    continue
                loop = loops[name]
                loop.step = rep + 1
                t0 = time.perf_counter()
                loop.save(sync=(name == "sync"))
                times[name].append(time.perf_counter() - t0)
                if name == "async":
                    loop.ckpt.saver.wait()
                    times["async (background write)"].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ref = statistics.median(times["torch.save"])
    print(f"checkpoint of {size / 2**20:.0f} MiB ({sum(1 for _ in model.parameters())} tensors), "
          f"{args.repeat} interleaved repeats, torch {torch.__version__}\n")
    print("| method | step stall, median (min-max) | vs torch.save |")
    print("| --- | --- | --- |")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.0f} ms ({min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f}) | {med / ref:.0%} |")
    share = statistics.median(times["async"]) / ref
    print(f"\nasync stall / torch.save: {share:.0%} (target: at most 20%)")


if __name__ == "__main__":
    main()
