"""Benchmark of mlutils.pattern against tests/ref_pattern.py, the reference written out from its documented behaviour.

Run: python3 bench/bench_pattern.py   (prints a markdown table of ratios measured in this run)
"""
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))  # ref_pattern
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import ref_pattern as R  # noqa: E402
from mlutils import pattern as P  # noqa: E402

K = 8


def time_construction(make, T, repeat):
    """Median time of a pattern construction: get_pattern(T + i) on one provider, each a cache miss."""
    provider = make()
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        provider.get_pattern(T + i)
        times.append(time.perf_counter() - t0)
    del provider
    gc.collect()
    return statistics.median(times)


def timeit(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fmt(sec):
    if sec >= 1:
        return f"{sec:.2f} s"
    if sec >= 1e-3:
        return f"{sec * 1e3:.2f} ms"
    return f"{sec * 1e6:.1f} µs"


def construction_rows():
    providers = [
        ("Delayed", lambda m: m.DelayedPatternProvider(K) if m is P else R.RefDelayed(K)),
        ("Parallel", lambda m: m.ParallelPatternProvider(K) if m is P else R.RefParallel(K)),
        ("Unrolled", lambda m: m.UnrolledPatternProvider(K) if m is P else R.RefUnrolled(K)),
        ("CoarseFirst", lambda m: m.CoarseFirstPattern(K) if m is P else R.RefCoarseFirst(K)),
        ("MusicLM", lambda m: m.MusicLMPattern(K) if m is P else R.RefMusicLM(K)),
    ]
    rows = []
    for T in (1500, 100000):
        for name, make in providers:
            ref_rep = 5 if T == 1500 else 1
            ref = time_construction(lambda: make(R), T, ref_rep)
            ours = time_construction(lambda: make(P), T, 200 if T == 1500 else 9)
            rows.append((f"construct {name}, K={K}, T={T}", ref, ours))
    return rows


def gather_rows():
    B, T = 16, 1500
    z = torch.randint(0, 2048, (B, K, T), dtype=torch.int64)
    rows = []
    for name, make_ref, make_ours in [
        ("Delayed", lambda: R.RefDelayed(K).get_pattern(T), lambda: P.DelayedPatternProvider(K).get_pattern(T)),
        ("Unrolled", lambda: R.RefUnrolled(K).get_pattern(T), lambda: P.UnrolledPatternProvider(K).get_pattern(T)),
    ]:
        def first(make):
            def run():
                p = make()
                t0 = time.perf_counter()
                s = p.build_pattern_sequence(z, 2048)[0]
                p.revert_pattern_sequence(s, 2048)
                return time.perf_counter() - t0
            return statistics.median(run() for _ in range(5 if name == "Delayed" else 3))

        rows.append((f"build+revert {name} [16,8,1500] int64, first call (tables built)",
                     first(make_ref), first(make_ours)))
        pr, po = make_ref(), make_ours()

        def steady(p):
            s = p.build_pattern_sequence(z, 2048)[0]
            p.revert_pattern_sequence(s, 2048)
        steady(pr)
        steady(po)
        rows.append((f"build+revert {name} [16,8,1500] int64, steady state (tables cached)",
                     timeit(lambda: steady(pr), 50), timeit(lambda: steady(po), 50)))
        logits = torch.randn(4, 64, K, pr.build_pattern_sequence(z, 0)[0].shape[-1])
        pr.revert_pattern_logits(logits, 0.0)
        po.revert_pattern_logits(logits, 0.0)
        rows.append((f"revert_pattern_logits {name} [4,64,8,S] float32, steady state",
                     timeit(lambda: pr.revert_pattern_logits(logits, 0.0), 20),
                     timeit(lambda: po.revert_pattern_logits(logits, 0.0), 20)))
    return rows


def main():
    torch.set_num_threads(1)
    rows = construction_rows() + gather_rows()
    print(f"torch {torch.__version__}, 1 thread; reference = tests/ref_pattern.py\n")
    print("| case | reference | mlutils | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for name, ref, ours in rows:
        print(f"| {name} | {fmt(ref)} | {fmt(ours)} | {ref / ours:.1f}x |")


if __name__ == "__main__":
    main()
