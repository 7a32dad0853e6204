"""Atomic writes (csrc/core/atomicfile.c) through every writer that uses them:
json_write, torch_save to .pt and to safetensors.

What is replaced (only regular files; FIFOs and devices are written in place),
how the temporary files of killed saves are reaped (never one a live writer
holds), and the order of the fsync and rename calls, observed with strace."""
import fcntl
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from mlutils import _ptsave
from mlutils._safetensors import save as st_bytes
from mlutils.io import json_read, json_stringify, json_write, torch_load, torch_save

TEMP_RE = r"\.{name}\.[A-Za-z0-9]{{6}}\.tmp"


def temps(folder, name):
    """The temporary files of target `name` in `folder` (atomicfile.h's pattern)."""
    pat = re.compile(TEMP_RE.format(name=re.escape(name[:200])) + r"\Z")
    return sorted(f for f in os.listdir(folder) if pat.match(f))


# ---------------------------------------------------------------- writers

TENSORS = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int64)}
JSON_VALUE = {"a": [1, 2.5, "x"], "b": None}


def _write_json(path):
    json_write(JSON_VALUE, path)


def _write_pt(path):
    torch_save({"module": TENSORS, "step": 3}, path)


def _write_sft(path):
    torch_save({"module": TENSORS, "step": 3}, path)


WRITERS = {
    # name: (file name, write(path), the bytes a write to that file name produces)
    "json": ("out.json", _write_json, lambda: json_stringify(JSON_VALUE, raw=True)),
    "pt": ("out.pt", _write_pt, None),
    "sft": ("out.safetensors", _write_sft, lambda: st_bytes(TENSORS, {"format": "pt", "step": "3"})),
}


def expected_bytes(kind, tmp_path):
    """What writer `kind` puts in a regular file of the same name."""
    name, write, direct = WRITERS[kind]
    if direct is not None:
        return direct()
    ref = tmp_path / "reference"
    ref.mkdir(exist_ok=True)
    write(ref / name)
    return (ref / name).read_bytes()


# ---------------------------------------------------------------- special files

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="os.mknod of a character device needs root")


def _null_device(path):
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers


@needs_root
@pytest.mark.parametrize("via_link", [False, True], ids=["node", "symlink"])
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_character_device_is_written_not_replaced(tmp_path, kind, via_link):
    name, write, _ = WRITERS[kind]
    dev = tmp_path / ("dev_" + name)
    _null_device(dev)
    target = dev
    if via_link:
        target = tmp_path / name
        target.symlink_to(dev.name)
    before = sorted(os.listdir(tmp_path))
    write(target)
    st = os.lstat(dev)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    if via_link:
        assert os.path.islink(target) and os.readlink(target) == dev.name
    assert sorted(os.listdir(tmp_path)) == before  # no temporary file, nothing renamed
    # and it really went through the device: a write to a full one fails
    full = tmp_path / "full"
    os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # /dev/full's numbers
    with pytest.raises(OSError) as ei:
        write(full)
    assert ei.value.errno == 28  # ENOSPC
    assert stat.S_ISCHR(os.lstat(full).st_mode)


@pytest.mark.parametrize("via_link", [False, True], ids=["node", "symlink"])
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_fifo_is_written_not_replaced(tmp_path, kind, via_link):
    name, write, _ = WRITERS[kind]
    want = expected_bytes(kind, tmp_path)
    fifo = tmp_path / ("pipe_" + name)
    os.mkfifo(fifo)
    target = fifo
    if via_link:
        target = tmp_path / name
        target.symlink_to(fifo.name)
    else:
        # the .pt archive name comes from the file name: keep it that of the reference
        fifo = fifo.rename(tmp_path / name)
        target = fifo
    before = sorted(os.listdir(tmp_path))
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        write(target)
        still_fifo = stat.S_ISFIFO(os.lstat(fifo).st_mode)
        got, _ = reader.communicate(timeout=5 if still_fifo else 0.5)
    except subprocess.TimeoutExpired:
        got = None
    finally:
        reader.kill()
        reader.wait()
    assert still_fifo, "the FIFO was replaced by a regular file"
    assert got == want
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_socket_and_folder_targets_are_errors(tmp_path, kind):
    name, write, _ = WRITERS[kind]
    sock_path = tmp_path / name
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(sock_path))
        with pytest.raises(OSError) as ei:
            write(sock_path)  # open() of a socket: ENXIO
        assert ei.value.errno == 6
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    finally:
        s.close()
    folder = tmp_path / ("dir_" + name)
    folder.mkdir()
    with pytest.raises(IsADirectoryError):
        write(folder)
    assert folder.is_dir() and sorted(os.listdir(tmp_path)) == sorted([name, folder.name])


