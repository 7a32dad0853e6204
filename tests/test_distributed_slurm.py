"""mlutils.distributed under SLURM: MASTER_ADDR from the first host of the
node list (SLURM's host list syntax, read without expanding a range) and
MASTER_PORT from the job id, filled only when unset; hostile values raise
ValueError naming the variable, in bounded time and memory."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from mlutils import distributed as D
from test_distributed import _child_env, env  # noqa: F401  (the fixture)

# Read here and not cleared by test_distributed's fixture.
SLURM_JOB_VARS = ["SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"]


@pytest.fixture
def senv(env, monkeypatch):  # noqa: F811
    """``env`` with SLURM's job variables cleared too (the tests may run inside a SLURM job)."""
    for name in SLURM_JOB_VARS:
        monkeypatch.delenv(name, raising=False)
    return env


def port_of(job_id):
    return str(10000 + job_id % 50000)


# ---------------------------------------------------------------- host lists and their first hosts
# Written by hand from SLURM's documented host list syntax (scontrol show hostnames):
# groups separated by commas outside brackets, each bracket a comma list of N or N-M
# with the zero padding of N kept, several brackets in one name.

FIRST_HOSTS = [
    ("node1", "node1"),
    ("node[1-4]", "node1"),
    ("gpu-a[007-009]", "gpu-a007"),
    ("cn[08-10]", "cn08"),
    ("n[9-10]", "n9"),
    ("a[1-2],b3", "a1"),
    ("b3,a[1-2]", "b3"),
    ("n[1,3-5]", "n1"),
    ("n[3-5,1]", "n3"),                     # the first as written, not the smallest
    ("n[1-1]", "n1"),
    ("rack[1-2]-n[01-04]", "rack1-n01"),
    ("rack[1-2]-n[01-04],login3", "rack1-n01"),
    ("x[1]y[2,4]z", "x1y2z"),
    ("node-01.cluster.example.org", "node-01.cluster.example.org"),
    ("gpu_a.b-c[10-12].ib", "gpu_a.b-c10.ib"),
    ("[5-6]", "5"),
    ("  node[1-2]\n", "node1"),             # whitespace around the list
    ("n[0-99999999999]", "n0"),             # never expanded
    ("n[00099-100000]", "n00099"),
]


@pytest.mark.parametrize("nodelist, first", FIRST_HOSTS, ids=[t for t, _ in FIRST_HOSTS])
def test_first_host_of_slurm_host_list(senv, nodelist, first):
    senv(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_JOB_ID=7, SLURM_JOB_NODELIST=nodelist)
    D.fix_unset_envs()
    assert os.environ["MASTER_ADDR"] == first


# ---------------------------------------------------------------- fix_unset_envs under a fake SLURM job

JOB = dict(SLURM_JOB_ID=123456, SLURM_JOB_NODELIST="gpu[03-04]", SLURM_NTASKS=4, SLURM_NTASKS_PER_NODE=2)


def _fix_and_diff():
    before = dict(os.environ)
    D.fix_unset_envs()
    after = dict(os.environ)
    assert set(before) <= set(after)
    assert all(after[k] == v for k, v in before.items())  # nothing set is changed
    return {k: v for k, v in after.items() if k not in before}


def test_fix_unset_envs_sets_exactly_the_launch_variables(senv):
    senv(**JOB, SLURM_PROCID=3, SLURM_LOCALID=1)
    assert _fix_and_diff() == dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
                                   MASTER_ADDR="gpu03", MASTER_PORT="33456")


def test_every_rank_computes_the_same_master(senv, monkeypatch):
    seen = set()
    for rank in range(4):
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name, raising=False)
        senv(**JOB, SLURM_PROCID=rank, SLURM_LOCALID=rank % 2, SLURM_NODEID=rank // 2)
        D.fix_unset_envs()
        seen.add((os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]))
    assert seen == {("gpu03", "33456")}


@pytest.mark.parametrize("job_id, port", [(1, 10001), (49999, 59999), (50000, 10000), (123456, 33456),
                                          (2 ** 32 - 1, 27295), ("+0042", 10042), (" 77 ", 10077)])
def test_master_port_formula(senv, job_id, port):
    senv(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST="n1")
    D.fix_unset_envs()
    assert os.environ["MASTER_PORT"] == str(port)


