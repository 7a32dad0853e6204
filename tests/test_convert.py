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
