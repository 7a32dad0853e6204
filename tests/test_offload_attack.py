"""mlutils.offload under misuse and odd input, on CPU: handles given to the
wrong engine, copies that fail half way, tensors the engine cannot copy,
argument checks, threads, the autograd-function form against torch's
reentrant checkpoint, long-lived saved-tensor hooks, Hugging Face style
models without checkpointing."""
import gc
import threading
import warnings

import pytest


@pytest.fixture
def off(torch):
    from mlutils import offload

    return offload


def _in_use(eng):
    gc.collect()  # graphs left in reference cycles give their buffers back first
    return eng.stats()["in_use"]


# ---------------------------------------------------------------------------
# the engine


def test_handle_of_another_engine_is_refused(off, torch):
    """Buffer ids are per pool: releasing engine A's handle through engine B
    freed B's buffer of the same id, and B's next offload overwrote a live
    copy (a silent wrong reload)."""
    a, b = off.OffloadEngine("cpu"), off.OffloadEngine("cpu")
    ha = a.offload(torch.randn(1000))
    x = torch.randn(1000)
    hb = b.offload(x)
    for method in (b.release, b.reload, b.prefetch):
        with pytest.raises(ValueError, match="another engine"):
            method(ha)
    hz = b.offload(torch.zeros(1000))  # would reuse hb's buffer had it been freed
    assert torch.equal(hb.reload(), x)
    assert b.stats()["in_use"] == 2 * 4096 and not ha.released and not hz.released
    for method in (a.release, a.reload, a.prefetch):
        with pytest.raises(TypeError, match="OffloadHandle"):
            method(x)
    ha.release()
    assert a.stats()["in_use"] == 0


def test_handle_state_after_release(off, torch):
    """A kept handle said offloaded once released."""
    eng = off.OffloadEngine("cpu", min_bytes=1 << 20)
    kept, copied = eng.offload(torch.randn(10)), eng.offload(torch.randn(10), min_bytes=0)
    for h, was in ((kept, False), (copied, True)):
        assert h.offloaded is was and not h.released
        h.release()
        assert h.offloaded is was and h.released and "released" in repr(h)
        with pytest.raises(ValueError, match="reload: the handle was released"):
            h.reload()
        with pytest.raises(ValueError, match="released"):
            h.prefetch()
        h.release()  # twice is once


def test_failed_copy_gives_the_buffer_back(off, torch, monkeypatch):
    """A copy that fails after the buffer was taken left it in use for good."""
    eng = off.OffloadEngine("cpu", max_bytes=8192)

    def broken(*args, **kwargs):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(torch, "frombuffer", broken)  # fails once the pool gave the buffer
    for compress in (None, "bf16"):
        with pytest.raises(RuntimeError, match="copy failed"):
            eng.offload(torch.randn(2000), compress=compress)
        assert eng.stats()["in_use"] == 0
    monkeypatch.undo()
    h = eng.offload(torch.randn(2000))  # the cap is all there again
    h.release()


def test_tensors_the_engine_cannot_copy_stay(off, torch):
    """Quantized and nested tensors made offload fail (a quantized one after
    its buffer was taken, which then leaked); subclasses came back as plain
    tensors.  They stay where they are, as sparse tensors do."""
    eng = off.OffloadEngine("cpu")

    class Tagged(torch.Tensor):
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized and nested tensors are deprecated / prototype
        q = torch.quantize_per_tensor(torch.randn(1000), 0.1, 0, torch.qint8)
        nested = torch.nested.nested_tensor([torch.randn(30, 4), torch.randn(50, 4)])
    for t in (q, nested, torch.randn(64, 64).as_subclass(Tagged), torch.randn(64, 64).to_sparse()):
        h = eng.offload(t)
        assert not h.offloaded and h.reload() is t
    assert eng.stats()["in_use"] == 0 and eng.stats()["acquires"] == 0
    p = torch.nn.Parameter(torch.randn(64, 64))
    h = eng.offload(p)  # a parameter is a plain tensor
    assert h.offloaded and torch.equal(h.reload(), p)
    h.release()
    # in a model: a nested tensor saved for backward is kept, the rest offloaded
    w = torch.randn(4, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nt = torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(5, 4)], requires_grad=True)
    with off.offload_saved_tensors(min_bytes=0):
        y = torch.nested.to_padded_tensor(nt * nt, 0.0) @ w
    y.sum().backward()
    ref = torch.nested.to_padded_tensor(nt * nt, 0.0).detach().sum((0, 1))
    torch.testing.assert_close(w.grad, ref.unsqueeze(1).expand(4, 4))


