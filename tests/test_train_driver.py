"""A small training script the mlutils.train tests run in subprocesses (nothing to collect here).

    python3 tests/test_train_driver.py --ckpt DIR --iterations N [--workers W] [--sleep S] ...

Prints the result of train() as one line ``RESULT {json}`` on stdout after
the metrics lines; with --announce-writes, each checkpoint file write is
announced on stderr as ``WRITING <path>`` just before it starts.
"""
import argparse
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--iterations", type=int, required=True)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--mp-context", default=None, help="the DataLoader's multiprocessing_context (with --workers)")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep in every step")
    ap.add_argument("--save-frequency", type=int, default=0)
    ap.add_argument("--eval-frequency", type=int, default=0)
    ap.add_argument("--keep-last", type=int, default=3)
    ap.add_argument("--sync", action="store_true", help="synchronous saves")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--big-mib", type=int, default=0, help="a buffer of this many MiB in the model")
    ap.add_argument("--announce-writes", action="store_true")
    ap.add_argument("--metrics-file", default=None)
    ap.add_argument("--items", type=int, default=203)
    args = ap.parse_args()

    import logging

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import mlutils.train as mt
    from mlutils.sampler import RandomSampler

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from mlutils import distributed

        distributed.init_distributed(timeout=60)
        sys.stderr.write(f"PID rank {rank} {os.getpid()}\n")
        sys.stderr.flush()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.items, 6, generator=g)
    y = (x[:, :3].sum(1, keepdim=True) > 0).float()
    ds = TensorDataset(x, y)
    sampler = RandomSampler(len(ds), seed=3)
    dl = DataLoader(ds, batch_size=8, sampler=sampler, drop_last=True, num_workers=args.workers,
                    multiprocessing_context=args.mp_context if args.workers else None)

    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.1), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    if args.big_mib:
        model.register_buffer("big", torch.zeros(args.big_mib * (1 << 18)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def loss_fn(m, batch):
        xb, yb = batch
        if args.sleep:
            time.sleep(args.sleep)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(xb), yb)
        return loss, {"noise": float(torch.rand(()))}  # consumes torch's RNG: resume must restore it

    def eval_fn(step, should_stop):
        model.eval()
        with torch.no_grad():
            total, n = 0.0, 0
            for i in range(0, len(ds), 50):
                if should_stop():
                    break
                xb, yb = ds[i:i + 50]
                total += float(torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb, reduction="sum"))
                n += len(xb)
                if args.sleep:
                    time.sleep(args.sleep)
        model.train()
        return {"loss": total / max(n, 1), "items": n}

    if args.announce_writes:
        from mlutils.train import checkpoint as ck

        real_save = ck.torch_save

        def announced(obj, path):
            sys.stderr.write(f"WRITING {path}\n")
            sys.stderr.flush()
            real_save(obj, path)

        ck.torch_save = announced

    cfg = mt.TrainConfig(iterations=args.iterations, save_frequency=args.save_frequency,
                         eval_frequency=args.eval_frequency, checkpoint_dir=args.ckpt, keep_last=args.keep_last,
                         resume=None if args.no_resume else "auto", async_save=not args.sync,
                         metrics_file=args.metrics_file, progress=False)
    res = mt.train(dl, mt.TorchEngine(model, opt, loss_fn, sched), eval_fn=eval_fn, config=cfg)
    from mlutils.io import json_stringify

    if rank == 0:
        print("RESULT " + json_stringify({"status": res.status, "step": res.step, "signal": res.signal,
                                          "checkpoint": res.checkpoint, "resumed_from": res.resumed_from,
                                          "world": world}), flush=True)
    if world > 1:
        from mlutils import distributed

        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
