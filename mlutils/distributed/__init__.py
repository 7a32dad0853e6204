"""Distributed helpers over ``torch.distributed`` (launched by torchrun or SLURM).

Ranks and world size come from the launcher's environment; collectives go
through ``torch.distributed`` (gloo on CPU, NCCL on CUDA).  mlutils runs no
rendezvous server, launcher or transport of its own.

``import mlutils.distributed`` never imports PyTorch; a helper that needs it
raises :class:`ImportError` only when used with more than one process.

Which launcher's variables are read: the first of these that is present
decides, and every value then comes from that launcher alone (never a mix):

==========  ==================  ====================  =======================  ===========================
launcher    present when        rank / local rank     world size               local world size
==========  ==================  ====================  =======================  ===========================
torchrun    any of RANK,        RANK, LOCAL_RANK      WORLD_SIZE               LOCAL_WORLD_SIZE
            WORLD_SIZE,
            LOCAL_RANK,
            LOCAL_WORLD_SIZE
SLURM       SLURM_PROCID        SLURM_PROCID,         SLURM_STEP_NUM_TASKS,    SLURM_STEP_TASKS_PER_NODE,
                                SLURM_LOCALID         else SLURM_NTASKS        SLURM_NTASKS_PER_NODE,
                                                                               SLURM_TASKS_PER_NODE
Open MPI    OMPI_COMM_WORLD_    OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE     OMPI_COMM_WORLD_LOCAL_SIZE
            RANK                ..._LOCAL_RANK
==========  ==================  ====================  =======================  ===========================

Defaults: rank 0, local rank 0, world size 1, local world size 1 (at least
local rank + 1).  Every value is checked: not an integer, negative, over
2**31 - 1 (torch's ranks are 32-bit), a rank not below the world size, or a
local world larger than the world raises :class:`ValueError` naming the
variable.  SLURM's compressed task lists (``2(x3),1``) are read group by group
with running sums, never expanded; a list over 64 KiB, naming over a million
nodes or giving a node no task is refused the same way.  Once
``torch.distributed`` is initialised, :func:`global_rank` and
:func:`world_size` come from it.

Under SLURM with several processes, an unset MASTER_ADDR is the first host of
the step's (else the job's) node list, read from SLURM's host list syntax
(``rack[1-2]-n[01-04],login3`` gives ``rack1-n01``) in one pass without
expanding a range, and an unset MASTER_PORT is ``10000 + SLURM_JOB_ID % 50000``;
a malformed list, one over 64 KiB or a job id that is not a positive 32-bit
integer raises :class:`ValueError` naming the variable.
"""
# The private names below are re-exported for the tests (and _nccl_wheel_dirs so that it can be
# replaced here: nccl_library looks it up on the package).
from ._collectives import all_ranks, any_rank, barrier, broadcast_object
from ._env import (_launcher_env, fix_unset_envs, get_free_port, global_leader_only, global_rank,
                   is_global_leader, is_local_leader, local_leader_only, local_rank, local_world_size,
                   world_size)
from ._errors import DistributedError, DistributedTimeoutError
from ._init import cleanup_distributed, ddp_model, distributed_initialized, init_distributed
from ._nccl import (NCCL_DTYPES, NCCL_OPS, Communicator, NcclUnavailableError, _nccl_wheel_dirs, _op_code,
                    _torch_dtype_code, nccl_library)

__all__ = [
    "DistributedError",
    "DistributedTimeoutError",
    "get_free_port",
    "fix_unset_envs",
    "local_rank",
    "global_rank",
    "world_size",
    "local_world_size",
    "is_local_leader",
    "is_global_leader",
    "local_leader_only",
    "global_leader_only",
    "init_distributed",
    "distributed_initialized",
    "cleanup_distributed",
    "ddp_model",
    "barrier",
    "broadcast_object",
    "any_rank",
    "all_ranks",
    "NcclUnavailableError",
    "nccl_library",
    "Communicator",
    "NCCL_OPS",
    "NCCL_DTYPES",
]
