"""Replays the ptload fuzz corpora (seeds from real torch.save files, plus
deterministic mutations of them) through the C harnesses built with
AddressSanitizer + UndefinedBehaviorSanitizer."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "tests", "fuzz")


def build(harness, out_dir):
    gcc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("gcc")
    if gcc is None:
        pytest.skip("no C compiler")
    exe = os.path.join(out_dir, harness)
    core = sorted(os.path.join(ROOT, "csrc", "core", f) for f in os.listdir(os.path.join(ROOT, "csrc", "core"))
                  if f.endswith(".c"))
    libs = subprocess.run(["pkg-config", "--libs", "jansson"], capture_output=True, text=True).stdout.split() \
        if shutil.which("pkg-config") else []
    cmd = [gcc, "-std=c11", "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
           "-I" + os.path.join(ROOT, "csrc"), "-I" + FUZZ, "-o", exe, os.path.join(FUZZ, harness + ".c"), *core,
           *(libs or ["-ljansson"]), "-lz", "-lm", "-lpthread"]
    subprocess.run(cmd, check=True)
    return exe


@pytest.mark.parametrize("harness", ["pt_zip", "pt_pickle"])
def test_replay_corpus_under_asan(tmp_path, harness):
    corpus = os.path.join(FUZZ, "corpus_" + harness)
    assert len(os.listdir(corpus)) >= 10
    exe = build(harness, str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD",)}
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["PT_MUTATE"] = "1500"
    r = subprocess.run([exe, corpus], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"replayed {len(os.listdir(corpus))} inputs" in r.stdout
