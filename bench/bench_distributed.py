"""Latency of the collectives the training loop uses (gloo on loopback, CPU).

Run: python3 bench/bench_distributed.py [--ranks 1,2,4] [--iters 300]
Launches `python -m torch.distributed.run --nproc-per-node N` for each N and
reports, per call (median and 90th percentile over --iters calls):
  broadcast_object(a stdin command) against torch's broadcast_object_list,
  any_rank(flag) against a one-int all_reduce(MAX) in torch,
  barrier(), and the 128-byte NCCL unique-id exchange (broadcast_object of bytes).
ratio = torch time / mlutils time (above 1: mlutils is faster).
"""
import argparse
import json
import os
import sys
import tempfile
import textwrap

WORKER = textwrap.dedent("""
    import json, os, statistics, sys, time
    import torch
    import torch.distributed as dist
    import mlutils.distributed as D

    iters = int(sys.argv[2])
    D.fix_unset_envs()
    D.init_distributed(timeout=120)
    rank = D.global_rank()
    command = {"cmd": "save", "args": ["checkpoints/step_1000"], "step": 1000}
    uid = os.urandom(128)

    def measure(fn):
        for _ in range(20):
            fn()
        D.barrier()
        out = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        out.sort()
        return statistics.median(out), out[int(len(out) * 0.9)]

    def torch_bcast():
        box = [command if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)

    def torch_any():
        t = torch.tensor([0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    res = {
        "broadcast_object": measure(lambda: D.broadcast_object(command if rank == 0 else None)),
        "torch broadcast_object_list": measure(torch_bcast),
        "any_rank": measure(lambda: D.any_rank(False)),
        "torch all_reduce(MAX)": measure(torch_any),
        "barrier": measure(D.barrier),
        "unique-id exchange (128 B)": measure(lambda: D.broadcast_object(uid if rank == 0 else None)),
    }
    D.cleanup_distributed()
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f)
""")


def run(n, iters, tmp):
    import _harness as H

    script = os.path.join(tmp, "worker.py")
    with open(script, "w") as f:
        f.write(WORKER)
    out = os.path.join(tmp, f"res{n}.json")
    H.torchrun(script, n, [out, iters], timeout=600)
    with open(out) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _harness as H

    print(H.machine())
    print(f"gloo on loopback, {os.cpu_count()} CPU core(s); median (p90) per call; "
          "ratio = torch / mlutils")
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: run(n, args.iters, tmp) for n in ranks}
    print("| operation | " + " | ".join(f"{n} process(es)" for n in ranks) + " |")
    print("| --- |" + " --- |" * len(ranks))
    names = list(results[ranks[0]])
    for name in names:
        cells = []
        for n in ranks:
            med, p90 = results[n][name]
            cell = f"{med * 1e6:.0f} us ({p90 * 1e6:.0f})"
            peer = {"broadcast_object": "torch broadcast_object_list", "any_rank": "torch all_reduce(MAX)"}.get(name)
            if peer:
                cell += f", {results[n][peer][0] / med:.2f}x"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
