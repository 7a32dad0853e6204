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
from __future__ import annotations

import functools
import math
import os
import pickle
import re
import socket
import time
from datetime import timedelta
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Dict, NamedTuple, Optional, Tuple, TypeVar, Union

from .._core import MlutilsError, nccl_dtypes as _nccl_dtypes, nccl_ops as _nccl_ops
from .._torch import loaded_torch, optional_torch, require_torch

if TYPE_CHECKING:
    import torch

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

F = TypeVar("F", bound=Callable[..., Any])


class DistributedError(MlutilsError, RuntimeError):
    """A distributed set-up or collective failed (the cause is chained)."""


class DistributedTimeoutError(DistributedError, TimeoutError):
    """Ranks did not meet within the timeout given."""


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------

_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


#: torch keeps ranks and world sizes in 32-bit ints.
_MAX_RANK = 2 ** 31 - 1
#: The most nodes a SLURM task list may name, and its longest text: SLURM
#: compresses runs of equal counts (``8(x4096)``), so a real list is short.
_SLURM_MAX_NODES = 1_000_000
_SLURM_MAX_TEXT = 65536
_SLURM_GROUP = re.compile(r"\s*([0-9]+)(?:\(x([0-9]+)\))?\s*")


def _cut(text: str, limit: int = 60) -> str:
    """``repr(text)`` for a message, an overlong text cut short (its length said)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit // 2]!r}... ({len(text)} characters)"


def _checked_int(text: str, what: str, minimum: int, maximum: int) -> int:
    """The integer ``text`` (ASCII digits, an optional sign) within [minimum, maximum].

    ``what`` starts the ValueError's message.  The number is compared without
    converting more digits than the bounds need (int() refuses over 4300).
    """
    text = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError(f"{what} is not an integer")
    digits = text.lstrip("+-").lstrip("0") or "0"
    sign = -1 if text.startswith("-") else 1
    # Beyond 18 digits the value is past any bound here: only its sign matters.
    value = sign * (int(digits) if len(digits) <= 18 else 10 ** 18)
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}")
    if value > maximum:
        raise ValueError(f"{what} must be <= {maximum}")
    return value


def _int_var(name: str, minimum: int, maximum: int = _MAX_RANK) -> Optional[int]:
    """The integer in environment variable ``name`` (None when unset or empty), within the bounds."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    return _checked_int(raw, f"environment variable {name}={_cut(raw)}", minimum, maximum)


def _slurm_tasks_per_node(name: str) -> Optional[int]:
    """This node's task count from a SLURM list such as ``4(x2),3`` (indexed by SLURM_NODEID).

    The list is read group by group with a running count of the nodes named so
    far, never expanded: its text, each count and the nodes in all are bounded.
    """
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    shown = f"environment variable {name}={_cut(raw)}"
    if len(raw) > _SLURM_MAX_TEXT:
        raise ValueError(f"{shown} is longer than a SLURM task list can be ({_SLURM_MAX_TEXT} characters)")
    node = _int_var("SLURM_NODEID", 0) or 0
    nodes = 0  # nodes named by the groups read so far
    count = None  # this node's tasks, once its group is read
    for part in raw.split(","):
        m = _SLURM_GROUP.fullmatch(part)
        if not m:
            raise ValueError(f"{shown} is not a SLURM task list like '4(x2),3' (at {_cut(part.strip())})")
        group = f"{shown}: group {_cut(part.strip())}"
        tasks = _checked_int(m.group(1), f"{group}: the task count", 1, _MAX_RANK)
        repeat = _checked_int(m.group(2) or "1", f"{group}: the node count", 1, _SLURM_MAX_NODES)
        if nodes + repeat > _SLURM_MAX_NODES:
            raise ValueError(f"{shown} names more than {_SLURM_MAX_NODES} nodes")
        if nodes <= node < nodes + repeat:
            count = tasks
        nodes += repeat
    if count is None:
        raise ValueError(f"environment variable SLURM_NODEID={node} is past the {nodes} node(s) of {name}={_cut(raw)}")
    return count


#: SLURM's host lists: a group is a name whose digits may be bracketed ranges
#: (``gpu[01-04,07]-ib``), groups are separated by commas outside brackets.
_SLURM_HOST_TOKEN = re.compile(r"(?P<name>[A-Za-z0-9._-]+)|(?P<range>\[[^\[\]]*\])|(?P<sep>,)|.", re.S)
_SLURM_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_SLURM_HOST_MAX = 253  # the longest DNS name
#: MASTER_PORT from the job id: 10000 + job_id % 50000, in [10000, 59999].
_SLURM_PORT_BASE = 10000
_SLURM_PORT_SPAN = 50000
_SLURM_MAX_JOB_ID = 2 ** 32 - 1  # SLURM's job ids are 32-bit


def _digits_le(a: str, b: str) -> bool:
    """Whether the decimal ``a`` <= ``b``, compared as text (any length, no int())."""
    a, b = a.lstrip("0") or "0", b.lstrip("0") or "0"
    return (len(a), a) <= (len(b), b)