# ---------------------------------------------------------------------------
# arguments


def _fake_hf_model(torch):
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.gradient_checkpointing = False

    return Layer()


@pytest.mark.parametrize("bad", [-1, 1.5, "8", True, None])
def test_sizes_and_counts_are_checked_where_given(off, torch, bad):
    """min_bytes given per call was not checked at all (a string failed deep
    inside with "'<' not supported", -1 was taken), True passed as 1 and a
    float max_bytes gave "an integer is required" without naming it; a bad
    min_bytes given to enable_offloaded_gradient_checkpointing surfaced only at
    the first training step."""
    eng = off.OffloadEngine("cpu")
    x = torch.randn(100)
    calls = [
        ("OffloadEngine: min_bytes", lambda: off.OffloadEngine("cpu", min_bytes=bad)),
        ("offload: min_bytes", lambda: eng.offload(x, min_bytes=bad)),
        ("offload_checkpoint: min_bytes", lambda: off.offload_checkpoint(torch.tanh, x, min_bytes=bad)),
        ("offload_saved_tensors: min_bytes", lambda: off.offload_saved_tensors(min_bytes=bad).__enter__()),
        ("offload_saved_tensors: prefetch", lambda: off.offload_saved_tensors(prefetch=bad).__enter__()),
        ("enable_offloaded_gradient_checkpointing: min_bytes",
         lambda: off.enable_offloaded_gradient_checkpointing(_fake_hf_model(torch), min_bytes=bad)),
    ]
    if bad is not None:
        calls.append(("OffloadEngine: max_bytes", lambda: off.OffloadEngine("cpu", max_bytes=bad)))
    for what, call in calls:
        if bad is None and what == "offload: min_bytes":
            continue  # None: the engine's own
        with pytest.raises(ValueError, match=what):
            call()
    assert eng.stats()["in_use"] == 0


def test_bare_cuda_device_without_cuda_is_a_clear_error(off, torch):
    """OffloadEngine("cuda") / get_engine("cuda") raised torch's
    AssertionError ("Torch not compiled with CUDA enabled")."""
    import mlutils

    if mlutils.cuda_available() and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for make in (off.OffloadEngine, off.get_engine):
        with pytest.raises(RuntimeError, match="without CUDA|no CUDA device"):
            make("cuda")


def test_cpu_device_with_an_index_is_the_cpu(off, torch):
    """OffloadEngine("cpu:0") refused every CPU tensor ("tensor on cpu, engine
    on cpu:0") and get_engine("cpu:0") made a second CPU engine."""
    eng = off.OffloadEngine("cpu:0")
    x = torch.randn(100)
    assert eng.device == torch.device("cpu") and torch.equal(eng.offload(x).reload(), x)
    assert off.get_engine("cpu:0") is off.get_engine("cpu")


def test_compression_error_edges(off, torch):
    """An empty tensor raised max()'s "Expected reduction dim"; a list, an AttributeError."""
    for compress in ("bf16", "fp8"):
        assert off.compression_error(torch.empty(0, dtype=torch.float16), compress) == {
            "max_abs": 0.0, "rms_abs": 0.0, "rms_rel": 0.0}
    with pytest.raises(TypeError, match="expected a tensor"):
        off.compression_error([1.0, 2.0], "bf16")
    # what it reports is what a round trip through the engine does
    x = torch.randn(5000, dtype=torch.bfloat16) * 7
    eng = off.OffloadEngine("cpu")
    y = eng.offload(x, compress="fp8").reload()
    assert off.compression_error(x, "fp8")["max_abs"] == (y.double() - x.double()).abs().max().item()


# ---------------------------------------------------------------------------
# threads


class _SignallingLock:
    """An RLock that says when a thread starts waiting for it."""

    def __init__(self):
        self.lock = threading.RLock()
        self.waiting = threading.Event()

    def __enter__(self):
        if not self.lock.acquire(blocking=False):
            self.waiting.set()
            self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()


def test_prefetch_of_a_neighbour_released_meanwhile_is_quiet(off, torch):
    """The backward of a checkpoint prefetches the checkpoint saved before it;
    when another thread released that one between the registry lookup and the
    prefetch, prefetch's "the handle was released" ValueError broke this
    thread's backward (seen with models trained in several threads)."""
    eng = off.OffloadEngine("cpu")
    eng._lock = _SignallingLock()
    prev = eng.offload(torch.randn(1000))
    off._checkpoint._register(prev)
    cur = eng.offload(torch.randn(1000))
    off._checkpoint._register(cur)
    errors = []

    def backward_of_cur():
        try:
            off._checkpoint._unregister_and_prefetch_previous(cur)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with eng._lock:  # the other thread holds the engine...
        t = threading.Thread(target=backward_of_cur)
        t.start()
        assert eng._lock.waiting.wait(10)  # ...while this one found `prev` live and waits to prefetch it
        prev.release()
    t.join(10)
    assert not errors, errors
    assert prev.prefetched is None and eng.stats()["in_use"] == 4096
    cur.release()


