"""Demo: a small training run that uses mlutils end to end.

A two-layer network learns a noisy function with a DataLoader driven by
mlutils' RandomSampler.  Each step logs one JSON line of metrics (floats
truncated); checkpoints (model, optimizer, sampler state, step) are written
atomically as PyTorch .pt and the weights exported as safetensors.  Halfway
through, the run is "interrupted" and resumed from its checkpoint in a fresh
model/optimizer/sampler: the resumed run must reproduce the uninterrupted
run's losses exactly.

    python3 examples/train_demo.py [--steps 200] [--out DIR]
"""
import argparse
import os
import sys
import tempfile

import numpy as np

import mlutils
from mlutils.io import json_read, json_stringify, json_write, torch_load, torch_save
from mlutils.sampler import RandomSampler

try:
    import torch
    from torch.utils.data import DataLoader, TensorDataset
except ImportError:  # pragma: no cover
    sys.exit("the demo trains a torch model: pip install torch (bash scripts/setup.sh does it)")


def make_data(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 8, generator=g) * 4 - 2
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.1 * torch.cos(3 * x[:, 4:]).sum(1, keepdim=True)
    y = y + 0.05 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def make_run(dataset, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sampler = RandomSampler(len(dataset), seed=seed)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler, drop_last=True)
    return model, opt, sampler, loader


def train(model, opt, sampler, loader, start_step, end_step, log, ckpt_dir=None, save_every=50):
    """Runs steps (start_step, end_step]; epochs never end the loop by themselves."""
    losses = {}
    step = start_step
    while step < end_step:
        for x, y in loader:
            step += 1
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[step] = loss.item()
            log(step, json_stringify({"step": step, "epoch": sampler.epoch, "loss": loss.item(),
                                      "lr": opt.param_groups[0]["lr"]}, truncate=True))
            if ckpt_dir is not None and step % save_every == 0:
                torch_save({"module": model.state_dict(), "optimizer": opt.state_dict(),
                            "sampler": sampler.state_dict(), "step": step},
                           os.path.join(ckpt_dir, "last.pt"))
            if step >= end_step:
                break
        # an exhausted sampler starts its next epoch on the next iter()
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--quiet", action="store_true", help="log every 25th step only")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="mlutils-demo-")
    os.makedirs(out, exist_ok=True)
    print(f"mlutils {mlutils.__version__}, features {sorted(mlutils.features)}, "
          f"cuda available: {mlutils.cuda_available()}; output in {out}")

    def log(step, line):
        if not args.quiet or step % 25 == 0:
            print(line)

    dataset = make_data()
    steps, half = args.steps, (args.steps // 2 // 50) * 50 or 50

    # 1. the reference run, uninterrupted
    ref = train(*make_run(dataset, seed=1), 0, steps, log=lambda _s, _l: None)

    # 2. the same run, checkpointing, "interrupted" after `half` steps ...
    model, opt, sampler, loader = make_run(dataset, seed=1)
    first = train(model, opt, sampler, loader, 0, half, log=log, ckpt_dir=out)
    del model, opt, sampler, loader

    # ... and resumed from the checkpoint in fresh objects (note the different seed)
    ckpt = torch_load(os.path.join(out, "last.pt"))
    model, opt, sampler, loader = make_run(dataset, seed=12345)
    model.load_state_dict(ckpt["module"])
    opt.load_state_dict(ckpt["optimizer"])
    sampler.load_state_dict(ckpt["sampler"])
    print(f"resumed at step {ckpt['step']} (epoch {sampler.epoch}, sampler position {sampler.index()})")
    second = train(model, opt, sampler, loader, ckpt["step"], steps, log=log, ckpt_dir=out)

    resumed = {**first, **second}
    exact = all(resumed[s] == ref[s] for s in ref)
    print(f"resume exact: {exact} ({len(ref)} steps compared); final loss {ref[steps]:.4f} "
          f"(first step {ref[1]:.4f})")

    # 3. export the weights as safetensors and check them against the model
    sft = os.path.join(out, "model.safetensors")
    torch_save({"module": model.state_dict(), "step": steps, "config": {"hidden": 64}}, sft)
    back = torch_load(sft)
    same = all(torch.equal(back["module"][k], v) for k, v in model.state_dict().items())
    print(f"exported {sft}: {len(back['module'])} tensors, metadata step={back['step']} "
          f"config={back['config']}, weights equal: {same}")
    json_write({"losses": [ref[s] for s in sorted(ref)], "resume_exact": exact}, os.path.join(out, "metrics.json"),
               truncate=True)
    assert json_read(os.path.join(out, "metrics.json"))["resume_exact"] is exact
    if not (exact and same):
        sys.exit("demo failed: the resumed run or the export differs")


if __name__ == "__main__":
    main()