def test_step_node_list_comes_first_then_job_then_legacy_names(senv, monkeypatch):
    senv(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_JOBID=99, SLURM_NODELIST="old[1-2]")
    assert _fix_and_diff()["MASTER_ADDR"] == "old1"
    assert os.environ["MASTER_PORT"] == port_of(99)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name)
    senv(SLURM_JOB_ID=5, SLURM_JOB_NODELIST="job[7-8]")
    D.fix_unset_envs()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("job7", port_of(5))
    monkeypatch.delenv("MASTER_ADDR")
    senv(SLURM_STEP_NODELIST="job[8]")  # a step on part of the allocation: its rank 0 is there
    D.fix_unset_envs()
    assert os.environ["MASTER_ADDR"] == "job8"


@pytest.mark.parametrize("given", [dict(MASTER_ADDR="10.1.2.3"), dict(MASTER_PORT="29500"),
                                   dict(MASTER_ADDR="10.1.2.3", MASTER_PORT="29500")],
                         ids=["addr", "port", "both"])
def test_set_master_is_never_overwritten_nor_its_source_read(senv, given):
    # The unused source may even be malformed: it is not read.
    bad = dict(SLURM_JOB_NODELIST="n[1-" if "MASTER_ADDR" in given else "n1",
               SLURM_JOB_ID="x" if "MASTER_PORT" in given else "12")
    senv(SLURM_PROCID=0, SLURM_NTASKS=2, **bad, **given)
    added = _fix_and_diff()
    assert set(added) == {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                          "MASTER_ADDR", "MASTER_PORT"} - set(given)
    assert {k: os.environ[k] for k in given} == given


def test_blank_master_counts_as_unset(senv):
    senv(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_JOB_ID=12, SLURM_JOB_NODELIST="n[4-5]", MASTER_ADDR="  ")
    D.fix_unset_envs()
    assert os.environ["MASTER_ADDR"] == "n4"


def test_a_bad_value_sets_nothing(senv):
    senv(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_JOB_ID=12, SLURM_JOB_NODELIST="n[2-1]")
    before = dict(os.environ)
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        D.fix_unset_envs()
    assert dict(os.environ) == before


def test_missing_sources_leave_master_unset(senv):
    senv(SLURM_PROCID=0, SLURM_NTASKS=2)
    assert set(_fix_and_diff()) == {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}


def test_one_process_under_slurm_stays_local(senv):
    # One task needs no other node: loopback and a free port, as without a launcher.
    senv(SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_JOB_ID=12, SLURM_JOB_NODELIST="n[4-5]")
    added = _fix_and_diff()
    assert added["MASTER_ADDR"] == "127.0.0.1" and 0 < int(added["MASTER_PORT"]) < 65536


@pytest.mark.parametrize("ranks", [dict(RANK=1, WORLD_SIZE=2), dict(OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_SIZE=2)],
                         ids=["torchrun-vars", "openmpi"])
def test_other_launchers_inside_a_slurm_job(senv, ranks):
    senv(**ranks, SLURM_JOB_ID=12, SLURM_JOB_NODELIST="n[4-5]")
    D.fix_unset_envs()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("n4", port_of(12))


def test_init_distributed_reports_a_bad_node_list_before_any_rendezvous(senv):
    senv(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_JOB_ID=12, SLURM_JOB_NODELIST="n[1-2],,m3")
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        D.init_distributed(timeout=3)
    assert not D.distributed_initialized()


RANK_SCRIPT = textwrap.dedent("""
    import os, json
    import mlutils.distributed as D
    D.init_distributed(timeout=60)
    got = D.broadcast_object((os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) if D.global_rank() == 0 else None)
    print(json.dumps([D.global_rank(), D.world_size(), os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"],
                      list(got)]))
    D.cleanup_distributed()
""")


