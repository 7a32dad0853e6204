"""Replays the seeds of the JSON, sampler, pattern and .pt writer fuzz harnesses (plus
deterministic mutations of them) through tests/fuzz/<name>.c built with gcc +
AddressSanitizer/UBSan: the core must neither crash, leak, nor break the
properties each harness checks (see the comment at the top of each)."""
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).parent.parent


@pytest.mark.parametrize("harness", ["json_parse", "sampler_pack", "pattern_layout", "dtoa", "pt_write"])
def test_fuzz_corpus_replays_clean_under_sanitizers(harness):
    if shutil.which("gcc") is None or shutil.which("make") is None:
        pytest.skip("gcc/make not installed")
    corpus = ROOT / "tests" / "fuzz" / f"corpus_{harness}"
    seeds = [p for p in corpus.iterdir() if not p.name.startswith(".")]
    assert len(seeds) >= 8
    # the harness carries its own sanitizers; make must not run under a preloaded ASan
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    env["PT_MUTATE"] = "1000"
    r = subprocess.run(["make", "-s", f"fuzz-replay-{harness}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert f"replayed {len(seeds)} inputs" in r.stdout
