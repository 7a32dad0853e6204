"""The launcher's environment: ranks and world sizes (torchrun, SLURM, Open MPI), SLURM's
task and host lists, :func:`fix_unset_envs`, the leader helpers, and ``torch.distributed``
when a default process group exists."""
from __future__ import annotations

import functools
import os
import re
import socket
from typing import Any, Callable, Dict, NamedTuple, Optional, TypeVar

from .._torch import loaded_torch, require_torch

F = TypeVar("F", bound=Callable[..., Any])

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


def _import_torch_dist(what: str):
    torch = require_torch(f"{what} (torch.distributed, for {world_size()} processes)")
    import torch.distributed as dist

    if not dist.is_available():
        raise ImportError(f"{what}: this PyTorch build has no torch.distributed")
    return torch, dist
