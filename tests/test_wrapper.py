"""mlutils.wrapper: class selection, injection, in-place replacement, autocast, compile, apply_optimizations."""
import os
import subprocess
import sys
import types
import warnings

import pytest

from mlutils import wrapper as w

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    """Each test starts with no warnings given, the default configuration and nothing injected."""
    monkeypatch.setattr(w, "_WARNED", set())
    monkeypatch.setattr(w, "_CURRENT", w.Optimizations())
    yield
    w.uninject()


def _record(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [r for r in rec if issubclass(r.category, RuntimeWarning)]


# ---------------------------------------------------------------------------
# Optimizations


def test_optimizations_defaults_and_validation():
    o = w.Optimizations()
    assert not any([o.injects, o.replace, o.compile, o.bitsandbytes, o.dadaptation, o.bitnet, o.fp8,
                    o.tensorrt, o.unsloth])
    assert o.model_offloading is None
    assert o.linear and o.embedding and o.optimizers  # scopes, on as in the original
    with pytest.raises(TypeError, match="bitsandbytes"):
        w.Optimizations(bitsandbytes="yes")
    with pytest.raises(TypeError, match="model_offloading"):
        w.Optimizations(model_offloading=["cpu"])
    assert w.Optimizations.from_dict({"compile": "eager", "fp8": True}) == w.Optimizations(compile="eager", fp8=True)
    with pytest.raises(ValueError, match="bitsandbyte"):
        w.Optimizations.from_dict({"bitsandbyte": True})


def test_configure_and_current():
    assert w.current() == w.Optimizations()
    o = w.configure(w.Optimizations(), compile="eager")
    assert w.current() is o and o.compile == "eager"
    with pytest.raises(TypeError):
        w.configure({"compile": True})


# ---------------------------------------------------------------------------
# selection and missing packages


def test_default_selection_is_torch(torch):
    assert w.Linear is torch.nn.Linear and w.Embedding is torch.nn.Embedding
    assert w.Adam is torch.optim.Adam and w.AdamW is torch.optim.AdamW and w.SGD is torch.optim.SGD
    assert w.Adagrad is torch.optim.Adagrad
    with pytest.raises(AttributeError):
        w.NotAThing


@pytest.mark.parametrize(
    "flag, package, kind",
    [
        ("bitsandbytes", "bitsandbytes", "Linear"),
        ("dadaptation", "dadaptation", "Adam"),
        ("bitnet", "bitnet", "Linear"),
        ("fp8", "transformer_engine", "Linear"),
    ],
)
def test_missing_package_warns_once_and_falls_back(torch, monkeypatch, flag, package, kind):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as when it is not installed
    if package == "transformer_engine":
        monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    opts = w.Optimizations(**{flag: True})
    sel, rec = _record(w.select, opts)
    assert getattr(sel, kind) is getattr(w.select(w.Optimizations()), kind)
    # again, and through the other entry points: still exactly one warning in all
    _, rec2 = _record(w.select, opts)
    _, rec3 = _record(w.apply_optimizations, torch.nn.Linear(2, 2), w.Optimizations(**{flag: True}, replace=True))
    every = rec + rec2 + rec3
    assert len(every) == 1, [str(r.message) for r in every]
    assert repr(package) in str(every[0].message) and flag in str(every[0].message)


def test_package_that_exits_on_import_is_a_warning(monkeypatch):
    """Some packages call exit() when their native setup fails; that must not end the program."""
    import importlib.abc
    import importlib.machinery

    class Exiting(importlib.abc.Loader):
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise SystemExit(1)

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "bitsandbytes":
                return importlib.machinery.ModuleSpec(name, Exiting())
            return None

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Finder()] + sys.meta_path)
    with pytest.warns(RuntimeWarning, match="SystemExit"):
        assert w._optional("bitsandbytes", "bitsandbytes", "test") is None
    assert "bitsandbytes" in w._WARNED


def _fake_bnb(torch):
    """A stand-in for bitsandbytes with its class names (the real one needs CUDA)."""
    bnb = types.ModuleType("bitsandbytes")
    bnb.nn = types.SimpleNamespace(
        Linear8bitLt=type("Linear8bitLt", (torch.nn.Linear,), {}),
        Embedding=type("Embedding", (torch.nn.Embedding,), {}),
    )
    bnb.optim = types.SimpleNamespace(**{
        name: type(name, (base,), {})
        for name, base in (("Adam8bit", torch.optim.Adam), ("AdamW8bit", torch.optim.AdamW),
                           ("SGD8bit", torch.optim.SGD), ("Adagrad8bit", torch.optim.Adagrad))
    })
    return bnb