def _slurm_first_host(name: str, raw: str) -> str:
    """The first host of SLURM host list ``raw`` (``rack[1-2]-n[01-04],login3`` gives ``rack1-n01``).

    The whole list is checked in one pass over its text, but no range is
    expanded: the first host is each bracket's first number, as written
    (zero padding kept), between the group's name parts.
    """
    shown = f"environment variable {name}={_cut(raw)}"
    if len(raw) > _SLURM_MAX_TEXT:
        raise ValueError(f"{shown} is longer than a SLURM host list can be ({_SLURM_MAX_TEXT} characters)")
    text = raw.strip()
    if not text:
        raise ValueError(f"{shown} is empty (no host)")
    bad = f"{shown} is not a SLURM host list like 'node[01-04],gpu7'"
    first: Optional[str] = None
    parts: list[str] = []  # the group being read (its first host's pieces)
    for m in _SLURM_HOST_TOKEN.finditer(text + ","):
        token, at = m.group(), m.start()
        if m.group("name"):
            parts.append(token)
        elif m.group("sep"):
            if not parts:
                raise ValueError(f"{bad} (an empty host at character {at})")
            if first is None:
                first = "".join(parts)
            parts = []
        elif m.group("range"):
            lows = []
            for item in token[1:-1].split(","):
                r = _SLURM_RANGE.fullmatch(item)
                if not r:
                    raise ValueError(f"{bad} (range {_cut(item)} is not N or N-M in digits, at character {at})")
                if r.group(2) is not None and not _digits_le(r.group(1), r.group(2)):
                    raise ValueError(f"{bad} (range {_cut(item)} ends below its start, at character {at})")
                lows.append(r.group(1))
            parts.append(lows[0])
        elif token in "[]":
            raise ValueError(f"{bad} (an unbalanced or nested {token!r} at character {at})")
        else:
            raise ValueError(f"{bad} (character {token!r} at {at})")
    assert first is not None  # the text is not empty: its last group ended at the added ","
    if len(first) > _SLURM_HOST_MAX:
        raise ValueError(f"{shown}: its first host {_cut(first)} is longer than a host name can be "
                         f"({_SLURM_HOST_MAX} characters)")
    return first


def _first_present(*names: str) -> Optional[str]:
    """The first of ``names`` set in the environment (even to ''), else None."""
    return next((n for n in names if n in os.environ), None)


