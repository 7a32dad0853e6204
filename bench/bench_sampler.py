"""Benchmark of mlutils.sampler against the original samplers, torch's and numpy's, in one run.

Run: python3 bench/bench_sampler.py [--repeat 5] [--items 1000000]

Peers: the original samplers (reference/seed_sampler.py; the pool's list.remove
is quadratic), the fair O(n) ways to draw a permutation (numpy's and torch's),
torch's RandomSampler / DistributedSampler, and an end-to-end epoch of a torch
DataLoader (workers 0 and 2, batch_size 256) over a tensor dataset.  Every
time is the median of --repeat interleaved repeats with its min-max spread
(the quadratic original runs once).  Peak RSS rows are VmHWM of a fresh
subprocess.  Prints markdown tables.
"""
import argparse
import json
import os
import pickle
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository: mlutils built in place, reference/

import numpy as np  # noqa: E402

import _harness as H  # noqa: E402
from reference import seed_sampler  # noqa: E402  (the original samplers)
from mlutils.sampler import IndexedTensorDataset, PoolSampler, RandomSampler, collate_batch  # noqa: E402

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None


def consume(it):
    for _ in it:
        pass


rows = []


def row(case, peer, peer_t, ours, ours_t):
    rows.append((case, peer, H.cell(peer_t), ours, H.cell(ours_t), H.ratio(peer_t, ours_t)))


def pool_epoch(repeat, n=10**5):
    random.seed(0)
    ref = seed_sampler.PoolSampler(list(range(n)))
    t_ref = H.interleaved([("ref", lambda: [ref.sample() for _ in range(n)])], 1)["ref"]

    def ours_sample():
        p = PoolSampler(range(n), seed=1)
        s = p.sample
        for _ in range(n):
            s()

    rng = np.random.default_rng(0)
    cases = [("sample", ours_sample),
             ("iter", lambda: consume(PoolSampler(range(n), seed=1))),
             ("take", lambda: PoolSampler(range(n), seed=1).take(n)),
             ("np", lambda: rng.permutation(n)),
             ("np_iter", lambda: consume(rng.permutation(n).tolist()))]
    if torch is not None:
        g = torch.Generator().manual_seed(0)
        cases.append(("randperm", lambda: torch.randperm(n, generator=g)))
        cases.append(("randperm_iter", lambda: consume(torch.randperm(n, generator=g).tolist())))
    t = H.interleaved(cases, repeat)
    what = "PoolSampler, epoch of 1e5 draws"
    row(what, "original (list remove, 1 run)", t_ref, "mlutils sample() loop", t["sample"])
    row(what, "original (list remove, 1 run)", t_ref, "mlutils iter", t["iter"])
    row(what, "original (list remove, 1 run)", t_ref, "mlutils take(n)", t["take"])
    row(what, "np default_rng.permutation(n).tolist(), iterated", t["np_iter"], "mlutils iter", t["iter"])
    row(what, "np default_rng.permutation(n)", t["np"], "mlutils take(n)", t["take"])
    if torch is not None:
        row(what, "torch.randperm(n).tolist(), iterated", t["randperm_iter"], "mlutils iter", t["iter"])
        row(what, "torch.randperm(n)", t["randperm"], "mlutils take(n)", t["take"])


def random_iter(repeat, n=10**6):
    ref = seed_sampler.RandomSampler(n)
    consume(ref)  # the next iter() draws a new permutation, as every epoch does
    cases = [("ours", lambda: consume(RandomSampler(n, seed=1))), ("orig", lambda: consume(ref))]
    if torch is not None:
        ts = torch.utils.data.RandomSampler(range(n))
        ds = torch.utils.data.DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True)
        cases += [("trs", lambda: consume(ts)), ("tds", lambda: consume(ds))]
    t = H.interleaved(cases, repeat)
    what = "RandomSampler, iterate 1e6 from Python"
    if torch is not None:
        row(what, "torch RandomSampler", t["trs"], "mlutils iter", t["ours"])
        row(what, "torch DistributedSampler", t["tds"], "mlutils iter", t["ours"])
    row(what, "original (perm[pos])", t["orig"], "mlutils iter", t["ours"])


def take_rate(repeat, n=10**7):
    rng = np.random.default_rng(0)
    cases = [("ours", lambda: RandomSampler(n, seed=1).take(n)), ("np", lambda: rng.permutation(n))]
    if torch is not None:
        g = torch.Generator().manual_seed(0)
        cases.append(("randperm", lambda: torch.randperm(n, generator=g)))
    t = H.interleaved(cases, repeat)
    what = "RandomSampler, 1e7 indices as an array"
    if torch is not None:
        row(what, "torch.randperm", t["randperm"], "mlutils take(1e7)", t["ours"])
    row(what, "np default_rng.permutation", t["np"], "mlutils take(1e7)", t["ours"])
    rows.append(("take(1e7) rate", "", "", "mlutils", f"{n / H.median(t['ours']) / 1e8:.2f}e8 indices/s", ""))


def state_size():
    n = 10**6
    ref_bytes = len(pickle.dumps(seed_sampler.RandomSampler(n).get_state()))
    ours = len(json.dumps(RandomSampler(10**9, seed=1).state_dict()).encode())
    # the original keeps the whole permutation: its state grows linearly with n
    rows.append(("state size at n = 1e9", "original (pickled state measured at 1e6, x 1000: linear in n)",
                 f"{ref_bytes * 1000:.3g} B", "mlutils (JSON)", f"{ours} B", f"{ref_bytes * 1000 / ours:,.0f}x"))


