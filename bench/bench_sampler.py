"""Benchmark of mlutils.sampler against the original samplers and torch's, in one run.

Run: python3 bench/bench_sampler.py   (prints a markdown table of ratios)
"""
import json
import os
import pickle
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # seed_sampler: the original samplers

import seed_sampler  # noqa: E402
from mlutils.sampler import PoolSampler, RandomSampler  # noqa: E402

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None


def best(fn, repeat=3):
    t = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def consume(it):
    for _ in it:
        pass


rows = []


def row(what, peer, peer_s, ours, ours_s, unit="s"):
    ratio = peer_s / ours_s if ours_s else float("inf")
    rows.append((what, peer, f"{peer_s:.4g} {unit}", ours, f"{ours_s:.4g} {unit}", f"{ratio:,.1f}x"))


def pool_epoch(n=10**5):
    random.seed(0)
    ref = seed_sampler.PoolSampler(list(range(n)))
    t_ref = best(lambda: [ref.sample() for _ in range(n)], repeat=1)

    def ours_sample():
        p = PoolSampler(range(n), seed=1)
        s = p.sample
        for _ in range(n):
            s()

    row(f"PoolSampler, epoch of 1e5 draws, sample() loop", "original (list remove)", t_ref,
        "mlutils sample()", best(ours_sample))
    row(f"PoolSampler, epoch of 1e5 draws, iteration", "original (list remove)", t_ref,
        "mlutils iter", best(lambda: consume(PoolSampler(range(n), seed=1))))
    row(f"PoolSampler, epoch of 1e5 draws, take", "original (list remove)", t_ref,
        "mlutils take(n)", best(lambda: PoolSampler(range(n), seed=1).take(n)))


def random_iter(n=10**6):
    ours = best(lambda: consume(RandomSampler(n, seed=1)))
    if torch is not None:
        ts = torch.utils.data.RandomSampler(range(n))
        row("RandomSampler, iterate 1e6 from Python", "torch RandomSampler", best(lambda: consume(ts)),
            "mlutils iter", ours)
        ds = torch.utils.data.DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True)
        row("RandomSampler, iterate 1e6 from Python", "torch DistributedSampler", best(lambda: consume(ds)),
            "mlutils iter", ours)
    ref = seed_sampler.RandomSampler(n)
    consume(ref)  # the next iter() draws a new permutation, as every epoch does
    row("RandomSampler, iterate 1e6 from Python", "original (perm[pos])", best(lambda: consume(ref), repeat=1),
        "mlutils iter", ours)


def take_rate(n=10**7):
    t = best(lambda: RandomSampler(n, seed=1).take(n), repeat=7)
    if torch is not None:
        g = torch.Generator().manual_seed(0)
        row("RandomSampler, 1e7 indices as an array", "torch.randperm", best(lambda: torch.randperm(n, generator=g)),
            "mlutils take(1e7)", t)
    rows.append(("take(1e7) rate", "", "", "mlutils", f"{n / t / 1e8:.2f}e8 indices/s", ""))


def state_size():
    n = 10**6
    ref = seed_sampler.RandomSampler(n)
    ref_bytes = len(pickle.dumps(ref.get_state()))
    ours = len(json.dumps(RandomSampler(10**9, seed=1).state_dict()).encode())
    # the original keeps the whole permutation: its state grows linearly with n
    row("state size at n = 1e9", "original (pickled, 1e6 measured x 1000)", ref_bytes * 1000,
        "mlutils (JSON)", ours, unit="B")


PEAK_RSS = r"""
from mlutils.sampler import RandomSampler


def hwm_kib():
    # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's across exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


base = hwm_kib()
s = RandomSampler(10**9, seed=3)
total = 0
while True:
    a = s.take(1 << 20)
    if len(a) == 0:
        break
    total += len(a)
assert total == 10**9, total
print(base, hwm_kib())
"""


def peak_rss():
    env = dict(os.environ, MLUTILS_NO_TORCH="1", PYTHONPATH=os.path.dirname(HERE))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK_RSS], capture_output=True, text=True, env=env, check=True)
    dt = time.perf_counter() - t0
    base, peak = (int(x) for x in out.stdout.split())
    rows.append(("RandomSampler(1e9), full take loop in 2^20 chunks", "original: randperm(1e9) int64",
                 "8000 MB (computed)", "mlutils peak RSS (whole process)",
                 f"{peak / 1024:.1f} MiB (+{(peak - base) / 1024:.1f} MiB over import, {dt:.1f} s)",
                 f"{8000 / (peak / 1024):,.0f}x"))


def main():
    pool_epoch()
    random_iter()
    take_rate()
    state_size()
    peak_rss()
    print("| case | peer | peer | mlutils | mlutils | ratio (peer / mlutils) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
