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
