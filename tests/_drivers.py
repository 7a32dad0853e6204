"""Shared by the torchrun drivers (tests/*_driver.py)."""
import os
import sys


def finish():
    """End a driver rank once its work is done: wait for every rank, destroy the group, and leave without
    finalizing the interpreter.  torch's gloo threads can still hold objects with Python references when
    the interpreter finalizes, which now and then aborts the process there (SIGABRT, "terminate called
    without an active exception") after all the work is done."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
