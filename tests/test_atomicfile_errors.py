"""OSErrors of the atomic writers (save_file, the .pt save, json_write,
torch_save to either format) name the file as open() does: errno and
strerror set, ``filename`` the path given (``os.fspath`` of a PathLike), the
message "[Errno N] strerror: 'path'" naming it once, the exception's class
picked by errno; and a failed write leaves the old file and no temporary.

The peer is the standard library: where open(path, "wb") fails the same way
(a missing folder, a parent that is a file, a folder as the target), the
writer's exception must equal open()'s in class, errno, strerror, filename
and text.  A write failing mid-file is made with RLIMIT_FSIZE in a child
process (SIGXFSZ ignored, so write() returns EFBIG)."""
import errno
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mlutils import _ptsave
from mlutils._safetensors import save_file
from mlutils.io import json_write, torch_save

BIG = np.arange(1 << 16, dtype=np.float64)  # 512 KiB: far past the size limit below
SIZE_LIMIT = 64 << 10


def _st(path, big=False):
    save_file({"w": BIG if big else np.ones(3, np.float32)}, path)


def _pt(path, big=False):
    _ptsave.save({"w": BIG if big else np.ones(3, np.float32), "step": 3}, path)


def _json(path, big=False):
    json_write({"xs": BIG.tolist() if big else [1, 2.5]}, path)


def _torch_save(path, big=False):
    """The suffix picks the format."""
    torch_save({"w": BIG if big else np.ones(3, np.float32)}, path)


WRITERS = {
    # name: (file name, write(path, big))
    "save_file": ("out.safetensors", _st),
    "ptsave": ("out.pt", _pt),
    "json_write": ("out.json", _json),
    "torch_save_st": ("t.safetensors", _torch_save),
    "torch_save_pt": ("t.pt", _torch_save),
}

PATH_TYPES = {"str": str, "Path": pathlib.Path, "bytes": os.fsencode}


def _open_error(path):
    """What open(path, "wb") raises (the peer)."""
    with pytest.raises(OSError) as ei:
        with open(path, "wb"):
            pass
    return ei.value


def _describe(e):
    return (type(e), e.errno, e.strerror, e.filename, e.filename2, str(e))


def _temps(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".tmp"))


def _cases(tmp_path, name):
    """(case, path, expected errno) for each way open() fails before writing."""
    (tmp_path / "plain").write_bytes(b"a regular file")
    (tmp_path / name).mkdir()
    return [
        ("missing folder", tmp_path / "missing" / name, errno.ENOENT),
        ("parent is a file", tmp_path / "plain" / name, errno.ENOTDIR),
        ("target is a folder", tmp_path / name, errno.EISDIR),
    ]


@pytest.mark.parametrize("kind,ptype", [(k, p) for k in sorted(WRITERS) for p in sorted(PATH_TYPES)
                                        if p != "bytes" or not k.startswith("torch_save")])  # str, PathLike only
def test_open_failures_are_raised_as_open_raises_them(tmp_path, kind, ptype):
    name, write = WRITERS[kind]
    for case, path, code in _cases(tmp_path, name):
        given = PATH_TYPES[ptype](path)
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(OSError) as ei:
            write(given)
        e = ei.value
        assert e.errno == code, case
        assert e.filename == os.fspath(given) and type(e.filename) is type(os.fspath(given)), case
        assert e.strerror == os.strerror(code), case
        assert str(e).count(repr(os.fspath(given))) == 1, (case, str(e))
        assert _describe(e) == _describe(_open_error(given)), case
        assert sorted(os.listdir(tmp_path)) == before, case  # nothing made, no temporary left
        assert (tmp_path / name).is_dir() and not os.listdir(tmp_path / name)


