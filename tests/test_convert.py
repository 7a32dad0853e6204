"""mlutils convert .pt -> safetensors for whole training checkpoints: tensors
beside plain values, nested dicts (--flatten), optimizer states, hostile
inputs; and torch_load reading what it wrote.  Files come from the real
torch.save and are read back by the real safetensors library."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlutils.io import torch_load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert(*args):
    return subprocess.run([sys.executable, "-m", "mlutils", "convert", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def refused(out, *words):
    """Exit 1, one clear error line naming words, no traceback."""
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stderr.startswith("mlutils convert: error: ") and "Traceback" not in out.stderr, out.stderr
    for w in words:
        assert w in out.stderr, (w, out.stderr)


def same_tensors(got, want, torch):
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_tensors_beside_plain_values(tmp_path, torch):
    """The most ordinary checkpoint: tensors at the top level beside step and config."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = {"w": torch.randn(4, 3), "b": torch.arange(3).to(torch.bfloat16)}
    values = {"step": 5, "cfg": {"dim": 4, "betas": [0.9, 0.99]}, "arch": "mlp", "seven": "7", "none": None,
              "nan": float("inf"), "format": "custom"}
    torch.save({**tensors, **values}, tmp_path / "ck.pt")
    out = convert(tmp_path / "ck.pt", tmp_path / "ck.safetensors")
    assert out.returncode == 0, out.stderr
    assert "tensors: the checkpoint's top-level tensors; metadata: arch, cfg, format, nan, none, seven, step" \
        in out.stdout
    same_tensors(load_file(tmp_path / "ck.safetensors"), tensors, torch)
    with safe_open(str(tmp_path / "ck.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta == {"step": "5", "cfg": '{"dim": 4, "betas": [0.9, 0.99]}', "arch": '"mlp"', "seven": '"7"',
                    "none": "null", "nan": "Infinity", "format": '"custom"',
                    "mlutils.values": json.dumps(list(values))}
    back = torch_load(tmp_path / "ck.safetensors")
    same_tensors(back.pop("module"), tensors, torch)
    assert back == values  # "7" stays a string, None and the checkpoint's own "format" come back
    back = torch_load(tmp_path / "ck.safetensors", framework="np", load_metadata=False)
    assert sorted(back) == ["b", "w"]
    # and back to .pt: the values as they were, under torch_load's layout
    assert convert(tmp_path / "ck.safetensors", tmp_path / "again.pt").returncode == 0
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    same_tensors(again.pop("module"), tensors, torch)
    assert again == values


def test_torch_load_parses_only_the_listed_values(tmp_path, torch):
    """A file's own string metadata is never JSON-decoded by accident when it lists its values."""
    from safetensors.torch import save_file

    from mlutils import SafetensorsError

    t = {"x": torch.ones(2)}
    meta = {"format": "pt", "step": "5", "version": "1", "flag": "true", "mlutils.values": '["step"]'}
    save_file(t, tmp_path / "listed.safetensors", metadata=meta)
    back = torch_load(tmp_path / "listed.safetensors", framework="np")
    np.testing.assert_array_equal(back.pop("module")["x"], np.ones(2, np.float32))
    assert back == {"step": 5, "version": "1", "flag": "true"}
    # a file without the list (torch_save's, or older): each value parsed when it parses, as before
    save_file(t, tmp_path / "plain.safetensors", metadata={"format": "pt", "step": "5", "name": "mlp"})
    back = torch_load(tmp_path / "plain.safetensors")
    back.pop("module")
    assert back == {"step": 5, "name": "mlp"}
    for bad, words in (({"mlutils.values": "[1]"}, "JSON array of strings"),
                       ({"mlutils.values": "step"}, "is not JSON"),
                       ({"mlutils.values": '["gone"]'}, "'gone'"),
                       ({"mlutils.values": '["v"]', "v": "{oops"}, "metadata 'v' is listed")):
        save_file(t, tmp_path / "bad.safetensors", metadata=bad)
        with pytest.raises(SafetensorsError, match="bad.safetensors") as e:
            torch_load(tmp_path / "bad.safetensors")
        assert words in str(e.value)


def test_flatten_nested_dicts_and_unflatten(tmp_path, torch):
    from safetensors import safe_open

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    ck = {"model": {"encoder": model.state_dict(), "head": {"w": torch.ones(2, 2)}, "buffers": {}},
          "ema": ema, "w0": torch.zeros(3), "step": 5}
    torch.save(ck, tmp_path / "ck.pt")
    refused(convert(tmp_path / "ck.pt", tmp_path / "x.safetensors"), "'model'", "--flatten")
    assert not (tmp_path / "x.safetensors").exists()
    out = convert(tmp_path / "ck.pt", tmp_path / "ck.safetensors", "--flatten")
    assert out.returncode == 0, out.stderr
    with safe_open(str(tmp_path / "ck.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.encoder.0.weight").shape == (4, 3)
        assert f.metadata()["step"] == "5"
    assert names == {"w0", "model.head.w"} | {f"model.encoder.{k}" for k in ema} | {f"ema.{k}" for k in ema}
    flat = torch_load(tmp_path / "ck.safetensors")["module"]
    assert set(flat) == names
    back = torch_load(tmp_path / "ck.safetensors", unflatten=True)
    assert back["step"] == 5
    nested = back["module"]
    # split where the dicts were: a state dict's own dotted keys stay whole, empty dicts come back
    assert set(nested) == {"model", "ema", "w0"}
    assert set(nested["model"]) == {"encoder", "head", "buffers"} and nested["model"]["buffers"] == {}
    same_tensors(nested["model"]["encoder"], model.state_dict(), torch)
    same_tensors(nested["ema"], ema, torch)
    model.load_state_dict(nested["ema"])
    assert torch.equal(nested["model"]["head"]["w"], torch.ones(2, 2))
    assert torch_load(tmp_path / "ck.safetensors", unflatten=True, load_metadata=False, framework="np").keys() \
        == {"model", "ema", "w0"}
    # --module-key K --flatten: names relative to K, its siblings must be values
    torch.save({"model": ck["model"], "step": 5}, tmp_path / "m.pt")
    out = convert(tmp_path / "m.pt", tmp_path / "m.safetensors", "--flatten", "--module-key", "model")
    assert out.returncode == 0, out.stderr
    back = torch_load(tmp_path / "m.safetensors", unflatten=True)
    assert set(back["module"]) == {"encoder", "head", "buffers"} and back["step"] == 5
    same_tensors(back["module"]["encoder"], model.state_dict(), torch)


@pytest.mark.parametrize("ck, words", [
    ({"a.b": 1, "a": {"b": 2}}, ["'a'['b']", "'a.b'", "would both be the tensor 'a.b'"]),
    ({"a.y": 1, "a": {"x": 2}}, ["'a.y'", "would come back as 'a'['y']"]),
    ({"m": {"e.f": {"g": 1}, "e": {"f.g": 2}}}, ["would both be the tensor 'm.e.f.g'"]),
    ({"m": {"e.f": {"g": 1}, "e": {"f": {"h": 2}}}}, ["would come back as"]),
    ({"m": {"w": 1, "note": "x"}}, ["'m'['note'] is a str among tensors", "--drop m"]),
    ({"m": {"w": 1, 3: 2}}, ["'m' has the key 3 (int)"]),
    ({"m": {"w": 1, "l": [2]}}, ["'m'['l'] is a list among tensors"]),
])
def test_flatten_collisions_are_errors(tmp_path, torch, ck, words):
    def tensors(x):
        if isinstance(x, dict):
            return {k: tensors(v) for k, v in x.items()}
        if isinstance(x, list):
            return [tensors(v) for v in x]
        return torch.full((2,), float(x)) if isinstance(x, int) else x

    torch.save(tensors(ck), tmp_path / "ck.pt")
    refused(convert(tmp_path / "ck.pt", tmp_path / "ck.safetensors", "--flatten"), *words)
    assert not (tmp_path / "ck.safetensors").exists()


def test_unflatten_without_a_record(tmp_path, torch):
    """Files written elsewhere: split at every dot; a name that prefixes another is an error."""
    from safetensors.torch import save_file

    from mlutils import SafetensorsError

    save_file({"a.b.c": torch.ones(1), "a.d": torch.zeros(1), "e": torch.ones(2)}, tmp_path / "x.safetensors")
    got = torch_load(tmp_path / "x.safetensors", unflatten=True, load_metadata=False)
    assert set(got) == {"a", "e"} and set(got["a"]) == {"b", "d"} and set(got["a"]["b"]) == {"c"}
    for names in (("a", "a.b"), ("a.b", "a")):
        save_file({n: torch.ones(1) for n in names}, tmp_path / "c.safetensors")
        with pytest.raises(SafetensorsError, match="one name is a prefix of the other"):
            torch_load(tmp_path / "c.safetensors", unflatten=True)
    save_file({"a.b": torch.ones(1)}, tmp_path / "t.safetensors", metadata={"mlutils.nested": '{"a": 1}'})
    with pytest.raises(SafetensorsError, match="objects of objects"):
        torch_load(tmp_path / "t.safetensors", unflatten=True)
    torch.save({"a.b": torch.ones(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="keeps its nesting"):
        torch_load(tmp_path / "x.pt", unflatten=True)


def _trained(torch):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    return model, opt


def test_optimizer_state_left_out_or_kept(tmp_path, torch):
    model, opt = _trained(torch)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7}, tmp_path / "ck.pt")
    out = convert(tmp_path / "ck.pt", tmp_path / "ck.safetensors")
    assert out.returncode == 0, out.stderr
    assert "left out 'optimizer', an optimizer state (--keep-optimizer writes it to" in out.stderr
    assert not (tmp_path / "ck.optimizer.pt").exists()
    back = torch_load(tmp_path / "ck.safetensors")
    assert set(back) == {"module", "step"} and back["step"] == 7
    same_tensors(back["module"], model.state_dict(), torch)

    out = convert(tmp_path / "ck.pt", tmp_path / "ck.safetensors", "--keep-optimizer")
    assert out.returncode == 0, out.stderr
    assert "'optimizer' goes to" in out.stderr and "ck.optimizer.pt" in out.stdout
    assert sorted(os.listdir(tmp_path)) == ["ck.optimizer.pt", "ck.pt", "ck.safetensors"]  # no temporary left
    kept = torch.load(tmp_path / "ck.optimizer.pt", weights_only=True)
    assert set(kept) == {"optimizer"}
    want = opt.state_dict()
    assert kept["optimizer"]["param_groups"] == want["param_groups"]
    for i, st in want["state"].items():
        same_tensors(kept["optimizer"]["state"][i], st, torch)
    model2, opt2 = _trained(torch)
    opt2.load_state_dict(kept["optimizer"])  # the real optimizer takes it back

    # two optimizers beside top-level tensors, one kept file for both
    d_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    d_opt.step()
    torch.save({"w": torch.ones(2), "opt_g": opt.state_dict(), "opt_d": d_opt.state_dict()}, tmp_path / "gan.pt")
    out = convert(tmp_path / "gan.pt", tmp_path / "gan.sft", "--keep-optimizer")
    assert out.returncode == 0, out.stderr
    assert set(torch.load(tmp_path / "gan.optimizer.pt", weights_only=True)) == {"opt_g", "opt_d"}


def test_keep_optimizer_refusals(tmp_path, torch):
    model, opt = _trained(torch)
    torch.save({"model": model.state_dict(), "step": 1}, tmp_path / "noopt.pt")
    refused(convert(tmp_path / "noopt.pt", tmp_path / "a.safetensors", "--keep-optimizer"), "no optimizer state")
    assert not (tmp_path / "a.safetensors").exists()
    # the kept file would be the input
    src = tmp_path / "x.optimizer.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, src)
    before = src.read_bytes()
    refused(convert(src, tmp_path / "x.safetensors", "--keep-optimizer"), "the input file")
    assert not (tmp_path / "x.safetensors").exists()
    assert src.read_bytes() == before
    # the flags write safetensors only
    torch.save({"x": torch.ones(1)}, tmp_path / "t.pt")
    assert convert(tmp_path / "t.pt", tmp_path / "t.sft").returncode == 0
    refused(convert(tmp_path / "t.sft", tmp_path / "t2.pt", "--keep-optimizer"), "--keep-optimizer applies")
    refused(convert(tmp_path / "t.sft", tmp_path / "t2.pt", "--flatten"), "--flatten applies")


def test_values_that_are_not_json_name_the_key(tmp_path, torch):
    deep_tensor = torch.ones(1)
    for _ in range(100):  # deeper than any fixed-depth search for tensors
        deep_tensor = [deep_tensor]
    cases = [
        ({"dtype": torch.float32}, ["'dtype'", "cannot be safetensors metadata"]),
        ({"raw": b"\x00\x01"}, ["'raw'", "bytes"]),
        ({"z": 1 + 2j}, ["'z'", "complex"]),
        ({"big": 2 ** 70}, ["'big'", "64 bits"]),
        ({"cfg": {"layers": {1: "a"}}}, ["'cfg' has the key 1 (int) at 'cfg'['layers']"]),
        ({"hidden": deep_tensor}, ["'hidden' holds a tensor at 'hidden'[0][0]", "--drop hidden"]),
        ({"extra": {"ema": torch.ones(1)}}, ["'extra'['ema']", "--flatten", "--drop extra"]),
        ({3: "three"}, ["checkpoint key 3 (int) is not a str"]),
        ({("a", 1): 2}, ["checkpoint key ('a', 1) (tuple)"]),
        ({"mlutils.values": "[]"}, ["'mlutils.values'", "reserved"]),
        ({"module": "resnet"}, ["'module' would be metadata named like the tensors"]),
    ]
    for extra, words in cases:
        torch.save({"w": torch.ones(2), **extra}, tmp_path / "ck.pt")
        refused(convert(tmp_path / "ck.pt", tmp_path / "ck.safetensors"), *words)
        assert not (tmp_path / "ck.safetensors").exists()


def test_shared_and_strided_tensors_are_written_as_copies(tmp_path, torch):
    """safetensors has no shared storage: the library's save_file refuses shared
    and non-contiguous tensors; convert writes each name as its own copy."""
    import safetensors.torch as st

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    big = torch.arange(40, dtype=torch.float16).reshape(4, 10)
    ck = {"w": base, "tied": base, "wT": base.t(), "col": base[:, 1], "strided": big[:, ::3], "other": torch.ones(2),
          "step": 3}
    tensors = {k: v for k, v in ck.items() if k != "step"}
    with pytest.raises(RuntimeError, match="share memory"):
        st.save_file({"w": base, "tied": base}, str(tmp_path / "lib.safetensors"))
    with pytest.raises(ValueError, match="non contiguous"):
        st.save_file({"strided": big[:, ::3]}, str(tmp_path / "lib.safetensors"))
    torch.save(ck, tmp_path / "ck.pt")
    out = convert(tmp_path / "ck.pt", tmp_path / "ck.safetensors")
    assert out.returncode == 0, out.stderr
    assert "'col', 'tied', 'w', 'wT' share memory: each is written as its own copy" in out.stderr
    got = st.load_file(str(tmp_path / "ck.safetensors"))
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].is_contiguous() and torch.equal(got[k], v), k
    assert torch_load(tmp_path / "ck.safetensors")["step"] == 3


def test_deep_nesting(tmp_path, torch):
    """Values and dicts as deep as a .pt may be (1000 levels): converted and
    read back without recursion; deeper is the reader's clear error."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # torch.save pickles recursively
    try:
        v, d = "end", torch.ones(2)
        for i in range(990):
            v, d = [v], {f"k{i % 3}": d}
        torch.save({"w": torch.zeros(1), "deep": v}, tmp_path / "v.pt")
        torch.save({"m": d, "step": 1}, tmp_path / "d.pt")
        for _ in range(20):
            v = [v]
        torch.save({"w": torch.zeros(1), "deep": v}, tmp_path / "toodeep.pt")
    finally:
        sys.setrecursionlimit(limit)
    assert convert(tmp_path / "v.pt", tmp_path / "v.sft").returncode == 0
    x, n = torch_load(tmp_path / "v.sft")["deep"], 0
    while isinstance(x, list):
        x, n = x[0], n + 1
    assert (n, x) == (990, "end")
    out = convert(tmp_path / "d.pt", tmp_path / "d.sft", "--flatten")
    assert out.returncode == 0, out.stderr
    x, n = torch_load(tmp_path / "d.sft", unflatten=True)["module"], 0
    while isinstance(x, dict):
        x, n = x[next(iter(x))], n + 1
    assert n == 991 and torch.equal(x, torch.ones(2))
    refused(convert(tmp_path / "toodeep.pt", tmp_path / "t.sft"), "nested deeper than 1000 levels")