def test_threads_train_separate_models_at_once(off, torch):
    """Forward and backward of separate models in several threads at once,
    through each way of offloading: every gradient as without offload, no
    error, every buffer back."""
    from mlutils.unsloth import Unsloth_Offloaded_Gradient_Checkpointer as U

    eng = off.get_engine("cpu")
    before = _in_use(eng)
    errors = []

    def worker(seed, how):
        try:
            torch.manual_seed(seed)
            blocks = [torch.nn.Linear(32, 32) for _ in range(4)]
            params = [p for b in blocks for p in b.parameters()]
            x0 = torch.randn(8, 32)

            def step(wrap):
                for p in params:
                    p.grad = None
                x = x0.clone().requires_grad_(True)
                h = x
                for b in blocks:
                    h = wrap(lambda t, b=b: torch.tanh(b(t)), h)
                h.pow(2).sum().backward()
                return [p.grad.clone() for p in params] + [x.grad]

            ref = step(lambda f, t: f(t))
            for _ in range(8):
                if how == "saved":
                    with off.offload_saved_tensors(min_bytes=0):
                        got = step(lambda f, t: f(t))
                else:
                    got = step(off.offload_checkpoint if how == "ckpt" else U.apply)
                for g, r in zip(got, ref):
                    torch.testing.assert_close(g, r)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((how, e))

    threads = [threading.Thread(target=worker, args=(k, how)) for k in range(3) for how in ("ckpt", "U", "saved")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert _in_use(eng) == before


# ---------------------------------------------------------------------------
# the autograd-function form (the original's contract)


@pytest.fixture
def U(torch):
    from mlutils.unsloth import Unsloth_Offloaded_Gradient_Checkpointer

    return Unsloth_Offloaded_Gradient_Checkpointer


def test_function_form_refuses_inplace_changes_of_the_input(off, torch, U):
    """offload_checkpoint raised when hidden_states changed in place after it
    was offloaded (the copy races the change on a GPU); the function form
    silently went on with whatever the copy held."""
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64, requires_grad=True)
    h = x * 2
    out = U.apply(lin, h)
    h.mul_(3)  # after it, before backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        U.apply(lambda t: lin(t.mul_(2)), x * 2)  # by the function
    small = x[:1, :4] * 1  # under min_bytes the engine keeps the tensor itself: the change would be seen
    out = off.OffloadedCheckpoint.apply(lambda t: t.exp(), {"compress": None, "min_bytes": 1 << 20,
                                                            "preserve_rng_state": True}, small)
    small.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_function_form_keeps_inputs_on_devices_without_an_engine(off, torch, U):
    """offload_checkpoint keeps meta (and, without a CUDA build, CUDA)
    tensors; the function form raised OffloadEngine's "neither cuda nor cpu"."""
    x = torch.randn(4, 8, device="meta", requires_grad=True)
    out = U.apply(lambda t: t * 2, x)
    assert out.device.type == "meta"
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (4, 8)


