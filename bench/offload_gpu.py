"""GPU check of mlutils.offload, in one run: correctness, then speed.

    python bench/offload_gpu.py                    # hidden 4096, seq 4096, 16 layers, bf16
    python bench/offload_gpu.py --hidden 2048 --seq 2048 --layers 8   # a smaller GPU

1. Correctness: gradients of offload_checkpoint and offload_saved_tensors
   equal those without offload (bf16 tolerance); the compression kernels
   agree with the CPU engine's rounding; the pinned pool is reused and
   neither pinned nor device memory grows over --check-steps steps.
2. Bandwidth: offload (device->pinned) and reload (pinned->device) of
   --copy-mib against a plain pinned copy (tensor.copy_ into a pinned tensor,
   non_blocking), target >= 90%.
3. Step time and peak GPU memory of a stack of transformer-like blocks seven
   ways: no checkpointing, torch checkpoint(use_reentrant=False), our
   offload_checkpoint, the same with nothing offloaded (min_bytes above every
   tensor: the cost of the checkpoint and its hooks alone),
   save_on_cpu(pin_memory=True), our offload_saved_tensors (which prefetches
   the next saved tensor in backward) and the same with prefetch=0 (each
   reload on demand, as save_on_cpu does: its peak memory).  The ways run interleaved (one sample of each per
   round, --rounds rounds of --steps steps; median and spread), so that clock
   and thermal drift hit them alike.  Peak memory is measured over one step
   from an emptied cache, both allocated and reserved: memory freed while a
   copy stream still reads it counts as reserved, not allocated.

Exits 0 with "no GPU" when there is none (or mlutils was built without CUDA).
`--device cpu` runs the whole script on CPU tensors through the CPU engine,
with small sizes, as a dry run of its logic (tests/test_offload_bench.py
does): its times say nothing of the GPU, and it has no memory figures.
"""
import argparse
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="steps per timed sample")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one sample of every way each)")
    p.add_argument("--ways", default="", help="comma-separated subset of: " + ", ".join(WAYS))
    p.add_argument("--check-steps", type=int, default=100, help="steps of the memory-growth check")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth test tensor")
    p.add_argument("--min-bytes", type=int, default=1 << 20)
    p.add_argument("--skip-speed", action="store_true", help="correctness only")
    p.add_argument("--skip-correctness", action="store_true", help="speed only")
    p.add_argument("--peaks", choices=["process", "inline"], default="process",
                   help="measure each way's peak memory in a fresh process (default) or in this one")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a dry run of the script's logic on CPU tensors (no GPU figures)")
    p.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)  # the child of --peaks process
    args = p.parse_args(argv)
    unknown = [w for w in args.ways.split(",") if w and w not in WAYS]
    if unknown:
        p.error(f"--ways: unknown {', '.join(unknown)} (known: {', '.join(WAYS)})")
    return args


def no_gpu_reason():
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    import mlutils

    if not mlutils.cuda_available():
        return mlutils.cuda_status()
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


