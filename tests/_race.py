"""A file cut and restored by another thread while a child process reads it.

A read that overlaps a cut can see the bytes the cut zeroes (the kernel
does not make a read atomic against a truncate of the same inode: a page
can be zeroed while it is being copied out), and nothing a reader does can
tell.  So the cutter keeps a generation number beside the file, odd while
it cuts and restores (a seqlock): the child checks values only for reads
that no cut overlapped (`stable_since(g)`), and every read, overlapped or
not, must succeed or raise the format's error, never crash."""
import os
import subprocess
import sys
import threading
import time

import numpy as np

#: Put at the top of a child's code: cut_generation() and stable_since(g).
CHILD_PRELUDE = '''
import os as _os, sys as _sys
_gen_fd = _os.open(_sys.argv[1] + ".gen", _os.O_RDONLY)
def cut_generation():
    """The cutter's generation: odd while it cuts or restores the file."""
    return int.from_bytes(_os.pread(_gen_fd, 8, 0), "little")
def stable_since(g):
    """Whether no cut overlapped the time since cut_generation() gave g."""
    return g % 2 == 0 and cut_generation() == g
'''


def run_while_cutting(path, child_code, seconds=1.5, seed=0):
    """Runs `python -c CHILD_PRELUDE + child_code path seconds` while a thread
    keeps truncating `path` to a random length and writing its bytes back
    (same inode), resting a random fraction of a millisecond between rounds
    so that some reads overlap no cut.  The child prints "ok bad checked"
    (calls that succeeded, that raised the format's error, and successes
    whose values it checked).  Checks it exited 0 (no SIGBUS) and checked
    some values; returns (ok, bad, checked)."""
    data = open(path, "rb").read()
    gen_path = str(path) + ".gen"
    with open(gen_path, "wb") as g:
        g.write(bytes(8))
    stop = threading.Event()
    rng = np.random.default_rng(seed)

    def cutter():
        gen = 0
        gfd = os.open(gen_path, os.O_WRONLY)
        try:
            with open(path, "r+b") as f:
                while not stop.is_set():
                    gen += 1  # odd: cutting
                    os.pwrite(gfd, gen.to_bytes(8, "little"), 0)
                    f.truncate(int(rng.integers(0, len(data))))
                    time.sleep(0)
                    f.seek(0)
                    f.write(data)
                    f.flush()
                    gen += 1  # even: whole again
                    os.pwrite(gfd, gen.to_bytes(8, "little"), 0)
                    time.sleep(float(rng.uniform(0, 1e-3)))
        finally:
            os.close(gfd)

    t = threading.Thread(target=cutter)
    t.start()
    try:
        # on a loaded machine a short run may see every read overlapped by a cut: the child runs again,
        # longer, until it has checked some values (or four tries have passed)
        for attempt in range(4):
            r = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + child_code, str(path),
                                str(seconds * 3 ** attempt)], capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
            ok, bad, checked = map(int, r.stdout.split())
            if checked > 0:
                break
    finally:
        stop.set()
        t.join()
    assert ok + bad > 0 and checked > 0, (ok, bad, checked)
    return ok, bad, checked
