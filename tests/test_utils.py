"""mlutils.utils: the original helpers, checked against the standard library, numpy and torch."""
import collections
import dataclasses
import hashlib
import logging
import os
import random
import subprocess
import sys
import time
from typing import Any, Dict, Optional

import numpy as np
import pytest

from mlutils import utils as u

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---------------------------------------------------------------------------
# md5_hash


def test_md5_hash_scalars_and_lists_match_hashlib():
    assert u.md5_hash("abc") == hashlib.md5(b"abc").hexdigest()
    assert u.md5_hash("é") == hashlib.md5("é".encode("utf-8")).hexdigest()
    assert u.md5_hash(b"\x00\xff") == hashlib.md5(b"\x00\xff").hexdigest()
    assert u.md5_hash(12) == hashlib.md5(b"12").hexdigest()
    assert u.md5_hash(None) == hashlib.md5(b"None").hexdigest()
    members = ":".join(hashlib.md5(s.encode()).hexdigest() for s in ["a", "b"])
    assert u.md5_hash(["a", "b"]) == hashlib.md5(members.encode()).hexdigest()
    assert u.md5_hash(("a", "b")) == u.md5_hash(["a", "b"])
    assert u.md5_hash(["a", "b"]) != u.md5_hash(["b", "a"])


def test_md5_hash_ignores_insertion_order():
    a = {"x": 1, "y": {"p": [1, 2], "q": {3, 4}}}
    b = {"y": {"q": {4, 3}, "p": [1, 2]}, "x": 1}
    assert u.md5_hash(a) == u.md5_hash(b)
    assert u.md5_hash(a) != u.md5_hash({"x": 1, "y": {"p": [2, 1], "q": {3, 4}}})
    assert u.md5_hash({"1": 1}) != u.md5_hash({1: 1})
    assert u.md5_hash({"a": 1.0}) != u.md5_hash({"a": 1})


_HASH_SCRIPT = (
    "from mlutils.utils import md5_hash\n"
    "import numpy as np, dataclasses\n"
    "@dataclasses.dataclass\n"
    "class C:\n"
    "    a: int = 1\n"
    "    b: tuple = ('x', 'y')\n"
    "print(md5_hash({'names': {'alpha', 'beta', 'gamma', 'delta'}, 'c': C(), 'arr': np.arange(4)}))\n"
    "print(md5_hash(frozenset(['u', 'v', 'w', 'z'])))\n"
)


