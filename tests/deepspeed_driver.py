"""Run by tests/test_train_deepspeed.py under torchrun (2 ranks, gloo, CPU): mlutils.train over real DeepSpeed
engines (ZeRO-2, torch Adam).  ``deepspeed_driver.py <out> <scenario>...`` runs each scenario and leaves
``<out>/<name>-rank<r>.pt`` files (weights, optimizer partitions, learning rates) and metrics files for the
test to compare:

* ``reference``: an uninterrupted run; ``stopped``: the same run quit at step K with a checkpoint;
  ``resumed``: a fresh engine resuming it to the end (``all`` runs the three in one process);
* ``lr``: the ``lr`` command at step 2 of a run without a scheduler, and export() against the module;
* ``zero3``: export() of a ZeRO-3 engine against the weights it started from and against one gathering;
* ``errors``: load_files / load_state_dict / set_loss_scale refusing what does not fit;
* ``finetune``: ``TrainConfig(init_from=<.safetensors>)`` under ZeRO-2 and ``init_from=<.pt>`` under ZeRO-3
  against runs whose module held those weights before ``deepspeed.initialize``, and load_weights' errors;
* ``oom``: a ``torch.OutOfMemoryError`` raised by loss_fn on rank 1 only, in the second micro-batch of step
  2, under ZeRO-0, 1 and 2, against runs that never saw that batch;
* ``fp16``: the ``loss_scale`` command on an fp16 ZeRO-2 engine, and load_weights' fp32 master weights."""
import json
import os
import sys

import torch
import torch.distributed as dist

import deepspeed
import mlutils.train as mt
from mlutils.io import torch_save
from _drivers import finish  # this folder: the drivers run as scripts

# DeepSpeed's CPU backend builds a shared-memory all-reduce op with a C++ compiler when it starts (minutes);
# training does not use it, gloo does the work
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

ITERATIONS, STOP_AT = 7, 4
EVENTS = ["lr 0.004@2"]


class Net(torch.nn.Module):
    def __init__(self, drop=0.2):
        super().__init__()
        self.inp = torch.nn.Linear(4, 16)
        # draws from torch's RNG: a resume must restore it (none where a skipped forward pass would draw less)
        self.drop = torch.nn.Dropout(drop) if drop else torch.nn.Identity()
        self.out = torch.nn.Linear(16, 1)
        self.register_buffer("scale", torch.full((1,), 0.5))

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.inp(x)))) * self.scale


def loss_fn(engine, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(engine(x), y)


def ds_config(stage=2, scheduler=True, fp16=False):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
           "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9}
    if fp16:  # a dynamic scale from 2**8 that grows only after 1000 steps without overflow
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000, "hysteresis": 1}
    if scheduler:
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01,
                                                           "warmup_num_steps": 3, "warmup_type": "linear"}}
    return cfg