def test_bitsandbytes_selection_and_scopes(torch, monkeypatch):
    bnb = _fake_bnb(torch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    sel = w.select(w.Optimizations(bitsandbytes=True))
    assert sel.Linear is bnb.nn.Linear8bitLt and sel.Embedding is bnb.nn.Embedding
    assert sel.AdamW is bnb.optim.AdamW8bit and sel.Adagrad is bnb.optim.Adagrad8bit
    sel = w.select(w.Optimizations(bitsandbytes=True, linear=False, optimizers=False))
    assert sel.Linear is torch.nn.Linear and sel.Adam is torch.optim.Adam and sel.Embedding is bnb.nn.Embedding
    # bitsandbytes' optimizers win over D-Adaptation's, as in the original
    sel = w.select(w.Optimizations(bitsandbytes=True, dadaptation=True))
    assert sel.Adam is bnb.optim.Adam8bit
    w.configure(w.Optimizations(bitsandbytes=True))
    assert w.Linear is bnb.nn.Linear8bitLt


def test_dadaptation_adamw_decouples(torch, monkeypatch):
    seen = {}

    class DAdaptAdam(torch.optim.Adam):
        def __init__(self, params, lr=1.0, decouple=False, **kw):
            seen["decouple"] = decouple
            super().__init__(params, lr=lr)

    da = types.ModuleType("dadaptation")
    da.DAdaptAdam = DAdaptAdam
    da.DAdaptSGD = type("DAdaptSGD", (torch.optim.SGD,), {})
    da.DAdaptAdaGrad = type("DAdaptAdaGrad", (torch.optim.Adagrad,), {})
    monkeypatch.setitem(sys.modules, "dadaptation", da)
    sel = w.select(w.Optimizations(dadaptation=True))
    assert sel.Adam is DAdaptAdam and sel.SGD is da.DAdaptSGD
    sel.AdamW(torch.nn.Linear(2, 2).parameters())
    assert seen["decouple"] is True  # the original's AdamW was plain DAdaptAdam (coupled decay)
    sel.Adam(torch.nn.Linear(2, 2).parameters())
    assert seen["decouple"] is False


def test_bitnet_without_bitsandbytes(torch, monkeypatch):
    bitnet = types.ModuleType("bitnet")
    bitnet.BitLinear = type("BitLinear", (torch.nn.Linear,), {})
    monkeypatch.setitem(sys.modules, "bitnet", bitnet)
    assert w.select(w.Optimizations(bitnet=True)).Linear is bitnet.BitLinear


# ---------------------------------------------------------------------------
# inject / undo


def test_inject_and_undo(torch, monkeypatch):
    bnb = _fake_bnb(torch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    original = torch.nn.Linear, torch.nn.Embedding, torch.optim.AdamW
    inj = w.inject(w.Optimizations(bitsandbytes=True, embedding=False))
    try:
        assert torch.nn.Linear is bnb.nn.Linear8bitLt and torch.optim.AdamW is bnb.optim.AdamW8bit
        assert torch.nn.Embedding is original[1]
        assert sorted(inj.names) == ["Adagrad", "Adam", "AdamW", "Linear", "SGD"]
        # torch's own classes stay reachable while injected
        assert w.select(w.Optimizations()).Linear is original[0]
        # a second injection does not lose the originals
        w.inject(w.Optimizations(bitsandbytes=True))
        assert torch.nn.Embedding is bnb.nn.Embedding
    finally:
        w.uninject()
    assert (torch.nn.Linear, torch.nn.Embedding, torch.optim.AdamW) == original
    with w.inject(w.Optimizations(bitsandbytes=True)):
        assert torch.nn.Linear is bnb.nn.Linear8bitLt
    assert torch.nn.Linear is original[0]


def test_apply_optimizations_injects(torch, monkeypatch):
    bnb = _fake_bnb(torch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    original = torch.nn.Linear
    w.apply_optimizations(torch.nn.Linear(2, 2), w.Optimizations(bitsandbytes=True, injects=True))
    assert torch.nn.Linear is bnb.nn.Linear8bitLt
    w.uninject()
    assert torch.nn.Linear is original


# ---------------------------------------------------------------------------
# replace_*


def _my_linear(torch):
    class MyLinear(torch.nn.Module):
        """Not a torch.nn.Linear subclass: only the constructor contract and state dict keys match."""

        def __init__(self, in_features, out_features, bias=True):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
            self.bias = torch.nn.Parameter(torch.empty(out_features)) if bias else None
            torch.nn.init.normal_(self.weight)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

    return MyLinear


def test_replace_linear_keeps_outputs(torch):
    MyLinear = _my_linear(torch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4, bias=False)
    ).double()
    model[0].weight.requires_grad_(False)
    model.eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    expected = model(x)
    out = w.replace_linear(model, MyLinear)
    assert out is model
    assert type(model[0]) is MyLinear and type(model[2]) is MyLinear and model[2].bias is None
    assert model[0].weight.dtype == torch.float64  # dtype kept
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    assert not model[0].training
    assert torch.equal(model(x), expected)  # the original built fresh layers and lost the weights


def test_replace_linear_shared_and_root(torch):
    MyLinear = _my_linear(torch)
    shared = torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    w.replace_linear(model, MyLinear)
    assert model[0] is model[2] and type(model[0]) is MyLinear  # still one module, under both names
    root = torch.nn.Linear(3, 2)
    x = torch.randn(2, 3)
    new = w.replace_linear(root, MyLinear)
    assert type(new) is MyLinear and torch.equal(new(x), root(x))
    # already the right class: left alone
    assert w.replace_linear(new, MyLinear) is new


def test_replace_linear_without_room_for_weights(torch):
    class Narrow(torch.nn.Module):
        def __init__(self, in_features, out_features, bias=True):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))

    with pytest.raises(ValueError, match="bias"):
        w.replace_linear(torch.nn.Sequential(torch.nn.Linear(2, 2)), Narrow)


