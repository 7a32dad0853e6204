"""mlutils' NCCL Communicator against torch.distributed's NCCL, on NVIDIA GPUs.

Run on a GPU machine:
    python3 bench/distributed_gpu.py                               # one GPU, one rank
    torchrun --nproc-per-node 8 bench/distributed_gpu.py           # every GPU of a node
Exits 0 with a message when there is no GPU, no torch or no NCCL.

1. correctness: every collective (all_reduce sum/prod/min/max/avg, broadcast,
   all_gather, reduce_scatter, send/recv) on several dtypes equals what
   torch.distributed's NCCL computes on the same inputs;
2. all_reduce latency, 8 B to 64 KiB (float32), ours and torch's, same run;
3. all_reduce bus bandwidth, 1 MiB to 1 GiB: busbw = bytes / time * 2(n-1)/n
   (n = 1 has no traffic: algbw = bytes / time is printed too);
4. one all_reduce captured in a CUDA graph and replayed, result checked.
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

LAT_SIZES = [8, 64, 512, 4096, 32768, 65536]
BW_SIZES = [1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30]


def _setup():
    """(torch, dist, D, comm) or None with the reason printed."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        print("torch is not installed: nothing to measure")
        return None
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return None
    import mlutils
    from mlutils import distributed as D

    if not mlutils.cuda_available():
        print(f"mlutils has no CUDA ({mlutils.cuda_status()}): nothing to measure")
        return None
    try:
        path, version = D.nccl_library()
    except D.NcclUnavailableError as e:
        print(f"NCCL unavailable: {e}")
        return None
    D.fix_unset_envs()
    D.init_distributed(timeout=300)
    if not D.distributed_initialized():  # one process without MASTER_ADDR: make a group of 1
        raise SystemExit("init_distributed made no process group")
    comm = D.Communicator.from_process_group()  # blocking, as torch's NCCL is by default
    if D.is_global_leader():
        print(f"NCCL {path} (version code {version}); {D.world_size()} rank(s); "
              f"GPU {torch.cuda.get_device_name()}")
    return torch, dist, D, comm


def _torch_op(dist, name):
    return {"sum": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT, "min": dist.ReduceOp.MIN,
            "max": dist.ReduceOp.MAX, "avg": dist.ReduceOp.AVG}[name]