def test_function_form_warns_when_no_input_requires_grad(off, torch, U):
    """As torch's reentrant checkpoint warns: the function's parameters get no
    gradient through it (the original's silent loss)."""
    lin = torch.nn.Linear(8, 8)
    with pytest.warns(UserWarning, match="none of the inputs requires grad"):
        U.apply(lin, torch.randn(2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        U.apply(lambda t, k: lin(t) * k, torch.randn(2, 8), torch.ones(1, requires_grad=True))  # one does
        U.apply(lin, torch.randn(2, 8, requires_grad=True))


@pytest.mark.parametrize("case", ["tuple", "alias", "same", "dropout", "intarg", "noncontig", "empty"])
def test_function_form_matches_torch_reentrant_checkpoint(off, torch, U, case):
    from torch.utils.checkpoint import checkpoint

    lin = torch.nn.Linear(32, 32)
    fns = {
        "tuple": (lambda h: (lin(h), 3, None), lambda o: o[0].pow(2).sum()),
        "alias": (lambda h: (lin(h), h), lambda o: o[0].sum() + o[1].pow(2).sum()),
        "same": (lambda h, a: lin(h) * a, lambda o: o.pow(2).sum()),
        "dropout": (lambda h: torch.nn.functional.dropout(lin(h), 0.5), lambda o: o.pow(2).sum()),
        "intarg": (lambda h, i: lin(h)[i], lambda o: o.pow(2).sum()),
        "noncontig": (lambda h: lin(h), lambda o: o.pow(2).sum()),
        "empty": (lambda h: lin(h), lambda o: o.sum() + lin.weight.sum()),
    }
    fn, loss = fns[case]

    def inputs():
        torch.manual_seed(7)
        if case == "noncontig":
            return ((torch.randn(32, 6, requires_grad=True) * 1).t(),)
        x = torch.randn(0 if case == "empty" else 6, 32, requires_grad=True)
        return {"same": (x, x), "intarg": (x, torch.tensor([0, 3]))}.get(case, (x,))

    res = {}
    for how in ("plain", "torch", "ours"):
        lin.zero_grad(set_to_none=True)
        inp = inputs()
        for t in inp:
            t.retain_grad() if t.requires_grad else None
        torch.manual_seed(3)
        out = fn(*inp) if how == "plain" else (checkpoint(fn, *inp, use_reentrant=True) if how == "torch"
                                               else U.apply(fn, *inp))
        loss(out).backward()
        res[how] = [lin.weight.grad, lin.bias.grad] + [t.grad for t in inp if t.requires_grad]
    for how in ("torch", "ours"):
        for g, r in zip(res[how], res["plain"]):
            torch.testing.assert_close(g, r)


# ---------------------------------------------------------------------------
# offload_saved_tensors


def test_saved_tensors_block_over_a_training_loop_does_not_grow(off, torch, monkeypatch):
    """The hooks kept a weak reference to every handle ever packed: a block
    around a whole training loop grew by one entry per saved tensor per step
    (10^8 entries over a long run), never dropped."""
    made = []

    class Recorded(off._saved._SavedTensorOffload):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(off._saved, "_SavedTensorOffload", Recorded)
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(8, 16, requires_grad=True)
    with off.offload_saved_tensors(min_bytes=0):
        for _ in range(300):  # 3 saved tensors a step
            torch.tanh(lin(x)).mul(x).sum().backward()
        kept = [torch.tanh(lin(x)).mul(x).sum() for _ in range(50)]  # graphs waiting for their backward
    hooks, = made
    assert len(hooks.order) < 300  # of 1050 packed
    x.grad = None
    torch.tanh(lin(x)).mul(x).sum().backward()
    want = x.grad.clone()
    x.grad = None
    for loss in reversed(kept):  # still reloaded (and prefetched) right after the pruning
        loss.backward()
    torch.testing.assert_close(x.grad, want * 50, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("depth", [0, 1, 3, 1000])
def test_saved_tensors_prefetch_depths_and_double_backward(off, torch, depth):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 32)
    x = torch.randn(8, 32, requires_grad=True)

    def grads(ctx):
        x.grad = None
        lin.zero_grad(set_to_none=True)
        with ctx:
            h = x
            for _ in range(4):
                h = torch.tanh(lin(h)) * h
            g, = torch.autograd.grad(h.pow(2).sum(), x, create_graph=True)
            g.pow(2).sum().backward()
        return [x.grad, lin.weight.grad]

    import contextlib

    eng = off.get_engine("cpu")
    before = _in_use(eng)
    for got, want in zip(grads(off.offload_saved_tensors(min_bytes=0, prefetch=depth)),
                         grads(contextlib.nullcontext())):
        torch.testing.assert_close(got, want)
    assert _in_use(eng) == before


# ---------------------------------------------------------------------------
# Hugging Face style models


def _hf_classes(torch):
    """A stand-in for transformers: PreTrainedModel's gradient_checkpointing_enable /
    _set_gradient_checkpointing / gradient_checkpointing_disable as it has them,
    and layers as GradientCheckpointingLayer calls its checkpointing function."""
    import functools

    from torch.utils.checkpoint import checkpoint

    nn = torch.nn

    class PreTrainedModel(nn.Module):
        supports_gradient_checkpointing = True

        @property
        def is_gradient_checkpointing(self):
            return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            if not self.supports_gradient_checkpointing:
                raise ValueError(f"{type(self).__name__} does not support gradient checkpointing.")
            kwargs = {"use_reentrant": True} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
            self._set_gradient_checkpointing(True, functools.partial(checkpoint, **kwargs))

        def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=checkpoint):
            found = False
            for m in self.modules():
                if hasattr(m, "gradient_checkpointing"):
                    m._gradient_checkpointing_func = gradient_checkpointing_func
                    m.gradient_checkpointing = enable
                    found = True
            if not found:
                raise ValueError(f"{type(self).__name__} is not compatible with gradient checkpointing.")

        def gradient_checkpointing_disable(self):
            if self.supports_gradient_checkpointing:
                self._set_gradient_checkpointing(enable=False)

    class GradientCheckpointingLayer(nn.Module):
        gradient_checkpointing = False

        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and self.training:
                return self._gradient_checkpointing_func(functools.partial(super().__call__, **kwargs), *args)
            return super().__call__(*args, **kwargs)

    class Layer(GradientCheckpointingLayer):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = nn.Linear(16, 16), nn.Dropout(0.2)

        def forward(self, h, attention_mask=None, position_embeddings=None):
            cos, sin = position_embeddings
            return (h + self.drop(torch.tanh(self.lin(h * cos + sin))) + attention_mask,)

    class Model(PreTrainedModel):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer() for _ in range(3)])

        def forward(self, h, mask):
            pe = (torch.cos(torch.arange(16.0)), torch.sin(torch.arange(16.0)))
            for layer in self.layers:
                h = layer(h, attention_mask=mask, position_embeddings=pe)[0]
            return h

    class NoCheckpointing(PreTrainedModel):  # supports it on paper, no module has it
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

    for cls in (PreTrainedModel, GradientCheckpointingLayer, Layer, Model, NoCheckpointing):
        cls.__qualname__ = cls.__name__  # reachable by name, so that pickle finds the latest ones
        globals()[cls.__name__] = cls
    return PreTrainedModel, Model, NoCheckpointing