def test_replace_embedding_keeps_padding_and_weights(torch):
    class MyEmbedding(torch.nn.Embedding):
        pass

    emb = torch.nn.Embedding(10, 4, padding_idx=0)
    model = torch.nn.Sequential(emb)
    ids = torch.tensor([[0, 3, 9]])
    expected = model(ids)
    w.replace_embedding(model, MyEmbedding)
    assert type(model[0]) is MyEmbedding and model[0].padding_idx == 0
    assert torch.equal(model(ids), expected)


def test_replace_attention(torch):
    class Config:
        hidden = 4

    class Attn(torch.nn.Module):
        def __init__(self, config, layer_idx):
            super().__init__()
            self.config, self.layer_idx = config, layer_idx
            self.qkv = torch.nn.Linear(config.hidden, 3 * config.hidden)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, -1)
            return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v

    class SdpaAttn(Attn):
        def __init__(self, config, layer_idx, mode):
            super().__init__(config, layer_idx)
            self.mode = mode

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, -1)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    cfg = Config()
    model = torch.nn.ModuleList([Attn(cfg, 0), Attn(cfg, 1)])
    x = torch.randn(2, 5, 4)
    expected = [m(x) for m in model]
    w.replace_attention(model, SdpaAttn, Attn, mode="sdpa")
    assert [type(m) for m in model] == [SdpaAttn, SdpaAttn]
    assert [m.layer_idx for m in model] == [0, 1] and model[0].mode == "sdpa"
    for m, e in zip(model, expected):
        torch.testing.assert_close(m(x), e)
    with pytest.raises(TypeError, match="config"):
        w.replace_attention(torch.nn.Sequential(torch.nn.Linear(2, 2)), SdpaAttn, torch.nn.Linear)


def test_apply_optimizations_replace(torch, monkeypatch):
    bnb = _fake_bnb(torch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(6, 4), torch.nn.Linear(4, 3))
    ids = torch.tensor([1, 2, 5])
    expected = model(ids)
    out = w.apply_optimizations(model, w.Optimizations(bitsandbytes=True, replace=True))
    assert type(out[0]) is bnb.nn.Embedding and type(out[1]) is bnb.nn.Linear8bitLt
    assert torch.equal(out(ids), expected)
    assert w.current().bitsandbytes  # apply makes it the current configuration


# ---------------------------------------------------------------------------
# autocast and compile


def test_autocast_is_entered(torch):
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with w.autocast("cpu", "bf16"):
        assert lin(x).dtype == torch.bfloat16  # the original yielded the context without entering it
    assert lin(x).dtype == torch.float32
    with w.autocast("cpu", torch.bfloat16, enabled=False):
        assert lin(x).dtype == torch.float32
    with w.autocast(dtype="bf16"):  # cpu here
        if not torch.cuda.is_available():
            assert lin(x).dtype == torch.bfloat16


