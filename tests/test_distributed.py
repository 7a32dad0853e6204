"""mlutils.distributed: launcher environments, leader decorators, and real
multi-process runs over gloo on loopback launched with torchrun."""
import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest

import mlutils
from mlutils import distributed as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAUNCH_VARS = [
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
    "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
]


@pytest.fixture
def env(monkeypatch):
    """A clean launcher environment; set(**vars) sets some."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)

    def setter(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, str(v))

    return setter


def state():
    return (D.global_rank(), D.local_rank(), D.world_size(), D.local_world_size(),
            D.is_global_leader(), D.is_local_leader())


# ---------------------------------------------------------------- environment

def test_defaults_without_launcher(env):
    assert state() == (0, 0, 1, 1, True, True)


LAUNCHERS = {
    "torchrun": dict(RANK=5, LOCAL_RANK=1, WORLD_SIZE=8, LOCAL_WORLD_SIZE=4),
    "slurm": dict(SLURM_PROCID=5, SLURM_LOCALID=1, SLURM_NTASKS=8, SLURM_NTASKS_PER_NODE=4),
    "slurm_tasks_per_node": dict(SLURM_PROCID=5, SLURM_LOCALID=1, SLURM_NTASKS=8,
                                 SLURM_TASKS_PER_NODE="4(x2)", SLURM_NODEID=1),
    "ompi": dict(OMPI_COMM_WORLD_RANK=5, OMPI_COMM_WORLD_LOCAL_RANK=1, OMPI_COMM_WORLD_SIZE=8,
                 OMPI_COMM_WORLD_LOCAL_SIZE=4),
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_variables(env, launcher):
    env(**LAUNCHERS[launcher])
    assert state() == (5, 1, 8, 4, False, False)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_leaders_under_each_launcher(env, launcher):
    values = dict(LAUNCHERS[launcher])
    # local leader of node 1 (global rank 4), then the global leader
    for key in values:
        if key in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"):
            values[key] = 0
        if key in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
            values[key] = 4
    env(**values)
    assert (D.is_local_leader(), D.is_global_leader()) == (True, False)
    calls = []

    @D.local_leader_only
    def local_fn(x):
        calls.append(("local", x))
        return x * 2

    @D.global_leader_only(default="skipped")
    def global_fn(x):
        calls.append(("global", x))
        return x * 3

    assert local_fn(5) == 10
    assert global_fn(5) == "skipped"
    assert calls == [("local", 5)]


def test_slurm_step_variables_win_over_allocation(env):
    # `srun -n 2` inside an allocation of 8 tasks: the step has 2.
    env(SLURM_PROCID=1, SLURM_LOCALID=1, SLURM_NTASKS=8, SLURM_TASKS_PER_NODE="4(x2)",
        SLURM_STEP_NUM_TASKS=2, SLURM_STEP_TASKS_PER_NODE="2")
    assert state()[:4] == (1, 1, 2, 2)


def test_slurm_uneven_tasks_per_node(env):
    env(SLURM_PROCID=8, SLURM_LOCALID=0, SLURM_NTASKS=9, SLURM_TASKS_PER_NODE="4(x2),1", SLURM_NODEID=2)
    assert D.local_world_size() == 1
    env(SLURM_NODEID=0, SLURM_PROCID=3, SLURM_LOCALID=3)
    assert D.local_world_size() == 4


def test_torchrun_variables_win_over_slurm(env):
    # torchrun started by srun on each node: torchrun's own variables describe the worker.
    env(RANK=3, LOCAL_RANK=3, WORLD_SIZE=8, LOCAL_WORLD_SIZE=4,
        SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NTASKS=2, SLURM_NTASKS_PER_NODE=1)
    assert state()[:4] == (3, 3, 8, 4)


def test_no_mixing_of_launchers(env):
    # Only SLURM_NTASKS from SLURM and RANK from torchrun: torchrun decides, world stays 1.
    env(RANK=0, SLURM_NTASKS=4)
    assert D.world_size() == 1


def test_local_world_default_covers_local_rank(env):
    env(RANK=3, LOCAL_RANK=3, WORLD_SIZE=4)
    assert D.local_world_size() == 4


@pytest.mark.parametrize("values, name", [
    (dict(RANK="x", WORLD_SIZE=2), "RANK"),
    (dict(RANK="1.5", WORLD_SIZE=2), "RANK"),
    (dict(RANK=-1, WORLD_SIZE=2), "RANK"),
    (dict(RANK=2, WORLD_SIZE=2), "RANK"),
    (dict(RANK=1), "RANK"),
    (dict(RANK=0, WORLD_SIZE=0), "WORLD_SIZE"),
    (dict(RANK=0, WORLD_SIZE="four"), "WORLD_SIZE"),
    (dict(RANK=0, LOCAL_RANK=-2, WORLD_SIZE=2), "LOCAL_RANK"),
    (dict(RANK=0, LOCAL_RANK=2, WORLD_SIZE=4, LOCAL_WORLD_SIZE=2), "LOCAL_RANK"),
    (dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=2, LOCAL_WORLD_SIZE=4), "LOCAL_WORLD_SIZE"),
    (dict(SLURM_PROCID=4, SLURM_NTASKS=4), "SLURM_PROCID"),
    (dict(SLURM_PROCID="a", SLURM_NTASKS=4), "SLURM_PROCID"),
    (dict(SLURM_PROCID=0, SLURM_NTASKS=4, SLURM_TASKS_PER_NODE="4(x"), "SLURM_TASKS_PER_NODE"),
    (dict(SLURM_PROCID=0, SLURM_NTASKS=4, SLURM_TASKS_PER_NODE="2(x2)", SLURM_NODEID=2), "SLURM_NODEID"),
    (dict(OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_SIZE=-3), "OMPI_COMM_WORLD_SIZE"),
    (dict(OMPI_COMM_WORLD_RANK=3, OMPI_COMM_WORLD_SIZE=2), "OMPI_COMM_WORLD_RANK"),
])
def test_bad_values_raise_naming_the_variable(env, values, name):
    env(**values)
    with pytest.raises(ValueError, match=name):
        state()


def test_get_free_port_is_bindable():
    import socket

    port = D.get_free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_fix_unset_envs_single_process(env):
    D.fix_unset_envs()
    e = os.environ
    assert (e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]) == ("0", "1", "0", "1")
    assert e["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < int(e["MASTER_PORT"]) < 65536
    port = e["MASTER_PORT"]
    D.fix_unset_envs()  # set values are kept
    assert e["MASTER_PORT"] == port


def test_fix_unset_envs_keeps_what_is_set(env):
    env(MASTER_ADDR="10.0.0.1", MASTER_PORT=1234)
    D.fix_unset_envs()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.1", "1234")


def test_fix_unset_envs_from_slurm_leaves_master_to_job(env):
    env(SLURM_PROCID=2, SLURM_LOCALID=0, SLURM_NTASKS=4, SLURM_NTASKS_PER_NODE=2)
    D.fix_unset_envs()
    e = os.environ
    assert (e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]) == ("2", "4", "0", "2")
    assert "MASTER_ADDR" not in e and "MASTER_PORT" not in e


def test_decorators_keep_metadata_and_check_at_call_time(env):
    @D.global_leader_only
    def f(x):
        """doc of f"""
        return x + 1

    @D.local_leader_only(default=-1)
    def g():
        return 1

    assert f.__name__ == "f" and f.__doc__ == "doc of f" and f.__wrapped__(1) == 2
    assert g.__name__ == "g"
    assert f(1) == 2 and g() == 1
    env(RANK=1, LOCAL_RANK=1, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2)
    assert f(1) is None and g() == -1


def test_decorator_default_must_be_keyword():
    with pytest.raises(TypeError, match="default="):
        D.global_leader_only(3)


def test_single_process_collectives_are_identities(env):
    assert D.init_distributed() is None  # one process, no MASTER_ADDR: no-op
    assert not D.distributed_initialized()
    obj = {"a": [1, 2]}
    assert D.broadcast_object(obj) is obj
    assert D.any_rank(True) is True and D.any_rank(0) is False
    assert D.all_ranks(1) is True and D.all_ranks(False) is False
    D.barrier()
    model = object()
    assert D.ddp_model(model) is model
    D.cleanup_distributed()
    D.cleanup_distributed()
    with pytest.raises(ValueError, match="src=1"):
        D.broadcast_object(obj, src=1)


def test_collectives_refuse_uninitialised_world(env):
    pytest.importorskip("torch")
    env(RANK=0, WORLD_SIZE=2)
    with pytest.raises(D.DistributedError, match="init_distributed"):
        D.any_rank(True)
    with pytest.raises(RuntimeError, match="not initialised"):
        D.broadcast_object(1)


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-1, ValueError), (float("nan"), ValueError),
                                      (True, TypeError), ("5", TypeError), (timedelta(0), ValueError)])
def test_bad_timeout(env, bad, exc):
    with pytest.raises(exc, match="timeout"):
        D.init_distributed(timeout=bad)


def test_init_with_fn_calls_it_and_passes_timeout(env):
    seen = []

    def backend_init(*args, **kwargs):
        seen.append((args, kwargs))
        return "ok"

    assert D.init_distributed(backend_init, 1, key="v", timeout=2.5) == "ok"
    assert seen == [((1,), {"key": "v", "timeout": timedelta(seconds=2.5)})]


def test_exceptions_mix_in_builtins():
    assert issubclass(D.DistributedError, mlutils.MlutilsError)
    assert issubclass(D.DistributedError, RuntimeError)
    assert issubclass(D.DistributedTimeoutError, TimeoutError)


def test_import_without_torch():
    code = textwrap.dedent("""
        import sys
        sys.modules['torch'] = None
        import mlutils.distributed as D
        assert D.world_size() == 1 and D.init_distributed() is None
        assert D.any_rank(True) and D.broadcast_object(3) == 3
        import os
        os.environ.update(RANK='0', WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT='1')
        for f in (D.init_distributed, lambda: D.any_rank(True), lambda: D.broadcast_object(1)):
            try:
                f()
            except ImportError as e:
                assert 'torch' in str(e), e
            else:
                raise AssertionError('no ImportError')
        print('ok')
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=_child_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---------------------------------------------------------------- real processes

