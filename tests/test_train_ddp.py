"""DDP under mlutils.train: micro-batches (accumulate, accumulate_batches) make one gradient reduction per
optimizer step (no_sync on every micro-batch but the last), counted by a communication hook on 2 gloo ranks."""
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if os.environ.get("MLUTILS_NO_TORCH") == "1":
    pytest.skip("the training loop trains torch models", allow_module_level=True)
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

# several torch processes a test: they exercise torch and the loop, not the C core, so the
# sanitizer pass leaves them out (scripts/asan.sh)
pytestmark = pytest.mark.heavy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("how", ["batches", "split"])
def test_ddp_accumulation_reduces_once_per_step(how):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        os.path.join(ROOT, "tests", "ddp_nosync_driver.py"), how, "3"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [x for x in p.stdout.splitlines() if x.startswith("REDUCTIONS")]
    assert lines == ["REDUCTIONS 3 STEPS 3 SAME True"] * 2, p.stdout