def test_hf_layers_enable_twice_disable_enable(off, torch):
    _, Model, _ = _hf_classes(torch)
    torch.manual_seed(0)
    model = Model()
    x, mask = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16)
    eng = off.get_engine("cpu")

    def step():
        torch.manual_seed(5)
        model.zero_grad(set_to_none=True)
        acquires = eng.stats()["acquires"]
        model(x, mask).pow(2).sum().backward()
        return [p.grad.clone() for p in model.parameters()], eng.stats()["acquires"] - acquires

    ref, n = step()
    assert n == 0
    for _ in range(2):  # enabling twice is enabling once
        assert off.enable_offloaded_gradient_checkpointing(model, compress=None) is model
    grads, n = step()
    assert n == 3 and model.is_gradient_checkpointing  # each layer's input went through the engine
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)
    assert off.disable_offloaded_gradient_checkpointing(model) is model
    assert not model.is_gradient_checkpointing and step()[1] == 0
    off.enable_offloaded_gradient_checkpointing(model)
    grads, n = step()
    assert n == 3
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)
    model.eval()
    assert step()[1] == 0  # HF checkpoints only in training


def test_hf_model_without_checkpointing_is_a_type_error(off, torch):
    """transformers' own ValueError ("is not compatible with gradient
    checkpointing") escaped enable; disable took any object, a model without
    checkpointing or None alike (None: AttributeError)."""
    _, _, NoCheckpointing = _hf_classes(torch)
    for model in (NoCheckpointing(), torch.nn.Linear(2, 2), None):
        with pytest.raises(TypeError, match="has no gradient checkpointing"):
            off.enable_offloaded_gradient_checkpointing(model)
        with pytest.raises(TypeError, match="has no gradient checkpointing"):
            off.disable_offloaded_gradient_checkpointing(model)


def test_unsloth_monkey_patch_on_a_transformers_stand_in(off, torch, monkeypatch):
    import sys
    import types

    from mlutils import unsloth

    PreTrainedModel, Model, _ = _hf_classes(torch)
    original = PreTrainedModel.gradient_checkpointing_enable
    tf = types.ModuleType("transformers")
    tf.modeling_utils = types.ModuleType("transformers.modeling_utils")
    tf.modeling_utils.PreTrainedModel = PreTrainedModel
    monkeypatch.setitem(sys.modules, "transformers", tf)
    monkeypatch.setitem(sys.modules, "transformers.modeling_utils", tf.modeling_utils)
    unsloth.apply_unsloth_offloaded_gradient_checkpoint_monkey_patch()
    unsloth.apply_unsloth_offloaded_gradient_checkpoint_monkey_patch()  # once is enough
    assert PreTrainedModel.gradient_checkpointing_enable.__mlutils_original__ is original
    model = Model()
    model.gradient_checkpointing_enable()
    assert all(layer._gradient_checkpointing_func.mlutils_offload for layer in model.layers)
    x = torch.randn(4, 16, requires_grad=True)
    acquires = off.get_engine("cpu").stats()["acquires"]
    model(x, torch.zeros(4, 16)).sum().backward()
    assert off.get_engine("cpu").stats()["acquires"] == acquires + 3 and x.grad is not None


