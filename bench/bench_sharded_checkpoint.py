"""Sharded checkpoints of an FSDP2 model (torch.distributed.checkpoint under mlutils.train) against DCP itself.

Run: python3 bench/bench_sharded_checkpoint.py [--ranks 2,4] [--mib 512] [--rounds 3]
Launches ``python -m torch.distributed.run --nproc-per-node N`` (gloo, CPU) for each N.  The model is a
stack of Linear(4096, 4096) layers with at least --mib MiB of fp32 parameters, each layer and the whole
sharded with ``fully_shard``, trained by AdamW (its state made by a first step: the checkpoint holds
about 3x the parameters).  Each round, in rotating order, every way saves the state once and the
training goes on for one step (forward, backward, optimizer step):

* ``mlutils``: ``Checkpointer.save`` of ``mlutils.train`` with a ``TorchEngine`` (background save: the
  rank files follow ``dcp.async_save``'s write, the step waits for the staged copy before its optimizer
  step);
* ``dcp.save``: the blocking save (``get_state_dict`` + ``dcp.save``);
* ``dcp.async_save``: the strongest peer, ``get_state_dict`` + ``dcp.async_save`` with a kept
  ``DefaultStager`` staging in a background thread and a gloo group of its own, the step waiting for
  ``staging_completion`` just before its optimizer step (the same place mlutils waits).

stall: what the training thread loses to the save (the save call, plus the wait before the optimizer
step for the two background ways); until complete: from the call until the checkpoint is complete on
disk, the training step overlapped (the background ways only).
Resume: loading the newest checkpoint into the model and optimizer (mlutils: reading the rank file,
the DCP folder and the engine's state; peer: ``get_state_dict`` + ``dcp.load`` + ``set_state_dict``),
rounds interleaved.  Bytes: the files of one mlutils step folder against one copy of the state (every
parameter and optimizer tensor, full size).  Every figure is rank 0's, median (min-max) over rounds;
ratio = peer / mlutils (above 1: mlutils is better), except the bytes row (mlutils / one copy).
"""
import argparse
import json
import os
import sys
import tempfile
import textwrap

WORKER = textwrap.dedent("""
    import json, os, shutil, sys, time
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    import mlutils.distributed as D
    from mlutils.train import TorchEngine
    from mlutils.train.checkpoint import CHECKPOINT_FORMAT, Checkpointer, rng_state, set_rng_state
    from mlutils.train.engine import Engines

    out, mib, rounds, tmp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    d = 4096
    layers = -(-mib * 2 ** 20 // (d * d * 4))
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(2, d)
    loss_fn = lambda m, b: m(b).square().mean()
    engine = TorchEngine(model, opt, loss_fn)
    engines = Engines(engine)
    engine.train_step(x)  # the optimizer's state exists from here on

    waits = []
    settle = engine._settle
    def timed_settle():
        t = time.perf_counter()
        settle()
        waits.append(time.perf_counter() - t)
    engine._settle = timed_settle

    ours_dir = os.path.join(tmp, "mlutils")
    ckpt = Checkpointer(ours_dir, keep_last=1, async_save=True, dist=D)
    peer_group = dist.new_group(backend="gloo")
    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                          use_async_staging=True, use_non_blocking_copy=False))

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x).backward()

    def rank_state(step):
        return {"format": CHECKPOINT_FORMAT, "step": step, "rank": rank, "world_size": world,
                "engines": engines.state_dict(rank == 0), "sampler": None, "rng": rng_state(),
                "loop": {"epoch": 0, "batches_in_epoch": step, "events": []}}

    step = 1
    saved = []
    def save_ours(r):
        global step
        step += 1
        t0 = time.perf_counter()
        ckpt.save(step, rank_state(step), sync=False, files=engines.save_files)
        call = time.perf_counter() - t0
        del waits[:]
        if r == rounds - 1:  # what the last save holds: a resume must give it back exactly
            saved[:] = [p.to_local().clone() for p in model.parameters()]
        engine.train_step(x)  # forward, backward, the wait for the staged copy, optimizer step
        stall = call + sum(waits)
        ckpt.saver.wait()
        return stall, time.perf_counter() - t0

    def save_sync(r):
        folder = os.path.join(tmp, "sync", str(r))
        t0 = time.perf_counter()
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=folder)
        stall = time.perf_counter() - t0
        fwd_bwd()
        opt.step()
        return stall, stall

    def save_async(r):
        folder = os.path.join(tmp, "async", str(r))
        t0 = time.perf_counter()
        msd, osd = get_state_dict(model, opt)
        resp = dcp.async_save({"model": msd, "optimizer": osd}, checkpoint_id=folder, process_group=peer_group,
                              async_stager=stager)
        call = time.perf_counter() - t0
        fwd_bwd()
        t1 = time.perf_counter()
        resp.staging_completion.result()
        wait = time.perf_counter() - t1
        opt.step()
        resp.upload_completion.result()
        return call + wait, time.perf_counter() - t0

    ways = [("mlutils", save_ours), ("dcp.save", save_sync), ("dcp.async_save", save_async)]
    res = {name: {"stall": [], "write": []} for name, _ in ways}
    for r in range(-1, rounds):  # round -1: a warm-up (groups, staging buffers, files made once), not counted
        order = ways[r % 3:] + ways[:r % 3]
        for name, fn in order:
            dist.barrier()
            stall, write = fn(r)
            if r >= 0:
                res[name]["stall"].append(stall)
                res[name]["write"].append(write)
        dist.barrier()
        if rank == 0:  # the peers' folders of the round before: disk space
            for sub in ("sync", "async"):
                shutil.rmtree(os.path.join(tmp, sub, str(r - 1)), ignore_errors=True)

    # resume: the newest checkpoint of each way, loaded in turn
    ours_folder = ckpt.last_folder
    peer_folder = os.path.join(tmp, "sync", str(rounds - 1))
    def load_ours():
        t0 = time.perf_counter()
        state, _ = ckpt.read(ours_folder)
        engines.load_files(ours_folder)
        engines.load_state_dict(state["engines"])
        set_rng_state(state["rng"])
        return time.perf_counter() - t0
    def load_peer():
        t0 = time.perf_counter()
        msd, osd = get_state_dict(model, opt)
        dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=peer_folder)
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
        return time.perf_counter() - t0
    res["resume mlutils"], res["resume dcp.load"] = [], []
    for r in range(rounds):
        for name, fn in ((("resume mlutils", load_ours), ("resume dcp.load", load_peer))[::1 if r % 2 == 0 else -1]):
            dist.barrier()
            res[name].append(fn())
    load_ours()
    exact = all(torch.equal(a, p.to_local()) for a, p in zip(saved, model.parameters()))

    msd, osd = get_state_dict(model, opt)
    one_copy = 0
    for sd in (msd, osd["state"]):
        stack = [sd]
        while stack:
            v = stack.pop()
            if isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, torch.Tensor):
                one_copy += v.numel() * v.element_size()  # a DTensor's numel is the full one
    files = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(ours_folder) for f in fs)
    stager.close()
    engine.quit()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"res": res, "one_copy": one_copy, "files": files, "layers": layers,
                       "params": sum(p.numel() for p in model.parameters()), "loaded_exact": exact}, f)
    dist.barrier()
    dist.destroy_process_group()
""")


