"""A file cut and restored by another thread while a child process reads it."""
import subprocess
import sys
import threading
import time

import numpy as np


def run_while_cutting(path, child_code, seconds=1.5, seed=0):
    """Runs `python -c child_code path seconds` while a thread keeps truncating
    `path` to a random length and writing its bytes back (same inode).
    Returns the child's (ok, bad) counts, after checking it exited 0 (no SIGBUS)."""
    data = open(path, "rb").read()
    stop = threading.Event()
    rng = np.random.default_rng(seed)

    def cutter():
        with open(path, "r+b") as f:
            while not stop.is_set():
                f.truncate(int(rng.integers(0, len(data))))
                time.sleep(0)
                f.seek(0)
                f.write(data)
                f.flush()

    t = threading.Thread(target=cutter)
    t.start()
    try:
        r = subprocess.run([sys.executable, "-c", child_code, str(path), str(seconds)], capture_output=True,
                           text=True, timeout=120)
    finally:
        stop.set()
        t.join()
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    ok, bad = map(int, r.stdout.split())
    assert ok + bad > 0
    return ok, bad
