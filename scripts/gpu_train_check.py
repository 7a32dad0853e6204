"""mlutils.train's sharded engines on a real device: an FSDP2 model under TorchEngine and a DeepSpeed ZeRO-2
engine under DeepSpeedEngine, each trained to step K with a checkpoint (``quit@K``), resumed in new processes
to the end, and compared with an uninterrupted run, full weights, bit for bit.

    python3 scripts/gpu_train_check.py                    # cuda + NCCL, one rank (torchrun --nproc-per-node 1)
    python3 scripts/gpu_train_check.py --device cpu       # the same on the CPU with gloo
    python3 scripts/gpu_train_check.py --engines fsdp2 --nproc-per-node 2 --steps 8 --stop-at 5

Each engine gets two torchrun launches (``--standalone``): the reference run and the run quit at step K,
then the resumed run.  Prints one line per engine (engine, steps as K+rest: before the quit and after the
resume, bytes of the step-K checkpoint, resume ok, max abs diff of the weights) and exits 1 when a run fails, a resume does not end where it should, or the weights differ by more
than ``--atol`` (0: on the GPU the workers run with deterministic algorithms).  On the CPU DeepSpeed's
shared-memory all-reduce op (a C++ build at start, unused with gloo) is stubbed out; on the GPU nothing is.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("fsdp2", "deepspeed")
BATCHES, BATCH = 4, 8  # an epoch of 4 loader batches of 8 items: a resume crosses an epoch boundary


# ---- the workers (run under torchrun)

def _model(torch: Any) -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 4))


def _loss(torch: Any) -> Any:
    def loss_fn(model: Any, batch: Any) -> Any:
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    return loss_fn


def _data(torch: Any, rank: int) -> List[Any]:
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 4, generator=g)) for _ in range(BATCHES)]


def _fsdp2(torch: Any, device: Any) -> Any:
    """(engine, full weights) for a fresh FSDP2 model under TorchEngine."""
    from torch.distributed.fsdp import fully_shard

    import mlutils.train as mt
    from mlutils.train import wrapped

    model = _model(torch).to(device)
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    engine = mt.TorchEngine(model, opt, _loss(torch), clip_grad_norm=1.0, device=device)
    return engine, lambda: wrapped.full_weights(model)


def _deepspeed(torch: Any, device: Any) -> Any:
    """(engine, full weights) for a fresh DeepSpeed ZeRO-2 engine under DeepSpeedEngine."""
    import deepspeed

    import mlutils.train as mt

    if device.type == "cpu":
        # DeepSpeed's CPU backend builds a shared-memory all-reduce op with a C++ compiler when it starts
        # (minutes); gloo does the work here.  Not on the GPU: NCCL is DeepSpeed's own there.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    model = _model(torch)
    cfg = {"train_micro_batch_size_per_gpu": BATCH // 2, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
           "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9}
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    if eng.device.type != device.type:
        raise RuntimeError(f"DeepSpeed put the engine on {eng.device}, this check runs on {device} (on the CPU "
                           f"set DS_ACCELERATOR=cpu)")
    engine = mt.DeepSpeedEngine(eng, _loss(torch))
    return engine, engine.export


def worker(engine_name: str, phase: str, out: str, device_name: str, steps: int, stop_at: int) -> None:
    """One torchrun rank: phase ``run`` trains the reference run and the run quit at `stop_at` (fresh models,
    one after the other), phase ``resume`` resumes the latter to the end; the global leader writes the full
    weights and every rank a JSON line of what its runs returned."""
    import torch
    import torch.distributed as dist

    import mlutils.train as mt

    if device_name == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.use_deterministic_algorithms(True, warn_only=True)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    make = _fsdp2 if engine_name == "fsdp2" else _deepspeed
    ckpt = os.path.join(out, f"{engine_name}-ckpt")
    runs = ["reference", "stopped"] if phase == "run" else ["resumed"]
    report: Dict[str, Any] = {"backend": dist.get_backend(), "world": dist.get_world_size(), "device": str(device)}
    for name in runs:
        engine, weights = make(torch, device)
        base = dict(iterations=steps, read_commands=False, progress=False, metrics_stdout=False,
                    handle_signals=False, metrics_file=os.path.join(out, f"{engine_name}-{name}-metrics.jsonl"))
        if name == "reference":
            cfg = mt.TrainConfig(resume=None, **base)
        else:  # the same command line both times, as a requeued job runs it: quit@K is not run again on resume;
            # the save command saves in the background (the quit's save then has nothing left to write), so
            # the resume reads a checkpoint staged off the training thread
            cfg = mt.TrainConfig(checkpoint_dir=ckpt, events=[f"save@{stop_at}", f"quit@{stop_at}"], **base)
        res = mt.train(_data(torch, rank), engine, config=cfg)
        full = weights()  # a collective: every rank takes part, the leader keeps them
        if rank == 0 and name != "stopped":
            torch.save(full, os.path.join(out, f"{engine_name}-{name}.pt"))
        report[name] = {"status": res.status, "step": res.step, "resumed_from": res.resumed_from,
                        "checkpoint": res.checkpoint}
        dist.barrier()
    with open(os.path.join(out, f"{engine_name}-{phase}-rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh)
    dist.barrier()  # every rank done with the group before any tears it down
    dist.destroy_process_group()


# ---- the launcher

@dataclass
class Row:
    engine: str
    steps: str
    checkpoint_bytes: Optional[int]
    ok: bool
    max_abs_diff: Optional[float]
    problem: str = ""


def compare(ref: Dict[str, Any], got: Dict[str, Any]) -> Optional[float]:
    """The largest absolute difference between two full weight dicts; None when their names or shapes differ."""
    if sorted(ref) != sorted(got) or not ref:
        return None
    worst = 0.0
    for k, v in ref.items():
        w = got[k]
        if tuple(v.shape) != tuple(w.shape):
            return None
        if v.numel():
            worst = max(worst, float((v.double() - w.double()).abs().max()))
    return worst


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _s, fs in os.walk(folder) for f in fs)


def _launch(args: argparse.Namespace, engine: str, phase: str, out: str) -> Optional[str]:
    """Run one torchrun launch; None when it succeeded, else the tail of its output."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    else:
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(args.nproc_per_node), os.path.abspath(__file__), "--worker", engine, phase, out,
           "--device", args.device, "--steps", str(args.steps), "--stop-at", str(args.stop_at)]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return f"{phase}: no result within {args.timeout} s"
    if p.returncode != 0:
        return f"{phase}: torchrun exited {p.returncode}\n{(p.stdout + p.stderr)[-4000:]}"
    return None