def make_engine(stage=2, scheduler=True, drop=0.2, weights=None, fp16=False):
    torch.manual_seed(0)
    model = Net(drop)
    if weights is not None:  # the module holds them before deepspeed.initialize
        model.load_state_dict(weights)
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                   config=ds_config(stage, scheduler, fp16))
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
    for bad in (8.0, 0.0, float("nan")):  # fp32: no loss scaler; then scales that are no scale
        try:
            engine.set_loss_scale(bad)
        except ValueError as exc:
            got[f"scale {bad}"] = str(exc)
    got["skipped"] = mt.Engines(engine).set_loss_scale(8.0)  # what the loss_scale command reports
    with open(os.path.join(out, f"errors-rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(got, fh)


def source_weights():
    """The weights a fine-tuning run starts from: another initialisation of Net."""
    torch.manual_seed(1)
    return {k: v.detach().clone() for k, v in Net().state_dict().items()}


def run_finetune(out):
    src = source_weights()
    files = {"safetensors": os.path.join(out, "init.safetensors"), "pt": os.path.join(out, "init.pt")}
    if dist.get_rank() == 0:
        torch_save(src, files["safetensors"])
        torch_save({"module": src}, files["pt"])
    dist.barrier()
    got = {"src": src}
    for stage, kind in ((2, "safetensors"), (3, "pt")):
        # fine-tuned: a module initialised otherwise, the weights loaded by TrainConfig.init_from
        _model, eng = make_engine(stage, scheduler=False)
        engine = mt.DeepSpeedEngine(eng, loss_fn)
        if stage == 3:  # what does not fit is refused before anything is written
            before = engine.export()
            for name, bad in (("extra", dict(src, extra=torch.zeros(1))), ("missing", {k: v for k, v in src.items()
                                                                                       if k != "out.bias"}),
                              ("shape", dict(src, **{"out.weight": torch.zeros(2, 16)}))):
                try:
                    engine.load_weights(bad)
                except RuntimeError as exc:
                    got[f"z3 {name}"] = str(exc)
            got["z3 unchanged"] = all(torch.equal(before[k], v) for k, v in engine.export().items())
        res = mt.train(data(micro=False), engine,
                       config=config(out, f"ft{stage}", iterations=2, init_from=files[kind]))
        tuned = {"weights": engine.export(), "status": res.status, "step": res.step}
        if stage < 3:
            tuned["optimizer"] = optimizer_state(eng)
        # the reference: the module held the weights before deepspeed.initialize
        _model, eng = make_engine(stage, scheduler=False, weights=src)
        engine = mt.DeepSpeedEngine(eng, loss_fn)
        start = engine.export()
        mt.train(data(micro=False), engine, config=config(out, f"ref{stage}", iterations=2))
        ref = {"weights": engine.export(), "start": start}
        if stage < 3:
            ref["optimizer"] = optimizer_state(eng)
        got[f"z{stage}"] = {"tuned": tuned, "ref": ref}
    # ZeRO-2: load_weights directly, strict or not
    _model, eng = make_engine(2, scheduler=False)
    engine = mt.DeepSpeedEngine(eng, loss_fn)
    try:
        engine.load_weights(dict(src, extra=torch.zeros(1)))
    except RuntimeError as exc:
        got["z2 extra"] = str(exc)
    lenient = {k: v for k, v in src.items() if k != "scale"}
    lenient["extra"] = src["scale"]
    got["z2 lenient"] = engine.load_weights(lenient, strict=False)
    torch.save(got, os.path.join(out, f"finetune-rank{dist.get_rank()}.pt"))


class OomAt:
    """loss_fn raising torch.OutOfMemoryError at its `at`-th call on rank `rank` (before the model runs)."""

    def __init__(self, at, rank):
        self.at, self.rank, self.calls = at, rank, 0

    def __call__(self, engine, batch):
        self.calls += 1
        if self.calls == self.at and dist.get_rank() == self.rank:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (raised by the test)")
        return loss_fn(engine, batch)


def run_oom(out):
    got = {}
    for stage in (0, 1, 2):
        # 4 steps of one loader batch cut into 2 micro-batches; the 4th loss_fn call (step 2, micro-batch 2,
        # after micro-batch 1's backward pass) runs out of memory on rank 1 only
        _model, eng = make_engine(stage, scheduler=False, drop=0)
        engine = mt.DeepSpeedEngine(eng, OomAt(4, 1))
        res = mt.train(data(micro=False), engine, config=config(out, f"oom{stage}", iterations=4))
        run = {"weights": engine.export(), "status": res.status, "step": res.step, "oom_skipped": res.oom_skipped,
               "global_steps": eng.global_steps, "micro_steps": eng.micro_steps,
               "optimizer": optimizer_state(eng) if stage else {}}
        # the reference never sees the skipped batch
        _model, eng = make_engine(stage, scheduler=False, drop=0)
        engine = mt.DeepSpeedEngine(eng, loss_fn)
        batches = data(micro=False)
        del batches[1]
        mt.train(batches, engine, config=config(out, f"oomref{stage}", iterations=4))
        ref = {"weights": engine.export(), "micro_steps": eng.micro_steps,
               "optimizer": optimizer_state(eng) if stage else {}}
        got[stage] = {"run": run, "ref": ref, "optimizer_type": type(eng.optimizer).__name__}
    torch.save(got, os.path.join(out, f"oom-rank{dist.get_rank()}.pt"))


def loss_fn16(engine, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(engine(x.half()).float(), y), {"scale": engine.optimizer.cur_scale}


def run_fp16(out):
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import safe_get_full_fp32_param

    if not get_accelerator().is_fp16_supported():  # DeepSpeed's CPU backend needs oneDNN's fp16 support
        torch.save({"unsupported": True}, os.path.join(out, f"fp16-rank{dist.get_rank()}.pt"))
        return
    got = {}
    runs = (("plain", [], 4), ("set", ["loss_scale 64@2"], 4), ("huge", ["loss_scale 1e9@1"], 3))
    for name, events, iterations in runs:
        _model, eng = make_engine(2, scheduler=False, drop=0, fp16=True)
        engine = mt.DeepSpeedEngine(eng, loss_fn16)
        res = mt.train(data(micro=False), engine, config=config(out, f"fp16{name}", iterations=iterations,
                                                                events=events))
        got[name] = {"status": res.status, "scale": eng.optimizer.cur_scale,
                     "ds_scale": eng._get_optimizer_loss_scale(), "skipped_steps": eng.skipped_steps}
    # fine-tuning in fp16: the module gets 16-bit weights, the fp32 master weights the given ones
    src = source_weights()
    model, eng = make_engine(2, scheduler=False, drop=0, fp16=True)
    mt.DeepSpeedEngine(eng, loss_fn16).load_weights(src)
    got["module"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    got["master"] = {k: safe_get_full_fp32_param(p).detach().clone() for k, p in model.named_parameters()}
    got["src"] = src
    torch.save(got, os.path.join(out, f"fp16-rank{dist.get_rank()}.pt"))


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
        elif s == "finetune":
            run_finetune(out)
        elif s == "oom":
            run_oom(out)
        elif s == "fp16":
            run_fp16(out)
        else:
            raise SystemExit(f"unknown scenario {s!r}")


if __name__ == "__main__":
    main()
    finish()  # barrier, destroy the group, leave without finalizing (tests/_drivers.py)