# ---------------------------------------------------------------------------
# compression


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fp8_infinities_stay_non_finite_and_do_not_flatten_the_rest(off, torch, dtype):
    """An infinity made amax infinite, so the scale fell back to 1: the
    infinity came back as 448 (finite: an overflow a GradScaler must see was
    hidden) and every finite value above 448 was clamped to 448."""
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    x = (torch.randn(4096) * 300).to(dt)
    x[0], x[1], x[2] = float("inf"), -float("inf"), float("nan")
    x[3] = 1000.0
    y = off.OffloadEngine("cpu").offload(x, compress="fp8").reload()
    assert not torch.isfinite(y[:3]).any()  # e4m3 has no infinity: NaN
    finite = torch.isfinite(x)
    assert torch.isfinite(y[finite]).all()
    xf, yf = x[finite].float(), y[finite].float()
    big = xf.abs() > xf.abs().max() / 64  # normal e4m3 range: 3 mantissa bits
    assert ((yf - xf).abs() / xf.abs())[big].max() <= 2 ** -4 + 1e-3
    assert y[3].item() == pytest.approx(1000.0, rel=2 ** -4)


# ---------------------------------------------------------------------------
# in-place changes after the offload


def test_inplace_change_before_the_tensor_is_dropped_is_still_an_error(off, torch, U):
    """The version check held only a weak reference to the saved tensor: a
    change in place followed by the tensor's last reference going away (a
    local of the block) was never seen, and backward silently used the
    offloaded copy where autograd without offload raises."""
    lin, lin2 = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def block(x):
        y = torch.tanh(lin(x))  # tanh saves its output y
        y[:2] = 0.0  # ...which is then changed; y itself is a local
        return lin2(y)

    import contextlib

    for ctx in (contextlib.nullcontext(), off.offload_saved_tensors(min_bytes=0)):
        x = torch.randn(8, 64, requires_grad=True)
        with ctx:
            out = block(x)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()

    for run in (off.offload_checkpoint, U.apply):
        h = torch.randn(8, 64, requires_grad=True) * 2
        out = run(lin, h)
        h.mul_(3)
        del h  # the only reference to the changed input
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_version_probe_holds_no_memory(off, torch):
    t = torch.randn(1 << 16)
    eng = off.OffloadEngine("cpu")
    packed = off._checkpoint._PackedInput(eng.offload(t), t)
    assert packed.probe.untyped_storage().nbytes() == 0 and t.untyped_storage().nbytes() == 4 << 16
    assert not packed.modified()
    view = t[10:20]
    del t
    view.add_(1)  # through a view, the tensor's own reference gone
    assert packed.modified()


def test_function_form_options_are_checked(off, torch):
    """options missing a key failed with KeyError 'compress' inside forward;
    bad values surfaced as whatever the engine made of them."""
    C = off.OffloadedCheckpoint
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    C.apply(lin, {}, x).sum().backward()  # defaults
    want = x.grad.clone()
    x.grad = None
    C.apply(lin, {"compress": "bf16"}, x).sum().backward()
    torch.testing.assert_close(x.grad, want)  # the input itself does not enter this gradient
    with pytest.raises(TypeError, match="unknown option"):
        C.apply(lin, {"min_byte": 0}, x)
    with pytest.raises(TypeError, match="options must be a dict"):
        C.apply(lin, [0], x)
    with pytest.raises(ValueError, match="min_bytes"):
        C.apply(lin, {"min_bytes": -1}, x)
    with pytest.raises(ValueError, match="compress"):
        C.apply(lin, {"compress": "int2"}, x)


# ---------------------------------------------------------------------------
# graphs that never see a backward


def test_dropped_graphs_and_exceptions_leave_no_buffers(off, torch, U):
    eng = off.get_engine("cpu")
    before = _in_use(eng)
    lin = torch.nn.Linear(64, 64)

    def boom(h):
        lin(h)
        raise KeyError("inside the function")

    for run in (off.offload_checkpoint, U.apply):
        for _ in range(3):
            with pytest.raises(KeyError):
                run(boom, torch.randn(8, 64, requires_grad=True))
        out = run(lin, torch.randn(8, 64, requires_grad=True))
        assert eng.stats()["in_use"] > before  # the input is in host memory...
        del out  # ...until its graph goes
        assert _in_use(eng) == before
    with off.offload_saved_tensors(min_bytes=0):
        with pytest.raises(KeyError):
            boom(torch.randn(8, 64, requires_grad=True))
        out = torch.tanh(lin(torch.randn(8, 64, requires_grad=True)))
    assert eng.stats()["in_use"] > before
    del out
    assert _in_use(eng) == before
    live = [ref() for ref in off._checkpoint._live.values()]
    assert not [h for h in live if h is not None and not h.released]
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            x = torch.randn(8, 64)
            torch.testing.assert_close(off.offload_checkpoint(lin, x), lin(x))
    assert _in_use(eng) == before


