"""torch_save / torch_load: the original contracts over our readers and writers,
checked against files the real torch and safetensors packages write and read."""
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import mlutils
from mlutils.io import is_safetensors_path, torch_load, torch_save

SFT_SUFFIXES = [".safetensors", ".safetensor", ".sft"]


def checkpoint_np():
    rng = np.random.default_rng(0)
    return {
        "module": {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.arange(3, dtype=np.int64)},
        "step": 12, "lr": 0.25, "name": "run-a", "cfg": {"layers": [1, 2], "act": "gelu"}, "skip": None,
    }


def test_suffix_dispatch():
    for s in SFT_SUFFIXES:
        assert is_safetensors_path("x" + s) and is_safetensors_path("X" + s.upper())
    for s in (".pt", ".pth", ".bin", ".sft.pt"):
        assert not is_safetensors_path("x" + s)


@pytest.mark.parametrize("suffix", SFT_SUFFIXES)
def test_safetensors_checkpoint_roundtrip_numpy(tmp_path, suffix):
    ck = checkpoint_np()
    path = tmp_path / ("ck" + suffix)
    torch_save(ck, path)
    back = torch_load(path, framework="np")
    assert set(back) == {"module", "step", "lr", "name", "cfg"}  # None dropped, format marker hidden
    assert back["step"] == 12 and back["lr"] == 0.25 and back["name"] == "run-a"
    assert back["cfg"] == {"layers": [1, 2], "act": "gelu"}
    for k, v in ck["module"].items():
        np.testing.assert_array_equal(back["module"][k], v)
        assert back["module"][k].dtype == v.dtype
    assert set(torch_load(path, framework="np", load_metadata=False)) == {"w", "b"}
    assert set(torch_load(path, framework="np", module_key="model")) == {"model", "step", "lr", "name", "cfg"}


def test_safetensors_split_rules(tmp_path):
    t = {"x": np.ones(2, np.float32)}
    # a flat dict of tensors is written as is
    torch_save(t, tmp_path / "flat.sft")
    assert set(torch_load(tmp_path / "flat.sft", framework="np")) == {"module"}
    # module_key picks the tensors; else the first value that is a dict of tensors
    torch_save({"meta": "m", "ema": t, "epoch": 2}, tmp_path / "a.sft")
    back = torch_load(tmp_path / "a.sft", framework="np")
    assert set(back) == {"module", "meta", "epoch"} and set(back["module"]) == {"x"}
    torch_save({"model": {"y": np.zeros(1, np.int8)}, "meta": [1]}, tmp_path / "b.sft", module_key="model")
    back = torch_load(tmp_path / "b.sft", framework="np", module_key="model")
    assert set(back["model"]) == {"y"} and back["meta"] == [1]
    # a second dict of tensors cannot become metadata: a clear error, no file
    with pytest.raises(ValueError, match="'ema' holds tensors"):
        torch_save({"model": {"y": np.zeros(1, np.int8)}, "ema": t}, tmp_path / "c.sft", module_key="model")
    with pytest.raises(ValueError, match="no dict of tensors"):
        torch_save({"a": 1}, tmp_path / "c.sft")
    with pytest.raises(ValueError, match="module_key"):
        torch_save({"a": t}, tmp_path / "c.sft", module_key="nope")
    with pytest.raises(TypeError, match="safetensors"):
        torch_save([t], tmp_path / "c.sft")
    assert not (tmp_path / "c.sft").exists()


def test_safetensors_metadata_must_be_json(tmp_path):
    t = {"x": np.ones(2, np.float32)}
    with pytest.raises(TypeError, match="'other'"):
        torch_save({"module": t, "other": {1, 2}}, tmp_path / "m.sft")
    assert not (tmp_path / "m.sft").exists()


def test_pt_checkpoint_roundtrip_numpy(tmp_path):
    ck = checkpoint_np()
    torch_save(ck, tmp_path / "ck.pt")
    back = torch_load(tmp_path / "ck.pt", framework="np")
    assert back["step"] == 12 and back["cfg"] == ck["cfg"] and back["skip"] is None
    np.testing.assert_array_equal(back["module"]["w"], ck["module"]["w"])


