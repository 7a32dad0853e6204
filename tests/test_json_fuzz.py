"""Replays the JSON fuzz seeds (and deterministic mutations of them) through
tests/fuzz/json_parse.c built with gcc + AddressSanitizer/UBSan: the strict and
lenient readers and truncate_json must neither crash, leak, nor break the
harness's properties (round trip, strict-implies-lenient, error positions)."""
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def test_json_fuzz_corpus_replays_clean_under_sanitizers():
    if shutil.which("gcc") is None or shutil.which("make") is None:
        pytest.skip("gcc/make not installed")
    corpus = ROOT / "tests" / "fuzz" / "corpus_json_parse"
    seeds = [p for p in corpus.iterdir() if not p.name.startswith(".")]
    assert len(seeds) >= 10
    # the harness carries its own sanitizers; make must not run under a preloaded ASan
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    r = subprocess.run(["make", "-s", "fuzz-replay-json"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert f"replayed {len(seeds)} inputs" in r.stdout