class Dev:
    """The device calls of the script, for a CUDA device or (dry run) the CPU,
    which has no memory statistics: those read None there."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def allocated(self):
        return self.torch.cuda.memory_allocated(self.device) if self.cuda else None

    def reset_peaks(self):
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self, base):
        """(peak allocated, peak reserved) above `base`."""
        if not self.cuda:
            return None, None
        t = self.torch.cuda
        return t.max_memory_allocated(self.device) - base, t.max_memory_reserved(self.device) - base


def gib(n):
    return "n/a" if n is None else f"{n / 2 ** 30:.2f}"


def make_block(torch, hidden, heads, dtype, device):
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
            self.qkv, self.o = nn.Linear(hidden, 3 * hidden, bias=False), nn.Linear(hidden, hidden, bias=False)
            self.up, self.down = nn.Linear(hidden, 4 * hidden, bias=False), nn.Linear(4 * hidden, hidden, bias=False)

        def forward(self, x):
            b, s, h = x.shape
            q, k, v = self.qkv(self.n1(x)).view(b, s, 3, heads, h // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, s, h))
            return x + self.down(F.gelu(self.up(self.n2(x))))

    return Block().to(device=device, dtype=dtype)


def run_stack(torch, blocks, x, way, min_bytes):
    from torch.utils.checkpoint import checkpoint

    from mlutils import offload

    h = x
    if way == "none":
        for b in blocks:
            h = b(h)
    elif way == "torch_checkpoint":
        for b in blocks:
            h = checkpoint(b, h, use_reentrant=False)
    elif way == "offload_checkpoint":
        for b in blocks:
            h = offload.offload_checkpoint(b, h)
    elif way == "offload_checkpoint_kept":
        # the same autograd function with nothing offloaded: its cost without the copies
        for b in blocks:
            h = offload.offload_checkpoint(b, h, min_bytes=1 << 62)
    elif way == "save_on_cpu":
        with torch.autograd.graph.save_on_cpu(pin_memory=x.device.type == "cuda"):
            for b in blocks:
                h = b(h)
    elif way in ("offload_saved_tensors", "offload_saved_tensors_noprefetch"):
        with offload.offload_saved_tensors(min_bytes=min_bytes, prefetch=0 if way.endswith("noprefetch") else 1):
            for b in blocks:
                h = b(h)
    else:
        raise ValueError(way)
    loss = h.float().pow(2).mean()
    loss.backward()
    return h.detach()


WAYS = ["none", "torch_checkpoint", "offload_checkpoint", "offload_checkpoint_kept", "save_on_cpu",
        "offload_saved_tensors", "offload_saved_tensors_noprefetch"]


def check_correctness(torch, args, D):
    from mlutils import offload

    dev = D.device
    ok = True
    torch.manual_seed(0)
    hidden, seq = min(args.hidden, 1024), min(args.seq, 512)
    blocks = torch.nn.ModuleList([make_block(torch, hidden, 8, torch.bfloat16, dev) for _ in range(4)])
    x0 = torch.randn(args.batch, seq, hidden, device=dev, dtype=torch.bfloat16)
    grads = {}
    for way in ("none", "offload_checkpoint", "offload_saved_tensors"):
        blocks.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        run_stack(torch, blocks, x, way, 0)
        grads[way] = [x.grad.float()] + [p.grad.float() for p in blocks.parameters()]
    for way in ("offload_checkpoint", "offload_saved_tensors"):
        worst = max(((g - r).abs().max() / (r.abs().max() + 1e-12)).item()
                    for g, r in zip(grads[way], grads["none"]))
        good = worst < 2e-2
        ok &= good
        print(f"gradients {way:<22} max error / max |grad| = {worst:.2e}  {'ok' if good else 'FAIL'}")

    # compression kernels against the CPU engine's rounding (same formulas)
    for dtype, comp in ((torch.float32, "bf16"), (torch.float16, "fp8"), (torch.bfloat16, "fp8")):
        t = (torch.randn(1 << 20, device=dev) * 7).to(dtype)
        g = offload.get_engine(dev).offload(t, compress=comp).reload()
        c = offload.OffloadEngine("cpu").offload(t.cpu(), compress=comp).reload()
        diff = (g.cpu().float() - c.float()).abs().max().item()
        err = offload.compression_error(t.cpu(), comp)
        good = diff <= (0 if comp == "bf16" else 1e-2 * t.float().abs().max().item())
        ok &= good
        print(f"compress {str(dtype):<15} {comp}: {dev.type} vs CPU engine max diff {diff:.2e}, "
              f"rms rel error {err['rms_rel']:.2e}  {'ok' if good else 'FAIL'}")

    # fp8 with non-finite values: the scale comes from the finite ones, and
    # infinities and NaN come back as NaN (e4m3 has no infinity), as on the CPU
    for dtype in (torch.float16, torch.bfloat16):
        t = (torch.randn(1 << 16, device=dev) * 7).to(dtype)
        t[::97], t[1::97], t[2::97] = float("inf"), float("-inf"), float("nan")
        g = offload.get_engine(dev).offload(t, compress="fp8").reload().cpu().float()
        c = offload.OffloadEngine("cpu").offload(t.cpu(), compress="fp8").reload().float()
        bad = ~torch.isfinite(t.cpu().float())
        nan_ok = torch.equal(torch.isnan(g), bad) and torch.equal(torch.isnan(c), bad)
        diff = (g[~bad] - c[~bad]).abs().max().item()
        good = nan_ok and diff <= 1e-2 * t.cpu().float()[~bad].abs().max().item()
        ok &= good
        print(f"compress {str(dtype):<15} fp8 with inf/nan: non-finite -> NaN {'yes' if nan_ok else 'NO'}, "
              f"{dev.type} vs CPU engine max diff {diff:.2e}  {'ok' if good else 'FAIL'}")

    # a bf16 tensor so small that 448 / amax overflows: scale 1, zeros stay zeros
    t = torch.zeros(1 << 16, device=dev, dtype=torch.bfloat16)
    t[::7] = 1e-39
    g = offload.get_engine(dev).offload(t, compress="fp8").reload().cpu()
    c = offload.OffloadEngine("cpu").offload(t.cpu(), compress="fp8").reload()
    good = bool(torch.isfinite(g).all()) and torch.equal(g, c)
    ok &= good
    print(f"compress torch.bfloat16  fp8 of a tensor of max 1e-39: finite and equal to the CPU engine's  "
          f"{'ok' if good else 'FAIL'}")

    # stream ordering: the copy sees the kernel that made its source, the source's
    # memory is not handed out again before the copy read it, and a reload is
    # complete for the kernels queued after it
    eng = offload.get_engine(dev)
    worst = 0.0
    n = 4096 if D.cuda else 256
    for _ in range(20):
        a = torch.randn(n, n, device=dev)
        x = a @ a
        h = eng.offload(x)
        ref = x.clone()
        del x
        junk = torch.full((n, n), 7.0, device=dev)  # likely the freed block of x
        back = h.reload()
        worst = max(worst, (back - ref).abs().max().item())
        del junk, h
    good = worst == 0.0
    ok &= good
    print(f"stream ordering over 20 offload/reload rounds: max diff {worst}  {'ok' if good else 'FAIL'}")

    # pool reuse, no growth of pinned or device memory over check_steps steps
    pinned, device_mem = [], []
    for step in range(args.check_steps):
        blocks.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        run_stack(torch, blocks, x, "offload_checkpoint" if step % 2 else "offload_saved_tensors", 0)
        del x
        D.sync()
        s = eng.stats()
        pinned.append(s["reserved"])
        device_mem.append(D.allocated())
    s = eng.stats()
    good = pinned[-1] == pinned[1] and device_mem[-1] == device_mem[1] and s["reuses"] > s["allocs"]
    ok &= good
    mib = lambda n: "n/a" if n is None else n >> 20  # noqa: E731
    print(f"{args.check_steps} steps: host pool {mib(pinned[1])} -> {mib(pinned[-1])} MiB, device "
          f"{mib(device_mem[1])} -> {mib(device_mem[-1])} MiB, allocs {s['allocs']}, reuses {s['reuses']}, "
          f"live handles {s.get('handles', 'n/a')}, in use {s['in_use']} B  {'ok' if good else 'FAIL'}")
    return ok


def timed(D, fn, reps):
    fn()
    D.sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    D.sync()
    return (time.perf_counter() - t0) / reps


def bandwidth(torch, args, D):
    from mlutils import offload

    dev = D.device
    n = args.copy_mib << 20
    x = torch.randn(n // 2, device=dev, dtype=torch.bfloat16)
    pinned = torch.empty(x.shape, dtype=x.dtype, pin_memory=D.cuda)
    back = torch.empty_like(x)
    eng = offload.get_engine(dev)
    t_ref_d2h = timed(D, lambda: pinned.copy_(x, non_blocking=True), 10)
    t_ref_h2d = timed(D, lambda: back.copy_(pinned, non_blocking=True), 10)
    last = []

    def ours_d2h():
        # the previous copy is done: its pinned buffer goes back to the pool and is reused
        while last:
            last.pop().release()
        h = eng.offload(x)
        if eng._cuda is not None:  # the CPU engine's copy is done when offload returns
            eng._cuda.sync(h.key)
        last.append(h)

    allocs0 = eng.stats()["allocs"]
    t_d2h = timed(D, ours_d2h, 10)
    h = last[-1]
    t_h2d = timed(D, lambda: h.reload(), 10)
    allocs = eng.stats()["allocs"] - allocs0
    h.release()
    print(f"host pool: {allocs} new allocation(s) for 11 offloads of the same size")
    rows = []
    for what, ours, ref in (("offload (D2H)", t_d2h, t_ref_d2h), ("reload (H2D)", t_h2d, t_ref_h2d)):
        rows.append((what, n / ours / 1e9, n / ref / 1e9, ref / ours))
    print(f"\n{'copy of %d MiB' % args.copy_mib:<16} {'ours GB/s':>10} {'pinned copy_ GB/s':>18} {'ratio':>7}")
    for what, a, b, r in rows:
        print(f"{what:<16} {a:>10.1f} {b:>18.1f} {r:>6.0%}{'' if r >= 0.9 else '  (target 90%)'}")


def peak_of(torch, args, D, way, blocks=None, x0=None):
    """(peak allocated, peak reserved) of one step of `way`, each above what
    was allocated before the step (parameters, gradients, input), or None when
    it runs out of memory.  Allocated misses memory that was freed while a
    copy stream still reads it; reserved counts it.  (None, None) on the CPU."""
    dev = D.device
    if blocks is None:
        torch.manual_seed(0)
        blocks = torch.nn.ModuleList([make_block(torch, args.hidden, args.heads, torch.bfloat16, dev)
                                      for _ in range(args.layers)])
        x0 = torch.randn(args.batch, args.seq, args.hidden, device=dev, dtype=torch.bfloat16)
    try:
        for _ in range(2):
            blocks.zero_grad(set_to_none=False)
            run_stack(torch, blocks, x0.clone().requires_grad_(True), way, args.min_bytes)
        D.sync()
        D.reset_peaks()
        blocks.zero_grad(set_to_none=False)
        x = x0.clone().requires_grad_(True)
        base = D.allocated()
        run_stack(torch, blocks, x, way, args.min_bytes)
        D.sync()
        return D.peaks(base)
    except torch.cuda.OutOfMemoryError:
        D.reset_peaks()
        return None


def peak_in_process(args, way):
    """peak_of in a fresh process, so that no other way's cached segments count."""
    import json
    import subprocess

    cmd = [sys.executable, __file__, "--peak-of", way, "--hidden", str(args.hidden), "--seq", str(args.seq),
           "--layers", str(args.layers), "--batch", str(args.batch), "--heads", str(args.heads),
           "--min-bytes", str(args.min_bytes), "--device", args.device]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        print(f"peak of {way}: failed ({r.returncode}): {r.stderr[-500:]}")
        return None
    got = json.loads(lines[-1])
    return None if got is None else tuple(got)