# ---------------------------------------------------------------- reaping temporaries

_KILLED_SAVER = """
import sys, numpy as np
from mlutils.io import torch_save
path, durable = sys.argv[1], sys.argv[2] == 'durable'
big = {'w%d' % i: np.full((256, 1024), i, np.float32) for i in range(32)}  # 32 MiB
print('ready', flush=True)
gen = 0
while True:
    torch_save({'module': big, 'gen': gen}, path, durable=durable)
    gen += 1
"""


def _assert_whole_checkpoint(path):
    """The checkpoint at `path` is one complete save of _KILLED_SAVER's."""
    got = torch_load(path, framework="np")
    assert got["gen"] >= 0 and len(got["module"]) == 32
    for k, v in got["module"].items():
        assert v.shape == (256, 1024) and v[0, 0] == v[-1, -1] == int(k[1:])


def _wait_for_temp(proc, folder, name, exclude=()):
    """The name of a temporary file of `name` not in `exclude` once it holds
    over 1 MiB (the writer is in the middle of its save), or None when the
    process ended first."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        for t in temps(folder, name):
            try:
                if t not in exclude and os.stat(os.path.join(folder, t)).st_size > (1 << 20):
                    return t
            except FileNotFoundError:
                pass
        time.sleep(0.0005)
    return None


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not_durable"])
@pytest.mark.parametrize("name", ["ck.pt", "ck.safetensors"])
def test_killed_saves_leave_one_temporary_at_most(tmp_path, name, durable):
    """Each save reaps the temporary files killed saves of the same target
    left, and a kill mid-write leaves the previous checkpoint whole, durable
    or not (durable=False skips only the fsyncs, not the rename)."""
    path = tmp_path / name
    seen = []
    rounds = 0
    # kill savers mid-write until four of them have left a temporary file (a
    # kill that lands between two saves of a loaded machine leaves none)
    while len(seen) < 4:
        rounds += 1
        assert rounds <= 15, f"only {len(seen)} of {rounds} kills landed mid-write"
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVER, str(path),
                                 "durable" if durable else "fast"], stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == b"ready"
            assert _wait_for_temp(proc, tmp_path, name, seen) is not None, "the saver never wrote a temporary file"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if path.exists():  # (the first saver may die in its first save)
            _assert_whole_checkpoint(path)
        left = temps(tmp_path, name)
        # the killed save's temporary may be there; every earlier one was reaped
        assert len(left) <= 1 and not set(left) & set(seen), (left, seen)
        seen += left
    # one more save reaps the last one
    torch_save({"module": {"x": np.ones(3, np.float32)}}, path)
    assert os.listdir(tmp_path) == [name]
    np.testing.assert_array_equal(torch_load(path, framework="np")["module"]["x"], np.ones(3, np.float32))


_STOPPED_SAVER = """
import sys, numpy as np
from mlutils.io import torch_save
big = {'w%d' % i: np.full((256, 1024), i, np.float32) for i in range(64)}  # 64 MiB
print('ready', flush=True)
torch_save({'module': big, 'who': 'stopped'}, sys.argv[1])
print('saved', flush=True)
"""


def test_a_live_writers_temporary_is_not_reaped(tmp_path):
    """A save stopped mid-write keeps its temporary file through other saves
    of the same target, and completes once it runs again."""
    path = tmp_path / "ck.pt"
    for _attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _STOPPED_SAVER, str(path)], stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == b"ready"
            t = _wait_for_temp(proc, tmp_path, "ck.pt")
            proc.send_signal(signal.SIGSTOP)
            try:
                held = os.stat(tmp_path / t) if t else None
            except FileNotFoundError:
                held = None  # it finished its save before it was stopped: again
            if held is not None:
                torch_save({"module": {"x": np.ones(2, np.float32)}, "who": "us"}, path)
                json_write([1], path)  # another writer of the same target
                assert temps(tmp_path, "ck.pt") == [t]
                assert os.stat(tmp_path / t).st_ino == held.st_ino
                assert json_read(path) == [1]
        finally:
            proc.send_signal(signal.SIGCONT)
            out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == b"saved"
        if held is not None:
            break
    else:
        pytest.fail("the saver never could be stopped mid-write")
    assert os.listdir(tmp_path) == ["ck.pt"]
    back = torch_load(path, framework="np")
    assert back["who"] == "stopped" and len(back["module"]) == 64


def test_only_stale_temporaries_of_the_target_are_reaped(tmp_path):
    target = tmp_path / "run.json"
    other_uid = 12345

    def make(name, data=b"x"):
        (tmp_path / name).write_bytes(data)
        return name

    stale = [make(".run.json.AbC123.tmp"), make(".run.json.zzzzzz.tmp"), make(".run.json.000000.tmp")]
    kept = [
        make(".run.json.AbC12.tmp"),      # 5 random characters
        make(".run.json.AbC1234.tmp"),    # 7
        make(".run.json.AbC-23.tmp"),     # a character mkstemp never uses
        make("run.json.AbC123.tmp"),      # no leading dot
        make(".run.json.AbC123.tmp~"),
        make(".run.jsonx.AbC123.tmp"),    # another target
        make(".other.json.AbC123.tmp"),
        make(".run.json.AbC123.temp"),
    ]
    os.symlink(".run.json.AbC123.tmp", tmp_path / ".run.json.LnK123.tmp")  # a link is never followed
    kept.append(".run.json.LnK123.tmp")
    os.mkfifo(tmp_path / ".run.json.FiF123.tmp")  # must not block the reaper either
    kept.append(".run.json.FiF123.tmp")
    if os.geteuid() == 0:
        make(".run.json.UiD123.tmp")
        os.chown(tmp_path / ".run.json.UiD123.tmp", other_uid, -1)  # another user's
        kept.append(".run.json.UiD123.tmp")
    # held by a live writer (flock from another open file description)
    held = make(".run.json.HeLd12.tmp")
    kept.append(held)
    fd = os.open(tmp_path / held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        json_write({"v": 1}, target)
        assert sorted(os.listdir(tmp_path)) == sorted(kept + ["run.json"])
        assert all(not os.path.exists(tmp_path / s) for s in stale)
    finally:
        os.close(fd)
    # the lock gone, the next save of the target reaps it
    json_write({"v": 2}, target)
    kept.remove(held)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["run.json"])
    assert json_read(target) == {"v": 2}


def test_long_names_reap_by_their_200_byte_prefix(tmp_path):
    name = "n" * 240 + ".json"
    stale = "." + name[:200] + ".q1W2e3.tmp"
    (tmp_path / stale).write_bytes(b"old")
    json_write([1], tmp_path / name)
    assert os.listdir(tmp_path) == [name]


# ---------------------------------------------------------------- fsync order

def _strace_usable():
    if shutil.which("strace") is None:
        return "strace is not installed (scripts/setup.sh installs it)"
    try:
        r = subprocess.run(["strace", "-f", "-e", "trace=fsync", "true"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"strace cannot run here: {exc}"
    if r.returncode != 0:
        return f"strace cannot trace here (ptrace refused?): {r.stderr.decode(errors='replace')[-200:]}"
    return None


def test_fsync_file_then_rename_then_fsync_folder(tmp_path):
    why = _strace_usable()
    if why:
        pytest.skip(why)
    out = tmp_path / "out"
    out.mkdir()
    folder = os.path.realpath(out)  # rename shows the path as given, -y the real one
    code = (
        "import sys, numpy as np\n"
        "from mlutils.io import json_write, torch_save\n"
        "d = sys.argv[1]\n"
        "json_write({'a': 1}, d + '/m.json')\n"
        "torch_save({'module': {'w': np.ones(4, np.float32)}, 'step': 1}, d + '/c.pt')\n"
        "torch_save({'module': {'w': np.ones(4, np.float32)}, 'step': 1}, d + '/c.safetensors')\n"
    )
    log = tmp_path / "trace.txt"
    subprocess.run(["strace", "-f", "-y", "-o", str(log), "-e",
                    "trace=fsync,fdatasync,rename,renameat,renameat2,flock",
                    sys.executable, "-c", code, folder], check=True, capture_output=True, timeout=300)
    lines = log.read_text().splitlines()
    for name in ("m.json", "c.pt", "c.safetensors"):
        tmp = re.escape(folder) + "/" + TEMP_RE.format(name=re.escape(name))

        def first(pattern, start=0):
            for i in range(start, len(lines)):
                if re.search(pattern, lines[i]):
                    return i
            pytest.fail(f"{name}: no call matching {pattern!r} after line {start} in\n" + "\n".join(lines))

        lock = first(rf"flock\(\d+<{tmp}>, LOCK_EX\) += 0")
        sync = first(rf"f(data)?sync\(\d+<{tmp}>\) += 0", lock)
        move = first(rf"rename(at2?)?\(.*\"{tmp}\", .*\"{re.escape(folder + '/' + name)}\"", sync)
        first(rf"fsync\(\d+<{re.escape(folder)}>\) += 0", move)


SYNC_CALLS = "fsync,fdatasync,sync_file_range,syncfs,sync"  # (sync_file_range2: other architectures)
_BIG_WRITES = (
    "import sys, numpy as np\n"
    "from mlutils.io import json_write, torch_save\n"
    "d, durable = sys.argv[1], sys.argv[2] == 'durable'\n"
    "big = {'w%d' % i: np.full((1024, 1024), i, np.float32) for i in range(17)}  # 68 MiB\n"
    "json_write({'a': [1, 2.5], 'pad': 'x' * 100000}, d + '/m.json', durable=durable)\n"
    "torch_save({'module': big, 'step': 1}, d + '/c.pt', durable=durable)\n"
    "torch_save({'module': big, 'step': 1}, d + '/c.safetensors', durable=durable)\n"
)


def _trace_big_writes(tmp_path, durable):
    """(folder, strace lines) of _BIG_WRITES run with `durable`: every sync
    call, rename and flock; 68 MiB is past the writers' writeback step (32 MiB,
    MLU_AFILE_WRITEBACK_STEP, the same for .pt and safetensors)."""
    out = tmp_path / ("durable" if durable else "fast")
    out.mkdir()
    folder = os.path.realpath(out)
    log = tmp_path / (out.name + ".trace")
    subprocess.run(["strace", "-f", "-y", "-o", str(log), "-e",
                    "trace=" + SYNC_CALLS + ",rename,renameat,renameat2,flock",
                    sys.executable, "-c", _BIG_WRITES, folder, out.name], check=True, capture_output=True,
                   timeout=300)
    return folder, log.read_text().splitlines()


def test_not_durable_renames_without_any_fsync(tmp_path):
    """durable=False: each writer still locks its temporary file and renames
    it over the target, but no fsync, fdatasync or sync_file_range happens at
    all; the files are byte-identical to durable ones."""
    why = _strace_usable()
    if why:
        pytest.skip(why)
    fast, fast_lines = _trace_big_writes(tmp_path, False)
    slow, slow_lines = _trace_big_writes(tmp_path, True)
    sync_re = re.compile(r"\b(f(data)?sync|sync_file_range2?|syncfs|sync)\(")
    assert [ln for ln in fast_lines if sync_re.search(ln)] == []
    for name in ("m.json", "c.pt", "c.safetensors"):
        for folder, lines in ((fast, fast_lines), (slow, slow_lines)):
            tmp = re.escape(folder) + "/" + TEMP_RE.format(name=re.escape(name))
            assert any(re.search(rf"flock\(\d+<{tmp}>, LOCK_EX\) += 0", ln) for ln in lines), name
            assert any(re.search(rf"rename(at2?)?\(.*\"{tmp}\", .*\"{re.escape(folder + '/' + name)}\"\) += 0", ln)
                       for ln in lines), name
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "durable" / name).read_bytes(), name
    assert sorted(os.listdir(fast)) == ["c.pt", "c.safetensors", "m.json"]
    # the same trace does see the durable writes' calls: writeback started
    # on the big temporary files, each fsynced, and the folder fsynced
    for name in ("c.pt", "c.safetensors"):
        tmp = re.escape(slow) + "/" + TEMP_RE.format(name=re.escape(name))
        assert any(re.search(rf"sync_file_range2?\(\d+<{tmp}>", ln) for ln in slow_lines), name
        assert any(re.search(rf"f(data)?sync\(\d+<{tmp}>\) += 0", ln) for ln in slow_lines), name
    assert any(re.search(rf"fsync\(\d+<{re.escape(slow)}>\) += 0", ln) for ln in slow_lines)


@pytest.mark.parametrize("kind", sorted(WRITERS))
@pytest.mark.parametrize("bad", ["yes", 1, None, np.bool_(True)])
def test_durable_must_be_a_bool(tmp_path, kind, bad):
    name, _write, _ = WRITERS[kind]
    path = tmp_path / name
    with pytest.raises(TypeError, match="durable must be True or False"):
        if kind == "json":
            json_write(JSON_VALUE, path, durable=bad)
        else:
            torch_save({"module": TENSORS, "step": 3}, path, durable=bad)
    assert os.listdir(tmp_path) == []


def test_durable_is_keyword_only_and_checked_in_every_layer(tmp_path):
    from mlutils import _core, _safetensors

    with pytest.raises(TypeError):
        torch_save({"module": TENSORS}, tmp_path / "a.pt", None, False)
    with pytest.raises(TypeError, match="durable must be True or False"):
        _safetensors.save_file(TENSORS, tmp_path / "a.sft", durable="no")
    with pytest.raises(TypeError, match="durable must be True or False"):
        _ptsave.save(TENSORS, tmp_path / "a.pt", durable="no")
    # the C entry points refuse a non-bool too (a str would read as true)
    with pytest.raises(TypeError):
        _core.write_file_atomic(str(tmp_path / "a.json"), b"1", durable="no")
    with pytest.raises(TypeError):
        _core.st_serialize([], None, str(tmp_path / "a.sft"), durable=0)
    with pytest.raises(TypeError):
        _core.write_file_atomic(str(tmp_path / "a.json"), b"1", False)  # keyword only
    assert os.listdir(tmp_path) == []
    _core.write_file_atomic(str(tmp_path / "a.json"), b"[1]", durable=False)
    assert json_read(tmp_path / "a.json") == [1]


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_not_durable_writes_the_same_bytes(tmp_path, kind):
    name, _write, _ = WRITERS[kind]
    for durable in (True, False):
        (tmp_path / str(durable)).mkdir()
        if kind == "json":
            json_write(JSON_VALUE, tmp_path / str(durable) / name, durable=durable)
        else:
            torch_save({"module": TENSORS, "step": 3}, tmp_path / str(durable) / name, durable=durable)
    assert (tmp_path / "True" / name).read_bytes() == (tmp_path / "False" / name).read_bytes()
    assert (tmp_path / "False" / name).read_bytes() == expected_bytes(kind, tmp_path)
    assert os.listdir(tmp_path / "False") == [name]


def test_concurrent_writers_of_one_target_all_succeed(tmp_path):
    """Writers of the same target reap around each other all the time: none
    may lose its temporary file to another (its rename would fail)."""
    target = tmp_path / "shared.json"
    code = (
        "import sys\nfrom mlutils.io import json_write\n"
        "k = int(sys.argv[2])\n"
        "for i in range(150):\n    json_write({'writer': k, 'i': i, 'pad': 'x' * 4096}, sys.argv[1])\n"
        "print('done', flush=True)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), str(k)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for k in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == b"done", err.decode()[-2000:]
    assert os.listdir(tmp_path) == ["shared.json"]
    got = json_read(target)
    assert got["i"] == 149 and got["writer"] in range(4)