def _slurm_master(world: int) -> Dict[str, str]:
    """MASTER_ADDR/MASTER_PORT for a SLURM job of ``world`` > 1 processes, only those unset.

    MASTER_ADDR: the first host of SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST,
    else SLURM_NODELIST (rank 0 of a step runs there).  MASTER_PORT:
    ``10000 + SLURM_JOB_ID % 50000``, the same on every rank.  A variable that
    is needed and present but unusable raises ValueError naming it; one that is
    absent leaves its value unset.
    """
    env = os.environ
    under_slurm = bool(env.get("SLURM_PROCID", "").strip() or env.get("SLURM_JOB_ID", "").strip()
                       or env.get("SLURM_JOBID", "").strip())
    if world <= 1 or not under_slurm:
        return {}
    values = {}
    if not env.get("MASTER_ADDR", "").strip():
        name = _first_present("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if name is not None:
            values["MASTER_ADDR"] = _slurm_first_host(name, env[name])
    if not env.get("MASTER_PORT", "").strip():
        name = _first_present("SLURM_JOB_ID", "SLURM_JOBID")
        if name is not None:
            raw = env[name]
            job = _checked_int(raw, f"environment variable {name}={_cut(raw)} (the SLURM job id)",
                               1, _SLURM_MAX_JOB_ID)
            values["MASTER_PORT"] = str(_SLURM_PORT_BASE + job % _SLURM_PORT_SPAN)
    return values


class _LauncherEnv(NamedTuple):
    launcher: str  # "torchrun", "SLURM", "Open MPI" or "none"
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int


def _launcher_env() -> _LauncherEnv:
    """What the launcher's environment says about this process, checked."""
    env = os.environ
    if any(env.get(n, "").strip() for n in _TORCHRUN):
        names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
        launcher = "torchrun"
        rank = _int_var("RANK", 0)
        local = _int_var("LOCAL_RANK", 0)
        world = _int_var("WORLD_SIZE", 1)
        local_world = _int_var("LOCAL_WORLD_SIZE", 1)
    elif env.get("SLURM_PROCID", "").strip():
        launcher = "SLURM"
        rank = _int_var("SLURM_PROCID", 0)
        local = _int_var("SLURM_LOCALID", 0)
        world_name = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS", "").strip() else "SLURM_NTASKS"
        world = _int_var(world_name, 1)
        local_world = None
        lw_name = "SLURM_TASKS_PER_NODE"
        if env.get("SLURM_STEP_TASKS_PER_NODE", "").strip():
            lw_name = "SLURM_STEP_TASKS_PER_NODE"
            local_world = _slurm_tasks_per_node(lw_name)
        elif env.get("SLURM_NTASKS_PER_NODE", "").strip():
            lw_name = "SLURM_NTASKS_PER_NODE"
            local_world = _int_var(lw_name, 1)
        else:
            local_world = _slurm_tasks_per_node(lw_name)
        names = ("SLURM_PROCID", "SLURM_LOCALID", world_name, lw_name)
    elif env.get("OMPI_COMM_WORLD_RANK", "").strip():
        launcher = "Open MPI"
        names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")
        rank = _int_var(names[0], 0)
        local = _int_var(names[1], 0)
        world = _int_var(names[2], 1)
        local_world = _int_var(names[3], 1)
    else:
        return _LauncherEnv("none", 0, 0, 1, 1)
    n_rank, n_local, n_world, n_lw = names
    rank = 0 if rank is None else rank
    local = 0 if local is None else local
    world_text = f"{n_world}={world}" if world is not None else f"{n_world} unset (1 process)"
    world = 1 if world is None else world
    if rank >= world:
        raise ValueError(f"environment variable {n_rank}={rank} is not below {world_text}")
    if local >= world:
        raise ValueError(f"environment variable {n_local}={local} is not below {world_text}")
    if local_world is None:
        # Not given: at least the local ranks below this one share the node.
        local_world = local + 1
    else:
        if local_world > world:
            raise ValueError(f"environment variable {n_lw}={local_world} exceeds {world_text}")
        if local >= local_world:
            raise ValueError(f"environment variable {n_local}={local} is not below {n_lw}={local_world}")
    return _LauncherEnv(launcher, rank, local, world, local_world)


def _dist_if_initialized():
    """``torch.distributed`` when a default process group exists, else None (never imports torch)."""
    if loaded_torch() is None:
        return None
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - a broken torch install
        return None
    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def get_free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def fix_unset_envs() -> None:
    """Fill the unset torchrun variables (RANK, ..., MASTER_ADDR, MASTER_PORT) from the launcher's.

    A variable already set (not blank) is never changed.  When no launcher
    variable is set (one process): RANK=0, WORLD_SIZE=1, LOCAL_RANK=0,
    LOCAL_WORLD_SIZE=1, MASTER_ADDR=127.0.0.1 and MASTER_PORT=a free port.
    Under SLURM or Open MPI the first four come from that launcher.  Under
    SLURM (SLURM_PROCID or SLURM_JOB_ID set) with more than one process,
    MASTER_ADDR is the first host of SLURM_STEP_NODELIST, else
    SLURM_JOB_NODELIST, else SLURM_NODELIST, and MASTER_PORT is
    ``10000 + SLURM_JOB_ID % 50000``: every rank computes the same pair.  Two
    jobs whose ids differ by a multiple of 50000, or two steps of one job,
    sharing that first node would collide on the port: set MASTER_PORT then.
    Otherwise MASTER_ADDR/MASTER_PORT for several processes are left to the
    job script.  A SLURM value that is needed but unusable raises ValueError
    naming it, before any variable is set.
    """
    launcher, rank, local, world, local_world = _launcher_env()
    master = _slurm_master(world)
    values = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": local, "LOCAL_WORLD_SIZE": local_world}
    for name, value in values.items():
        if not os.environ.get(name, "").strip():
            os.environ[name] = str(value)
    os.environ.update(master)
    if world == 1:
        if not os.environ.get("MASTER_ADDR", "").strip():
            os.environ["MASTER_ADDR"] = "127.0.0.1"
        if not os.environ.get("MASTER_PORT", "").strip():
            os.environ["MASTER_PORT"] = str(get_free_port())


def global_rank() -> int:
    """This process's rank among all processes (0 when not distributed)."""
    dist = _dist_if_initialized()
    if dist is not None:
        return int(dist.get_rank())
    return _launcher_env().rank


def local_rank() -> int:
    """This process's rank on its node (the CUDA device it uses)."""
    return _launcher_env().local_rank


def world_size() -> int:
    """The number of processes in the job (1 when not distributed)."""
    dist = _dist_if_initialized()
    if dist is not None:
        return int(dist.get_world_size())
    return _launcher_env().world_size


def local_world_size() -> int:
    """The number of processes on this node."""
    return _launcher_env().local_world_size


def is_local_leader() -> bool:
    """True on local rank 0 (one process per node)."""
    return local_rank() == 0


def is_global_leader() -> bool:
    """True on global rank 0 (one process per job)."""
    return global_rank() == 0


def _leader_only(check: Callable[[], bool], name: str, fn: Optional[Callable], default: Any):
    def decorate(f: F) -> F:
        if not callable(f):
            raise TypeError(f"{name} decorates a callable, got {type(f).__name__}")

        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if check():
                return f(*args, **kwargs)
            return default

        return wrapper  # type: ignore[return-value]

    if fn is None:
        return decorate
    if not callable(fn):
        raise TypeError(f"{name}: pass the default by keyword, {name}(default=...); got {fn!r}")
    return decorate(fn)


def local_leader_only(fn: Optional[Callable] = None, *, default: Any = None):
    """Run the function on local rank 0 only; elsewhere return ``default``.

    Usable bare (``@local_leader_only``) or as ``@local_leader_only(default=x)``.
    The rank is checked at each call, not when decorating.
    """
    return _leader_only(is_local_leader, "local_leader_only", fn, default)


def global_leader_only(fn: Optional[Callable] = None, *, default: Any = None):
    """Run the function on global rank 0 only; elsewhere return ``default``.

    Usable bare (``@global_leader_only``) or as ``@global_leader_only(default=x)``.
    """
    return _leader_only(is_global_leader, "global_leader_only", fn, default)


# --------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------

_STATE: Dict[str, Any] = {"ran": False, "backend": None}


def _import_torch_dist(what: str):
    torch = require_torch(f"{what} (torch.distributed, for {world_size()} processes)")
    import torch.distributed as dist

    if not dist.is_available():
        raise ImportError(f"{what}: this PyTorch build has no torch.distributed")
    return torch, dist


def _as_timedelta(timeout: Union[float, int, timedelta, None]) -> Optional[timedelta]:
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be seconds (float) or a timedelta, got {type(timeout).__name__}")
    else:
        seconds = float(timeout)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
    return timedelta(seconds=seconds)


def _cuda_usable(torch: ModuleType) -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - a broken driver counts as no CUDA
        return False


def _set_device(torch: ModuleType) -> None:
    if _cuda_usable(torch):
        count = torch.cuda.device_count()
        lr = local_rank()
        if lr >= count:
            raise DistributedError(
                f"local rank {lr} has no CUDA device: this node shows {count} device(s) "
                "(start at most that many processes per node, or set CUDA_VISIBLE_DEVICES)")
        torch.cuda.set_device(lr)


def init_distributed(fn: Optional[Callable] = None, *args: Any,
                     timeout: Union[float, timedelta, None] = None, **kwargs: Any) -> Any:
    """Initialise ``torch.distributed`` from the launcher's environment.

    Without ``fn``: one process with no MASTER_ADDR is a no-op (the collectives
    here are then identities); otherwise the default process group is made with
    NCCL when CUDA is usable (after ``torch.cuda.set_device(local_rank())``),
    gloo on CPU, through ``env://`` (MASTER_ADDR, MASTER_PORT; under SLURM the
    unset ones are first set as :func:`fix_unset_envs` does).  Already
    initialised: nothing is done.  ``timeout`` (seconds or timedelta) bounds the
    rendezvous and every later collective; a rank that never arrives raises
    :class:`DistributedTimeoutError`.

    With ``fn`` (e.g. ``deepspeed.init_distributed``): set the CUDA device to
    the local rank and return ``fn(*args, **kwargs)``; a given ``timeout`` is
    passed on as ``timeout=timedelta``.
    """
    td = _as_timedelta(timeout)
    if fn is not None:
        if not callable(fn):
            raise TypeError(f"init_distributed: fn must be callable, got {type(fn).__name__}")
        torch = optional_torch()
        if torch is not None:
            _set_device(torch)
        if td is not None:
            kwargs["timeout"] = td
        result = fn(*args, **kwargs)
        _STATE["ran"] = True
        return result

    if _dist_if_initialized() is not None:
        _STATE["ran"] = True
        return None
    env = _launcher_env()
    launcher, rank, world = env.launcher, env.rank, env.world_size
    os.environ.update(_slurm_master(world))
    master_addr = os.environ.get("MASTER_ADDR", "").strip()
    if world == 1 and not master_addr:
        _STATE["ran"] = True
        return None
    torch, dist = _import_torch_dist("init_distributed")
    if not master_addr or not os.environ.get("MASTER_PORT", "").strip():
        raise DistributedError(
            f"init_distributed: {world} processes ({launcher}) but MASTER_ADDR/MASTER_PORT are not set; "
            "torchrun sets them; under SLURM they come from SLURM_JOB_NODELIST and SLURM_JOB_ID, "
            "else export them in the job script, e.g. "
            "MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1) MASTER_PORT=29500")
    port = _int_var("MASTER_PORT", 0, 65535)
    if port == 0 and world > 1:
        raise ValueError(
            f"environment variable MASTER_PORT=0 lets rank 0 listen on any port, which the other {world - 1} "
            "rank(s) cannot know: set the same fixed port (e.g. 29500) on every rank")
    _set_device(torch)
    backend = "nccl" if _cuda_usable(torch) else "gloo"
    extra = {} if td is None else {"timeout": td}
    where = f"{master_addr}:{port}"
    start = time.monotonic()
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, **extra)
    except Exception as e:  # torch raises DistStoreError, RuntimeError, ValueError ...
        elapsed = time.monotonic() - start
        # torch appends a C++ stack trace to some messages: keep its first line.
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        timed_out = "timed out" in text.lower() or "timeout" in text.lower() or (
            td is not None and elapsed >= 0.9 * td.total_seconds())
        if timed_out:
            limit = f"{td.total_seconds():g} s" if td is not None else "the default timeout"
            raise DistributedTimeoutError(
                f"init_distributed: rank {rank} of {world} did not meet the other ranks at {where} "
                f"within the timeout of {limit} (waited {elapsed:.1f} s; is every rank started "
                f"with the same MASTER_ADDR/MASTER_PORT?): {text}") from e
        raise DistributedError(
            f"init_distributed: {backend} process group for rank {rank} of {world} at {where} failed: {text}") from e
    _STATE["ran"] = True
    _STATE["backend"] = backend
    return None