def test_pool_cap_hit_mid_forward_leaves_nothing(off, torch, U):
    blocks = [torch.nn.Linear(64, 64) for _ in range(10)]
    x = torch.randn(64, 64, requires_grad=True)  # 16 KiB a copy: the 4th does not fit

    def ckpt(run, n=10):
        h = x
        for b in blocks[:n]:
            h = run(b, h)
        return h

    def saved():
        with off.offload_saved_tensors(min_bytes=0):
            h = x
            for b in blocks:
                h = torch.tanh(b(h))
        return h

    off.set_pool_limit(64 * 1024)
    try:
        eng = off.get_engine("cpu")
        for run in (lambda: ckpt(off.offload_checkpoint), lambda: ckpt(U.apply), saved):
            with pytest.raises(off.OffloadPoolFullError, match="raise the cap"):
                run()
            assert _in_use(eng) == 0
        out = ckpt(off.offload_checkpoint, 4)  # fits again once those are back
    except off.OffloadPoolFullError as e:
        raise AssertionError(f"buffers were left in use: {e}") from e
    finally:
        off.set_pool_limit(None)
    del out


def test_model_with_offloaded_checkpointing_still_pickles(off, torch):
    """The installed function was a closure: torch.save(model) (and anything
    pickling the model, e.g. spawning workers with it) failed with "Can't
    pickle local object", where transformers' own partial(checkpoint) pickles."""
    import io
    import pickle

    _, Model, _ = _hf_classes(torch)
    pickle.dumps(Model())  # the stand-in itself pickles (module-level classes in a test module)
    model = off.enable_offloaded_gradient_checkpointing(Model(), min_bytes=0, compress="bf16")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    func = back.layers[0]._gradient_checkpointing_func
    assert func.mlutils_offload and func.compress == "bf16"
    acquires = off.get_engine("cpu").stats()["acquires"]
    back(torch.randn(4, 16, requires_grad=True), torch.zeros(4, 16)).sum().backward()
    assert off.get_engine("cpu").stats()["acquires"] == acquires + 3


def test_expanded_tensors_stay(off, torch):
    """An expanded tensor (a broadcast bias, a mask) holds a few bytes; its
    offload made it contiguous first (on a GPU a full-size device copy, a
    memory peak) and kept the full size in host memory: offloading cost
    memory instead of saving it."""
    eng = off.OffloadEngine("cpu")
    bias = torch.randn(1, 256)
    wide = bias.expand(4096, 256)  # 4 MiB seen, 1 KiB held
    h = eng.offload(wide)
    assert not h.offloaded and h.reload() is wide and eng.stats()["in_use"] == 0
    w = torch.randn(256, 256, requires_grad=True)
    bias.requires_grad_(True)
    with off.offload_saved_tensors(min_bytes=0):
        before = off.get_engine("cpu").stats()["acquires"]
        y = (bias.expand(4096, 256) @ w).sum()  # saves the expanded bias (kept) and w (offloaded)
        assert off.get_engine("cpu").stats()["acquires"] == before + 1
    y.backward()
    torch.testing.assert_close(w.grad, 4096 * bias.detach().t().expand(256, 256), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(bias.grad, 4096 * w.detach().sum(1).unsqueeze(0), rtol=1e-4, atol=1e-3)
    sliced = torch.randn(64, 64)[:, :8]  # a view with gaps is offloaded (its copy is smaller)
    assert eng.offload(sliced).offloaded


@pytest.mark.parametrize("compress", [None, "bf16", "fp8"])
def test_dense_non_contiguous_tensors_come_back_with_their_strides(off, torch, compress):
    """A channels_last activation or a transposed weight came back contiguous
    (a convolution's backward then converts it again) and was made contiguous
    on its device first (on a GPU a full-size copy before the copy)."""
    eng = off.OffloadEngine("cpu")
    dt = torch.float16 if compress == "fp8" else torch.float32
    for x in (torch.randn(2, 8, 16, 16).to(memory_format=torch.channels_last), torch.randn(64, 48).t(),
              torch.randn(4, 6, 8).permute(2, 0, 1)):
        x = x.to(dt)
        y = eng.offload(x, compress=compress).reload()
        assert y.stride() == x.stride()
        if compress is None:
            assert torch.equal(y, x)
        elif compress == "bf16":
            assert torch.equal(y, x.to(torch.bfloat16).float())
        else:
            torch.testing.assert_close(y, x, rtol=2 ** -4, atol=x.abs().max().item() / 64)
    gappy = torch.randn(64, 64)[:, :8]  # not one span: copied contiguous, as before
    y = eng.offload(gappy).reload()
    assert torch.equal(y, gappy) and y.is_contiguous()


def test_channels_last_convolution_under_saved_tensor_offload(off, torch):
    import contextlib

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 16, 16).to(memory_format=torch.channels_last).requires_grad_(True)

    def grads(ctx):
        conv.zero_grad(set_to_none=True)
        x.grad = None
        with ctx:
            y = conv(torch.relu(conv(x)))
        y.pow(2).sum().backward()
        return x.grad, conv.weight.grad

    ref = grads(contextlib.nullcontext())
    got = grads(off.offload_saved_tensors(min_bytes=0))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)
        assert g.stride() == r.stride()


