"""mlutils.distributed: the NCCL unique id exchanged over a torch.distributed
subgroup.  Three processes over gloo; the group [1, 2] exchanges an id made
on its first rank (global rank 1, not 0) by the fake NCCL library
(tests/c/fake_nccl.c), rank 0 takes no part."""
import json

import pytest

from test_distributed import CUDA_BUILT, fake_nccl, run_ranks  # noqa: F401  (the fixture)

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

SUBGROUP = r"""
import json, time
import torch.distributed as dist
import mlutils.distributed as D

D.init_distributed(timeout=10)  # a rank left waiting fails the test in seconds
rank = D.global_rank()
group = dist.new_group([1, 2])  # every rank takes part in making it
made = []  # the ids this rank's library made
make_unique_id = D.Communicator.unique_id


def recorded_unique_id():
    uid = make_unique_id()
    made.append(uid.hex())
    return uid


D.Communicator.unique_id = staticmethod(recorded_unique_id)
res = {"rank": rank}
start = time.monotonic()
try:
    if rank == 0:
        D.Communicator.exchange_unique_id(group)
    else:
        res["uid"] = D.Communicator.exchange_unique_id(group).hex()
except Exception as e:
    res["error"] = [type(e).__name__, str(e)]
res["elapsed"] = time.monotonic() - start
res["made"] = list(made)  # the exchange alone (joining below makes another)
if rank != 0:
    try:
        comm = D.Communicator.from_process_group(group)
        res["comm"] = [comm.rank, comm.size]
        comm.destroy()
    except Exception as e:
        res["init_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(res), flush=True)
try:
    D.cleanup_distributed()
except Exception:
    pass  # a broken exchange may leave the group out of step: the results above tell
"""


def test_unique_id_exchange_over_a_subgroup_led_by_rank_1(tmp_path, fake_nccl):
    lib = fake_nccl("-DFAKE_WORKING") if CUDA_BUILT else fake_nccl()
    script = tmp_path / "subgroup.py"
    script.write_text(SUBGROUP)
    results = []
    for rank, (code, out, err) in enumerate(run_ranks(script, 3, rank_env=lambda r: {"MLUTILS_NCCL_PATH": lib},
                                                      timeout=60)):
        assert code == 0, f"rank {rank}: {err[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    r0, r1, r2 = results
    assert "error" not in r1 and "error" not in r2, (r1.get("error"), r2.get("error"))
    # The group's first rank (global 1) made the one id of the exchange, and rank 2 received its bytes.
    assert len(r1["made"]) == 1 and r2["made"] == [] and r0["made"] == [], (r0["made"], r1["made"], r2["made"])
    uid = bytes.fromhex(r1["made"][0])
    assert bytes.fromhex(r1["uid"]) == uid and bytes.fromhex(r2["uid"]) == uid
    assert len(uid) == 128 and uid[1:] == bytes(i ^ 0x5A for i in range(1, 128))
    # Rank 0 is not in the group: it is told so at once and waits for nothing.
    assert r0["error"][0] == "DistributedError" and "rank 0 is not in the group" in r0["error"][1], r0["error"]
    assert r0["elapsed"] < 2.0
    # Joining: group ranks 0 and 1 of 2 (a CUDA build with the working fake), else the build's own words.
    for res, group_rank in ((r1, 0), (r2, 1)):
        if CUDA_BUILT and "comm" in res:
            assert res["comm"] == [group_rank, 2]
        elif not CUDA_BUILT:
            assert "built without CUDA" in res["init_error"], res
