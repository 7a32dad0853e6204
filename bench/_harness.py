"""Shared timing and reporting for the benches: interleaved repeats, medians with spread, the machine, tables.

    from _harness import interleaved, cell, machine, table, peak_rss

``interleaved`` runs every case once per round, rounds repeated (default 5),
so that a slow phase of a shared machine hits all cases alike; a figure is the
median of its repeats with the min-max spread, flagged when max/min > 2.
"""
from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPREAD_FLAG = 2.0


def _first(path: str, prefix: str) -> Optional[str]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _disk(path: str) -> str:
    """The filesystem holding `path`: device, type, and whether the block device is rotational."""
    path = os.path.realpath(path)
    best = ("?", "?", "")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[2]):
                    best = (dev, fstype, mnt)
    except OSError:
        pass
    dev, fstype, mnt = best
    kind = ""
    name = os.path.basename(dev)
    for cand in (name, name.rstrip("0123456789"), name.split("p")[0] if name.startswith("nvme") else name):
        rot = f"/sys/block/{cand}/queue/rotational"
        if os.path.exists(rot):
            with open(rot) as f:
                kind = ", rotational" if f.read().strip() == "1" else ", non-rotational"
            break
    return f"{path} on {dev} ({fstype} at {mnt}{kind})"


def machine(path: str = "/tmp") -> str:
    """One line: CPUs, RAM, CPU model, load average, the disk under `path`, Python."""
    mem = _first("/proc/meminfo", "MemTotal")
    ram = f"{int(mem.split()[0]) / 2**20:.1f} GiB RAM" if mem else "RAM ?"
    model = _first("/proc/cpuinfo", "model name") or platform.processor() or "CPU ?"
    try:
        load = "load avg %.1f" % os.getloadavg()[0]
    except OSError:
        load = "load avg ?"
    return (f"machine: nproc {os.cpu_count()}, {ram}, {model}, {load}; disk: {_disk(path)}; "
            f"Python {platform.python_version()}")


def interleaved(cases: Sequence[Tuple[str, Callable[[], Any]]], repeat: int = 5,
                before: Optional[Callable[[str], None]] = None) -> Dict[str, List[float]]:
    """Times each case `repeat` times, one of each per round; `before(name)` runs untimed ahead of each."""
    import time

    times: Dict[str, List[float]] = {name: [] for name, _ in cases}
    for _ in range(max(1, repeat)):
        for name, fn in cases:
            gc.collect()
            if before is not None:
                before(name)
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            del out
    return times


def fmt_s(sec: float) -> str:
    if sec >= 1:
        return f"{sec:.2f} s"
    if sec >= 1e-3:
        return f"{sec * 1e3:.1f} ms"
    return f"{sec * 1e6:.1f} µs"


def median(ts: Iterable[float]) -> float:
    return statistics.median(list(ts))


def cell(ts: Sequence[float], fmt: Callable[[float], str] = fmt_s) -> str:
    """'median (min-max)', with the spread named when max/min exceeds 2."""
    lo, hi, med = min(ts), max(ts), statistics.median(ts)
    out = f"{fmt(med)} ({fmt(lo)}–{fmt(hi)})" if len(ts) > 1 else fmt(med)
    if lo > 0 and hi / lo > SPREAD_FLAG:
        out += f" **spread {hi / lo:.1f}x**"
    return out


def ratio(peer: Sequence[float], ours: Sequence[float]) -> str:
    """Median peer / median ours (above 1: ours faster)."""
    o = statistics.median(ours)
    return f"{statistics.median(peer) / o:,.2f}x" if o > 0 else "inf"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str = "", path: str = "/tmp",
          repeat: Optional[int] = None) -> None:
    """Prints the machine line, an optional title, and a markdown table."""
    print(machine(path))
    if repeat is not None:
        print(f"each time: median of {repeat} interleaved repeats (min–max); "
              f"**spread** marks max/min > {SPREAD_FLAG:g}")
    if title:
        print(title)
    print()
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join(" --- " for _ in headers) + "|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print()


_HWM = r"""
def _vmhwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
print("VMHWM", _vmhwm())
"""


def peak_rss(code: str, argv: Sequence[str] = (), env: Optional[Dict[str, str]] = None) -> int:
    """VmHWM (bytes) of a fresh interpreter that runs `code` (this checkout importable)."""
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, "-c", code + "\n" + _HWM, *argv], capture_output=True,
                         text=True, env=e, check=True).stdout
    return int(out.strip().splitlines()[-1].split()[1])


def torchrun(script: str, ranks: int, args: Sequence[str], timeout: float = 3600) -> "subprocess.CompletedProcess[str]":
    """Run `script` under ``python -m torch.distributed.run`` with `ranks` processes on this machine (a
    free loopback port, one OpenMP thread each, this checkout first on the path, no launcher variables
    inherited); exits naming the rank count and the end of stderr when it fails."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
           "127.0.0.1", "--master-port", str(port), script, *map(str, args)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        sys.exit(f"{ranks} ranks failed:\n{p.stderr[-4000:]}")
    return p
