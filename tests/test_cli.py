"""python -m mlutils inspect / convert / verify."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlutils.__main__ import main
from mlutils.io import torch_load, torch_save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mlutils", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.fixture
def files(tmp_path):
    tensors = {"enc.w": np.arange(12, dtype=np.float32).reshape(3, 4), "enc.b": np.zeros(3, np.float16),
               "ids": np.arange(5, dtype=np.int64)}
    ck = {"module": tensors, "step": 9, "cfg": {"dim": 4}}
    torch_save(ck, tmp_path / "ck.pt")
    torch_save(ck, tmp_path / "ck.sft")
    return tmp_path, tensors


def test_inspect_table_and_json(files):
    tmp, tensors = files
    out = run_cli("inspect", tmp / "ck.sft")
    assert out.returncode == 0, out.stderr
    assert "safetensors, 3 tensors" in out.stdout
    assert "enc.w" in out.stdout and "F32" in out.stdout and "[3, 4]" in out.stdout
    assert "step: 9" in out.stdout
    out = run_cli("inspect", "--json", tmp / "ck.pt")
    info = json.loads(out.stdout)
    assert info["format"] == "pt"
    got = {t["name"]: t for t in info["tensors"]}
    assert got["module.enc.w"]["shape"] == [3, 4] and got["module.enc.w"]["nbytes"] == 48
    assert got["module.enc.b"]["dtype"] == "float16"


def test_convert_both_ways(files):
    tmp, tensors = files
    assert main(["convert", str(tmp / "ck.pt"), str(tmp / "out.safetensors")]) == 0
    back = torch_load(tmp / "out.safetensors", framework="np")
    assert back["step"] == 9 and back["cfg"] == {"dim": 4}
    for k, v in tensors.items():
        np.testing.assert_array_equal(back["module"][k], v)
    assert main(["convert", str(tmp / "out.safetensors"), str(tmp / "again.pt")]) == 0
    again = torch_load(tmp / "again.pt", framework="np")
    assert again["step"] == 9 and again["cfg"] == {"dim": 4}
    for k, v in tensors.items():
        np.testing.assert_array_equal(again["module"][k], v)


def test_convert_plain_safetensors_gives_a_flat_state_dict(tmp_path, torch):
    from safetensors.torch import save_file

    sd = {"a": torch.randn(2, 2), "b": torch.ones(3, dtype=torch.bfloat16)}
    save_file(sd, tmp_path / "plain.safetensors")
    assert main(["convert", str(tmp_path / "plain.safetensors"), str(tmp_path / "plain.pt")]) == 0
    got = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert set(got) == {"a", "b"}
    for k, v in sd.items():
        assert torch.equal(got[k], v) and got[k].dtype == v.dtype


def test_convert_refuses_same_format_and_same_file(files, capsys):
    tmp, _ = files
    assert main(["convert", str(tmp / "ck.pt"), str(tmp / "x.pt")]) == 1
    assert "one side must be" in capsys.readouterr().err
    assert main(["convert", str(tmp / "ck.sft"), str(tmp / "ck.sft")]) == 1


def test_verify_ok_and_broken(files):
    tmp, _ = files
    for name in ("ck.pt", "ck.sft"):
        out = run_cli("verify", tmp / name)
        assert out.returncode == 0 and "OK" in out.stdout
        data = bytearray((tmp / name).read_bytes())
        bad = tmp / ("bad" + os.path.splitext(name)[1])
        bad.write_bytes(bytes(data[: len(data) - 7]))  # truncated download
        out = run_cli("verify", bad)
        assert out.returncode == 1
        assert "error" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("verify", tmp / "missing.sft")
    assert out.returncode == 1 and "No such file" in out.stderr


def test_console_script_and_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("mlutils ")
    import importlib.metadata as md

    eps = [e for e in md.entry_points(group="console_scripts") if e.name == "mlutils"]
    assert eps and eps[0].value == "mlutils.__main__:main"


def test_progress_reads_the_writers_temporary_file(tmp_path):
    from mlutils.__main__ import _WriteProgress

    target = tmp_path / "out.sft"
    (tmp_path / ".out.sft.a1B2c3.tmp").write_bytes(b"x" * 1000)
    (tmp_path / ".other.sft.zzzzzz.tmp").write_bytes(b"x" * 5000)
    (tmp_path / "out.sft.tmp").write_bytes(b"x" * 7000)
    assert _WriteProgress(str(target), 10_000)._size() == 1000
    assert _WriteProgress(str(tmp_path / "none.sft"), 10_000)._size() == 0


def test_convert_shows_a_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    import io

    class TTY(io.StringIO):
        def isatty(self):
            return True

    err = TTY()
    monkeypatch.setattr(sys, "stderr", err)
    tensors = {f"w{i}": np.full((1024, 1024 * 2), i, np.float32) for i in range(10)}  # 80 MiB
    torch_save(tensors, tmp_path / "big.pt")
    assert main(["convert", str(tmp_path / "big.pt"), str(tmp_path / "big.sft")]) == 0
    assert "100%" in err.getvalue() and "big.sft" in err.getvalue()
    back = torch_load(tmp_path / "big.sft", framework="np")["module"]
    assert all(back[k][0, 0] == int(k[1:]) for k in tensors)


def test_convert_checkpoint_without_module_key(tmp_path, torch):
    """An ordinary training checkpoint: the first dict of tensors becomes the tensors, and the CLI says so."""
    from safetensors import safe_open

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "step": 7, "arch": "mlp"}, tmp_path / "plain.pt")
    out = run_cli("convert", tmp_path / "plain.pt", tmp_path / "plain.safetensors")
    assert out.returncode == 0, out.stderr
    assert "tensors: checkpoint entry 'model'" in out.stdout and "arch, step" in out.stdout
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "step": "7", "arch": '"mlp"', "mlutils.values": '["step", "arch"]'}
        for k, v in model.state_dict().items():
            assert torch.equal(f.get_tensor(k), v)
    # with the optimizer: left out with a note (tests/test_convert.py has --keep-optimizer)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7}, tmp_path / "ck.pt")
    out = run_cli("convert", tmp_path / "ck.pt", tmp_path / "ck.safetensors")
    assert out.returncode == 0 and "left out 'optimizer'" in out.stderr
    # an entry holding tensors that is no optimizer: the advice says what to do, no file
    torch.save({"model": model.state_dict(), "swa": {"n": 1, "avg": [torch.ones(1)]}}, tmp_path / "swa.pt")
    out = run_cli("convert", tmp_path / "swa.pt", tmp_path / "swa.safetensors")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "'swa' holds a tensor at 'swa'['avg'][0]" in out.stderr and "--drop swa" in out.stderr
    assert not (tmp_path / "swa.safetensors").exists()
    out = run_cli("convert", tmp_path / "ck.pt", tmp_path / "ck.safetensors", "--drop", "optimizer")
    assert out.returncode == 0, out.stderr
    back = torch_load(tmp_path / "ck.safetensors")
    assert back["step"] == 7 and "optimizer" not in back
    assert all(torch.equal(back["module"][k], v) for k, v in model.state_dict().items())
    # an explicit --module-key still picks the entry, and a wrong one is a clear error
    out = run_cli("convert", tmp_path / "plain.pt", tmp_path / "k.safetensors", "--module-key", "nope")
    assert out.returncode == 1 and "--module-key 'nope' is not in the checkpoint" in out.stderr
    out = run_cli("convert", tmp_path / "ck.pt", tmp_path / "k.safetensors", "--drop", "optim")
    assert out.returncode == 1 and "--drop optim: not in the checkpoint" in out.stderr


def _npz_format():
    """A third format (numpy .npz) built only from the public registry pieces."""
    from mlutils.io import Format

    def save(data, path, module_key=None, **kwargs):
        with open(path, "wb") as fh:
            np.savez(fh, **data)

    def load(path, device, framework, unsafe, load_metadata, module_key):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def describe(path):
        with np.load(path) as z:
            tensors = [{"name": k, "dtype": str(z[k].dtype), "shape": list(z[k].shape), "nbytes": z[k].nbytes}
                       for k in z.files]
        return {"format": "npz", "tensors": tensors, "metadata": None}

    def verify(path):
        describe(path)

    return Format("npz", (".npz",), save, load, describe, verify)


def test_a_third_format_is_one_registry_entry(files, monkeypatch, capsys):
    """torch_save, torch_load and inspect/convert/verify all dispatch through
    mlutils.io.FORMATS: adding one entry is enough for a new suffix."""
    import mlutils.io as mio

    tmp, tensors = files
    assert mio.format_for(tmp / "x.npz") is mio.PT  # unclaimed suffixes are .pt
    monkeypatch.setattr(mio, "FORMATS", (mio.SAFETENSORS, _npz_format(), mio.PT))
    assert mio.format_for(tmp / "X.NPZ").name == "npz"
    torch_save(tensors, tmp / "t.npz")
    with np.load(tmp / "t.npz") as z:  # the real numpy reads it
        assert sorted(z.files) == sorted(tensors) and np.array_equal(z["enc.w"], tensors["enc.w"])
    back = torch_load(tmp / "t.npz", framework="np")
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)
    assert main(["inspect", str(tmp / "t.npz")]) == 0
    assert "npz, 3 tensors" in capsys.readouterr().out
    assert main(["verify", str(tmp / "t.npz")]) == 0
    assert "OK (npz, 3 tensors)" in capsys.readouterr().out
    assert main(["convert", str(tmp / "t.npz"), str(tmp / "t.safetensors")]) == 0
    out = torch_load(tmp / "t.safetensors", framework="np", load_metadata=False)
    assert all(np.array_equal(out[k], tensors[k]) for k in tensors)


def test_format_for_picks_by_suffix():
    from mlutils.io import FORMATS, PT, SAFETENSORS, format_for

    assert FORMATS[-1] is PT
    for name in ("a.safetensors", "a.SafeTensor", "dir.pt/a.sft"):
        assert format_for(name) is SAFETENSORS
    for name in ("a.pt", "a.PTH", "a.bin", "a.sft.pt", "a"):
        assert format_for(name) is PT