def _child_env(**extra):
    e = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_ranks(script, world, args=(), rank_env=None, timeout=60):
    """Start ``script`` once per rank (RANK, WORLD_SIZE, ... set as torchrun would, on loopback),
    without torchrun's start-up; return each rank's (returncode, stdout, stderr).
    ``rank_env(rank)`` gives a rank's extra variables.  Every rank still running
    after ``timeout`` seconds is killed and the test fails."""
    port = D.get_free_port()
    procs = []
    try:
        for rank in range(world):
            extra = dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world,
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            extra.update(rank_env(rank) if rank_env else {})
            procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=_child_env(**extra),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        results = []
        for rank, p in enumerate(procs):
            try:
                out, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} of {world} still runs after {timeout} s")
            results.append((p.returncode, out, err))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


WORKER = textwrap.dedent("""
    import json, os, sys, time
    import torch
    import mlutils.distributed as D

    out_dir = sys.argv[1]
    D.init_distributed(timeout=90)
    D.init_distributed()  # already initialised: nothing happens
    assert D.distributed_initialized()
    rank, world = D.global_rank(), D.world_size()
    res = {"rank": rank, "world": world, "local": D.local_rank(), "local_world": D.local_world_size(),
           "env_rank": int(os.environ["RANK"])}
    res["b0"] = D.broadcast_object({"from": rank, "data": list(range(5))} if rank == 0 else None)
    res["b3"] = D.broadcast_object(("tuple", rank), src=3)
    res["any_one"] = D.any_rank(rank == 2)
    res["any_none"] = D.any_rank(False)
    res["all_true"] = D.all_ranks(True)
    res["all_but_one"] = D.all_ranks(rank != 1)

    @D.global_leader_only(default="not leader")
    def leader():
        return "leader"

    res["leader"] = leader()
    model = torch.nn.Linear(2, 2)
    wrapped = D.ddp_model(model)
    res["ddp"] = type(wrapped).__name__
    D.barrier()
    D.cleanup_distributed()
    D.cleanup_distributed()
    res["after_cleanup"] = D.distributed_initialized()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
""")