def speed(torch, args, D):
    """Step time (interleaved rounds, median and spread) and peak GPU memory, each way."""
    dev = D.device
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    import _harness as H

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([make_block(torch, args.hidden, args.heads, torch.bfloat16, dev)
                                  for _ in range(args.layers)])
    x0 = torch.randn(args.batch, args.seq, args.hidden, device=dev, dtype=torch.bfloat16)

    def step(way):
        blocks.zero_grad(set_to_none=False)
        x = x0.clone().requires_grad_(True)
        run_stack(torch, blocks, x, way, args.min_bytes)

    ways = [w for w in WAYS if w in args.ways.split(",")] if args.ways else WAYS
    peaks, dead = {}, set()
    for way in ways:
        peak = peak_in_process(args, way) if args.peaks == "process" else peak_of(torch, args, D, way, blocks, x0)
        if peak is None:
            dead.add(way)
        else:
            peaks[way] = peak

    def timed_steps(way):
        def run():
            D.sync()
            for _ in range(args.steps):
                step(way)
            D.sync()
        return run

    cases = [(w, timed_steps(w)) for w in ways if w not in dead]
    for _, fn in cases:  # warm-up
        fn()
    times = H.interleaved(cases, repeat=args.rounds)
    times = {w: [t / args.steps for t in ts] for w, ts in times.items()}
    print(f"\n{args.layers} blocks, hidden {args.hidden}, seq {args.seq}, batch {args.batch}, bf16, {dev.type}; "
          f"median of {args.rounds} interleaved rounds of {args.steps} steps")
    print("peak GiB: the highest allocated / reserved during one step above what was allocated before it, "
          "each way in a fresh process" if args.peaks == "process" else "peak GiB: in this process")
    print(f"{'way':<33} {'step ms':>9} {'spread ms':>14} {'peak alloc GiB':>15} {'peak reserved GiB':>18} "
          f"{'vs torch ckpt':>14}")
    ref = H.median(times["torch_checkpoint"]) if "torch_checkpoint" in times else float("nan")
    for way in ways:
        if way in dead:
            print(f"{way:<33} {'out of memory':>9}")
            continue
        ts = times[way]
        t = H.median(ts)
        pa, pr = peaks[way]
        print(f"{way:<33} {t * 1e3:>9.1f} {min(ts) * 1e3:>6.1f}-{max(ts) * 1e3:<7.1f} {gib(pa):>15} "
              f"{gib(pr):>18} {t / ref:>13.3f}x")
    med = {w: H.median(ts) for w, ts in times.items()}
    if {"offload_checkpoint", "torch_checkpoint"} <= med.keys():
        o, c = "offload_checkpoint", "torch_checkpoint"
        print(f"\noffload_checkpoint vs torch checkpoint: {med[o] / med[c] - 1:+.1%} time (target <= +5%), "
              f"peak allocated {gib(peaks[o][0])} vs {gib(peaks[c][0])} GiB, "
              f"reserved {gib(peaks[o][1])} vs {gib(peaks[c][1])} GiB")
    for o in ("offload_saved_tensors", "offload_saved_tensors_noprefetch"):
        c = "save_on_cpu"
        if {o, c} <= med.keys():
            print(f"{o} vs save_on_cpu: {med[o] / med[c]:.2f}x time (target < 1), "
                  f"peak allocated {gib(peaks[o][0])} vs {gib(peaks[c][0])} GiB, "
                  f"reserved {gib(peaks[o][1])} vs {gib(peaks[c][1])} GiB")


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda":
        reason = no_gpu_reason()
        if reason is not None:
            print(f"no GPU: {reason}; nothing to check")
            return 0
    import torch

    if args.device == "cuda":
        D = Dev(torch, torch.device("cuda", torch.cuda.current_device()))
    else:
        D = Dev(torch, torch.device("cpu"))
    if args.peak_of:
        import json

        print(json.dumps(peak_of(torch, args, D, args.peak_of)))
        return 0
    print(f"device: {torch.cuda.get_device_name(D.device)}" if D.cuda
          else "device: cpu (a dry run of the script: no GPU figures)")
    ok = True if args.skip_correctness else check_correctness(torch, args, D)
    if not args.skip_speed:
        bandwidth(torch, args, D)
        speed(torch, args, D)
    print("\ncorrectness:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
