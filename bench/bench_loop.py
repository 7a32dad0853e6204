"""Benchmark: the per-step cost of mlutils.train against a hand-written loop doing the same work.

Run: python3 bench/bench_loop.py [--steps 2000] [--model-steps 40] [--repeat 5]

Two cases, each timed interleaved with its hand-written twin:

* ``null engine``: an engine whose step does nothing; the hand-written loop
  calls it and writes one JSON metrics line a step (``json_stringify`` to
  /dev/null), as the loop does: the difference is the loop's own cost per
  step (commands, signals, position, counters).  Target: at most 30 µs.
* ``demo model``: the demo's transformer (examples/train_demo.py) through
  ``TorchEngine``; the hand-written loop does forward, backward, optimizer and
  scheduler steps and one JSON line a step.  Target: at most 2% slower.

Both loops write their lines to /dev/null; no checkpoints, no progress bar.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
import mlutils.train as mt  # noqa: E402  (this checkout's build)
from mlutils.io import json_stringify  # noqa: E402
from _harness import cell, interleaved, median, table  # noqa: E402


class NullEngine:
    def __init__(self):
        self._step = 0

    @property
    def global_step(self):
        return self._step

    def train_step(self, batch):
        self._step += 1
        return {"loss": 0.5, "lr": 0.001}

    def state_dict(self):
        return {"step": self._step}

    def load_state_dict(self, s):
        self._step = s["step"]

    def export(self):
        return {}

    def set_lr(self, lr):
        pass

    def quit(self):
        pass


def config(steps: int) -> mt.TrainConfig:
    return mt.TrainConfig(iterations=steps, checkpoint_dir=None, metrics_stdout=False, metrics_file=os.devnull,
                          progress=False, read_commands=False, handle_signals=False)


def hand_loop(data, step_fn, steps: int) -> None:
    with open(os.devnull, "w") as out:
        step, epoch = 0, 0
        while step < steps:
            for batch in data:
                metrics = step_fn(batch)
                step += 1
                out.write(json_stringify({"step": step, "epoch": epoch,
                                          **{k: float(v) for k, v in metrics.items()}}, truncate=True) + "\n")
                out.flush()
                if step >= steps:
                    return
            epoch += 1


def demo_parts(steps: int):
    import train_demo as demo

    items = demo.make_items(256, seed=demo.SEED)
    batches = [demo.collate(items[i:i + 16]) for i in range(0, len(items), 16)]
    model, opt, sched, loss_fn, _ = demo.build(steps)
    return batches, model, opt, sched, loss_fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000, help="steps of the null-engine case")
    ap.add_argument("--model-steps", type=int, default=40, help="steps of the demo-model case")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)

    data = list(range(97))
    cases = [("null: hand-written", lambda: hand_loop(data, NullEngine().train_step, args.steps)),
             ("null: mlutils.train", lambda: mt.train(data, NullEngine(), config=config(args.steps)))]
    t_null = interleaved(cases, repeat=args.repeat)

    batches, model, opt, sched, loss_fn = demo_parts(args.model_steps)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def fresh():
        model.load_state_dict(state)
        o = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        return o, torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0)

    def hand():
        o, s = fresh()

        def step(batch):
            model.train()
            o.zero_grad(set_to_none=True)
            loss, extra = loss_fn(model, batch)
            loss.backward()
            o.step()
            s.step()
            return {"loss": loss.detach(), "lr": o.param_groups[0]["lr"], **extra}

        hand_loop(batches, step, args.model_steps)

    def ours():
        o, s = fresh()
        mt.train(batches, mt.TorchEngine(model, o, loss_fn, s), config=config(args.model_steps))

    t_model = interleaved([("demo: hand-written", hand), ("demo: mlutils.train", ours)], repeat=args.repeat)

    per = {k: [t / args.steps for t in v] for k, v in t_null.items()}
    per.update({k: [t / args.model_steps for t in v] for k, v in t_model.items()})
    overhead = median(per["null: mlutils.train"]) - median(per["null: hand-written"])
    slower = median(per["demo: mlutils.train"]) / median(per["demo: hand-written"]) - 1
    rows = [(name, cell(ts)) for name, ts in per.items()]
    table(["loop", "time per step"], rows, title=f"torch {torch.__version__}, 1 intra-op thread",
          repeat=args.repeat)
    print(f"the loop's own cost: {overhead * 1e6:.1f} µs per step (target: at most 30 µs)")
    print(f"demo model: mlutils.train {slower:+.1%} against the hand-written loop (target: at most +2%)")
    np.random.seed(0)


if __name__ == "__main__":
    main()
