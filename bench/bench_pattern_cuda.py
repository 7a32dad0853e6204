"""The CUDA gather of mlutils.pattern: checked against the CPU result on random
inputs, then timed against the reference's torch indexing on the same GPU.

Run: python3 bench/bench_pattern_cuda.py   (exits 0 with a message when there is no GPU)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # mlutils, reference/


def main() -> int:
    try:
        import torch
    except ImportError:
        print("torch is not installed: nothing to measure")
        return 0
    import mlutils
    from mlutils import pattern as P

    if not mlutils.cuda_available():
        print(f"no CUDA for mlutils ({mlutils.cuda_status()}): nothing to measure")
        return 0
    if not torch.cuda.is_available():
        print("torch sees no CUDA device: nothing to measure")
        return 0
    from reference import ref_pattern as R

    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(0)
    providers = [(P.DelayedPatternProvider(8), R.RefDelayed(8)),
                 (P.UnrolledPatternProvider(8, [0, 1, 1, 2, 2, 2, 3, 3], [0, 1, 1, 2, 2, 2, 3, 3]),
                  R.RefUnrolled(8, [0, 1, 1, 2, 2, 2, 3, 3], [0, 1, 1, 2, 2, 2, 3, 3])),
                 (P.CoarseFirstPattern(8), R.RefCoarseFirst(8)), (P.MusicLMPattern(8), R.RefMusicLM(8))]
    checked = 0
    for ours, _ in providers:
        for T in (1, 17, 250):
            p = ours.get_pattern(T)
            for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.float16, torch.bfloat16,
                          torch.float32, torch.float64, torch.complex128):
                for valid in (False, True):
                    z = (torch.randint(0, 100, (3, 8, T), generator=g)).to(dtype)
                    cpu = p.build_pattern_sequence(z, 7, valid)
                    gpu = p.build_pattern_sequence(z.to(dev), 7, valid)
                    assert gpu[0].device == dev and gpu[0].dtype == cpu[0].dtype
                    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
                    assert torch.equal(gpu[2].cpu(), cpu[2])
                    S = cpu[0].shape[-1]
                    if S == 0:
                        continue
                    s = torch.randint(0, 100, (3, 8, S), generator=g).to(dtype)
                    a = p.revert_pattern_sequence(s, 5, valid)
                    b = p.revert_pattern_sequence(s.to(dev), 5, valid)
                    assert torch.equal(b[0].cpu(), a[0])
                    lg = torch.randn(2, 3, 8, S, generator=g).to(dtype)
                    a = p.revert_pattern_logits(lg, 0, valid)
                    b = p.revert_pattern_logits(lg.to(dev), 0, valid)
                    assert torch.equal(b[0].cpu(), a[0])
                    checked += 3
    # non-default stream: the launcher runs on torch's current stream
    side = torch.cuda.Stream()
    p = P.DelayedPatternProvider(8).get_pattern(1500)
    z = torch.randint(0, 2048, (16, 8, 1500), device=dev)
    with torch.cuda.stream(side):
        v = p.build_pattern_sequence(z, 2048)[0]
    side.synchronize()
    assert torch.equal(v.cpu(), p.build_pattern_sequence(z.cpu(), 2048)[0])
    print(f"{checked} CUDA results equal to the CPU ones\n")

    def cuda_time(fn, repeat=50):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeat * 1e3  # µs

    import _harness as H

    print(H.machine())
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}\n")
    print("| case | torch indexing (reference) | mlutils kernel | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for name, ours, theirs in [("Delayed", P.DelayedPatternProvider(8), R.RefDelayed(8)),
                               ("Unrolled", P.UnrolledPatternProvider(8), R.RefUnrolled(8))]:
        po, pr = ours.get_pattern(1500), theirs.get_pattern(1500)
        z = torch.randint(0, 2048, (16, 8, 1500), device=dev)

        def run(p):
            s = p.build_pattern_sequence(z, 2048)[0]
            p.revert_pattern_sequence(s, 2048)
        a, b = cuda_time(lambda: run(pr)), cuda_time(lambda: run(po))
        print(f"| build+revert {name} [16,8,1500] int64 | {a:.1f} µs | {b:.1f} µs | {a / b:.2f}x |")
        S = po.build_pattern_sequence(z, 0)[0].shape[-1]
        lg = torch.randn(4, 2048, 8, S, device=dev, dtype=torch.bfloat16)
        a = cuda_time(lambda: pr.revert_pattern_logits(lg, 0.0), 20)
        b = cuda_time(lambda: po.revert_pattern_logits(lg, 0.0), 20)
        print(f"| revert_pattern_logits {name} [4,2048,8,S] bf16 | {a:.1f} µs | {b:.1f} µs | {a / b:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