def distributed_initialized() -> bool:
    """True when ``torch.distributed`` has a default process group now."""
    return _dist_if_initialized() is not None


def cleanup_distributed() -> None:
    """Barrier, then destroy the default process group; safe to call twice or after a failed init."""
    dist = _dist_if_initialized()
    if dist is None:
        return
    try:
        barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _STATE["backend"] = None


def ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """Wrap in DistributedDataParallel when initialised with more than one process, else return ``model``."""
    dist = _dist_if_initialized()
    if dist is None or dist.get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if _on_cuda(dist):
        kwargs.setdefault("device_ids", [local_rank()])
    return DistributedDataParallel(model, **kwargs)


def _on_cuda(dist, group: Any = None) -> bool:
    backend = str(dist.get_backend(group))
    return backend == "nccl"


def _device(dist, group: Any = None) -> torch.device:
    """Where the tensors of a collective over ``group`` live: the current CUDA device under NCCL, else the CPU."""
    torch = require_torch("a collective")

    return torch.device("cuda", torch.cuda.current_device()) if _on_cuda(dist, group) else torch.device("cpu")


def _group_for(what: str):
    """``torch.distributed`` when collectives must run, None for one process; raises when world>1 but not set up."""
    dist = _dist_if_initialized()
    if dist is not None:
        return dist
    world = _launcher_env().world_size
    if world == 1:
        return None
    _import_torch_dist(what)
    raise DistributedError(
        f"{what}: the environment says {world} processes but torch.distributed is not initialised; "
        "call mlutils.distributed.init_distributed() first")


