"""Demo: a small transformer trained with mlutils.train, stopped by SIGTERM midway, resumed exactly.

The data are synthetic multi-codebook token sequences (K=4 codebooks of 32
tokens, 16 to 64 steps long) with learnable structure: codebook 0 follows a
Markov chain, codebook k is mostly a fixed function of codebook k-1 at the
same step.  Items of similar length are batched by BatchedOrderedSampler
over duration buckets; the codebooks are interleaved by the delay pattern
(DelayedPatternProvider: build_pattern_sequence for the input, the logits
reverted to the codes' layout for the loss and the evaluation).

The run: a reference process trains N steps uninterrupted while a second
process trains the same job with rotating checkpoints and commands on its
standard input; at step N/2 the demo sends it a real SIGTERM (it saves and
exits 0), then resumes it in a new process (resume="auto").  The demo checks
that the resumed run's final weights are bit-identical to the reference's and
its loss log identical, prints first vs last loss against the unigram
baseline, exports the weights as safetensors and shows ``mlutils inspect``.

    python3 examples/train_demo.py [--steps 300] [--out DIR] [--quiet]
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

K, CARD = 4, 32          # codebooks, tokens per codebook (CARD is also the special/padding token)
T_MIN, T_MAX = 16, 64    # sequence lengths (timesteps)
SEED = 1234


# ---------------------------------------------------------------- data


def make_items(n, seed):
    """n items of shape [K, T]: codebook 0 a Markov chain, codebook k mostly (3 k-1 + k) mod CARD of codebook k-1."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        T = int(rng.integers(T_MIN, T_MAX + 1))
        z = np.empty((K, T), dtype=np.int64)
        z[0, 0] = rng.integers(CARD)
        for t in range(1, T):
            u = rng.random()
            prev = z[0, t - 1]
            z[0, t] = (5 * prev + 3) % CARD if u < 0.7 else (prev + 1) % CARD if u < 0.9 else rng.integers(CARD)
        for k in range(1, K):
            noise = rng.random(T) < 0.15
            z[k] = np.where(noise, rng.integers(0, CARD, T), (z[k - 1] * (2 * k + 1) + 7 * k) % CARD)
        items.append(z)
    return items


def buckets_of(items):
    """Duration buckets {name: [(index, T), ...]} sorted by T, for BatchedOrderedSampler (items renumbered in that order)."""
    edges = [(16, 24), (24, 32), (32, 48), (48, 65)]
    order, buckets = [], {}
    for lo, hi in edges:
        idx = sorted((i for i, z in enumerate(items) if lo <= z.shape[1] < hi), key=lambda i: items[i].shape[1])
        buckets[f"{lo}-{hi - 1}"] = [(f"item{i}", items[i].shape[1]) for i in idx]
        order.extend(idx)
    return buckets, [items[i] for i in order]


def collate(batch):
    import torch

    T = max(z.shape[1] for z in batch)
    codes = torch.full((len(batch), K, T), CARD, dtype=torch.long)
    for i, z in enumerate(batch):
        codes[i, :, :z.shape[1]] = torch.from_numpy(z)
    return {"codes": codes, "lengths": torch.tensor([z.shape[1] for z in batch])}


def unigram_baseline(items):
    """(cross-entropy of the best constant prediction = unigram entropy, accuracy of always predicting the most frequent token)."""
    counts = np.zeros((K, CARD))
    for z in items:
        for k in range(K):
            counts[k] += np.bincount(z[k], minlength=CARD)
    p = counts / counts.sum(1, keepdims=True)
    entropy = float(np.mean([-(pk[pk > 0] * np.log(pk[pk > 0])).sum() for pk in p]))
    return entropy, float(np.mean(p.max(1)))


# ---------------------------------------------------------------- model