def test_pt_written_by_us_is_read_by_torch(tmp_path, torch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    ck = {"module": model.state_dict(), "optimizer": opt.state_dict(), "step": 3}
    torch_save(ck, tmp_path / "ck.pt")
    theirs = torch.load(tmp_path / "ck.pt", weights_only=True)
    ours = torch_load(tmp_path / "ck.pt")
    for got in (theirs, ours):
        assert got["step"] == 3
        for k, v in model.state_dict().items():
            assert torch.equal(got["module"][k], v) and got["module"][k].dtype == v.dtype
        assert got["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
        for i, st in opt.state_dict()["state"].items():
            for name, v in st.items():
                assert torch.equal(got["optimizer"]["state"][i][name], v)
    assert ours["module"]._metadata == model.state_dict()._metadata


def test_torch_written_files_load(tmp_path, torch):
    from safetensors.torch import save_file

    sd = {"a": torch.randn(2, 3), "b": torch.arange(4, dtype=torch.int32)}
    torch.save({"module": sd, "epoch": 1}, tmp_path / "t.pt")
    save_file(sd, tmp_path / "t.safetensors", metadata={"format": "pt", "epoch": "1"})
    for path in ("t.pt", "t.safetensors"):
        got = torch_load(tmp_path / path)
        assert got["epoch"] == 1
        for k, v in sd.items():
            assert torch.equal(got["module"][k], v)


def test_sft_written_by_us_is_read_by_safetensors(tmp_path, torch):
    from safetensors import safe_open

    sd = {"w": torch.randn(3, 3).to(torch.bfloat16), "i": torch.arange(5)}
    torch_save({"module": sd, "step": 7, "cfg": {"a": 1}}, tmp_path / "m.sft")
    with safe_open(str(tmp_path / "m.sft"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "step": "7", "cfg": '{"a": 1}'}
        for k, v in sd.items():
            assert torch.equal(f.get_tensor(k), v)


def test_unsafe_is_explicit_and_warns(tmp_path, torch):
    import fractions

    path = tmp_path / "custom.pt"
    torch.save({"x": fractions.Fraction(1, 3)}, path)  # a global outside the weights-only allowlist
    with pytest.raises(mlutils.UnsafePickleError):
        torch_load(path)
    with pytest.warns(UserWarning):
        assert torch_load(path, unsafe=True) == {"x": fractions.Fraction(1, 3)}


def test_device_and_framework(tmp_path, torch):
    torch_save({"x": torch.ones(2)}, tmp_path / "d.pt")
    torch_save({"x": torch.ones(2)}, tmp_path / "d.sft")
    # .pt gives back the object saved; safetensors puts the tensors under module_key
    for p, where in (("d.pt", lambda got: got["x"]), ("d.sft", lambda got: got["module"]["x"])):
        x = where(torch_load(tmp_path / p, device="cpu"))
        assert isinstance(x, torch.Tensor) and x.device.type == "cpu" and torch.equal(x, torch.ones(2))
        x = where(torch_load(tmp_path / p, framework="np"))
        assert isinstance(x, np.ndarray)
        np.testing.assert_array_equal(x, np.ones(2, np.float32))


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not_durable"])
@pytest.mark.parametrize("suffix", [".pt", ".sft"])
def test_kill_mid_save_keeps_previous_file(tmp_path, suffix, durable):
    """A real SIGKILL while torch_save rewrites a checkpoint never damages it,
    durable or not (durable=False skips the fsyncs, not the rename)."""
    path = tmp_path / ("ck" + suffix)
    code = (
        "import sys, numpy as np\n"
        "from mlutils.io import torch_save\n"
        "path, durable = sys.argv[1], sys.argv[2] == 'durable'\n"
        "big = {'w%d' % i: np.full((256, 1024), i, np.float32) for i in range(32)}\n"  # 32 MiB
        "i = 0\n"
        "while True:\n"
        "    torch_save({'module': big, 'gen': i}, path, durable=durable)\n"
        "    i += 1\n"
        "    if i == 2: print('ready', flush=True)\n"
    )
    rng = np.random.default_rng(1)
    for _round in range(3):
        proc = subprocess.Popen([sys.executable, "-c", code, str(path), "durable" if durable else "fast"],
                                stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(float(rng.uniform(0.0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        got = torch_load(path, framework="np")
        assert got["gen"] >= 1
        assert len(got["module"]) == 32
        for k, v in got["module"].items():
            assert v.shape == (256, 1024) and v[0, 0] == v[-1, -1] == int(k[1:])
    # each save reaps what the killed one before it left: one temporary file
    # at most (the last killed save's), and the next save takes it
    leftovers = [f for f in os.listdir(tmp_path) if f != path.name]
    assert len(leftovers) <= 1 and all(f.startswith("." + path.name) and f.endswith(".tmp") for f in leftovers)
    torch_save({"module": {"x": np.ones(1, np.float32)}, "gen": -1}, path)
    assert os.listdir(tmp_path) == [path.name]


def test_metadata_named_like_the_tensors_key_is_refused_on_save(tmp_path):
    sd = {"w": np.ones(2, np.float32)}
    path = tmp_path / "c.safetensors"
    # the tensors come back under "module" (torch_load's default): a "module" entry would replace them
    with pytest.raises(ValueError, match="'module'"):
        torch_save({"model": sd, "module": "resnet18"}, path)
    with pytest.raises(ValueError, match="'module'"):
        torch_save({"model": sd, "module": "resnet18"}, path, module_key="model")
    assert not path.exists()
    # the .pt path keeps such a checkpoint as it is
    torch_save({"model": sd, "module": "resnet18"}, tmp_path / "c.pt")
    assert torch_load(tmp_path / "c.pt", framework="np")["module"] == "resnet18"
    # any other name is metadata as before, and the tensors survive
    torch_save({"model": sd, "arch": "resnet18"}, path)
    back = torch_load(path, framework="np")
    assert back["arch"] == "resnet18" and set(back["module"]) == {"w"}


def test_metadata_never_replaces_the_tensors_on_load(tmp_path):
    """A file (written by anyone) whose metadata has the module_key's name."""
    from safetensors.numpy import save_file as lib_save_file

    path = tmp_path / "hostile.safetensors"
    lib_save_file({"w": np.ones(2, np.float32)}, str(path), metadata={"module": "x", "weights": "[1]"})
    with pytest.raises(mlutils.SafetensorsError, match="'module'") as e:
        torch_load(path, framework="np")
    assert isinstance(e.value, ValueError)
    with pytest.raises(mlutils.SafetensorsError, match="'weights'"):
        torch_load(path, framework="np", module_key="weights")
    back = torch_load(path, framework="np", module_key="tensors")
    assert back["module"] == "x" and back["weights"] == [1] and set(back["tensors"]) == {"w"}
    assert set(torch_load(path, framework="np", load_metadata=False)) == {"w"}


NO_TORCH_CODE = r'''
import sys, numpy as np
import mlutils.io as io
assert sys.modules.get("torch") is None
ck = {"module": {"w": np.arange(3, dtype=np.float32)}, "step": 2}
for name in ("c.pt", "c.sft"):
    io.torch_save(ck, name)
    try:
        io.torch_load(name)
    except io.TorchNotInstalledError as exc:
        assert isinstance(exc, ImportError) and exc.name == "torch", exc
        assert "install torch" in str(exc) and "framework='np'" in str(exc), exc
        print(name, "raised")
    else:
        raise AssertionError(name + ": no error without torch")
    back = io.torch_load(name, framework="np")
    assert back["step"] == 2 and back["module"]["w"].tolist() == [0.0, 1.0, 2.0]
for call in (lambda: io.safe_open("c.sft", framework="pt"), lambda: io.load_file("c.sft", framework="pt")):
    try:
        call()
    except io.TorchNotInstalledError:
        print("st raised")
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
'''


def test_without_torch_both_formats_say_so(tmp_path):
    """framework='pt' without torch: one clear ImportError for .pt and .sft alike; 'np' works."""
    env = dict(os.environ, MLUTILS_NO_TORCH="1")
    code = "import sys; sys.modules['torch'] = None  # as conftest does under MLUTILS_NO_TORCH=1\n" + NO_TORCH_CODE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == ["c.pt raised", "c.sft raised", "st raised", "st raised"]


@pytest.mark.skipif(os.environ.get("MLUTILS_NO_TORCH") != "1", reason="runs under MLUTILS_NO_TORCH=1 only")
def test_without_torch_under_the_suite_switch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(NO_TORCH_CODE, "no_torch", "exec"), {})


def test_without_torch_suite_switch_runs(tmp_path):
    env = dict(os.environ, MLUTILS_NO_TORCH="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_io_state.py::test_without_torch_under_the_suite_switch"],
                         capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("as_path", [str, __import__("pathlib").Path])
def test_metadata_entry_named_like_module_key_names_the_file(tmp_path, as_path):
    """A safetensors file (written by the safetensors library) whose metadata
    has an entry named like torch_load's module_key: the error names the file
    as every format error does ("'path': ...")."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "m.safetensors"
    safetensors_numpy.save_file({"w": np.ones(3, np.float32)}, str(path), metadata={"module": "x"})
    with pytest.raises(mlutils.SafetensorsError) as info:
        torch_load(as_path(path), framework="np")
    assert str(info.value).startswith(f"{str(path)!r}: the metadata has an entry named 'module'")
    assert set(torch_load(as_path(path), framework="np", load_metadata=False)) == {"w"}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_bytes_paths_pick_the_format_and_round_trip(tmp_path, suffix):
    """A bytes path (os.PathLike's other form) picks its format by suffix as a
    str does (it was a TypeError about bytes and str)."""
    (tmp_path / "s").mkdir()
    (tmp_path / "b").mkdir()
    str_path = str(tmp_path / "s" / ("m" + suffix))  # the same name: a .pt archive is named after it
    bytes_path = os.fsencode(str(tmp_path / "b" / ("m" + suffix)))
    data = {"w": np.arange(6, dtype=np.float32)}
    torch_save(data, str_path)
    torch_save(data, bytes_path)
    assert is_safetensors_path(bytes_path) == (suffix == ".safetensors")
    with open(str_path, "rb") as a, open(bytes_path, "rb") as b:
        assert a.read() == b.read()
    got = torch_load(bytes_path, framework="np")
    want = torch_load(str_path, framework="np")
    assert got.keys() == want.keys()