def test_four_processes_with_torchrun(tmp_path):
    pytest.importorskip("torch")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-addr", "127.0.0.1", "--master-port", str(D.get_free_port()),
           str(script), str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_child_env())
    assert out.returncode == 0, out.stdout + out.stderr
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["local"], res["local_world"], res["env_rank"]) == (r, 4, r, 4, r)
        assert res["b0"] == {"from": 0, "data": [0, 1, 2, 3, 4]}
        assert res["b3"] == ["tuple", 3]
        assert (res["any_one"], res["any_none"], res["all_true"], res["all_but_one"]) == (True, False, True, False)
        assert res["leader"] == ("leader" if r == 0 else "not leader")
        assert res["ddp"] == "DistributedDataParallel"
        assert res["after_cleanup"] is False


MISSING_PEER = textwrap.dedent("""
    import time
    import torch
    import mlutils.distributed as D
    start = time.monotonic()
    try:
        D.init_distributed(timeout=5)
    except D.DistributedTimeoutError as e:
        D.cleanup_distributed()
        D.cleanup_distributed()
        print("TIMEOUT %.1f %s" % (time.monotonic() - start, e))
    else:
        print("INITIALISED")
""")


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_that_never_arrives_times_out(tmp_path, rank):
    pytest.importorskip("torch")
    script = tmp_path / "lonely.py"
    script.write_text(MISSING_PEER)
    env = _child_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=D.get_free_port())
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("TIMEOUT"), out.stdout + out.stderr
    elapsed = float(line.split()[1])
    assert 4.0 <= elapsed <= 15.0, line
    assert "timeout of 5 s" in line and f"rank {rank} of 2" in line
    assert "frame #" not in out.stdout  # no C++ stack trace in the message


