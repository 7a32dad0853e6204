"""mlutils.distributed: a collective that fails on one rank before anything is
sent (an object that cannot be pickled, a flag with no truth value, an NCCL id
that cannot be made, a library missing on one rank) raises on every rank within
seconds, naming the rank that failed, and leaves the group usable.  Two real
processes over gloo on loopback; the process-group timeout is short, so a rank
left waiting fails the test in seconds rather than hanging for 30 minutes."""
import json
import subprocess

import pytest

from test_distributed import FAKE_SRC, run_ranks

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

PG_TIMEOUT = 10  # seconds; every rank must raise well before this
FAST = 5.0

# Every scenario runs in one pair of processes (starting torch twice per
# scenario would cost more than the scenarios); after each, both ranks meet in
# a broadcast that must still pair up.
WORKER = r"""
import json, os, sys, time
import mlutils.distributed as D
from mlutils import _core

fake_lib, missing_lib = sys.argv[1], sys.argv[2]
D.init_distributed(timeout=%(timeout)d)
rank = D.global_rank()
make_unique_id = D.Communicator.unique_id


class Unpicklable:
    def __reduce__(self):
        raise TypeError("this object refuses to be pickled")


class NoTruth:
    def __bool__(self):
        raise ValueError("the truth value of this flag is ambiguous")


def failing_unique_id():
    raise D.DistributedError("ncclGetUniqueId failed (NCCL result 2): fake system error")


def use_nccl(path):
    os.environ["MLUTILS_NCCL_PATH"] = path
    _core._nccl_unload()  # the next nccl_library() loads from the path again


def broadcast_src0():
    return D.broadcast_object(Unpicklable() if rank == 0 else None, src=0)


def broadcast_src1():
    return D.broadcast_object(Unpicklable() if rank == 1 else None, src=1)


def broadcast_lambda():
    return D.broadcast_object((lambda: 1) if rank == 0 else None)


def any_rank():
    return D.any_rank(NoTruth() if rank == 1 else False)


def all_ranks():
    return D.all_ranks(NoTruth() if rank == 0 else True)


def unique_id():
    use_nccl(fake_lib)
    D.Communicator.unique_id = staticmethod(failing_unique_id if rank == 0 else make_unique_id)
    try:
        return D.Communicator.exchange_unique_id()
    finally:
        D.Communicator.unique_id = staticmethod(make_unique_id)


def nccl_missing_on_rank1():
    use_nccl(fake_lib if rank == 0 else missing_lib)
    return D.Communicator.exchange_unique_id()


def working_exchange():  # the failures above left nothing behind
    use_nccl(fake_lib)
    return D.Communicator.exchange_unique_id().hex()


results = {}
for step in (broadcast_src0, broadcast_src1, broadcast_lambda, any_rank, all_ranks, unique_id,
             nccl_missing_on_rank1, working_exchange):
    res = results[step.__name__] = {}
    start = time.monotonic()
    try:
        res["value"] = step()
    except Exception as e:
        res["error"] = [type(e).__name__, str(e), [c.__name__ for c in type(e).__mro__]]
        res["cause"] = repr(e.__cause__)
    res["elapsed"] = time.monotonic() - start
    try:
        res["after"] = D.broadcast_object({"after": step.__name__}, src=1)
    except Exception as e:
        res["after"] = repr(e)
print(json.dumps({"rank": rank, "results": results}), flush=True)
try:
    D.cleanup_distributed()
except Exception:
    pass  # a regression's group may be broken: the results above tell
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Each scenario's result on rank 0 and rank 1: {scenario: [rank0, rank1]}."""
    import shutil

    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the fake NCCL library")
    tmp = tmp_path_factory.mktemp("failures")
    lib = tmp / "fake_nccl.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(lib), FAKE_SRC], check=True,
                   capture_output=True, timeout=120)
    script = tmp / "failing.py"
    script.write_text(WORKER % {"timeout": PG_TIMEOUT})
    per_rank = []
    for rank, (code, out, err) in enumerate(run_ranks(script, 2, [lib, tmp / "nowhere" / "libnccl.so.2"],
                                                      timeout=240)):
        assert code == 0, f"rank {rank}: {err[-3000:]}"
        got = json.loads(out.strip().splitlines()[-1])
        assert got["rank"] == rank
        per_rank.append(got["results"])
    return {name: [per_rank[0][name], per_rank[1][name]] for name in per_rank[0]}


def _raised_everywhere(outcomes, scenario):
    results = outcomes[scenario]
    for r, res in enumerate(results):
        assert "error" in res, f"rank {r} returned {res.get('value')!r} instead of raising"
        assert res["elapsed"] < FAST, f"rank {r} raised after {res['elapsed']:.1f} s: {res['error']}"
        assert "DistributedError" in res["error"][2] and "RuntimeError" in res["error"][2], res["error"]
        assert res["after"] == {"after": scenario}, f"rank {r}: the group is out of step: {res['after']}"
    return results


@pytest.mark.parametrize("scenario, src", [("broadcast_src0", 0), ("broadcast_src1", 1)])
def test_unpicklable_object_raises_on_every_rank(outcomes, scenario, src):
    results = _raised_everywhere(outcomes, scenario)
    for res in results:
        msg = res["error"][1]
        assert f"broadcast_object: rank {src} could not pickle the object" in msg, msg
        assert "TypeError: this object refuses to be pickled" in msg, msg
    # The source keeps pickle's own exception as the cause.
    assert "this object refuses to be pickled" in results[src]["cause"]


def test_lambda_cannot_be_broadcast(outcomes):
    for res in _raised_everywhere(outcomes, "broadcast_lambda"):
        assert "rank 0 could not pickle the object" in res["error"][1] and "lambda" in res["error"][1]


@pytest.mark.parametrize("scenario, bad", [("any_rank", 1), ("all_ranks", 0)])
def test_flag_without_truth_value_raises_on_every_rank(outcomes, scenario, bad):
    results = _raised_everywhere(outcomes, scenario)
    for res in results:
        assert f"{scenario}: the flag on rank {bad} has no truth value" in res["error"][1], res["error"]
    assert "the truth value of this flag is ambiguous" in results[bad]["error"][1]


def test_unique_id_failure_on_the_first_rank_reaches_the_others(outcomes):
    for res in _raised_everywhere(outcomes, "unique_id"):
        msg = res["error"][1]
        assert "rank 0 could not make the NCCL unique id" in msg, msg
        assert "fake system error" in msg, msg


def test_nccl_missing_on_one_rank_stops_every_rank(outcomes):
    results = _raised_everywhere(outcomes, "nccl_missing_on_rank1")
    for res in results:
        # Every rank takes the same branch of an `except NcclUnavailableError` (or ImportError).
        assert "NcclUnavailableError" in res["error"][2] and "ImportError" in res["error"][2], res["error"]
        assert "NCCL could not be loaded on rank 1" in res["error"][1], res["error"]
    assert "nowhere/libnccl.so.2" in results[1]["error"][1]


def test_exchange_works_after_the_failures(outcomes):
    r0, r1 = outcomes["working_exchange"]
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    uid = bytes.fromhex(r0["value"])
    assert uid == bytes.fromhex(r1["value"]) and len(uid) == 128
    assert uid[1:] == bytes(i ^ 0x5A for i in range(1, 128))  # made by the fake library
