"""mlutils.distributed: hostile launcher values.  SLURM's compressed task lists
are read arithmetically (never expanded), and every rank, world size, task
list and MASTER_PORT that is not usable raises ValueError naming the variable,
in bounded time and memory, with a message of bounded length."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from mlutils import distributed as D
from test_distributed import _child_env, env  # noqa: F401  (the fixture)

SLURM_BASE = dict(SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NTASKS=2_000_000_000)


# ---------------------------------------------------------------- SLURM task lists that are fine

@pytest.mark.parametrize("tasks, node, count", [
    ("4", 0, 4),
    ("2(x3),1", 0, 2), ("2(x3),1", 2, 2), ("2(x3),1", 3, 1),
    ("2,3(x2)", 0, 2), ("2,3(x2)", 1, 3), ("2,3(x2)", 2, 3),
    ("1(x3),5(x2),2", 3, 5), ("1(x3),5(x2),2", 4, 5), ("1(x3),5(x2),2", 5, 2),
    (" 4(x2) , 3 ", 2, 3),
    ("8(x1000000)", 999_999, 8),  # the most nodes a list may name
    ("1(x999999),7", 999_999, 7),
])
def test_slurm_task_list_is_read_by_running_sums(env, tasks, node, count):
    env(**SLURM_BASE, SLURM_TASKS_PER_NODE=tasks, SLURM_NODEID=node)
    assert D.local_world_size() == count
    env(SLURM_STEP_TASKS_PER_NODE=tasks, SLURM_STEP_NUM_TASKS=1000)
    assert D.local_world_size() == count


def test_slurm_node_past_the_list(env):
    env(**SLURM_BASE, SLURM_TASKS_PER_NODE="2(x3),1", SLURM_NODEID=4)
    with pytest.raises(ValueError, match=r"SLURM_NODEID=4 is past the 4 node\(s\) of SLURM_TASKS_PER_NODE"):
        D.local_world_size()


# ---------------------------------------------------------------- hostile values, in a child with little memory

HOSTILE = textwrap.dedent("""
    import json, os, resource, sys, time
    limit = 512 << 20  # far below what expanding any of these lists would take
    if "asan" not in os.environ.get("LD_PRELOAD", ""):  # the sanitizer's shadow memory needs far more
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import mlutils.distributed as D
    base = json.loads(sys.argv[1])
    results = []
    for values in json.load(sys.stdin):
        for k in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_"))] + ["RANK", "WORLD_SIZE",
                  "LOCAL_RANK", "LOCAL_WORLD_SIZE"]:
            os.environ.pop(k, None)
        os.environ.update(base)
        os.environ.update(values)
        start = time.monotonic()
        try:
            got = list(D._launcher_env())
        except BaseException as e:
            got = [type(e).__name__, str(e)]
        results.append([got, time.monotonic() - start])
    print(json.dumps(results))