def check(args: argparse.Namespace, engine: str, out: str) -> Row:
    """Reference, stopped and resumed runs of `engine`; the row of the table."""
    import torch

    steps = f"{args.stop_at}+{args.steps - args.stop_at}"
    for phase in ("run", "resume"):
        failed = _launch(args, engine, phase, out)
        if failed is not None:
            return Row(engine, steps, None, False, None, failed)
    with open(os.path.join(out, f"{engine}-run-rank0.json"), encoding="utf-8") as fh:
        first = json.load(fh)
    with open(os.path.join(out, f"{engine}-resume-rank0.json"), encoding="utf-8") as fh:
        second = json.load(fh)
    step_dir = os.path.join(out, f"{engine}-ckpt", f"step-{args.stop_at:08d}")
    size = folder_bytes(step_dir) if os.path.isdir(step_dir) else None
    problems = []
    if (first["reference"]["status"], first["reference"]["step"]) != ("completed", args.steps):
        problems.append(f"the reference run ended {first['reference']['status']} at {first['reference']['step']}")
    if (first["stopped"]["status"], first["stopped"]["step"]) != ("quit", args.stop_at):
        problems.append(f"the stopped run ended {first['stopped']['status']} at {first['stopped']['step']}")
    res = second["resumed"]
    if (res["status"], res["step"]) != ("completed", args.steps):
        problems.append(f"the resumed run ended {res['status']} at {res['step']}")
    if not (res["resumed_from"] or "").endswith(f"step-{args.stop_at:08d}"):
        problems.append(f"the resumed run started from {res['resumed_from']}, not step {args.stop_at}")
    if size is None:
        problems.append(f"no checkpoint {step_dir}")
    ref = torch.load(os.path.join(out, f"{engine}-reference.pt"), map_location="cpu", weights_only=True)
    got = torch.load(os.path.join(out, f"{engine}-resumed.pt"), map_location="cpu", weights_only=True)
    diff = compare(ref, got)
    if diff is None:
        problems.append("the resumed weights have other names or shapes than the reference's")
    elif diff > args.atol:
        problems.append(f"the resumed weights differ from the reference's by up to {diff:.3g}")
    if first["backend"] != args.backend:
        problems.append(f"the runs used {first['backend']}, not {args.backend}")
    return Row(engine, steps, size, not problems, diff, "; ".join(problems))