def test_md5_hash_is_the_same_in_every_process():
    """Sets of strings iterate in an order that depends on PYTHONHASHSEED; the hash must not."""
    outs = set()
    for seed in ("1", "2", "3", "4"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=ROOT)
        r = subprocess.run([sys.executable, "-c", _HASH_SCRIPT], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        outs.add(r.stdout)
    assert len(outs) == 1
    # and the sets' str() really does differ across those seeds (what the original hashed)
    strs = set()
    for seed in ("1", "2", "3", "4"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        r = subprocess.run([sys.executable, "-c", "print(str({'alpha', 'beta', 'gamma', 'delta'}))"],
                           capture_output=True, text=True, env=env)
        strs.add(r.stdout)
    assert len(strs) > 1


def test_md5_hash_refuses_objects_without_a_stable_form():
    class Opaque:
        pass

    with pytest.raises(TypeError, match="Opaque"):
        u.md5_hash({"a": Opaque()})
    with pytest.raises(TypeError, match="Opaque"):
        u.md5_hash(Opaque())


def test_md5_hash_tensors(torch):
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert u.md5_hash({"t": t}) == u.md5_hash({"t": t.clone()})
    assert u.md5_hash({"t": t}) != u.md5_hash({"t": t.reshape(3, 2)})
    assert u.md5_hash({"t": t}) != u.md5_hash({"t": t.double()})


# ---------------------------------------------------------------------------
# small helpers


def test_clamp():
    assert u.clamp(5, 0, 3) == 3
    assert u.clamp(-1, 0, 3) == 0
    assert u.clamp(2.5, 0, 3) == 2.5
    with pytest.raises(ValueError, match="lo"):
        u.clamp(1, 3, 0)


def test_timer_context_callback_and_log(caplog):
    got = []
    with caplog.at_level(logging.INFO, logger="mlutils.utils"):
        with u.timer("step took", callback=got.append) as t:
            time.sleep(0.02)
    assert len(got) == 1 and got[0] >= 0.02 and t.elapsed == got[0]
    assert any(r.getMessage().startswith("step took ") and r.getMessage().endswith("s") for r in caplog.records)


def test_timer_decorator_and_print_fn():
    lines, got = [], []

    @u.timer("f:", callback=got.append, print_fn=lines.append)
    def f(x):
        time.sleep(0.01)
        return x * 2

    assert f(3) == 6 and f(4) == 8
    assert len(got) == 2 and all(g >= 0.01 for g in got)
    assert len(lines) == 2 and lines[0].startswith("f: ")


def test_timer_bare_decorator(caplog):
    @u.timer
    def g(x, y=1):
        return x + y

    with caplog.at_level(logging.INFO, logger="mlutils.utils"):
        assert g(1, y=2) == 3
    assert g.__name__ == "g"
    assert any(r.getMessage().startswith("test_timer_bare_decorator.<locals>.g: ") for r in caplog.records)
    with pytest.raises(TypeError):
        u.timer("x")(1, 2)


def test_timer_reports_even_when_the_block_raises():
    got = []
    with pytest.raises(KeyError):
        with u.timer(callback=got.append):
            raise KeyError("x")
    assert len(got) == 1


def test_flatten_dict():
    d = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": 3, "f": {}}
    assert u.flatten_dict(d) == {"a.b": 1, "a.c.d": [1, 2], "e": 3, "f": {}}
    assert u.flatten_dict({1: {2: "x"}}) == {"1.2": "x"}
    with pytest.raises(ValueError, match="a.b"):
        u.flatten_dict({"a.b": 1, "a": {"b": 2}})


def test_coalese_last_by_default_first_on_request():
    assert u.coalese(None, 1, None, 2, None) == 2
    assert u.coalese(None, 1, None, 2, return_last=False) == 1
    assert u.coalese(0, None) == 0  # falsy values count
    assert u.coalese(None, None) is None  # the original raised IndexError
    assert u.coalese() is None
    assert u.coalesce is u.coalese


def test_passes_policy():
    assert u.passes_policy(None, "anything")
    pol = {"include": ["model"], "exclude": ["emb"]}
    assert u.passes_policy(pol, "model.layers.0")
    assert not u.passes_policy(pol, "model.emb")
    assert not u.passes_policy(pol, "head")
    # exclude-only passes the rest (the original failed every name)
    assert u.passes_policy({"exclude": ["emb"]}, "layers.0")
    assert not u.passes_policy({"exclude": ["emb"]}, "emb")
    assert not u.passes_policy({"include": []}, "x")
    assert u.passes_policy({"include": "lay"}, "layers.0")  # a bare string is one term
    assert not u.passes_policy({"include": "xyz"}, "layers.x")
    with pytest.raises(TypeError):
        u.passes_policy(["model"], "model")


def test_convert_kwargs_strips_prefix_in_place():
    kw = {"enc_dim": 4, "dim": 1, "other": 2, "enc_depth": 3}
    out = u.convert_kwargs(kw, "enc_")
    assert out is kw
    assert kw == {"dim": 4, "other": 2, "depth": 3}  # the prefixed value wins
    kw2 = {"enc_dim": 4, "dim": 1}
    kw3 = {"dim": 1, "enc_dim": 4}
    assert u.convert_kwargs(kw2, "enc_") == u.convert_kwargs(kw3, "enc_") == {"dim": 4}


# ---------------------------------------------------------------------------
# prune_missing


@dataclasses.dataclass
class _Inner:
    lr: float = 1e-3
    betas: tuple = (0.9, 0.99)


@dataclasses.dataclass
class _Cfg:
    name: str = "m"
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # free-form
    policy: Optional[dict] = None


def test_prune_missing_nested_dicts():
    source = {"a": 1, "b": {"c": 2, "d": {"e": 3}}}
    dest = {"a": 10, "z": {"q": 1}, "b": {"c": 20, "x": 5, "d": {"e": 30, "f": 1}}}
    kept, missing = u.prune_missing(source, dest)
    assert kept == {"a": 10, "b": {"c": 20, "d": {"e": 30}}}
    assert sorted(missing) == ["b.d.f", "b.x", "z"]
    assert dest["b"]["x"] == 5  # dest is not changed
    assert u.prune_missing(source, dest, return_missing=False) == kept
    kept, missing = u.prune_missing(source, dest, recurse=False)
    assert kept == {"a": 10, "b": dest["b"]} and missing == ["z"]


def test_prune_missing_objects():
    dest = {
        "name": "n",
        "inner": {"lr": 0.1, "momentum": 0.9},
        "extra": {"anything": {"goes": 1}},
        "policy": {"include": ["x"]},
        "typo": {"nested": True},  # the original raised KeyError here
    }
    kept, missing = u.prune_missing(_Cfg(), dest)
    assert kept == {
        "name": "n",
        "inner": {"lr": 0.1},
        "extra": {"anything": {"goes": 1}},
        "policy": {"include": ["x"]},
    }
    assert sorted(missing) == ["inner.momentum", "typo"]
    # a plain object with attributes works the same
    class Plain:
        def __init__(self):
            self.a = 1
            self.sub = {"b": 2}

    kept, missing = u.prune_missing(Plain(), {"a": 2, "sub": {"b": 3, "c": 4}, "method": 1})
    assert kept == {"a": 2, "sub": {"b": 3}} and sorted(missing) == ["method", "sub.c"]


def test_prune_missing_bad_source():
    with pytest.raises(TypeError, match="int"):
        u.prune_missing(3, {"a": 1})


# ---------------------------------------------------------------------------
# set_seed


def _draws(torch):
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randint(0, 1000, (4,)).tolist()


def test_set_seed_reproduces_python_numpy_torch(torch):
    assert u.set_seed(1234) == 1234
    first = _draws(torch)
    assert u.set_seed(1234) == 1234
    assert _draws(torch) == first
    u.set_seed(1235)
    assert _draws(torch) != first


def test_set_seed_zero_is_a_seed(torch):
    """The original replaced a seed of 0 with the clock."""
    assert u.set_seed(0) == 0
    a = _draws(torch)
    time.sleep(1.1)
    assert u.set_seed(0) == 0
    assert _draws(torch) == a


def test_set_seed_none_picks_and_returns_a_seed(torch):
    seed = u.set_seed()
    assert isinstance(seed, int) and 0 <= seed < 2 ** 32
    a = _draws(torch)
    u.set_seed(seed)
    assert _draws(torch) == a


def test_set_seed_rejects_bad_seeds():
    with pytest.raises(ValueError):
        u.set_seed(-1)
    with pytest.raises(ValueError):
        u.set_seed(2 ** 32)
    with pytest.raises(TypeError):
        u.set_seed(1.5)


# ---------------------------------------------------------------------------
# coerce_dtype


def test_coerce_dtype(torch):
    assert u.coerce_dtype("float16") is torch.float16
    assert u.coerce_dtype("fp16") is torch.float16
    assert u.coerce_dtype("bf16") is torch.bfloat16
    assert u.coerce_dtype("bfloat16") is torch.bfloat16
    assert u.coerce_dtype("fp32") is torch.float32
    assert u.coerce_dtype("int8") is torch.int8
    assert u.coerce_dtype("torch.float64") is torch.float64
    assert u.coerce_dtype("float8_e5m2") is torch.float8_e5m2
    assert u.coerce_dtype(torch.int16) is torch.int16
    with pytest.raises(ValueError, match="'float17'"):
        u.coerce_dtype("float17")  # the original quietly gave float32
    with pytest.raises(ValueError, match="Tensor"):
        u.coerce_dtype("Tensor")
    with pytest.raises(TypeError):
        u.coerce_dtype(3)


# ---------------------------------------------------------------------------
# tree_map / to_device


_Pair = collections.namedtuple("_Pair", "left right")


def test_tree_map_keeps_container_types(torch):
    t = torch.ones(2)
    x = {
        "tuple": (t, 1, [t, "s"]),
        "pair": _Pair(t, (t,)),
        "od": collections.OrderedDict([("b", t), ("a", {"deep": (t, None)})]),
        "dd": collections.defaultdict(list, {"k": t}),
    }
    y = u.tree_map(lambda v: v * 3, x)
    assert type(y["tuple"]) is tuple  # the original gave a generator
    assert torch.equal(y["tuple"][0], t * 3) and y["tuple"][1] == 1
    assert type(y["tuple"][2]) is list and y["tuple"][2][1] == "s"
    assert type(y["pair"]) is _Pair and torch.equal(y["pair"].left, t * 3)
    assert type(y["pair"].right) is tuple and torch.equal(y["pair"].right[0], t * 3)
    assert type(y["od"]) is collections.OrderedDict and list(y["od"]) == ["b", "a"]
    assert type(y["od"]["a"]["deep"]) is tuple and y["od"]["a"]["deep"][1] is None
    assert type(y["dd"]) is collections.defaultdict and y["dd"].default_factory is list
    assert torch.equal(x["tuple"][0], t)  # input untouched


def test_to_device_and_dtype(torch):
    x = (torch.zeros(2), {"a": [torch.ones(1, dtype=torch.int64)]})
    y = u.to_device(x, "cpu", dtype=torch.float64)
    assert type(y) is tuple and y[0].dtype == torch.float64
    assert y[1]["a"][0].dtype == torch.float64 and y[1]["a"][0].device.type == "cpu"


# ---------------------------------------------------------------------------
# state dicts, attributes, resize_weight


def test_load_state_dict_non_strict(torch, caplog):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(3, 2))
    sd = other.state_dict()
    del sd["1.bias"]
    sd["head.weight"] = torch.zeros(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="mlutils.utils"):
        report = u.load_state_dict_non_strict(model, sd)
    assert report.loaded == ["1.weight"]
    assert report.missing == ["1.bias"]
    assert report.unexpected == ["head.weight"]
    assert report.mismatched == [("0.bias", (3,), (5,)), ("0.weight", (3, 4), (5, 4))]
    assert torch.equal(model[1].weight, other[1].weight)
    assert torch.equal(model[0].weight, before["0.weight"]) and torch.equal(model[1].bias, before["1.bias"])
    assert any("0.weight (3, 4) vs (5, 4)" in r.getMessage() for r in caplog.records)
    messages = []
    u.load_state_dict_non_strict(model, sd, logger=messages.append)
    assert len(messages) == 1 and "head.weight" in messages[0]


def test_gather_and_dispatch_attribute(torch):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    model[0].loss = 1.5
    model[1][0].loss = {"ce": 2.0, "aux": {"z": 3}}
    model.loss = 0.5
    got = u.gather_attribute(model, "loss")
    assert got == {"loss": 0.5, "loss.0": 1.5, "loss.1.0.ce": 2.0, "loss.1.0.aux.z": 3}
    assert not hasattr(model[0], "loss") and not hasattr(model, "loss")
    model[0].flag = False
    model[1][0].flag = False
    u.dispatch_attribute(model, "flag", True, filter_fn=lambda m: m is not model[0])
    assert model[0].flag is False and model[1][0].flag is True
    assert not hasattr(model[1][1], "flag")  # only modules that already had it
    model[0].x = 1
    assert u.gather_attribute(model, "x", delete=False, prefix=False) == {"0": 1} and model[0].x == 1


def test_resize_weight_trim_and_extend(torch):
    torch.manual_seed(0)
    w = torch.randn(100, 64) * 0.02 + 0.5
    short = u.resize_weight(w, 10)
    assert torch.equal(short, w[:10])
    longer = u.resize_weight(w, 5000)
    assert longer.shape == (5000, 64) and torch.equal(longer[:100], w)
    new = longer[100:]
    # new rows follow the existing weights' mean and spread (the original used uniform [0, 1))
    assert abs(new.mean().item() - w.mean().item()) < 0.002
    assert abs(new.std().item() - w.std().item()) < 0.002
    zeros = u.resize_weight(w, 120, random=False)
    assert torch.equal(zeros[100:], torch.zeros(20, 64))
    assert u.resize_weight(w, 100) is w


def test_resize_weight_other_dim_dtype(torch):
    w = torch.randn(3, 4, dtype=torch.float64)
    wider = u.resize_weight(w, 6, dim=1)
    assert wider.shape == (3, 6) and wider.dtype == torch.float64 and torch.equal(wider[:, :4], w)
    assert torch.equal(u.resize_weight(w, 2, dim=-1), w[:, :2])
    ints = u.resize_weight(torch.arange(4), 6)
    assert ints.tolist() == [0, 1, 2, 3, 0, 0]
    with pytest.raises(ValueError):
        u.resize_weight(w, -1)
    with pytest.raises(ValueError):
        u.resize_weight(w, 4, dim=2)


# ---------------------------------------------------------------------------
# devices, sizes and the offload policy

LAYER = (10 * 10 + 10) * 4  # bytes of a float32 Linear(10, 10)


def _stack(torch, n=4):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(10, 10) for _ in range(n))
            self.act = torch.nn.ReLU()

        def forward(self, x):
            for layer in self.layers:
                x = self.act(layer(x)) + x
            return x

    return Net()