def run(n, mib, rounds, tmp):
    import _harness as H

    script = os.path.join(tmp, "worker.py")
    with open(script, "w") as f:
        f.write(WORKER)
    out = os.path.join(tmp, f"res{n}.json")
    H.torchrun(script, n, [out, mib, rounds, os.path.join(tmp, f"ck{n}")])
    with open(out) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--mib", type=int, default=512, help="MiB of fp32 parameters (at least)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary folder under /tmp)")
    args = ap.parse_args()
    if args.rounds < 1 or args.mib < 1:
        ap.error("--rounds and --mib must be at least 1")
    ranks = [int(x) for x in args.ranks.split(",")]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _harness as H

    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in ranks:
            results[n] = run(n, args.mib, args.rounds, tmp)
    first = results[ranks[0]]
    title = (f"FSDP2, {first['layers']} x Linear(4096, 4096): {first['params'] * 4 / 2 ** 20:.0f} MiB of fp32 "
          f"parameters + AdamW state = {first['one_copy'] / 2 ** 20:.0f} MiB; gloo, {os.cpu_count()} CPU core(s); "
          f"rank 0's median (min-max) over {args.rounds} rounds; ratio = peer / mlutils")
    rows = []
    for n in ranks:
        r = results[n]["res"]
        ours = r["mlutils"]
        for peer in ("dcp.save", "dcp.async_save"):
            rows.append([f"{n} ranks: save stall vs {peer}", H.cell(ours["stall"]), H.cell(r[peer]["stall"]),
                         H.ratio(r[peer]["stall"], ours["stall"])])
        rows.append([f"{n} ranks: save until complete (a step overlapped) vs dcp.async_save", H.cell(ours["write"]),
                     H.cell(r["dcp.async_save"]["write"]), H.ratio(r["dcp.async_save"]["write"], ours["write"])])
        rows.append([f"{n} ranks: resume vs dcp.load", H.cell(r["resume mlutils"]), H.cell(r["resume dcp.load"]),
                     H.ratio(r["resume dcp.load"], r["resume mlutils"])])
        rows.append([f"{n} ranks: bytes on disk vs one copy of the state", f"{results[n]['files'] / 2 ** 20:.1f} MiB",
                     f"{results[n]['one_copy'] / 2 ** 20:.1f} MiB",
                     f"{results[n]['files'] / results[n]['one_copy']:.3f}x"])
        if not results[n]["loaded_exact"]:
            sys.exit(f"{n} ranks: the resumed weights differ from the saved ones")
    H.table(["case", "mlutils", "peer", "ratio"], rows, title=title, path=args.dir or "/tmp")


if __name__ == "__main__":
    main()