def build(steps):
    import torch
    from torch import nn

    from mlutils.pattern import DelayedPatternProvider

    class TinyLM(nn.Module):
        """Sum of K codebook embeddings -> causal TransformerEncoder (2 layers, d=64) -> K heads."""

        def __init__(self, d=64, layers=2, heads=4):
            super().__init__()
            self.emb = nn.ModuleList(nn.Embedding(CARD + 1, d) for _ in range(K))
            self.pos = nn.Embedding(T_MAX + K + 1, d)
            layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.1, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.out = nn.ModuleList(nn.Linear(d, CARD) for _ in range(K))

        def forward(self, seq):  # [B, K, S] -> [B, K, S, CARD]
            S = seq.shape[-1]
            x = sum(self.emb[k](seq[:, k]) for k in range(K)) + self.pos(torch.arange(S))
            mask = nn.Transformer.generate_square_subsequent_mask(S)
            h = self.encoder(x, mask=mask, is_causal=True)
            return torch.stack([head(h) for head in self.out], dim=1)

    provider = DelayedPatternProvider(n_q=K)

    def codes_logits(model, batch):
        """Logits aligned with the codes [B, K, T, CARD] and the mask of positions to score [B, K, T]."""
        codes, lengths = batch["codes"], batch["lengths"]
        T = codes.shape[-1]
        pattern = provider.get_pattern(T)
        seq, _, _ = pattern.build_pattern_sequence(codes, special_token=CARD)
        logits = model(seq).permute(0, 3, 1, 2)                                   # [B, CARD, K, S]
        logits, _, mask = pattern.revert_pattern_logits(logits, float("nan"))     # [B, CARD, K, T]
        valid = mask[None] & (torch.arange(T)[None, None, :] < lengths[:, None, None])
        return logits.permute(0, 2, 3, 1), valid

    def loss_fn(model, batch):
        logits, valid = codes_logits(model, batch)
        target = batch["codes"][valid]
        picked = logits[valid]
        loss = nn.functional.cross_entropy(picked, target)
        return loss, {"acc": float((picked.argmax(-1) == target).float().mean())}

    torch.manual_seed(SEED)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warm = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))) + 0.02)
    return model, opt, sched, loss_fn, codes_logits


# ---------------------------------------------------------------- one training process