_CHILD_WRITER = """
import json, os, pathlib, resource, signal, sys
sys.path.insert(0, {tests!r})
import test_atomicfile_errors as t
path = sys.argv[1] if sys.argv[2] == "str" else pathlib.Path(sys.argv[1])
write = t.WRITERS[sys.argv[3]][1]
limit = int(sys.argv[4])
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    write(path, big=True)
except OSError as e:
    print(json.dumps([type(e).__name__, e.errno, e.strerror, e.filename, str(e)]))
else:
    print(json.dumps(None))
"""


def _write_in_child(target, ptype, kind, limit=0, prefix=()):
    """The OSError writer `kind` raises in a child process as
    [class name, errno, strerror, filename, str], or None when it succeeds."""
    code = _CHILD_WRITER.format(tests=os.path.dirname(__file__))
    r = subprocess.run([*prefix, sys.executable, "-c", code, str(target), ptype, kind, str(limit)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _expect(got, cls, code, target):
    assert got is not None, "the write did not fail"
    assert got == [cls, code, os.strerror(code), str(target),
                   f"[Errno {code}] {os.strerror(code)}: {str(target)!r}"]


@pytest.mark.parametrize("ptype", ["str", "Path"])
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_write_failing_mid_file_names_the_file_and_keeps_the_old_one(tmp_path, kind, ptype):
    name, _ = WRITERS[kind]
    target = tmp_path / name
    target.write_bytes(b"the old file")
    _expect(_write_in_child(target, ptype, kind, limit=SIZE_LIMIT), "OSError", errno.EFBIG, target)
    assert target.read_bytes() == b"the old file"
    assert sorted(os.listdir(tmp_path)) == [name] and not _temps(tmp_path)


def _unprivileged():
    """A command prefix that runs a child without the right to ignore file
    permissions (root: setpriv drops CAP_DAC_OVERRIDE and its kin), or None."""
    if os.geteuid() != 0:
        return ()
    try:
        r = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner",
                            "true"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner")


@pytest.mark.parametrize("ptype", ["str", "Path"])
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_read_only_folder_is_a_permission_error_naming_the_file(tmp_path, kind, ptype):
    """The temporary file cannot be made beside a file in a read-only folder:
    PermissionError (EACCES) naming the target, which is left as it was."""
    prefix = _unprivileged()
    if prefix is None:
        pytest.skip("running as root without setpriv: permissions are not enforced")
    name, _ = WRITERS[kind]
    folder = tmp_path / "ro"
    folder.mkdir()
    target = folder / name
    target.write_bytes(b"the old file")
    folder.chmod(0o555)
    try:
        got = _write_in_child(target, ptype, kind, prefix=prefix)
    finally:
        folder.chmod(0o755)
    _expect(got, "PermissionError", errno.EACCES, target)
    assert target.read_bytes() == b"the old file"
    assert os.listdir(folder) == [name]


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_path_ending_in_a_slash_stays_a_value_error(tmp_path, kind):
    """Only OSErrors take a file name: the refusal of a path that names a
    folder ("dir/") keeps its class and its text, which names the path once."""
    _, write = WRITERS[kind]
    given = str(tmp_path / "sub") + "/"
    with pytest.raises(ValueError) as ei:
        write(given)
    assert not isinstance(ei.value, OSError)
    assert str(ei.value) == f"path '{given}' names a folder, not a file"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_the_failed_step_is_the_exceptions_note(tmp_path, name):
    """str(e) is open()'s; what the writer was doing is the note under the
    traceback (BaseException.add_note), naming the file."""
    fname, write = WRITERS[name]
    path = str(tmp_path / "missing" / fname)
    with pytest.raises(FileNotFoundError) as info:
        write(path)
    notes = getattr(info.value, "__notes__", [])
    assert notes == [f"cannot create a temporary file beside {path!r}"], notes
    assert str(info.value) == str(_open_error(path))


def test_reader_open_failure_note_names_the_step(tmp_path):
    from mlutils._safetensors import load_file

    path = str(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError) as info:
        load_file(path)
    assert info.value.filename == path and info.value.__notes__ == [f"cannot open {path!r}"]