def table(rows: List[Row]) -> str:
    lines = [f"{'engine':<10} {'steps':>6} {'checkpoint bytes':>17} {'resume ok':>10} {'max abs diff':>13}"]
    for r in rows:
        size = str(r.checkpoint_bytes) if r.checkpoint_bytes is not None else "-"
        diff = f"{r.max_abs_diff:.3g}" if r.max_abs_diff is not None else "-"
        lines.append(f"{r.engine:<10} {r.steps:>6} {size:>17} {'yes' if r.ok else 'NO':>10} {diff:>13}")
    return "\n".join(lines)


def report(rows: List[Row]) -> int:
    """Print the table (and what went wrong); the exit status: 0 when every row is ok."""
    print(table(rows))
    for r in rows:
        if not r.ok:
            print(f"\n{r.engine}: {r.problem}")
    return 0 if rows and all(r.ok for r in rows) else 1


def _args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda: NCCL (the default); cpu: gloo")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, of: " + ", ".join(ENGINES))
    ap.add_argument("--nproc-per-node", type=int, default=1, help="ranks (GPUs under cuda) [1]")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps of a run [6]")
    ap.add_argument("--stop-at", type=int, default=3, help="the step the interrupted run quits at [3]")
    ap.add_argument("--atol", type=float, default=0.0, help="largest weight difference taken as equal [0]")
    ap.add_argument("--out", help="folder for the runs' files [a temporary one, removed]")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per torchrun launch [600]")
    args = ap.parse_args(argv)
    names = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in names if e not in ENGINES]
    if bad or not names:
        ap.error(f"--engines: unknown {bad or args.engines!r}; choose from {', '.join(ENGINES)}")
    args.engines = names
    if args.nproc_per_node < 1:
        ap.error("--nproc-per-node must be >= 1")
    if not 0 < args.stop_at < args.steps:
        ap.error(f"--stop-at must be between 1 and --steps - 1 ({args.steps - 1}), got {args.stop_at}")
    if not args.atol >= 0:
        ap.error("--atol must be >= 0")
    args.backend = "nccl" if args.device == "cuda" else "gloo"
    return args


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        wp = argparse.ArgumentParser()
        wp.add_argument("--worker", nargs=3, metavar=("ENGINE", "PHASE", "OUT"))
        wp.add_argument("--device", required=True)
        wp.add_argument("--steps", type=int, required=True)
        wp.add_argument("--stop-at", type=int, required=True)
        w = wp.parse_args(argv)
        worker(w.worker[0], w.worker[1], w.worker[2], w.device, w.steps, w.stop_at)
        return 0
    args = _args(argv)
    try:
        import torch
    except ImportError:
        print("torch is not installed", file=sys.stderr)
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device (--device cpu runs the check on the CPU with gloo)", file=sys.stderr)
        return 1
    if args.device == "cuda" and args.nproc_per_node > torch.cuda.device_count():
        print(f"--nproc-per-node {args.nproc_per_node}: only {torch.cuda.device_count()} GPU(s)", file=sys.stderr)
        return 1
    print(f"== train check: {', '.join(args.engines)} on {args.device} with {args.backend}, "
          f"{args.nproc_per_node} rank(s), quit@{args.stop_at} of {args.steps} steps", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlutils-train-check-") as tmp:
        out = os.path.abspath(args.out) if args.out else tmp
        for engine in args.engines:
            folder = os.path.join(out, engine)
            if os.path.lexists(folder):
                print(f"--out {out}: {folder} exists (a run of its own needs an empty place)", file=sys.stderr)
                return 1
            os.makedirs(folder)
            if engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
                rows.append(Row(engine, "-", None, False, None, "deepspeed is not installed"))
                continue
            rows.append(check(args, engine, folder))
    return report(rows)


if __name__ == "__main__":
    sys.exit(main())