def barrier() -> None:
    """Wait until every rank gets here (no-op for one process)."""
    dist = _group_for("barrier")
    if dist is None:
        return
    if _on_cuda(dist):
        torch = require_torch("barrier")
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


# A collective whose input is made on one rank (pickled, asked of NCCL, ...) can
# fail there before anything is sent.  That rank must still take part, saying
# that it failed, or every other rank waits out the whole process-group
# timeout (or, worse, pairs with the next collective): so the failure travels
# in the same collectives as the answer and every rank raises at once.

_SENT, _FAILED = 1, 2  # header of _broadcast_bytes: the payload is the bytes / the error's text
_ERROR_TEXT_MAX = 2000


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= _ERROR_TEXT_MAX else text[:_ERROR_TEXT_MAX] + "..."


def _broadcast_bytes(dist, produce: Callable[[], bytes], src: int, group: Any, what: str, failure: str) -> bytes:
    """``produce()`` run on global rank ``src`` only, its bytes returned on every rank of ``group``.

    The source runs ``produce`` first, then broadcasts a header (sent or
    failed, length) and the payload: the bytes, or the text of produce's
    exception.  When produce fails every rank raises :class:`DistributedError`
    ("{what}: rank {src} {failure}: {error}"; on the source the exception is
    chained), and the group stays in step.
    """
    torch = require_torch(what)

    device = _device(dist, group)
    is_src = dist.get_rank() == src
    error: Optional[Exception] = None
    payload = b""
    header = torch.zeros(2, dtype=torch.int64)
    if is_src:
        try:
            payload = bytes(produce())
            header[0] = _SENT
        except Exception as e:  # anything produce raises is reported to every rank
            error = e
            payload = _error_text(e).encode("utf-8", "replace")
            header[0] = _FAILED
        header[1] = len(payload)
    header = header.to(device)
    dist.broadcast(header, src=src, group=group)
    status, length = (int(v) for v in header.tolist())
    if status not in (_SENT, _FAILED) or length < 0:
        raise DistributedError(
            f"{what}: rank {src} sent no header of this call (read {status}, {length}); "
            "do all ranks call the same collectives in the same order?")
    if length:
        if is_src:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        else:
            data = torch.empty(length, dtype=torch.uint8, device=device)
        dist.broadcast(data, src=src, group=group)
        if not is_src:
            payload = data.cpu().numpy().tobytes()
    if status == _FAILED:
        raise DistributedError(f"{what}: rank {src} {failure}: {payload.decode('utf-8', 'replace')}") from error
    return payload