def test_autocast_fp8_missing_falls_back(torch, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    lin = torch.nn.Linear(4, 4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with w.autocast("cpu", "bf16", opts=w.Optimizations(fp8=True)):
            assert lin(torch.randn(1, 4)).dtype == torch.bfloat16
    assert len([r for r in rec if "transformer_engine" in str(r.message)]) == 1


def test_compile_model_eager_and_unknown(torch):
    lin = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    compiled = w.compile_model(lin, "eager")
    assert torch.equal(compiled(x), lin(x))
    with pytest.raises(ValueError, match="'nope'.*inductor"):
        w.compile_model(lin, "nope")
    assert "inductor" in w.available_backends() and "eager" in w.available_backends()


def test_compile_model_auto_choice(torch, monkeypatch):
    got = []
    monkeypatch.setattr(torch, "compile", lambda model, backend=None, **kw: got.append(backend) or model)
    monkeypatch.setattr(w, "_c_compiler_works", lambda: True)
    w.compile_model(torch.nn.Linear(1, 1))
    monkeypatch.setattr(w, "_c_compiler_works", lambda: False)
    w.compile_model(torch.nn.Linear(1, 1), backend="auto")
    # tensorrt missing: one warning, then the auto choice
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    _, rec = _record(w.compile_model, torch.nn.Linear(1, 1), "tensorrt")
    _, rec2 = _record(w.apply_optimizations, torch.nn.Linear(1, 1), w.Optimizations(compile=True, tensorrt=True))
    assert got == ["inductor", "eager", "eager", "eager"]  # the original's auto took 'aot_eager' or 'cudagraphs'
    assert len(rec + rec2) == 1 and "torch_tensorrt" in str(rec[0].message)


def test_c_compiler_probe_is_real():
    assert isinstance(w._c_compiler_works(), bool)


# ---------------------------------------------------------------------------
# activation offload, offloading, no torch


def test_unsloth_without_offload_module_warns_once(torch, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlutils.offload", None)
    model = torch.nn.Linear(2, 2)
    out, rec = _record(w.apply_optimizations, model, w.Optimizations(unsloth=True))
    out2, rec2 = _record(w.enable_activation_offload, model)
    assert out is model and out2 is model
    assert len(rec + rec2) == 1 and "mlutils.offload" in str(rec[0].message)


def test_unsloth_with_offload_module(torch, monkeypatch):
    calls = []
    fake = types.ModuleType("mlutils.offload")
    fake.enable_offloaded_gradient_checkpointing = calls.append
    monkeypatch.setitem(sys.modules, "mlutils.offload", fake)
    model = torch.nn.Linear(2, 2)
    _, rec = _record(w.apply_optimizations, model, w.Optimizations(unsloth=True))
    assert calls == [model] and rec == []


def test_apply_optimizations_offload_and_compile(torch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    expected = model(x)
    policy = {"devices": [{"name": "cpu", "free": 80}, {"name": "cpu", "free": 10 ** 6}]}
    out = w.apply_optimizations(model, w.Optimizations(model_offloading=policy, compile="eager"))
    assert model.offload_plan == {"0": "cpu", "2": "cpu"}
    assert torch.equal(out(x), expected)


def test_import_without_torch():
    code = (
        "import sys\n"
        "import mlutils.utils as u, mlutils.wrapper as w\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "assert len(u.md5_hash({'a': [1, 2]})) == 32 and u.coalese(None, 2) == 2\n"
        "assert u.tree_map(lambda t: t, (1, [2])) == (1, [2])\n"
        "assert u.get_devices() == ['cpu']\n"
        "assert u.set_seed(3) == 3\n"
        "o = w.Optimizations(bitsandbytes=True)\n"
        "for fn, args in ((u.coerce_dtype, ('fp16',)), (u.resize_weight, (None, 1)), (w.select, ()),\n"
        "                 (w.compile_model, (None,)), (w.autocast().__enter__, ())):\n"
        "    try:\n"
        "        fn(*args)\n"
        "    except ImportError as e:\n"
        "        assert 'PyTorch' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError(fn)\n"
        "try:\n"
        "    from mlutils.wrapper import Linear\n"
        "except ImportError as e:\n"
        "    assert 'PyTorch' in str(e)\n"
        "else:\n"
        "    raise AssertionError('Linear without torch')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, MLUTILS_NO_TORCH="1", PYTHONPATH=ROOT)
    # hide torch for real as well: any import of it fails
    code = "import sys; sys.modules['torch'] = None\n" + code
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
