"""Benchmark of mlutils.pattern against reference/ref_pattern.py, the reference written out from its documented behaviour.

Run: python3 bench/bench_pattern.py [--repeat 5] [--quick]   (markdown table of ratios measured in this run)

Construction is timed twice for mlutils: get_pattern(T) alone (the layout
list is built only when asked for) and get_pattern(T).layout (materialised
like the reference's, which always builds it).  Every figure is the median of
--repeat interleaved repeats with its min-max spread (bench/_harness.py);
--quick skips T = 100000.
"""
import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # mlutils, reference/

import _harness as H  # noqa: E402
from reference import ref_pattern as R  # noqa: E402
from mlutils import pattern as P  # noqa: E402

K = 8


_fresh = itertools.count()


def construct(make, T, layout=False):
    """One construction on a cache miss: a fresh provider asked for a length it has not seen."""
    def run():
        p = make().get_pattern(T + next(_fresh) % 7)
        if layout:
            p.layout
    return run


def construction_rows(repeat, quick):
    providers = [
        ("Delayed", lambda m: m.DelayedPatternProvider(K) if m is P else R.RefDelayed(K)),
        ("Parallel", lambda m: m.ParallelPatternProvider(K) if m is P else R.RefParallel(K)),
        ("Unrolled", lambda m: m.UnrolledPatternProvider(K) if m is P else R.RefUnrolled(K)),
        ("CoarseFirst", lambda m: m.CoarseFirstPattern(K) if m is P else R.RefCoarseFirst(K)),
        ("MusicLM", lambda m: m.MusicLMPattern(K) if m is P else R.RefMusicLM(K)),
    ]
    rows = []
    for T in (1500,) if quick else (1500, 100000):
        for name, make in providers:
            t = H.interleaved([("ref", construct(lambda: make(R), T)),
                               ("ours", construct(lambda: make(P), T)),
                               ("ours+layout", construct(lambda: make(P), T, layout=True))], repeat)
            rows.append((f"construct {name}, K={K}, T={T}", t["ref"], t["ours"]))
            rows.append((f"construct {name}, K={K}, T={T}, with `layout` materialised", t["ref"], t["ours+layout"]))
    return rows


def gather_rows(repeat):
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
            return [run() for _ in range(repeat)]

        rows.append((f"build+revert {name} [16,8,1500] int64, first call (tables built)",
                     first(make_ref), first(make_ours)))
        pr, po = make_ref(), make_ours()

        def steady(p):
            s = p.build_pattern_sequence(z, 2048)[0]
            p.revert_pattern_sequence(s, 2048)
        steady(pr)
        steady(po)
        t = H.interleaved([("ref", lambda: steady(pr)), ("ours", lambda: steady(po))], max(repeat, 20))
        rows.append((f"build+revert {name} [16,8,1500] int64, steady state (tables cached)", t["ref"], t["ours"]))
        logits = torch.randn(4, 64, K, pr.build_pattern_sequence(z, 0)[0].shape[-1])
        pr.revert_pattern_logits(logits, 0.0)
        po.revert_pattern_logits(logits, 0.0)
        t = H.interleaved([("ref", lambda: pr.revert_pattern_logits(logits, 0.0)),
                           ("ours", lambda: po.revert_pattern_logits(logits, 0.0))], max(repeat, 10))
        rows.append((f"revert_pattern_logits {name} [4,64,8,S] float32, steady state", t["ref"], t["ours"]))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="skip the T = 100000 constructions")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = construction_rows(args.repeat, args.quick) + gather_rows(args.repeat)
    H.table(["case", "reference", "mlutils", "speed-up"],
            [(name, H.cell(ref), H.cell(ours), H.ratio(ref, ours)) for name, ref, ours in rows],
            f"torch {torch.__version__}, 1 thread; reference = reference/ref_pattern.py", repeat=args.repeat)


if __name__ == "__main__":
    main()