""")


def _run_hostile(cases, base):
    out = subprocess.run([sys.executable, "-c", HOSTILE, json.dumps({k: str(v) for k, v in base.items()})],
                         input=json.dumps(cases), capture_output=True, text=True, timeout=120,
                         env=_child_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def _assert_value_errors(cases, results, name_of):
    for values, (got, elapsed) in zip(cases, results):
        name = name_of(values)
        shown = {k: (v if len(v) < 40 else v[:20] + "...(%d chars)" % len(v)) for k, v in values.items()}
        assert got[0] == "ValueError", (shown, got[:1], got[1][:300] if len(got) > 1 else "")
        assert name in got[1], (shown, got[1][:300])
        assert len(got[1]) < 400, (shown, len(got[1]))  # an overlong value is not copied into the message
        assert elapsed < 1.0, (shown, elapsed)


HOSTILE_TASK_LISTS = [
    "2(x99999999999)",            # 10^11 nodes: MemoryError when expanded
    "1(x200000000)",              # 1.6 GB list when expanded
    "8(x1000001)",                # one node more than a list may name
    "1(x600000),1(x600000)",      # too many nodes in total, each group allowed alone
    "1(x" + "9" * 5000 + ")",     # more digits than int() takes
    "9" * 5000,
    "1,99999999999999999999",     # a count no node has
    "-2", "2(x-1)", "2,-3",
    "0", "2(x0)", "1,0,1", "0(x4)",  # no task on a node, or a group of no node
    "", " , ", "2(x3),,1", "abc", "2(x3", "2x3", "(x3)", "2(x3)1", "2(x 3)", "2(X3)", "٢",
    "1," * 200_000 + "1",         # a list too long to be SLURM's (it compresses runs)
    "4(x2)" + " " * 100_000,
]


@pytest.mark.parametrize("var", ["SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE"])
def test_hostile_slurm_task_lists_raise_naming_the_variable(var):
    base = dict(SLURM_BASE, SLURM_STEP_NUM_TASKS=2_000_000_000)
    # An empty list is "unset" (as for every variable); " , " and the rest are not.
    cases = [{var: v, "SLURM_NODEID": "0"} for v in HOSTILE_TASK_LISTS if v != ""]
    _assert_value_errors(cases, _run_hostile(cases, base), lambda values: var)


HOSTILE_INTEGERS = [
    dict(RANK="9" * 5000, WORLD_SIZE="2"),
    dict(RANK="0", WORLD_SIZE="9" * 5000),
    dict(RANK="x" * 100_000, WORLD_SIZE="2"),
    dict(RANK="0", WORLD_SIZE=str(2 ** 31)),             # torch's ranks are 32-bit
    dict(RANK="0", WORLD_SIZE=str(10 ** 30)),
    dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="1" * 30),
    dict(RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE=str(2 ** 64)),
    dict(RANK="0", WORLD_SIZE="1" + " " * 100_000 + "2"),
    dict(SLURM_PROCID="0", SLURM_NTASKS=str(2 ** 40)),
    dict(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_NODEID="9" * 5000, SLURM_TASKS_PER_NODE="4"),
    dict(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_NODEID=str(10 ** 12), SLURM_TASKS_PER_NODE="4"),
    dict(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE=str(2 ** 63)),
    dict(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_SIZE="7" * 5000),
]


def test_hostile_integers_raise_naming_the_variable():
    def name_of(values):
        for k, v in values.items():
            if len(v) > 12 or not v.strip().isdigit() or int(v) >= 2 ** 31:
                return k
        raise AssertionError(values)

    _assert_value_errors(HOSTILE_INTEGERS, _run_hostile(HOSTILE_INTEGERS, {}), name_of)


def test_largest_rank_torch_takes_is_accepted(env):
    top = 2 ** 31 - 1
    env(RANK=top - 1, WORLD_SIZE=top, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1)
    assert (D.global_rank(), D.world_size()) == (top - 1, top)


# ---------------------------------------------------------------- MASTER_PORT

@pytest.mark.parametrize("port", ["abc", "70000", "-1", "0", "9" * 5000, "29500x"],
                         ids=["abc", "70000", "-1", "0", "5000-digits", "29500x"])
def test_bad_master_port_raises_before_any_rendezvous(env, port):
    pytest.importorskip("torch")
    # Port 0 lets rank 0 listen anywhere: the other ranks could never find it.
    env(RANK=0, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    with pytest.raises(ValueError, match="MASTER_PORT") as info:
        D.init_distributed(timeout=3)
    assert len(str(info.value)) < 400
    assert not D.distributed_initialized()


def test_master_port_zero_is_fine_for_one_process(env):
    pytest.importorskip("torch")
    env(MASTER_ADDR="127.0.0.1", MASTER_PORT=0)
    try:
        D.init_distributed(timeout=30)
        assert D.distributed_initialized() and D.world_size() == 1
    finally:
        D.cleanup_distributed()
