"""Run by tests/test_train_scaleout.py under torchrun (gloo, CPU): a small model wrapped in DDP, FSDP1 or
FSDP2 trained by mlutils.train with checkpoints; rank 0 saves the full final weights and optimizer state.

    torchrun ... tests/dist_engines_driver.py KIND CKPT ITERATIONS OUT [EVENT ...]
Prints 'RESULT <rank> <json>' on every rank."""
import json
import os
import sys

import torch
import torch.distributed as dist

import mlutils.train as mt
from mlutils.train import wrapped
from _drivers import finish  # this folder: the drivers run as scripts


def build(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
    elif kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    return model


def main():
    kind, ckpt, iterations, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    events = sys.argv[5:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    engine = mt.TorchEngine(model, opt, lambda m, b: (m(b[0]) - b[1]).pow(2).mean(), clip_grad_norm=0.5)
    if os.environ.get("PLAIN_DCP"):  # a checkpoint written by plain dcp.save, not by mlutils: weights + 1
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd}, checkpoint_id=os.environ["PLAIN_DCP"])
        full = wrapped.full_weights(model)  # a collective: every rank gathers
        if rank == 0:
            torch.save({"model": full}, out)
        return
    if os.environ.get("KILL_AT") and rank == 1:  # killed (-9) inside DCP's writer thread of that step's save
        import signal
        import threading

        from torch.distributed.checkpoint import FileSystemWriter

        write_data = FileSystemWriter.write_data
        step_dir = "step-%08d" % int(os.environ["KILL_AT"])

        def dying_write(self, plan, planner):
            if step_dir in str(self.path) and threading.current_thread() is not threading.main_thread():
                os.kill(os.getpid(), signal.SIGKILL)
            return write_data(self, plan, planner)

        FileSystemWriter.write_data = dying_write
    if os.environ.get("NO_BACKGROUND_STAGING"):  # as on a torch without DCP's DefaultStager
        wrapped.background_saves = lambda: False

        def no_stager(*args, **kwargs):
            raise AssertionError("a background stager was made")

        wrapped.ShardedSaver = no_stager
    if os.environ.get("SLOW_STAGING"):  # the background copy of the state lags: the step must wait for it
        import time

        from torch.distributed.checkpoint._state_dict_stager import StateDictStager

        stage = StateDictStager.stage

        def slow_stage(self, *args, **kwargs):
            time.sleep(0.5)
            return stage(self, *args, **kwargs)

        StateDictStager.stage = slow_stage
    g = torch.Generator().manual_seed(100 + rank)
    data = [(torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)) for _ in range(5)]
    cfg = mt.TrainConfig(iterations=iterations, checkpoint_dir=ckpt, save_frequency=2, keep_last=0, events=events,
                         resume=os.environ.get("RESUME", "auto"),
                         read_commands=False, progress=False, metrics_stdout=False, handle_signals=False,
                         export_on_quit=True)
    if os.environ.get("LOADED_WEIGHTS"):  # the weights right after resuming, before any step
        cfg.iterations = int(os.environ["LOADED_WEIGHTS"])
        cfg.save_at_end = False
        cfg.export_on_quit = False
    res = mt.train(data, engine, config=cfg)
    weights = wrapped.full_weights(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    if rank == 0:
        torch.save({"model": weights, "optim": osd}, out)
    metrics = {k: float(v) for k, v in res.last_metrics.items() if isinstance(v, (int, float))}
    line = "RESULT %d %s\n" % (rank, json.dumps({"status": res.status, "step": res.step,
                                                  "resumed_from": res.resumed_from, "metrics": metrics}))
    os.write(1, line.encode())  # one write: the ranks share stdout


if __name__ == "__main__":
    main()
    finish()  # barrier, destroy the group, leave without finalizing (tests/_drivers.py)