def test_a_tensor_saved_several_times_is_offloaded_once(off, torch, monkeypatch):
    """Separate q/k/v (or gate/up) projections each save the block's input,
    h * h saves h twice: each save made its own copy (here six host copies of
    the same tensor, six transfers each way)."""
    import contextlib

    torch.manual_seed(0)
    q, k, v = (torch.nn.Linear(64, 64) for _ in range(3))
    eng = off.get_engine("cpu")
    x = torch.randn(32, 64, requires_grad=True)
    reloads = []
    orig = off.OffloadEngine.reload
    monkeypatch.setattr(off.OffloadEngine, "reload", lambda self, hd: reloads.append(hd) or orig(self, hd))
    counted = {}

    def grads(ctx, retain=False):
        for m in (q, k, v):
            m.zero_grad(set_to_none=True)
        x.grad = None
        with ctx:
            h = torch.tanh(x)  # h: saved by tanh (its output), by q, k, v and twice by h * h
            acquires = eng.stats()["acquires"]
            hq, hk, hv, hh = q(h), k(h), v(h), h * h
            counted["acquires"] = eng.stats()["acquires"] - acquires
            loss = (hq + hk + hv).pow(2).sum() + hh.sum()
        reloads.clear()
        loss.backward(retain_graph=retain)
        counted["reloads"] = len(reloads)
        return [x.grad.clone()] + [m.weight.grad.clone() for m in (q, k, v)]

    ref = grads(contextlib.nullcontext())
    before = _in_use(eng)
    got = grads(off.offload_saved_tensors(min_bytes=0), retain=True)
    reloads.clear()  # the spy's references to the handles
    assert _in_use(eng) == before  # the shared copy went with the graph
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)
    assert counted["acquires"] == 0  # the five later saves of h share tanh's copy
    assert counted["reloads"] == 2  # h once for its six unpacks, and what pow saved


def test_shared_copy_is_not_used_for_a_changed_tensor(off, torch):
    """A tensor changed in place between two saves gets a copy of its own for
    the second, and the first save's check still raises, as autograd does."""
    import contextlib

    w = torch.randn(16, 16, requires_grad=True)
    for make in (contextlib.nullcontext, lambda: off.offload_saved_tensors(min_bytes=0)):
        x = torch.randn(16, 16)
        with make():
            a = x @ w  # saves x
            x.add_(1)
            b = x @ w  # saves the changed x
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (a + b).sum().backward()
        w.grad = None
        x = torch.randn(16, 16)
        with make():
            b = x @ w
            x.add_(1)
            c = x @ w
        c.sum().backward()  # only the second save is needed: no error, its own copy
        torch.testing.assert_close(w.grad, x.sum(0).unsqueeze(1).expand(16, 16))
        w.grad = None


def test_fp8_tiny_amax_keeps_zeros_zero(torch):
    """A bf16 tensor whose largest magnitude is so small that 448 / amax
    overflows float32: the scale falls back to 1, so zeros stay zeros (an
    infinite scale made every zero 0 * inf = NaN) and nothing non-finite
    appears; the CUDA kernel uses the same rule (bench/offload_gpu.py)."""
    from mlutils import offload as off

    eng = off.OffloadEngine("cpu")
    for tiny in (1e-39, 1e-38, 1e-30):
        x = torch.zeros(4096, dtype=torch.bfloat16)
        x[0], x[1] = tiny, -tiny
        y = eng.offload(x, compress="fp8").reload()
        assert torch.isfinite(y).all(), tiny
        assert torch.equal(y[2:], x[2:])
        assert (y[:2].float() - x[:2].float()).abs().max().item() <= abs(float(x[0]))
