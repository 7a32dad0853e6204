"""Run by tests/test_train_ddp.py under torchrun (2 ranks, gloo): a DDP model trained by mlutils.train with
micro-batches; a communication hook counts the gradient reductions.  Prints 'REDUCTIONS <n> STEPS <m>'."""
import os
import sys

import torch
import torch.distributed as dist

import mlutils.train as mt
from _drivers import finish  # this folder: the drivers run as scripts


def main() -> None:
    how, k = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    calls = []

    def counting(state, bucket):
        calls.append(bucket.index())
        fut = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    model.register_comm_hook(None, counting)
    engine = mt.TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            lambda m, b: m(b).pow(2).mean(), accumulate=k if how == "split" else 1)
    g = torch.Generator().manual_seed(dist.get_rank())
    data = [torch.randn(6, 4, generator=g) for _ in range(12)]
    cfg = mt.TrainConfig(iterations=3, checkpoint_dir=None, read_commands=False, progress=False,
                         metrics_stdout=False, handle_signals=False,
                         accumulate_batches=k if how == "batches" else 1)
    res = mt.train(data, engine, config=cfg)
    w = model.module.weight.detach().clone()
    others = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
    dist.all_gather(others, w)
    same = all(torch.equal(o, w) for o in others)
    os.write(1, f"REDUCTIONS {len(calls)} STEPS {res.step} SAME {same}\n".encode())  # one write: shared stdout


if __name__ == "__main__":
    main()
    finish()  # barrier, destroy the group, leave without finalizing (tests/_drivers.py)