def test_init_distributed_meets_at_the_slurm_master():
    pytest.importorskip("torch")
    for _ in range(50):  # a free port the formula can give
        port = D.get_free_port()
        if 10000 <= port < 60000:
            break
    else:
        pytest.skip("no free port in [10000, 60000)")
    job = 50000 * 3 + (port - 10000)
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_child_env(SLURM_PROCID=r, SLURM_LOCALID=r, SLURM_NTASKS=2,
                                                        SLURM_JOB_ID=job, SLURM_JOB_NODELIST="localhost"))
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = sorted(json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    assert results == [[r, 2, "localhost", str(port), ["localhost", str(port)]] for r in range(2)]


# ---------------------------------------------------------------- hostile values, in a child with little memory

HOSTILE = textwrap.dedent("""
    import json, os, resource, sys, time
    limit = 512 << 20  # far below what expanding any of these ranges would take
    if "asan" not in os.environ.get("LD_PRELOAD", ""):  # the sanitizer's shadow memory needs far more
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import mlutils.distributed as D
    results = []
    for values in json.load(sys.stdin):
        for k in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "MASTER_"))] + ["RANK", "WORLD_SIZE",
                  "LOCAL_RANK", "LOCAL_WORLD_SIZE"]:
            os.environ.pop(k, None)
        os.environ.update(SLURM_PROCID="0", SLURM_NTASKS="8")
        os.environ.update(values)
        start = time.monotonic()
        try:
            D.fix_unset_envs()
            got = ["ok", os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")]
        except BaseException as e:
            got = [type(e).__name__, str(e)]
        results.append([got, time.monotonic() - start])
    print(json.dumps(results))
""")


def _run_hostile(cases):
    out = subprocess.run([sys.executable, "-c", HOSTILE], input=json.dumps(cases), capture_output=True,
                         text=True, timeout=120, env=_child_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def _shown(values):
    return {k: (v if len(v) < 40 else v[:20] + "...(%d chars)" % len(v)) for k, v in values.items()}


HOSTILE_NODE_LISTS = [
    "", " ", "\n",                              # no host at all
    ",", " , ", "a,,b", "a,", ",a", "n[1-2],",  # an empty group
    "n[1-2", "n1-2]", "n[[1-2]]", "n[1-2]]", "[", "]", "][", "n[1[2]]",  # unbalanced or nested
    "n[]", "n[,]", "n[1,]", "n[,1]",            # an empty range
    "n[5-3]", "n[10-9]", "n[1,4-2]", "n[" + "9" * 5000 + "-1]", "n[" + "1" * 5000 + "-" + "1" * 4999 + "]",
    "n[a-b]", "n[1-2-3]", "n[-1]", "n[1-]", "n[1-x]", "n[0x1]", "n[1 -2]", "n[+1]", "n[\u0662]", "n[1.5]",
    "n 1", "n\t1", "n;reboot", "n$(id)", "node\u00fc", "n/1", "n:1",   # not a host name
    "a" * 254, "n" * 200 + "[1-2]" + "x" * 100, "n[" + "0" * 300 + "-1]",  # a first host longer than DNS allows
    "x" * 70_000, "a," * 40_000, "n[" + "1," * 40_000 + "1]",          # over 64 KiB
    "n[1-2]" + " " * 70_000,
    "[" * 65_536, "n[" + "1" * 65_000, "]" * 65_536, "n[1-2]," * 9000 + "x[2-1]",
]


@pytest.mark.parametrize("var", ["SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_NODELIST"])
def test_hostile_node_lists_raise_naming_the_variable(var):
    cases = [{"SLURM_JOB_ID": "12", var: v} for v in HOSTILE_NODE_LISTS]
    for values, (got, elapsed) in zip(cases, _run_hostile(cases)):
        assert got[0] == "ValueError", (_shown(values), got[:1], got[1][:300] if len(got) > 1 else "")
        assert var in got[1] and "MASTER" not in got[1], (_shown(values), got[1][:300])
        assert len(got[1]) < 400, (_shown(values), len(got[1]))
        assert elapsed < 1.0, (_shown(values), elapsed)


HOSTILE_JOB_IDS = ["", " ", "0", "-5", "00", "abc", "1.5", "12x", "1e5", "0x10", "\u0663", "9" * 5000,
                   str(2 ** 32), str(10 ** 30), "1" + " " * 100_000 + "2", "x" * 100_000]


@pytest.mark.parametrize("var", ["SLURM_JOB_ID", "SLURM_JOBID"])
def test_hostile_job_ids_raise_naming_the_variable(var):
    cases = [{"SLURM_JOB_NODELIST": "n[1-2]", var: v} for v in HOSTILE_JOB_IDS]
    for values, (got, elapsed) in zip(cases, _run_hostile(cases)):
        assert got[0] == "ValueError", (_shown(values), got[:1], got[1][:300] if len(got) > 1 else "")
        assert var in got[1], (_shown(values), got[1][:300])
        assert len(got[1]) < 400, (_shown(values), len(got[1]))
        assert elapsed < 1.0, (_shown(values), elapsed)


def test_huge_ranges_are_read_without_expanding():
    huge = [("n[0-99999999999]", "n0"), ("n[0-" + "9" * 5000 + "]", "n0"),
            ("rack[0-999999999]-n[0-999999999]-g[0-999999999]", "rack0-n0-g0"),
            ("n[1-99999999999]," * 3000 + "m1", "n1")]
    cases = [{"SLURM_JOB_ID": "12", "SLURM_JOB_NODELIST": v} for v, _ in huge]
    for values, (_, first), (got, elapsed) in zip(cases, huge, _run_hostile(cases)):
        assert got == ["ok", first, port_of(12)], (_shown(values), got[:2])
        assert elapsed < 1.0, (_shown(values), elapsed)
