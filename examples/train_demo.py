"""Demo: a small training-style run using mlutils.

Logs one JSON line of metrics per step (floats truncated) and keeps a
metrics file written atomically.
"""
import argparse
import math
import os
import random
import tempfile

import mlutils
from mlutils.io import json_read, json_stringify, json_write


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="mlutils-demo-")
    os.makedirs(out, exist_ok=True)
    rng = random.Random(0)
    w, lr = 0.0, 0.1
    history = []
    for step in range(1, args.steps + 1):
        x = rng.uniform(-1, 1)
        y = 3.0 * x + 0.5
        pred = w * x
        loss = (pred - y) ** 2
        w -= lr * 2 * (pred - y) * x
        metrics = {"step": step, "loss": loss, "w": w, "lr": lr, "ppl": math.exp(min(loss, 50))}
        history.append(metrics)
        print(json_stringify(metrics, truncate=True))
    path = os.path.join(out, "metrics.json")
    json_write({"history": history, "features": sorted(mlutils.features)}, path, pretty=True)
    assert json_read(path)["history"][-1]["step"] == args.steps
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