def _fake(*frees, cpu=None):
    devs = [{"name": f"cuda:{i}", "free": f} for i, f in enumerate(frees)]
    if cpu is not None:
        devs.append({"name": "cpu", "free": cpu})
    return devs


def _plan(result):
    return {d["name"]: d["modules"] for d in result}


def test_module_size_and_devices(torch):
    net = _stack(torch)
    assert u.get_module_size(net) == 4 * LAYER
    bn = torch.nn.BatchNorm1d(8)
    assert u.get_module_size(bn) == sum(t.numel() * t.element_size() for t in list(bn.parameters()) + list(bn.buffers()))
    tied = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert u.get_module_size(tied) == 10 * 4 * 4
    assert u.get_devices()[-1] == "cpu"
    props = u.get_device_properties("cpu")
    assert props["total"] > 0 and 0 <= props["free"] <= props["total"]
    with pytest.raises(ValueError, match="tpu"):
        u.get_device_properties("tpu:0")


def test_offload_policy_byte_budgets(torch):
    net = _stack(torch)
    plan = u.get_model_offload_policy(net, {"devices": _fake(10 ** 9, 10 ** 9, cpu=10 ** 9), "limits": [2 * LAYER, LAYER]})
    assert _plan(plan) == {"cuda:0": ["layers.0", "layers.1"], "cuda:1": ["layers.2"], "cpu": ["layers.3"]}
    assert plan[0]["free"] == 0 and plan[2]["free"] == 10 ** 9 - LAYER