def _agree(dist, group: Any, error: Optional[BaseException], what: str, failure: str,
           exc_type: Optional[type] = None) -> None:
    """Raise on every rank of ``group`` when ``error`` is set on any of them (one all_reduce).

    The message names the lowest failing global rank ("{what}: {failure} on
    rank N"), with this rank's own error when it failed (chained).
    """
    torch = require_torch(what)

    exc_type = exc_type or DistributedError
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([world - rank if error is not None else 0], dtype=torch.int64, device=_device(dist, group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    failed = int(t.item())
    if failed:
        msg = f"{what}: {failure} on rank {world - failed}"
        if error is not None:
            msg += f" (on this rank, {rank}: {_error_text(error)})"
        raise exc_type(msg) from error


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (pickled; identity for one process).

    An object that cannot be pickled raises :class:`DistributedError` on every
    rank at once, naming ``src`` and pickle's error (chained on ``src``).
    """
    if isinstance(src, bool) or not isinstance(src, int):
        raise TypeError(f"broadcast_object: src must be an int rank, got {type(src).__name__}")
    dist = _group_for("broadcast_object")
    world = 1 if dist is None else dist.get_world_size()
    if not 0 <= src < world:
        raise ValueError(f"broadcast_object: src={src} is not a rank of a world of {world}")
    if dist is None:
        return obj
    rank = dist.get_rank()
    payload = _broadcast_bytes(dist, lambda: pickle.dumps(obj), src, None,
                               "broadcast_object", "could not pickle the object")
    if rank == src:
        return obj
    try:
        return pickle.loads(payload)
    except Exception as e:
        raise DistributedError(
            f"broadcast_object: the object from rank {src} could not be unpickled on rank {rank}: "
            f"{_error_text(e)}") from e


def _reduce_flag(flag: Any, what: str, maximum: bool, group: Any = None) -> bool:
    dist = _group_for(what)
    if dist is None:
        return bool(flag)
    torch = require_torch(what)

    error: Optional[Exception] = None
    try:
        value = bool(flag)
    except Exception as e:  # e.g. a tensor or array of several elements: reported to every rank
        error, value = e, False
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # One all_reduce(MAX) of [witness, failure]: any_rank is the MAX of the
    # flags, all_ranks the negation of the MAX of their negations; the failure
    # is world - rank on a failing rank, so its MAX names the lowest of them.
    witness = value if maximum else not value
    t = torch.tensor([1 if witness else 0, world - rank if error is not None else 0],
                     dtype=torch.int32, device=_device(dist, group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    seen, failed = (int(v) for v in t.tolist())
    if failed:
        msg = f"{what}: the flag on rank {world - failed} has no truth value"
        if error is not None:
            msg += f" (on this rank, {rank}: {_error_text(error)})"
        raise DistributedError(msg) from error
    return bool(seen) if maximum else not seen


def any_rank(flag: Any, group: Any = None) -> bool:
    """Logical OR of ``flag`` over all ranks (e.g. "some rank asked to stop"); over `group` when given (a
    gloo group on the CPU keeps the agreement off the GPU: no device sync)."""
    return _reduce_flag(flag, "any_rank", True, group)


def all_ranks(flag: Any, group: Any = None) -> bool:
    """Logical AND of ``flag`` over all ranks (of `group` when given)."""
    return _reduce_flag(flag, "all_ranks", False, group)


# --------------------------------------------------------------------------
# NCCL communicator (libnccl.so.2 loaded at run time by the C core)
# --------------------------------------------------------------------------

class NcclUnavailableError(DistributedError, ImportError):
    """libnccl.so.2 could not be loaded (the message lists every place tried)."""


#: Reductions by name, as NCCL numbers them (ncclRedOp_t; the C core's enum).
NCCL_OPS = dict(_nccl_ops)
#: Data types by name, as NCCL numbers them (ncclDataType_t; the C core's enum).
NCCL_DTYPES = dict(_nccl_dtypes)


def _nccl_wheel_dirs() -> list:
    """lib folders of installed nvidia-nccl-cu* wheels (``nvidia/nccl/lib`` and the like)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        for sub in ("nccl/lib", "cu13/lib", "cu12/lib"):
            d = os.path.join(base, sub)
            if os.path.isdir(d):
                dirs.append(d)
    return dirs


def nccl_library() -> Tuple[str, int]:
    """Load libnccl.so.2 once and return ``(path, version_code)``.

    Looks at $MLUTILS_NCCL_PATH (only there when set), an NCCL this process
    already loaded (PyTorch's), the nvidia-nccl pip wheels, the CUDA install
    ($CUDA_HOME, $CUDA_PATH, /usr/local/cuda) and the system library path;
    NCCL 2.18 or later.  Raises :class:`NcclUnavailableError` naming every
    place tried and what to install.
    """
    from .. import _core

    try:
        lib = _core.nccl_load(_nccl_wheel_dirs())
    except ImportError as e:
        raise NcclUnavailableError(str(e)) from None
    return lib.path, lib.version


def _torch_dtype_code(torch: ModuleType, dtype: torch.dtype) -> int:
    name = str(dtype).replace("torch.", "")
    code = NCCL_DTYPES.get(name)
    if code is None:
        raise TypeError(f"NCCL has no data type for {dtype} (supported: {', '.join(NCCL_DTYPES)})")
    return code


def _op_code(op: Any) -> int:
    name = getattr(op, "name", op)  # accepts torch.distributed.ReduceOp members too
    if isinstance(name, str) and name.lower() in NCCL_OPS:
        return NCCL_OPS[name.lower()]
    raise ValueError(f"unknown reduction {op!r}: use one of {', '.join(NCCL_OPS)}")


class Communicator:
    """An NCCL communicator driven from Python, on the caller's current CUDA stream.

    Made with :meth:`from_process_group` (the unique id is created on the
    group's first rank and sent to the others over that torch.distributed
    group) or :meth:`from_unique_id`.  Tensor methods take contiguous CUDA
    tensors on this communicator's device and enqueue on
    ``torch.cuda.current_stream()`` unless ``stream`` (a torch stream or a
    raw ``cudaStream_t`` int) is given; :attr:`handle` takes raw device
    pointers.  Every failure carries NCCL's own error text.  With ``timeout``
    the communicator is non-blocking and each call (and :meth:`synchronize`)
    gives up after that many seconds, aborting the communicator.
    """

    def __init__(self, handle: Any, timeout: Optional[float], device: Optional[int]):
        self._handle = handle
        self.timeout = timeout
        self.device = device

    # ---- construction
    @staticmethod
    def unique_id() -> bytes:
        """A new 128-byte NCCL unique id (ncclGetUniqueId; needs no GPU)."""
        from .. import _core

        nccl_library()
        return _call(_core.nccl_unique_id)

    @staticmethod
    def exchange_unique_id(group: Any = None) -> bytes:
        """Make an id on the group's first rank and return it on every rank of ``group``."""
        _torch, dist = _import_torch_dist("Communicator")
        what = "Communicator.exchange_unique_id"
        if not dist.is_initialized():
            raise DistributedError(f"{what}: torch.distributed is not initialised; "
                                   "call mlutils.distributed.init_distributed() first")
        if group is not None and dist.get_rank(group) < 0:
            raise DistributedError(f"{what}: rank {dist.get_rank()} is not in the group; "
                                   "call it on the group's ranks only")
        src = 0 if group is None else dist.get_global_rank(group, 0)
        # NCCL is needed on every rank: one rank without it stops all of them,
        # with the same exception everywhere (so they take the same branch).
        error: Optional[Exception] = None
        try:
            nccl_library()
        except Exception as e:
            error = e
        _agree(dist, group, error, what, "NCCL could not be loaded", NcclUnavailableError)
        uid = _broadcast_bytes(dist, Communicator.unique_id, src, group, what, "could not make the NCCL unique id")
        if len(uid) != 128:
            raise DistributedError(f"{what}: the NCCL unique id received from rank {src} is {len(uid)} bytes, not 128")
        return uid

    @classmethod
    def from_process_group(cls, group: Any = None, timeout: Union[float, timedelta, None] = None) -> "Communicator":
        """One communicator over the ranks of a torch.distributed ``group`` (default: the world)."""
        _torch, dist = _import_torch_dist("Communicator")
        _as_timedelta(timeout)  # a bad timeout is refused before any rank waits for another
        uid = cls.exchange_unique_id(group)
        return cls.from_unique_id(uid, dist.get_rank(group), dist.get_world_size(group), timeout=timeout)

    @classmethod
    def from_unique_id(cls, uid: bytes, rank: int, size: int,
                       timeout: Union[float, timedelta, None] = None) -> "Communicator":
        """Join the communicator ``uid`` as ``rank`` of ``size`` on the current CUDA device."""
        from .. import _core

        td = _as_timedelta(timeout)
        nccl_library()
        device = None
        torch = optional_torch()
        if torch is not None and _cuda_usable(torch):
            device = torch.cuda.current_device()
        handle = _call(_core.nccl_comm_init, size, uid, rank, td.total_seconds() if td else 0.0)
        return cls(handle, None if td is None else td.total_seconds(), device)

    # ---- properties
    @property
    def handle(self) -> Any:
        """The raw communicator: methods take device pointers, counts, NCCL dtype/op codes, streams."""
        return self._handle

    @property
    def rank(self) -> int:
        return self._handle.rank

    @property
    def size(self) -> int:
        return self._handle.size

    # ---- helpers
    def _stream(self, stream: Any) -> int:
        if stream is None:
            torch = require_torch("Communicator")
            return int(torch.cuda.current_stream().cuda_stream)
        if isinstance(stream, int):
            return stream
        return int(stream.cuda_stream)

    def _check(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if not getattr(t, "is_cuda", False):
                raise ValueError(f"NCCL needs CUDA tensors, got one on {getattr(t, 'device', type(t).__name__)}")
            if not t.is_contiguous():
                raise ValueError("NCCL needs contiguous tensors")
            if self.device is not None and t.device.index != self.device:
                raise ValueError(f"tensor on cuda:{t.device.index}, the communicator is on cuda:{self.device}")
        if len({t.dtype for t in tensors}) > 1:
            raise TypeError(f"tensors of different dtypes: {[str(t.dtype) for t in tensors]}")

    def _dtype(self, t: torch.Tensor) -> int:
        torch = require_torch("Communicator")
        return _torch_dtype_code(torch, t.dtype)

    # ---- collectives (tensors)
    def all_reduce(self, tensor: torch.Tensor, op: Any = "sum", out: Optional[torch.Tensor] = None,
                   stream: Any = None) -> torch.Tensor:
        """Reduce ``tensor`` over ranks into ``out`` (default: in place); returns the result tensor."""
        out = tensor if out is None else out
        self._check(tensor, out)
        if out.numel() != tensor.numel():
            raise ValueError(f"out has {out.numel()} elements, tensor {tensor.numel()}")
        _call(self._handle.all_reduce, tensor.data_ptr(), out.data_ptr(), tensor.numel(),
              self._dtype(tensor), _op_code(op), self._stream(stream))
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0, stream: Any = None) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` into ``tensor`` on every rank (in place)."""
        self._check(tensor)
        _call(self._handle.broadcast, tensor.data_ptr(), tensor.data_ptr(), tensor.numel(),
              self._dtype(tensor), src, self._stream(stream))
        return tensor

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, stream: Any = None) -> torch.Tensor:
        """Every rank's ``input`` one after another into ``output`` (size * input.numel() elements)."""
        self._check(output, input)
        if output.numel() != input.numel() * self.size:
            raise ValueError(f"all_gather output needs {input.numel() * self.size} elements, has {output.numel()}")
        _call(self._handle.all_gather, input.data_ptr(), output.data_ptr(), input.numel(),
              self._dtype(input), self._stream(stream))
        return output

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: Any = "sum",
                       stream: Any = None) -> torch.Tensor:
        """Reduce ``input`` over ranks; rank r keeps block r in ``output`` (input.numel() / size elements)."""
        self._check(output, input)
        if input.numel() != output.numel() * self.size:
            raise ValueError(f"reduce_scatter input needs {output.numel() * self.size} elements, has {input.numel()}")
        _call(self._handle.reduce_scatter, input.data_ptr(), output.data_ptr(), output.numel(),
              self._dtype(input), _op_code(op), self._stream(stream))
        return output

    def send(self, tensor: torch.Tensor, peer: int, stream: Any = None) -> None:
        """Send ``tensor`` to rank ``peer`` (pair with its :meth:`recv`)."""
        self._check(tensor)
        _call(self._handle.send, tensor.data_ptr(), tensor.numel(), self._dtype(tensor), peer, self._stream(stream))

    def recv(self, tensor: torch.Tensor, peer: int, stream: Any = None) -> torch.Tensor:
        """Receive into ``tensor`` from rank ``peer``."""
        self._check(tensor)
        _call(self._handle.recv, tensor.data_ptr(), tensor.numel(), self._dtype(tensor), peer, self._stream(stream))
        return tensor

    def group_start(self) -> None:
        """ncclGroupStart: the following calls are issued together at :meth:`group_end`."""
        _call(self._handle.group_start)

    def group_end(self) -> None:
        _call(self._handle.group_end)

    def barrier(self, stream: Any = None) -> None:
        """All ranks meet: a one-element all_reduce, then wait for it."""
        torch = require_torch("Communicator.barrier")

        t = torch.zeros(1, dtype=torch.float32, device=torch.device("cuda", self.device or 0))
        self.all_reduce(t, stream=stream)
        self.synchronize(stream)

    def synchronize(self, stream: Any = None, timeout: Union[float, timedelta, None] = None) -> None:
        """Wait for the work queued on ``stream``; with a timeout (or the communicator's), poll and abort when late."""
        torch = require_torch("Communicator.synchronize")

        td = _as_timedelta(timeout)
        limit = td.total_seconds() if td is not None else self.timeout
        s = torch.cuda.current_stream() if stream is None else (
            torch.cuda.ExternalStream(stream) if isinstance(stream, int) else stream)
        if limit is None:
            s.synchronize()
            self.check()
            return
        deadline = time.monotonic() + limit
        while not s.query():
            self.check()
            if time.monotonic() > deadline:
                self.abort()
                raise DistributedTimeoutError(
                    f"NCCL work did not finish within the timeout of {limit:g} s; the communicator was aborted")
            time.sleep(0.0005)
        self.check()

    def check(self) -> None:
        """Raise when NCCL reports an asynchronous error on this communicator."""
        code, text = _call(self._handle.async_error)
        if code not in (0, 7):
            raise DistributedError(f"NCCL communicator error: {text}")

    def abort(self) -> None:
        """ncclCommAbort: stop now (pending work is dropped); safe to call again."""
        _call(self._handle.abort)

    def destroy(self) -> None:
        """ncclCommDestroy after pending work; safe to call again."""
        _call(self._handle.destroy)

    @property
    def closed(self) -> bool:
        return bool(self._handle.closed)

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.destroy()
        else:
            self.abort()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Communicator rank {self.rank} of {self.size}, cuda:{self.device}, {state}>"


def _call(fn: Callable, *args: Any) -> Any:
    """Call into the C core, turning its TimeoutError/RuntimeError into ours (NCCL's text kept)."""
    try:
        return fn(*args)
    except TimeoutError as e:
        raise DistributedTimeoutError(str(e)) from e
    except ImportError as e:
        raise NcclUnavailableError(str(e)) from e
    except RuntimeError as e:
        raise DistributedError(str(e)) from e