# ---------------------------------------------------------------- NCCL (run-time loaded)

FAKE_SRC = os.path.join(ROOT, "tests", "c", "fake_nccl.c")
CUDA_BUILT = "cuda" in mlutils.features


@pytest.fixture
def fake_nccl(tmp_path):
    """fake_nccl(*defines, name=...) builds tests/c/fake_nccl.c into a shared object; returns its path."""
    import shutil

    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the fake NCCL library")

    def build(*defines, name="fake.so", where=None):
        out = (where or tmp_path) / name
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(out), FAKE_SRC, *defines],
                       check=True, capture_output=True, timeout=120)
        return str(out)

    return build


@pytest.fixture
def nccl_env(monkeypatch):
    """No library loaded before or after; MLUTILS_NCCL_PATH and CUDA_HOME cleared."""
    from mlutils import _core

    monkeypatch.delenv("MLUTILS_NCCL_PATH", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    _core._nccl_unload()
    yield monkeypatch
    _core._nccl_unload()


def test_nccl_codes_come_from_the_c_enums():
    from mlutils import _core

    # NCCL's ABI (nccl.h): ncclDataType_t and ncclRedOp_t
    assert D.NCCL_DTYPES == {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5,
                             "float16": 6, "float32": 7, "float64": 8, "bfloat16": 9,
                             "float8_e4m3fn": 10, "float8_e5m2": 11}
    assert D.NCCL_OPS == {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}
    assert D.NCCL_DTYPES == _core.nccl_dtypes and D.NCCL_DTYPES is not _core.nccl_dtypes
    assert D.NCCL_OPS == _core.nccl_ops and D.NCCL_OPS is not _core.nccl_ops
    # the data types are named as torch names them
    torch_names = {d.name for d in _core.torch_dtypes()}
    assert set(D.NCCL_DTYPES) <= torch_names


def test_nccl_loads_a_library_at_run_time(nccl_env, fake_nccl):
    path = fake_nccl()
    nccl_env.setenv("MLUTILS_NCCL_PATH", path)
    assert D.nccl_library() == (path, 22103)
    assert D.nccl_library() == (path, 22103)  # loaded once
    a, b = D.Communicator.unique_id(), D.Communicator.unique_id()
    assert len(a) == len(b) == 128
    assert a[1:] == bytes(i ^ 0x5A for i in range(1, 128))  # what the library wrote
    assert a[0] != b[0]


def test_nccl_directory_in_env(nccl_env, fake_nccl, tmp_path):
    path = fake_nccl(name="libnccl.so.2", where=tmp_path / "lib")
    nccl_env.setenv("MLUTILS_NCCL_PATH", str(tmp_path / "lib"))
    assert D.nccl_library()[0] == path


def test_nccl_too_old_is_refused(nccl_env, fake_nccl):
    nccl_env.setenv("MLUTILS_NCCL_PATH", fake_nccl("-DFAKE_VERSION=21703"))
    with pytest.raises(D.NcclUnavailableError) as info:
        D.nccl_library()
    msg = str(info.value)
    assert "NCCL 2.17.3 is too old" in msg and "2.18.0 or later" in msg
    assert "pip install nvidia-nccl-cu13" in msg
    assert isinstance(info.value, ImportError) and isinstance(info.value, mlutils.MlutilsError)


def test_nccl_missing_required_symbol(nccl_env, fake_nccl):
    nccl_env.setenv("MLUTILS_NCCL_PATH", fake_nccl("-DFAKE_OMIT_ALLREDUCE"))
    with pytest.raises(D.NcclUnavailableError, match="lacks the required symbol ncclAllReduce"):
        D.nccl_library()


def test_nccl_explicit_path_missing_names_it(nccl_env, tmp_path):
    nccl_env.setenv("MLUTILS_NCCL_PATH", str(tmp_path / "nope" / "libnccl.so.2"))
    with pytest.raises(D.NcclUnavailableError, match="MLUTILS_NCCL_PATH: .*nope/libnccl.so.2: not found"):
        D.nccl_library()


def test_nccl_missing_everywhere_lists_every_place(nccl_env, tmp_path):
    nccl_env.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    nccl_env.setattr(D, "_nccl_wheel_dirs", lambda: [str(tmp_path / "wheel")])
    try:
        D.nccl_library()
    except D.NcclUnavailableError as e:
        msg = str(e)
    else:
        pytest.skip("this machine has NCCL on its system path")
    for place in ("already in this process", f"{tmp_path}/wheel/libnccl.so.2: not found",
                  f"CUDA_HOME: {tmp_path}/cuda/lib64/libnccl.so.2", "/usr/local/cuda/lib64/libnccl.so.2",
                  "system library path", "pip install nvidia-nccl-cu13", "MLUTILS_NCCL_PATH"):
        assert place in msg, (place, msg)


def test_nccl_found_in_pip_wheel_layout(fake_nccl, tmp_path):
    # nvidia-nccl-cu13 installs nvidia/nccl/lib/libnccl.so.2 (a namespace package "nvidia")
    site = tmp_path / "site"
    path = fake_nccl(name="libnccl.so.2", where=site / "nvidia" / "nccl" / "lib")
    code = "import mlutils.distributed as D; print(D.nccl_library()[0])"
    env = _child_env()
    env.pop("MLUTILS_NCCL_PATH", None)
    env["PYTHONPATH"] = str(site) + os.pathsep + ROOT
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.strip()
    if "already loaded" in loaded:
        pytest.skip("an NCCL is already in the process")
    assert loaded == path


def test_nccl_dtype_and_op_names():
    torch = pytest.importorskip("torch")
    assert D._torch_dtype_code(torch, torch.bfloat16) == 9
    assert D._torch_dtype_code(torch, torch.float8_e4m3fn) == 10
    assert D._torch_dtype_code(torch, torch.float8_e5m2) == 11
    assert D._torch_dtype_code(torch, torch.float16) == 6
    with pytest.raises(TypeError, match="torch.bool"):
        D._torch_dtype_code(torch, torch.bool)
    assert D._op_code("AVG") == 4 and D._op_code(torch.distributed.ReduceOp.MAX) == 2
    with pytest.raises(ValueError, match="unknown reduction"):
        D._op_code("median")


def test_nccl_comm_init_failure_carries_nccl_text(nccl_env, fake_nccl):
    nccl_env.setenv("MLUTILS_NCCL_PATH", fake_nccl())
    uid = D.Communicator.unique_id()
    with pytest.raises(D.DistributedError) as info:
        D.Communicator.from_unique_id(uid, 0, 1)
    if CUDA_BUILT:
        assert "ncclCommInitRank failed (NCCL result 3): fake internal error: fake last error" in str(info.value)
    else:
        assert "built without CUDA" in str(info.value)
    with pytest.raises(ValueError, match="128 bytes"):
        from mlutils import _core
        _core.nccl_comm_init(1, b"short", 0)


@pytest.mark.skipif(not CUDA_BUILT, reason="the communicator needs a CUDA build")
def test_nccl_comm_checks_arguments_before_nccl(nccl_env, fake_nccl):
    nccl_env.setenv("MLUTILS_NCCL_PATH", fake_nccl("-DFAKE_WORKING"))
    comm = D.Communicator.from_unique_id(D.Communicator.unique_id(), 1, 2)
    h = comm.handle
    assert (comm.rank, comm.size, comm.closed) == (1, 2, False)
    h.all_reduce(0, 0, 4, D.NCCL_DTYPES["float32"], D.NCCL_OPS["sum"], 0)
    with pytest.raises(ValueError, match="float8 needs NCCL 2.24"):
        h.all_reduce(0, 0, 4, D.NCCL_DTYPES["float8_e4m3fn"], 0, 0)
    with pytest.raises(ValueError, match="unknown NCCL reduction 9"):
        h.all_reduce(0, 0, 4, 7, 9, 0)
    with pytest.raises(ValueError, match="unknown NCCL data type 12"):
        h.broadcast(0, 0, 4, 12, 0, 0)
    with pytest.raises(ValueError, match="root 2 is not a rank"):
        h.broadcast(0, 0, 4, 7, 2, 0)
    with pytest.raises(ValueError, match="peer -1 is not a rank"):
        h.send(0, 4, 7, -1, 0)
    with pytest.raises(ValueError, match="count must be >= 0"):
        h.recv(0, -1, 7, 0, 0)
    assert comm.handle.async_error() == (0, "")
    comm.abort()
    comm.abort()
    assert comm.closed
    with pytest.raises(ValueError, match="aborted or destroyed"):
        h.all_gather(0, 0, 4, 7, 0)
    from mlutils import _core
    with pytest.raises(RuntimeError, match="still use the library"):
        _core._nccl_unload()
    del comm, h


@pytest.mark.skipif(not CUDA_BUILT, reason="the communicator needs a CUDA build")
def test_nccl_timeout_aborts_a_communicator_that_never_forms(nccl_env, fake_nccl):
    import time

    nccl_env.setenv("MLUTILS_NCCL_PATH", fake_nccl("-DFAKE_HANG"))
    start = time.monotonic()
    with pytest.raises(D.DistributedTimeoutError, match="within the timeout of 0.5 s; the communicator was aborted"):
        D.Communicator.from_unique_id(D.Communicator.unique_id(), 0, 2, timeout=0.5)
    assert time.monotonic() - start < 5



@pytest.mark.skipif(not CUDA_BUILT, reason="the communicator needs a CUDA build")
def test_nccl_timeout_aborts_a_collective_that_never_finishes(nccl_env, fake_nccl):
    """A timed-out call is TimeoutError from the core's status (the same path as a timed-out
    initialisation), and the communicator is aborted."""
    nccl_env.setenv("MLUTILS_NCCL_PATH", fake_nccl("-DFAKE_HANG_CALLS"))
    comm = D.Communicator.from_unique_id(D.Communicator.unique_id(), 0, 2, timeout=0.2)
    h = comm.handle
    f32, total = D.NCCL_DTYPES["float32"], D.NCCL_OPS["sum"]
    with pytest.raises(TimeoutError, match="ncclAllReduce did not complete within the timeout of 0.2 s"):
        h.all_reduce(0, 0, 4, f32, total, 0)
    assert comm.closed and h.timed_out
    with pytest.raises(ValueError, match="aborted after a timeout"):
        h.all_reduce(0, 0, 4, f32, total, 0)
    del comm, h


EXCHANGE = textwrap.dedent("""
    import json, os, sys
    import mlutils.distributed as D
    out_dir = sys.argv[1]
    D.init_distributed(timeout=90)
    rank = D.global_rank()
    res = {"rank": rank}
    try:
        res["library"] = D.nccl_library()
    except D.NcclUnavailableError as e:
        res["unavailable"] = str(e)
    else:
        res["uid"] = D.Communicator.exchange_unique_id().hex()
        try:
            D.Communicator.from_process_group()
        except D.DistributedError as e:
            res["init_error"] = str(e)
    D.cleanup_distributed()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
""")


@pytest.mark.parametrize("which", ["fake", "real"])
def test_unique_id_exchange_over_gloo(tmp_path, fake_nccl, which):
    """The id made on rank 0 reaches rank 1 through torch.distributed (2 processes, gloo)."""
    pytest.importorskip("torch")
    script = tmp_path / "exchange.py"
    script.write_text(EXCHANGE)
    env = _child_env()
    if which == "fake":
        env["MLUTILS_NCCL_PATH"] = fake_nccl()
    else:
        env.pop("MLUTILS_NCCL_PATH", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(D.get_free_port()), str(script), str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    if which == "real" and "unavailable" in r0:
        pytest.skip("no NCCL here: " + r0["unavailable"].splitlines()[0])
    uid0, uid1 = bytes.fromhex(r0["uid"]), bytes.fromhex(r1["uid"])
    assert len(uid0) == 128 and uid0 == uid1
    if which == "fake":
        assert uid0[1:] == bytes(i ^ 0x5A for i in range(1, 128))
    # No GPU here: joining fails, with NCCL's (or the build's) own words, on both ranks.
    for r in (r0, r1):
        if "init_error" not in r:
            continue  # a machine with GPUs forms the communicator
        if not CUDA_BUILT:
            assert "built without CUDA" in r["init_error"]
        elif which == "fake":
            assert "fake internal error" in r["init_error"]
        else:
            assert "ncclCommInitRank failed" in r["init_error"]