def check_correctness(torch, dist, D, comm):
    """Returns the number of checks; raises AssertionError on the first mismatch."""
    rank, world = comm.rank, comm.size
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device="cpu").manual_seed(1234 + rank)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64,
              torch.uint8, torch.int8]
    from mlutils import _core

    fp8 = [t for t in (torch.float8_e4m3fn, torch.float8_e5m2)
           if _core.nccl_dtype_supported(D.NCCL_DTYPES[str(t).replace("torch.", "")])]
    checks = 0

    def rand(n, dtype):
        if dtype.is_floating_point:
            x = torch.rand(n, generator=g) * 2 + 0.5  # positive: prod stays finite
        else:
            x = torch.randint(1, 3, (n,), generator=g)
        return x.to(dtype).to(dev)

    for dtype in dtypes + fp8:
        ops = ["sum", "max", "min"] if dtype in fp8 else ["sum", "prod", "max", "min"]
        if dtype.is_floating_point and dtype not in fp8:
            ops.append("avg")
        for op in ops:
            x = rand(1031, dtype)
            ours = x.clone()
            comm.all_reduce(ours, op=op)
            if dtype in fp8:  # torch's NCCL may lack fp8: compare in float32 after the round trip
                ref = x.float()
                dist.all_reduce(ref, op=_torch_op(dist, op))
                torch.cuda.synchronize()
                assert torch.allclose(ours.float(), ref.to(dtype).float(), rtol=0.25), (dtype, op)
            else:
                ref = x.clone()
                dist.all_reduce(ref, op=_torch_op(dist, op))
                torch.cuda.synchronize()
                if dtype.is_floating_point and op in ("sum", "prod", "avg") and world > 2:
                    # another communicator may pick another algorithm: rounding may differ
                    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
                    assert torch.allclose(ours.float(), ref.float(), rtol=tol), (dtype, op)
                else:
                    assert torch.equal(ours, ref), (dtype, op)
            checks += 1
        # broadcast from the last rank
        x = rand(517, dtype)
        ours, ref = x.clone(), x.clone()
        comm.broadcast(ours, src=world - 1)
        if dtype not in fp8:
            dist.broadcast(ref, src=world - 1)
            torch.cuda.synchronize()
            assert torch.equal(ours, ref), (dtype, "broadcast")
        checks += 1
        # all_gather and reduce_scatter
        x = rand(257, dtype)
        out = torch.empty(257 * world, dtype=dtype, device=dev)
        comm.all_gather(out, x)
        if dtype not in fp8:
            ref = torch.empty_like(out)
            dist.all_gather_into_tensor(ref, x)
            torch.cuda.synchronize()
            assert torch.equal(out, ref), (dtype, "all_gather")
            big = rand(64 * world, dtype)
            mine = torch.empty(64, dtype=dtype, device=dev)
            comm.reduce_scatter(mine, big)
            theirs = torch.empty_like(mine)
            dist.reduce_scatter_tensor(theirs, big)
            torch.cuda.synchronize()
            assert torch.equal(mine, theirs), (dtype, "reduce_scatter")
            checks += 1
        checks += 1
    # send/recv around a ring (to itself when alone)
    x = rand(100, torch.float32) + rank
    got = torch.empty_like(x)
    comm.group_start()
    comm.send(x, (rank + 1) % world)
    comm.recv(got, (rank - 1) % world)
    comm.group_end()
    expect = [None] * world
    dist.all_gather_object(expect, x.cpu())
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), expect[(rank - 1) % world]), "send/recv"
    checks += 1
    # raw pointers: the handle on a buffer torch owns
    x = torch.full((16,), rank + 1.0, device=dev)
    comm.handle.all_reduce(x.data_ptr(), x.data_ptr(), 16, D.NCCL_DTYPES["float32"], D.NCCL_OPS["sum"],
                           torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.all(x == world * (world + 1) / 2), "raw pointer all_reduce"
    checks += 1
    return checks


def _time(torch, fn, iters, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters  # seconds per call


def latency_rows(torch, dist, comm):
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for nbytes in LAT_SIZES:
        x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=dev)
        ours = _time(torch, lambda: comm.all_reduce(x), 200)
        theirs = _time(torch, lambda: dist.all_reduce(x), 200)
        rows.append((nbytes, ours, theirs))
    return rows


def bandwidth_rows(torch, dist, comm):
    dev = torch.device("cuda", torch.cuda.current_device())
    free, _total = torch.cuda.mem_get_info()
    n = comm.size
    factor = 2 * (n - 1) / n
    rows = []
    for nbytes in BW_SIZES:
        if nbytes * 2 > free * 0.8:
            break
        x = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
        iters = 20 if nbytes <= (64 << 20) else 5
        ours = _time(torch, lambda: comm.all_reduce(x), iters, warmup=2)
        theirs = _time(torch, lambda: dist.all_reduce(x), iters, warmup=2)
        rows.append((nbytes, ours, theirs, nbytes / ours * factor, nbytes / theirs * factor,
                     nbytes / ours, nbytes / theirs))
        del x
    return rows


def graph_check(torch, comm):
    """One out-of-place all_reduce captured in a CUDA graph and replayed.

    Out of place, with `out` reset to a sentinel before each replay, so that a
    graph that captured nothing is caught even with one rank (where an
    in-place sum leaves its input as it was)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    n, rank = comm.size, comm.rank
    x = torch.zeros(1024, dtype=torch.float32, device=dev)
    y = torch.zeros_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside capture on the capture stream
        comm.all_reduce(x, out=y)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        comm.all_reduce(x, out=y)
    results = []
    for value in (1.0, 2.5):
        x.fill_(value * (rank + 1))
        y.fill_(-1.0)
        graph.replay()
        torch.cuda.synchronize()
        expect = value * n * (n + 1) / 2
        results.append(bool(torch.all(y == expect)))
    t = _time(torch, graph.replay, 200)
    return all(results), t


def _fmt_bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} B"


def main() -> int:
    ready = _setup()
    if ready is None:
        return 0
    torch, dist, D, comm = ready
    leader = D.is_global_leader()
    checks = check_correctness(torch, dist, D, comm)
    if leader:
        print(f"correctness: {checks} collectives equal torch.distributed's NCCL results")
    lat = latency_rows(torch, dist, comm)
    bw = bandwidth_rows(torch, dist, comm)
    graph_ok, graph_t = graph_check(torch, comm)
    if leader:
        print(f"\nall_reduce latency (float32, {comm.size} rank(s)); ratio = torch / mlutils")
        print("| size | mlutils | torch.distributed | ratio |")
        print("| --- | --- | --- | --- |")
        for nbytes, ours, theirs in lat:
            print(f"| {_fmt_bytes(nbytes)} | {ours * 1e6:.1f} us | {theirs * 1e6:.1f} us | {theirs / ours:.2f}x |")
        print(f"\nall_reduce bandwidth; busbw = bytes/time * 2(n-1)/n, n = {comm.size}")
        print("| size | mlutils busbw | torch busbw | mlutils algbw | torch algbw |")
        print("| --- | --- | --- | --- | --- |")
        for nbytes, ours, theirs, bus_o, bus_t, alg_o, alg_t in bw:
            print(f"| {_fmt_bytes(nbytes)} | {bus_o / 1e9:.1f} GB/s | {bus_t / 1e9:.1f} GB/s | "
                  f"{alg_o / 1e9:.1f} GB/s | {alg_t / 1e9:.1f} GB/s |")
        print(f"\nCUDA graph: one captured all_reduce replayed: results {'correct' if graph_ok else 'WRONG'}, "
              f"{graph_t * 1e6:.1f} us per replay")
    comm.destroy()
    D.cleanup_distributed()
    return 0 if graph_ok else 1


if __name__ == "__main__":
    sys.exit(main())