def test_offload_policy_fraction_budgets(torch):
    net = _stack(torch)
    plan = u.get_model_offload_policy(net, {"devices": _fake(10 ** 9, 10 ** 9, cpu=10 ** 9), "limits": [0.5, 0.25]})
    assert _plan(plan) == {"cuda:0": ["layers.0", "layers.1"], "cuda:1": ["layers.2"], "cpu": ["layers.3"]}


def test_offload_policy_cap_never_raises_free_memory(torch):
    net = _stack(torch)
    plan = u.get_model_offload_policy(net, {"devices": _fake(LAYER, cpu=10 ** 9), "limits": [10 ** 9]})
    assert _plan(plan) == {"cuda:0": ["layers.0"], "cpu": ["layers.1", "layers.2", "layers.3"]}


def test_offload_policy_explicit_assignment(torch):
    net = _stack(torch)
    policy = {"devices": _fake(2 * LAYER, 2 * LAYER, cpu=10 ** 9), "assign": [["layers.3"], ["layers.0"]]}
    plan = u.get_model_offload_policy(net, policy)
    # assigned first, then the rest fill in model order; unassigned modules are not lost
    assert _plan(plan) == {"cuda:0": ["layers.3", "layers.1"], "cuda:1": ["layers.0", "layers.2"]}
    # an assigned module that does not fit joins the rest
    policy = {"devices": _fake(LAYER // 2, 10 ** 9, cpu=10 ** 9), "assign": [["layers.0"]]}
    assert _plan(u.get_model_offload_policy(net, policy)) == {"cuda:1": ["layers.0", "layers.1", "layers.2", "layers.3"]}


def test_offload_policy_spills_to_cpu(torch):
    net = _stack(torch)
    plan = u.get_model_offload_policy(net, {"devices": _fake(LAYER, LAYER, cpu=10 ** 9)})
    assert _plan(plan) == {"cuda:0": ["layers.0"], "cuda:1": ["layers.1"], "cpu": ["layers.2", "layers.3"]}


def test_offload_policy_include_exclude(torch):
    net = _stack(torch)
    plan = u.get_model_offload_policy(net, {"devices": _fake(10 ** 9), "exclude": ["layers.1"]})
    assert _plan(plan) == {"cuda:0": ["layers.0", "layers.2", "layers.3"]}
    plan = u.get_model_offload_policy(net, {"device": _fake(10 ** 9), "include": ["layers.2"]})
    assert _plan(plan) == {"cuda:0": ["layers.2"]}


def test_offload_policy_impossible_is_a_clear_error(torch):
    net = _stack(torch)
    with pytest.raises(ValueError) as e:
        u.get_model_offload_policy(net, {"devices": _fake(LAYER, LAYER)})
    text = str(e.value)
    assert "'layers.2'" in text and f"{LAYER} bytes" in text and "cuda:0" in text and "cuda:1" in text
    # one module bigger than every device
    big = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(100, 100))
    with pytest.raises(ValueError, match="'1'"):
        u.get_model_offload_policy(big, {"devices": _fake(10 ** 4, cpu=10 ** 4)})


def test_offload_policy_bad_input(torch):
    net = _stack(torch)
    with pytest.raises(ValueError, match="limits"):
        u.get_model_offload_policy(net, {"devices": _fake(1), "limits": [1, 2]})
    with pytest.raises(ValueError, match="limits"):
        u.get_model_offload_policy(net, {"devices": _fake(1), "limits": ["4GiB"]})
    with pytest.raises(ValueError, match="not both"):
        u.get_model_offload_policy(net, {"devices": _fake(1), "device": _fake(1)})
    with pytest.raises(ValueError, match="name"):
        u.get_model_offload_policy(net, {"devices": [{"free": 3}]})
    with pytest.raises(TypeError):
        u.get_model_offload_policy(net, ["cpu"])


def test_offload_policy_default_devices_on_cpu(torch):
    plan = u.get_model_offload_policy(_stack(torch))
    # on a machine without CUDA everything lands on the CPU
    if u.get_devices() == ["cpu"]:
        assert _plan(plan) == {"cpu": [f"layers.{i}" for i in range(4)]}


def test_offload_model_all_cpu_keeps_outputs(torch):
    torch.manual_seed(0)
    net = _stack(torch)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.full((10,), 2.0))  # a parent with its own parameter
            self.net = net

        def forward(self, x, bias=None):
            return self.net(x) * self.scale + (0 if bias is None else bias)

    model = Wrapped()
    x = torch.randn(3, 10)
    expected = model(x, bias=torch.ones(10))
    devices = [{"name": "cpu", "free": 2 * LAYER}, {"name": "cpu", "free": 10 ** 9}]
    out = u.offload_model(model, {"devices": devices})
    assert out is model
    assert set(model.offload_plan) == {"", "net.layers.0", "net.layers.1", "net.layers.2", "net.layers.3"}
    assert torch.equal(model(x, bias=torch.ones(10)), expected)
    loss = model(x).sum()
    loss.backward()
    assert model.scale.grad is not None and net.layers[0].weight.grad is not None


def test_offload_model_twice_replaces_hooks(torch):
    net = _stack(torch)
    x = torch.randn(2, 10)
    expected = net(x)
    policy = {"devices": [{"name": "cpu", "free": 10 ** 9}]}
    u.offload_model(net, policy)
    u.offload_model(net, policy)
    assert len(net.layers[0]._forward_pre_hooks) == 1 and len(net.layers[0]._forward_hooks) == 1
    assert torch.equal(net(x), expected)