OURS_RSS = r"""
import sys
from mlutils.sampler import RandomSampler
n = int(sys.argv[1])
s = RandomSampler(n, seed=3)
total = 0
while True:
    a = s.take(1 << 20)
    if len(a) == 0:
        break
    total += len(a)
assert total == n, total
"""

PEER_RSS = r"""
import sys
import torch
n = int(sys.argv[1])
perm = torch.randperm(n)            # the original's RandomSampler holds this permutation
for i in range(0, n, 1 << 20):
    perm[i:i + (1 << 20)].numpy()
"""

BASE_RSS = "import sys\nimport {mod}\n"


def peak_rss(big=True):
    env = dict(os.environ, MLUTILS_NO_TORCH="1")
    mib = 2**20
    base_ours = H.peak_rss(BASE_RSS.format(mod="mlutils.sampler"), env=env)
    for n, label in ((10**8, "1e8"), (10**9, "1e9")) if big else ((10**6, "1e6"),):
        ours = H.peak_rss(OURS_RSS, [str(n)], env=env)
        if torch is not None and n <= 10**8:
            base_peer = H.peak_rss(BASE_RSS.format(mod="torch"))
            peer = H.peak_rss(PEER_RSS, [str(n)])
            rows.append((f"peak RSS, one epoch of {label} draws in 2^20 chunks", "original: torch.randperm(n) held",
                         f"{peer / mib:.0f} MiB (+{(peer - base_peer) / mib:.0f} over import)",
                         "mlutils RandomSampler take loop",
                         f"{ours / mib:.0f} MiB (+{(ours - base_ours) / mib:.0f} over import)",
                         f"{(peer - base_peer) / max(1, ours - base_ours):,.0f}x (over import)"))
        else:
            rows.append((f"peak RSS, one epoch of {label} draws in 2^20 chunks",
                         "original: torch.randperm(n) held (not run: 8 GB)", "",
                         "mlutils RandomSampler take loop",
                         f"{ours / mib:.0f} MiB (+{(ours - base_ours) / mib:.0f} over import)", ""))


def end_to_end(repeat, n):
    """One epoch of a DataLoader over n items of (16 float32, int64 label), batch_size 256."""
    from torch.utils.data import BatchSampler, DataLoader, TensorDataset
    from torch.utils.data import RandomSampler as TorchRandom

    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n)
    plain = TensorDataset(x, y)
    fast = IndexedTensorDataset(x, y)
    bs = 256
    e2e = []
    for workers in (0, 2):
        kw = dict(num_workers=workers, persistent_workers=False)

        def epoch(loader):
            def run():
                for _ in loader:
                    pass
            return run

        cases = [
            ("torch default", epoch(DataLoader(plain, batch_size=bs, shuffle=True, **kw))),
            ("mlutils sampler=", epoch(DataLoader(plain, batch_size=bs, sampler=RandomSampler(n, seed=1), **kw))),
            ("torch BatchSampler + getitems", epoch(DataLoader(
                fast, batch_sampler=BatchSampler(TorchRandom(range(n)), bs, False), collate_fn=collate_batch, **kw))),
            ("mlutils batches + getitems", epoch(DataLoader(
                fast, batch_sampler=RandomSampler(n, seed=1).batches(bs), collate_fn=collate_batch, **kw))),
        ]
        t = H.interleaved(cases, repeat)
        what = f"DataLoader epoch, {n:.0e} items, batch 256, workers {workers}"
        e2e.append((what, "torch shuffle=True, item fetch + default collate", t["torch default"],
                    "mlutils RandomSampler as sampler= (item fetch)", t["mlutils sampler="]))
        e2e.append((what, "torch BatchSampler(RandomSampler) + IndexedTensorDataset.__getitems__",
                    t["torch BatchSampler + getitems"],
                    "mlutils batches(256) + IndexedTensorDataset.__getitems__", t["mlutils batches + getitems"]))
        e2e.append((what, "torch shuffle=True, item fetch + default collate", t["torch default"],
                    "mlutils batches(256) + IndexedTensorDataset.__getitems__", t["mlutils batches + getitems"]))
    return e2e


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--items", type=int, default=10**6, help="items of the end-to-end DataLoader epoch")
    ap.add_argument("--e2e-repeat", type=int, default=None, help="repeats of the end-to-end rows (default: --repeat)")
    args = ap.parse_args()
    if torch is not None:
        torch.set_num_threads(1)
    pool_epoch(args.repeat)
    random_iter(args.repeat)
    take_rate(args.repeat)
    state_size()
    peak_rss()
    headers = ["case", "peer", "peer time", "mlutils", "mlutils time", "peer / mlutils"]
    H.table(headers, rows, "torch: 1 thread", repeat=args.repeat)
    if torch is not None:
        rep = args.e2e_repeat or args.repeat
        e2e = end_to_end(rep, args.items)
        H.table(headers, [(c, p, H.cell(pt), o, H.cell(ot), H.ratio(pt, ot)) for c, p, pt, o, ot in e2e],
                "end to end: one epoch each, loaders built once; tensors x (n, 16) float32, y (n,) int64",
                repeat=rep)


if __name__ == "__main__":
    main()