def child(args):
    """One training process: the job itself (run by the demo twice or three times)."""
    import logging

    import torch
    from torch.utils.data import DataLoader

    from mlutils import train as mt
    from mlutils.sampler import BatchedOrderedSampler

    torch.set_num_threads(1)  # bit-exactness between processes needs the same thread count
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="  [%(name)s] %(message)s")
    train_items = make_items(1200, seed=SEED)
    eval_items = make_items(96, seed=SEED + 1)
    buckets, ordered = buckets_of(train_items)
    sampler = BatchedOrderedSampler(buckets, max_duration=640, shuffle=True, drop_last=True, seed=SEED)
    loader = DataLoader(ordered, batch_sampler=sampler, collate_fn=collate, num_workers=args.workers)
    model, opt, sched, loss_fn, codes_logits = build(args.steps)

    def eval_fn(step, should_stop):
        model.eval()
        tot, right, n = 0.0, 0, 0
        with torch.no_grad():
            for i in range(0, len(eval_items), 32):
                if should_stop():
                    break
                batch = collate(eval_items[i:i + 32])
                logits, valid = codes_logits(model, batch)
                target = batch["codes"][valid]
                tot += float(torch.nn.functional.cross_entropy(logits[valid], target, reduction="sum"))
                right += int((logits[valid].argmax(-1) == target).sum())
                n += int(target.numel())
        model.train()
        return {"loss": tot / max(n, 1), "acc": right / max(n, 1), "tokens": n}

    cfg = mt.TrainConfig(iterations=args.steps, save_frequency=max(args.steps // 6, 1),
                         eval_frequency=max(args.steps // 3, 1), checkpoint_dir=os.path.join(args.out, "checkpoints"),
                         keep_last=2, resume="auto", async_save=True, metrics_file=os.path.join(args.out, "metrics.jsonl"),
                         progress=args.progress, events=[f"export@{args.steps}"])
    res = mt.train(loader, mt.TorchEngine(model, opt, loss_fn, sched, clip_grad_norm=1.0), eval_fn=eval_fn, config=cfg)
    print("RESULT " + json.dumps({"status": res.status, "step": res.step, "signal": res.signal,
                                  "checkpoint": res.checkpoint, "resumed_from": res.resumed_from,
                                  "eval": res.eval_metrics}), flush=True)


# ---------------------------------------------------------------- the demo


class Child:
    """A training process; its stdout lines are collected (and echoed by `echo`)."""

    def __init__(self, out, steps, stderr, progress, echo=None, commands=()):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--out", out, "--steps", str(steps),
               "--workers", "2"] + (["--progress"] if progress else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        for c in commands:
            self.proc.stdin.write(c + "\n")
        self.proc.stdin.flush()
        self.lines, self.step, self.echo = [], 0, echo
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if line.startswith("{"):
                rec = json.loads(line)
                self.step = max(self.step, rec.get("step", 0))
            if self.echo is not None:
                self.echo(line)

    def wait(self):
        self.proc.stdin.close()
        rc = self.proc.wait()
        self.thread.join()
        if rc != 0:
            sys.exit(f"demo failed: a training process exited with {rc} (logs in {os.path.dirname(self.proc.args[4])})")
        return json.loads(next(x for x in reversed(self.lines) if x.startswith("RESULT "))[len("RESULT "):])


def final_weights(result):
    from mlutils.io import torch_load

    return torch_load(os.path.join(result["checkpoint"], "rank-00000-of-00001.pt"))["engines"]["model"]["model"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    ap.add_argument("--out", default=None, help="output folder (default: a fresh temporary folder)")
    ap.add_argument("--quiet", action="store_true", help="print the summary only")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 4:
        ap.error("--steps must be at least 4")
    if args.child:
        return child(args)

    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("the demo trains a torch model: pip install torch (bash scripts/setup.sh does it)")
    import mlutils

    if args.out:
        out = os.path.abspath(args.out)
        os.makedirs(out, exist_ok=True)
        if os.listdir(out):
            sys.exit(f"--out {out} is not empty: the demo needs a fresh folder")
    else:
        out = tempfile.mkdtemp(prefix=time.strftime("mlutils-demo-%Y%m%d-%H%M%S-"))
    ref_dir, run_dir = os.path.join(out, "reference"), os.path.join(out, "run")
    os.makedirs(ref_dir)
    os.makedirs(run_dir)
    steps, half = args.steps, args.steps // 2
    say = print
    say(f"mlutils {mlutils.__version__}; output in {out}")
    say(f"training a 2-layer transformer (d=64) on {K} delay-interleaved codebooks for {steps} steps, "
        f"twice: an uninterrupted reference, and a run stopped by SIGTERM at step {half} then resumed")

    def echo(line):
        if args.quiet:
            return
        if line.startswith("{"):
            rec = json.loads(line)
            if "eval" in rec or rec.get("step", 0) % 25 == 0:
                say("  " + line)

    t0 = time.time()
    with open(os.path.join(ref_dir, "train.log"), "w") as ref_log, open(os.path.join(run_dir, "train.log"), "a") as run_log:
        ref = Child(ref_dir, steps, ref_log, progress=False)
        run_err = run_log if args.quiet else None
        run = Child(run_dir, steps, run_err, progress=not args.quiet, echo=echo,
                    commands=["time to %d" % steps, "event show"])
        while run.step < half and run.proc.poll() is None:
            time.sleep(0.01)
        run.proc.send_signal(signal.SIGTERM)
        say(f"-- sent SIGTERM to the training process at step {run.step}")
        first = run.wait()
        if first["status"] != "signal":
            sys.exit(f"demo failed: the run was not stopped by the signal ({first})")
        say(f"-- it saved {first['checkpoint']} at step {first['step']} and exited 0; resuming in a new process")
        resumed = Child(run_dir, steps, run_err, progress=not args.quiet, echo=echo)
        second = resumed.wait()
        reference = ref.wait()
    elapsed = time.time() - t0

    import torch

    a, b = final_weights(reference), final_weights(second)
    exact = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_log_lines = open(os.path.join(ref_dir, "metrics.jsonl")).read().splitlines()
    run_log_lines = open(os.path.join(run_dir, "metrics.jsonl")).read().splitlines()
    def timeless(lines):  # "elapsed" is wall-clock time: the one field two runs never share
        return [{k: v for k, v in json.loads(x).items() if k != "elapsed"} for x in lines]

    same_log = timeless(ref_log_lines) == timeless(run_log_lines)
    losses = [json.loads(x)["loss"] for x in run_log_lines if '"eval"' not in x]
    baseline, base_acc = unigram_baseline(make_items(1200, seed=SEED))
    first_loss = float(np.mean(losses[:10]))
    last_loss = float(np.mean(losses[-10:]))
    ev = second.get("eval") or {}
    say(f"resumed from {second['resumed_from']}; {len(losses)} steps in {elapsed:.0f} s")
    say(f"resume exact: final weights bit-identical to the reference: {exact}; "
        f"loss log identical ({len(run_log_lines)} lines): {same_log}")
    say(f"loss: first 10 steps {first_loss:.3f} -> last 10 steps {last_loss:.3f}; "
        f"unigram baseline (best constant prediction) {baseline:.3f}")
    if ev:
        say(f"held-out: loss {ev['loss']:.3f}, accuracy {ev['acc']:.3f} (most frequent token: {base_acc:.3f})")
    export = os.path.join(run_dir, "checkpoints", f"export-{steps:08d}.safetensors")
    for path in (os.path.join(second["checkpoint"], "rank-00000-of-00001.pt"), export):
        rel = os.path.relpath(path)
        say(f"$ python3 -m mlutils inspect {path if rel.startswith('..') else rel}")
        shown = subprocess.run([sys.executable, "-m", "mlutils", "inspect", path], capture_output=True, text=True)
        lines = shown.stdout.splitlines()
        for line in (lines if len(lines) <= 12 else lines[:8] + [f"  ... ({len(lines) - 8} more lines)"]):
            say("  " + line)
        if shown.returncode != 0:
            sys.exit(f"demo failed: mlutils inspect {path}: {shown.stderr.strip()}")
    say(f"outputs: {out} (checkpoints, metrics.jsonl, train.log, the safetensors export)")
    if not (exact and same_log):
        sys.exit("demo failed: the resumed run differs from the reference")
    if not last_loss < baseline:
        sys.exit("demo failed: the loss did not fall below the unigram baseline")


if __name__ == "__main__":
    main()
