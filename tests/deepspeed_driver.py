"""Run by tests/test_train_deepspeed.py under torchrun (2 ranks, gloo, CPU): mlutils.train over real DeepSpeed
engines (ZeRO-2, torch Adam).  ``deepspeed_driver.py <out> <scenario>...`` runs each scenario and leaves
``<out>/<name>-rank<r>.pt`` files (weights, optimizer partitions, learning rates) and metrics files for the
test to compare:

* ``reference``: an uninterrupted run; ``stopped``: the same run quit at step K with a checkpoint;
  ``resumed``: a fresh engine resuming it to the end (``all`` runs the three in one process);
* ``lr``: the ``lr`` command at step 2 of a run without a scheduler, and export() against the module;
* ``zero3``: export() of a ZeRO-3 engine against the weights it started from and against one gathering;
* ``errors``: load_files / load_state_dict refusing what does not fit."""
import json
import os
import sys

import torch
import torch.distributed as dist

import deepspeed
import mlutils.train as mt

# DeepSpeed's CPU backend builds a shared-memory all-reduce op with a C++ compiler when it starts (minutes);
# training does not use it, gloo does the work
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

ITERATIONS, STOP_AT = 7, 4
EVENTS = ["lr 0.004@2"]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(4, 16)
        self.drop = torch.nn.Dropout(0.2)  # draws from torch's RNG: a resume must restore it
        self.out = torch.nn.Linear(16, 1)
        self.register_buffer("scale", torch.full((1,), 0.5))

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.inp(x)))) * self.scale


def loss_fn(engine, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(engine(x), y)


def ds_config(stage=2, scheduler=True):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
           "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9}
    if scheduler:
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01,
                                                           "warmup_num_steps": 3, "warmup_type": "linear"}}
    return cfg


def make_engine(stage=2, scheduler=True):
    torch.manual_seed(0)
    model = Net()
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                   config=ds_config(stage, scheduler))
    return model, eng


def data(micro):
    """This rank's loader: 5 batches of (x, y), of 2 items (micro-batches) or 4 (cut into 2)."""
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    n = 2 if micro else 4
    return [(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)) for _ in range(5)]


def config(out, name, **kw):
    kw.setdefault("iterations", ITERATIONS)
    return mt.TrainConfig(read_commands=False, progress=False, metrics_stdout=False, handle_signals=False,
                          metrics_file=os.path.join(out, f"{name}-metrics.jsonl"), **kw)


def optimizer_state(eng):
    """This rank's partition of the optimizer: the Adam state of each flat group and the fp32 master weights."""
    base = eng.optimizer.optimizer
    out = {f"{i}.{k}": v.clone() for i, group in enumerate(base.param_groups)
           for k, v in base.state[group["params"][0]].items()}
    for i, t in enumerate(eng.optimizer.single_partition_of_fp32_groups):
        out[f"{i}.fp32"] = t.detach().clone()
    return out


def dump(out, name, eng, result, **extra):
    state = {"weights": mt.DeepSpeedEngine(eng, loss_fn).export(), "optimizer": optimizer_state(eng),
             "global_steps": eng.global_steps, "status": result.status, "step": result.step,
             "lrs": [g["lr"] for g in eng.optimizer.param_groups],
             "base_lrs": [g["lr"] for g in eng.optimizer.optimizer.param_groups], **extra}
    torch.save(state, os.path.join(out, f"{name}-rank{dist.get_rank()}.pt"))


def run_resume(out, which):
    # accumulate_batches=2 over 5 micro-batches an epoch: steps of 2, 2 and 1 (the epoch's last, fewer
    # than gradient_accumulation_steps), so a resume crosses both kinds
    ck = os.path.join(out, "ckpt")
    for name in which:
        _model, eng = make_engine()
        engine = mt.DeepSpeedEngine(eng, loss_fn)
        if name == "reference":
            cfg = config(out, name, events=list(EVENTS), accumulate_batches=2, resume=None)
        else:  # the same command line twice, as a requeued job runs it: quit@K is not run again on resume
            cfg = config(out, name, events=EVENTS + [f"quit@{STOP_AT}"], accumulate_batches=2,
                         checkpoint_dir=ck, save_frequency=2)
        res = mt.train(data(micro=True), engine, config=cfg)
        files = sorted(os.path.relpath(os.path.join(d, f), ck) for d, _s, fs in os.walk(ck) for f in fs) \
            if os.path.isdir(ck) else []
        dump(out, name, eng, res, resumed_from=res.resumed_from, files=files)


def run_lr(out):
    model, eng = make_engine(scheduler=False)
    engine = mt.DeepSpeedEngine(eng, loss_fn)
    res = mt.train(data(micro=False), engine, config=config(out, "lr", iterations=3, events=["lr 0.0025@2"]))
    module = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dump(out, "lr", eng, res, module=module, ds_lr=eng.get_lr())


def run_zero3(out):
    torch.manual_seed(0)
    model = Net()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(3, False))
    engine = mt.DeepSpeedEngine(eng, loss_fn)
    first = engine.export()
    mt.train(data(micro=False), engine, config=config(out, "zero3", iterations=2))
    trained = engine.export()
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"start": start, "first": first, "trained": trained, "gathered": gathered,
                "partitioned": [tuple(p.shape) for p in model.parameters()]},
               os.path.join(out, f"zero3-rank{dist.get_rank()}.pt"))


def run_errors(out):
    _model, eng = make_engine()
    engine = mt.DeepSpeedEngine(eng, loss_fn)
    got = {}
    try:
        engine.load_files(os.path.join(out, "nowhere"))
    except mt.CheckpointError as exc:
        got["missing"] = str(exc)
    try:
        engine.load_state_dict({"global_step": 3, "lrs": [0.01], "lr_set": None})
    except mt.CheckpointError as exc:
        got["step"] = str(exc)
    try:
        mt.DeepSpeedEngine(torch.nn.Linear(1, 1), loss_fn)
    except TypeError as exc:
        got["type"] = str(exc)
    with open(os.path.join(out, f"errors-rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(got, fh)


def main():
    out, scenarios = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    for s in scenarios:
        if s == "all":
            run_resume(out, ["reference", "stopped", "resumed"])
        elif s in ("reference", "stopped", "resumed"):
            run_resume(out, [s])
        elif s == "lr":
            run_lr(out)
        elif s == "zero3":
            run_zero3(out)
        elif s == "errors":
            run_errors(out)
        else:
            raise SystemExit(f"unknown scenario {s!r}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
