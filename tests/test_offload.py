"""mlutils.offload on CPU: the pool (HostPool over the C bookkeeping), the CPU
engine, compression error, offloaded checkpointing against torch's
checkpoint and plain autograd, the HF hooks, the original names, the
saved-tensor context manager, and the CUDA entry points failing politely."""
import functools
import gc
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlutils
from mlutils import _core

# ---------------------------------------------------------------------------
# the pool through its binding


def test_pool_reuses_buffers_of_a_class():
    pool = _core.HostPool(None)
    i1, v1 = pool.acquire(10000)
    assert len(v1) == 10000 and not v1.readonly
    v1[:3] = b"abc"
    pool.release(i1)
    i2, v2 = pool.acquire(9000)  # same 10240-byte class
    s = pool.stats()
    assert i2 == i1 and bytes(v2[:3]) == b"abc"
    assert s["allocs"] == 1 and s["reuses"] == 1 and s["reserved"] == 10240 and s["requested"] == 9000
    pool.release(i2)
    assert pool.trim() == 10240 and pool.stats()["reserved"] == 0


def test_pool_cap_error_names_the_cap():
    pool = _core.HostPool(64 * 1024)
    i, _ = pool.acquire(60000)
    with pytest.raises(MemoryError, match=r"cap 65536 bytes, 65536 bytes in use, 1 asked"):
        pool.acquire(1)
    pool.release(i)
    with pytest.raises(ValueError, match="not in use"):
        pool.release(i)
    with pytest.raises(ValueError, match="> 0"):
        pool.acquire(0)
    with pytest.raises(ValueError, match="max_bytes"):
        _core.HostPool(-1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 300000)), max_size=80),
       st.sampled_from([None, 1 << 20, 300000]))
def test_pool_invariants_hold_for_any_sequence(ops, cap):
    pool = _core.HostPool(cap)
    live = {}
    for acquire, n in ops:
        if acquire or not live:
            try:
                i, view = pool.acquire(n)
            except MemoryError as e:
                assert cap is not None and "is full" in str(e)
                continue
            assert i not in live and len(view) == n
            view[0] = i & 0xFF
            view[n - 1] = i & 0xFF
            live[i] = view
        else:
            i = sorted(live)[n % len(live)]
            assert live[i][0] == i & 0xFF and live[i][-1] == i & 0xFF  # no other buffer wrote here
            pool.release(i)
            del live[i]
        pool.check()
        s = pool.stats()
        assert s["in_use"] <= s["reserved"] <= max(s["cap"], s["in_use"])


# ---------------------------------------------------------------------------
# the CPU engine


@pytest.fixture
def off(torch):
    from mlutils import offload

    return offload


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int64", "bool", "uint8"])
def test_engine_roundtrip(off, torch, dtype):
    dt = getattr(torch, dtype)
    x = (torch.randn(37, 129) * 100).to(dt)
    eng = off.OffloadEngine("cpu")
    h = eng.offload(x)
    assert h.offloaded
    x_before = x.clone()
    x.zero_() if dt != torch.bool else x.logical_and_(torch.zeros_like(x))  # the copy is independent
    y = h.reload()
    assert y.dtype == dt and y.shape == x.shape and torch.equal(y, x_before)
    h.release()
    assert eng.stats()["in_use"] == 0


def test_engine_noncontiguous_prefetch_release(off, torch):
    eng = off.OffloadEngine("cpu")
    x = torch.randn(64, 48).t()[3:]
    h = eng.offload(x)
    h.prefetch()
    h.prefetch()  # a second prefetch is a no-op
    assert torch.equal(h.reload(), x)
    assert torch.equal(h.reload(), x)  # reload again (retain_graph style) loads again
    h.release()
    h.release()  # idempotent
    with pytest.raises(ValueError, match="released"):
        h.reload()


def test_engine_min_bytes_keeps_small_tensors(off, torch):
    eng = off.OffloadEngine("cpu", min_bytes=4096)
    small, big = torch.randn(100), torch.randn(2000)
    hs, hb = eng.offload(small), eng.offload(big)
    assert not hs.offloaded and hs.reload() is small
    assert hb.offloaded and eng.stats()["in_use"] == 8192
    assert eng.offload(big, min_bytes=10 ** 9).reload() is big
    with pytest.raises(TypeError):
        eng.offload([1, 2])
    with pytest.raises(ValueError, match="compress"):
        eng.offload(big, compress="int4")


# min_bytes counts the tensor's bytes (numel * element_size), and a tensor of
# exactly min_bytes bytes is offloaded: 8 bytes an element here, so counting
# elements instead of bytes, or comparing with > instead of >=, fails below.
_N = 129  # elements of the tensor at the threshold


@pytest.mark.parametrize("dtype", ["float64", "float32", "int16", "uint8"])
def test_engine_min_bytes_is_inclusive_and_in_bytes(off, torch, dtype):
    dt = getattr(torch, dtype)
    x = torch.ones(_N, dtype=dt)
    nbytes = _N * x.element_size()
    for min_bytes, copied in ((nbytes - 1, True), (nbytes, True), (nbytes + 1, False)):
        for eng, kw in ((off.OffloadEngine("cpu", min_bytes=min_bytes), {}),      # the engine's threshold
                        (off.OffloadEngine("cpu", min_bytes=10 ** 9), {"min_bytes": min_bytes})):  # per call
            h = eng.offload(x, **kw)
            assert h.offloaded is copied, (min_bytes, nbytes, kw)
            assert eng.stats()["requested"] == (nbytes if copied else 0)
            assert torch.equal(h.reload(), x) and (h.reload() is x) is not copied
    # one element under: kept; a view of a larger storage counts its own bytes
    eng = off.OffloadEngine("cpu", min_bytes=nbytes)
    for under in (torch.ones(_N - 1, dtype=dt), torch.ones(4 * _N, dtype=dt)[:_N - 1]):
        h = eng.offload(under)
        assert not h.offloaded and h.reload() is under
    assert eng.stats()["acquires"] == 0
    if x.element_size() > 1:  # bytes, not elements: _N elements reach a threshold of _N + 1 bytes
        assert eng.offload(x, min_bytes=_N + 1).offloaded


def test_engine_pool_reused_no_growth_over_steps(off, torch):
    eng = off.OffloadEngine("cpu")
    xs = [torch.randn(1000 + 17 * k) for k in range(8)]
    for step in range(100):
        hs = [eng.offload(x) for x in xs]
        for h, x in zip(reversed(hs), reversed(xs)):
            assert torch.equal(h.reload(), x)
            h.release()
        if step == 0:
            first = eng.stats()
    s = eng.stats()
    assert s["reserved"] == first["reserved"] == s["peak_reserved"]
    assert s["allocs"] == first["allocs"] == 8 and s["reuses"] == 99 * 8


def test_engine_cap_raises_pool_full(off, torch):
    eng = off.OffloadEngine("cpu", max_bytes=16384)
    h = eng.offload(torch.randn(3000))
    with pytest.raises(off.OffloadPoolFullError, match="raise the cap") as ei:
        eng.offload(torch.randn(3000))
    assert isinstance(ei.value, MemoryError) and isinstance(ei.value, mlutils.MlutilsError)
    h.release()
    eng.offload(torch.randn(3000)).release()


def test_handle_released_by_garbage_collection(off, torch):
    eng = off.OffloadEngine("cpu")
    h = eng.offload(torch.randn(5000))
    assert eng.stats()["in_use"] > 0
    del h
    assert eng.stats()["in_use"] == 0


# ---------------------------------------------------------------------------
# compression


def test_bf16_compression_is_torch_rounding(off, torch):
    x = torch.randn(4096) * 3
    eng = off.OffloadEngine("cpu")
    h = eng.offload(x, compress="bf16")
    assert h.mode == _core.OFFLOAD_F32_BF16
    assert eng.stats()["requested"] == 8192  # half the bytes cross
    assert torch.equal(h.reload(), x.to(torch.bfloat16).float())
    err = off.compression_error(x, "bf16")
    assert 0 < err["rms_rel"] < 2 ** -8


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fp8_compression_error(off, torch, dtype):
    dt = getattr(torch, dtype)
    x = (torch.randn(8192) * 5).to(dt)
    eng = off.OffloadEngine("cpu")
    h = eng.offload(x, compress="fp8")
    assert eng.stats()["requested"] == _core.offload_packed_size(h.mode, x.numel()) == 8192 + 16
    y = h.reload()
    assert y.dtype == dt
    amax = x.float().abs().max()
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 on normal values
    big = x.float().abs() > amax / 64
    rel = ((y.float() - x.float()).abs() / x.float().abs())[big]
    assert rel.max() <= 2 ** -4 + 1e-3
    assert y.float().abs().max() == pytest.approx(amax.item(), rel=2 ** -4)
    err = off.compression_error(x, "fp8")
    assert 0 < err["rms_rel"] < 0.05
    # float32 under fp8 travels as bfloat16
    assert eng.offload(torch.randn(4096), compress="fp8").mode == _core.OFFLOAD_F32_BF16


def test_fp8_zero_nan_and_inf(off, torch):
    eng = off.OffloadEngine("cpu")
    z = torch.zeros(3000, dtype=torch.float16)
    assert torch.equal(eng.offload(z, compress="fp8").reload(), z)
    x = torch.randn(3000, dtype=torch.bfloat16)
    x[5] = float("nan")
    y = eng.offload(x, compress="fp8").reload()
    assert torch.isnan(y[5]) and torch.isfinite(y[:5]).all()


# ---------------------------------------------------------------------------
# offloaded checkpointing


def _blocks(torch, kind, dim=32):
    nn = torch.nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x, *args, **kwargs):
            return x + self.b(torch.nn.functional.gelu(self.a(x)))

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

        def forward(self, x, mask=None, scale=None):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            s = q @ k.transpose(-1, -2) * (scale if scale is not None else dim ** -0.5)
            if mask is not None:
                s = s + mask
            return x + self.o(torch.softmax(s, dim=-1) @ v)

    class DropNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lin, self.drop = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Dropout(0.3)

        def forward(self, x, *args, **kwargs):
            return x + self.drop(self.lin(self.norm(x)))

    cls = {"mlp": MLP, "attn": Attn, "dropnorm": DropNorm}[kind]
    return nn.ModuleList([cls() for _ in range(3)])


def _run(torch, blocks, x, how, mask=None, seed=0, **kw):
    from mlutils import offload as off
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(seed)
    for p in blocks.parameters():
        p.grad = None
    h = x
    for blk in blocks:
        if how == "plain":
            h = blk(h, mask)
        elif how == "torch":
            h = checkpoint(blk, h, mask, use_reentrant=False)
        else:
            h = off.offload_checkpoint(blk, h, mask, **kw)
    loss = (h.float() ** 2).mean()
    loss.backward()
    return h.detach(), [p.grad.clone() for p in blocks.parameters()]


@pytest.mark.parametrize("kind", ["mlp", "attn", "dropnorm"])
@pytest.mark.parametrize("x_grad", [False, True])
def test_checkpoint_gradients_match_torch(off, torch, kind, x_grad):
    torch.manual_seed(1)
    blocks = _blocks(torch, kind)
    x0 = torch.randn(2, 8, 32)
    mask = torch.zeros(8, 8).masked_fill(torch.ones(8, 8).triu(1).bool(), float("-inf")) if kind == "attn" else None
    results = {}
    for how in ("plain", "torch", "ours"):
        x = x0.clone().requires_grad_(x_grad)
        out, grads = _run(torch, blocks, x, how, mask=mask)
        results[how] = (out, grads, x.grad)
    for how in ("torch", "ours"):
        out, grads, xg = results[how]
        torch.testing.assert_close(out, results["plain"][0])
        for g, ref in zip(grads, results["plain"][1]):
            torch.testing.assert_close(g, ref)
        if x_grad:
            torch.testing.assert_close(xg, results["plain"][2])
        else:
            assert xg is None


def test_checkpoint_without_grad_inputs_still_trains_parameters(off, torch):
    # the original lost parameter gradients when no input required grad
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)
    off.offload_checkpoint(lin, x).sum().backward()
    ref = torch.autograd.grad(lin(x).sum(), lin.weight)[0]
    torch.testing.assert_close(lin.weight.grad, ref)


def test_checkpoint_args_kwargs_and_non_tensors(off, torch):
    w = torch.randn(16, 16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    x = torch.randn(4, 16, requires_grad=True)

    def fn(h, weight, power, bias=None, *, mode="relu", extra=None):
        y = (h @ weight) ** power + bias
        y = torch.relu(y) if mode == "relu" else torch.tanh(y)
        return y * extra["k"], "not a tensor", None

    def loss_of(f):
        out, tag, none = f(x, w, 2, bias=b, mode="tanh", extra={"k": 3.0})
        assert tag == "not a tensor" and none is None
        return out.pow(2).sum()

    ref = torch.autograd.grad(loss_of(fn), (x, w, b))
    loss_of(functools.partial(off.offload_checkpoint, fn)).backward()
    for got, want in zip((x.grad, w.grad, b.grad), ref):
        torch.testing.assert_close(got, want)


def test_checkpoint_nested(off, torch):
    torch.manual_seed(0)
    inner = _blocks(torch, "dropnorm")

    def outer(h):
        for blk in inner:
            h = off.offload_checkpoint(blk, h)
        return h * 2

    x = torch.randn(3, 32, requires_grad=True)
    torch.manual_seed(5)
    off.offload_checkpoint(outer, x).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in inner.parameters()]
    x.grad = None
    for p in inner.parameters():
        p.grad = None
    torch.manual_seed(5)
    h = x
    for blk in inner:
        h = blk(h)
    (h * 2).sum().backward()
    want = [x.grad] + [p.grad for p in inner.parameters()]
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_)


def test_checkpoint_autocast_and_rng_restored(off, torch):
    torch.manual_seed(2)
    blocks = _blocks(torch, "dropnorm")
    x0 = torch.randn(2, 8, 32)
    res = {}
    for how in ("plain", "ours"):
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(3)
        for p in blocks.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = x
            for blk in blocks:
                h = blk(h) if how == "plain" else off.offload_checkpoint(blk, h)
        h.float().pow(2).mean().backward()
        res[how] = [x.grad] + [p.grad.clone() for p in blocks.parameters()]
        # the RNG continues from where the forward left it, as without checkpointing
        res[how + "_rng"] = torch.rand(3)
    for g, w_ in zip(res["ours"], res["plain"]):
        torch.testing.assert_close(g, w_)
    torch.testing.assert_close(res["ours_rng"], res["plain_rng"])


def test_checkpoint_compressed_gradients_close(off, torch):
    torch.manual_seed(4)
    blocks = _blocks(torch, "mlp")
    x0 = torch.randn(2, 8, 32)
    _, ref = _run(torch, blocks, x0.clone().requires_grad_(True), "plain")
    _, got = _run(torch, blocks, x0.clone().requires_grad_(True), "ours", compress="bf16")
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=3e-2, atol=3e-3)


def test_checkpoint_releases_buffers_and_prefetches(off, torch, monkeypatch):
    blocks = _blocks(torch, "mlp")
    x = torch.randn(4, 64, 32, requires_grad=True)
    eng = off.get_engine("cpu")
    reloads = []
    orig = off.OffloadEngine.reload

    def spy(self, handle):
        reloads.append((handle.seq, handle.prefetched is not None))
        return orig(self, handle)

    monkeypatch.setattr(off.OffloadEngine, "reload", spy)
    gc.collect()  # graphs an earlier test left in reference cycles give their buffers back first
    before = eng.stats()
    h = x
    for blk in blocks:
        h = off.offload_checkpoint(blk, h)
    mid = eng.stats()
    assert mid["in_use"] - before["in_use"] >= 3 * x.numel() * 4
    h.sum().backward()
    assert eng.stats()["in_use"] == before["in_use"]
    # backward runs last block first; each earlier block's input was already
    # on its way back (prefetched by the backward of the block after it)
    assert [seq for seq, _ in reloads] == sorted((seq for seq, _ in reloads), reverse=True)
    assert [was for _, was in reloads] == [False, True, True]


def test_checkpoint_no_grad_mode_just_calls(off, torch):
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(off.offload_checkpoint(lin, x), lin(x))
    with pytest.raises(TypeError, match="hidden_states must be a tensor"):
        off.offload_checkpoint(lin, [1.0])


def test_checkpoint_retain_graph_and_autograd_grad(off, torch):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64, requires_grad=True)
    eng = off.get_engine("cpu")
    gc.collect()  # graphs an earlier test left in reference cycles give their buffers back first
    before = eng.stats()["in_use"]
    out = off.offload_checkpoint(lin, x).sum()
    assert eng.stats()["in_use"] > before  # the input is in host memory
    out.backward(retain_graph=True)
    first = x.grad.clone()
    out.backward()  # the offloaded copy is still there for a second backward
    torch.testing.assert_close(x.grad, 2 * first)
    del out
    assert eng.stats()["in_use"] == before  # freed with the graph
    want = torch.autograd.grad(lin(x).pow(2).sum(), (x, lin.weight))
    got = torch.autograd.grad(off.offload_checkpoint(lin, x).pow(2).sum(), (x, lin.weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_checkpoint_inplace_change_of_the_input_is_an_error(off, torch):
    """Autograd skips its version check for tensors saved through hooks: ours
    checks, as torch's checkpoint does, since on a GPU the copy could race it."""
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        off.offload_checkpoint(lambda t: lin(t.mul_(2)), x * 2)  # by the function
    h = x * 2
    out = off.offload_checkpoint(lin, h)
    h.mul_(3)  # after it, before backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_saved_tensors_inplace_change_is_an_error(off, torch):
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(64, 64)
    with off.offload_saved_tensors(min_bytes=0):
        y = x @ w  # saves x
    x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # as autograd itself says without offload
    y = x @ w
    x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_checkpoint_on_devices_without_an_engine_keeps_the_input(off, torch):
    lin = torch.nn.Linear(8, 8, device="meta")
    x = torch.empty(4, 8, device="meta", requires_grad=True)
    out = off.offload_checkpoint(lin, x)
    assert out.device.type == "meta" and out.shape == (4, 8)
    out.sum().backward()
    assert x.grad is not None and x.grad.device.type == "meta"


def test_checkpoint_kwargs_checkpoint_would_take_reach_the_function(off, torch):
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    seen = {}

    def fn(t, debug=None, context_fn=None, determinism_check=None):
        seen.update(debug=debug, context_fn=context_fn, determinism_check=determinism_check)
        return lin(t) * debug

    off.offload_checkpoint(fn, x, debug=torch.full((1,), 2.0), context_fn="c", determinism_check="d").sum().backward()
    assert seen["context_fn"] == "c" and seen["determinism_check"] == "d" and seen["debug"].item() == 2.0
    torch.testing.assert_close(x.grad, 2 * lin.weight.sum(0).expand(4, 8))


def test_shared_engines_max_inflight(off, torch):
    eng = off.get_engine("cpu")
    try:
        off.set_max_inflight(1 << 20)
        assert eng.max_inflight == 1 << 20 and off.get_engine("cpu") is eng
        off.set_max_inflight(None)
        assert eng.max_inflight is None
        with pytest.raises(ValueError, match="max_inflight"):
            off.set_max_inflight(-5)
    finally:
        off.set_max_inflight(off.DEFAULT_MAX_INFLIGHT)


def test_forwards_without_backward_do_not_grow_the_registry(off, torch):
    lin = torch.nn.Linear(8, 8)
    for _ in range(500):
        off.offload_checkpoint(lin, torch.randn(2, 8, requires_grad=True))  # graph dropped at once
    assert len(off._checkpoint._live) < 200


def test_checkpoint_recomputation_stops_early(off, torch):
    """Backward reruns the function only up to the last tensor it saved, as
    torch's non-reentrant checkpoint does: the final matmul, whose output
    nothing saved, is not run again (in a transformer block that is the MLP's
    down projection, a third of the block's matmul work)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import checkpoint

    class CountMatmuls(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                CountMatmuls.n += 1
            return func(*args, **(kwargs or {}))

    up, down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def block(h):
        return h + down(torch.relu(up(h)))

    counts = {}
    for how, run in (("plain", block), ("torch", lambda h: checkpoint(block, h, use_reentrant=False)),
                     ("ours", lambda h: off.offload_checkpoint(block, h))):
        x = torch.randn(4, 32, requires_grad=True)
        CountMatmuls.n = 0
        with CountMatmuls():
            run(x).sum().backward()
        counts[how] = CountMatmuls.n
    # plain: 2 forward + 4 backward; checkpointed: + `up` rerun, `down` not
    assert counts == {"plain": 6, "torch": 7, "ours": 7}


# ---------------------------------------------------------------------------
# the original names


def test_unsloth_original_class(torch):
    from mlutils.unsloth import Unsloth_Offloaded_Gradient_Checkpointer as C
    from mlutils import unsloth

    assert issubclass(C, torch.autograd.Function)
    blocks = _blocks(torch, "attn")
    x0 = torch.randn(2, 8, 32)
    _, ref = _run(torch, blocks, x0.clone().requires_grad_(True), "plain")
    for p in blocks.parameters():
        p.grad = None
    x = x0.clone().requires_grad_(True)
    h = x
    for blk in blocks:
        h = C.apply(blk.__call__, h, None, 0.2)
    with pytest.raises(AssertionError):  # scale 0.2 differs from the reference: the arg reached the block
        torch.testing.assert_close(h, _run(torch, blocks, x0.clone(), "plain")[0])
    h = x
    for p in blocks.parameters():
        p.grad = None
    for blk in blocks:
        h = C.apply(blk.__call__, h)
    (h.float() ** 2).mean().backward()
    for g, r in zip([p.grad for p in blocks.parameters()], ref):
        torch.testing.assert_close(g, r)

    import sys

    saved = sys.modules.get("transformers")
    sys.modules["transformers"] = None  # as where transformers is not installed
    try:
        with pytest.raises(ImportError, match="transformers"):
            unsloth.apply_unsloth_offloaded_gradient_checkpoint_monkey_patch()
    finally:
        if saved is None:
            del sys.modules["transformers"]
        else:
            sys.modules["transformers"] = saved


# ---------------------------------------------------------------------------
# Hugging Face style models


def _fake_hf(torch):
    from torch.utils.checkpoint import checkpoint

    nn = torch.nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, h, mask, scale=1.0):
            return (h + torch.tanh(self.lin(h)) * scale + mask,)

    class Model(nn.Module):
        supports_gradient_checkpointing = True

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer() for _ in range(3)])
            self.gradient_checkpointing = False

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            kw = gradient_checkpointing_kwargs or {"use_reentrant": True}
            self._set_gradient_checkpointing(True, functools.partial(checkpoint, **kw))

        def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=checkpoint):
            for m in self.modules():
                if hasattr(m, "gradient_checkpointing"):
                    m._gradient_checkpointing_func = gradient_checkpointing_func
                    m.gradient_checkpointing = enable

        def forward(self, h, mask):
            for layer in self.layers:
                if self.gradient_checkpointing and self.training:
                    h = self._gradient_checkpointing_func(functools.partial(layer.__call__, scale=0.5), h, mask)[0]
                else:
                    h = layer(h, mask, scale=0.5)[0]
            return h

    return Model


def test_enable_on_hf_style_model(off, torch):
    Model = _fake_hf(torch)
    torch.manual_seed(0)
    model = Model()
    x, mask = torch.randn(4, 16), torch.randn(4, 16)
    model(x, mask).pow(2).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eng = off.get_engine("cpu")
    acquires = eng.stats()["acquires"]
    assert off.enable_offloaded_gradient_checkpointing(model) is model
    assert model.gradient_checkpointing and model._gradient_checkpointing_func.mlutils_offload
    model(x, mask).pow(2).sum().backward()
    assert eng.stats()["acquires"] == acquires + 3  # each layer's input went through the engine
    for g, r in zip([p.grad for p in model.parameters()], ref):
        torch.testing.assert_close(g, r)
    off.disable_offloaded_gradient_checkpointing(model)
    assert not model.gradient_checkpointing


def test_enable_on_model_without_checkpointing(off, torch):
    with pytest.raises(TypeError, match="no gradient checkpointing"):
        off.enable_offloaded_gradient_checkpointing(torch.nn.Linear(2, 2))

    class NoSupport(torch.nn.Module):
        supports_gradient_checkpointing = False

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            raise AssertionError("not called")

    with pytest.raises(TypeError, match="no gradient checkpointing"):
        off.enable_offloaded_gradient_checkpointing(NoSupport())


def test_wrapper_unsloth_uses_offload(off, torch):
    from mlutils import wrapper

    model = _fake_hf(torch)()
    wrapper.apply_optimizations(model, wrapper.Optimizations(unsloth=True))
    assert model.mlutils_offloaded_checkpointing and model._gradient_checkpointing_func.mlutils_offload


# ---------------------------------------------------------------------------
# every saved tensor


@pytest.mark.parametrize("compress", [None, "bf16"])
def test_offload_saved_tensors_matches_plain(off, torch, compress):
    torch.manual_seed(0)
    blocks = _blocks(torch, "attn")
    x0 = torch.randn(2, 16, 32)
    _, ref = _run(torch, blocks, x0.clone().requires_grad_(True), "plain")
    for p in blocks.parameters():
        p.grad = None
    eng = off.get_engine("cpu")
    gc.collect()  # graphs an earlier test left in reference cycles give their buffers back first
    before = eng.stats()
    x = x0.clone().requires_grad_(True)
    with off.offload_saved_tensors(min_bytes=1024, compress=compress):
        h = x
        for blk in blocks:
            h = blk(h)
        loss = h.pow(2).mean()
    mid = eng.stats()
    assert mid["acquires"] - before["acquires"] >= 6 and mid["in_use"] > before["in_use"]
    loss.backward()
    del loss, h
    assert eng.stats()["in_use"] == before["in_use"]
    tol = {} if compress is None else {"rtol": 3e-2, "atol": 3e-3}
    for p, r in zip(blocks.parameters(), ref):
        torch.testing.assert_close(p.grad, r, **tol)


@pytest.mark.parametrize("depth", [0, 1])
def test_offload_saved_tensors_prefetches_the_next(off, torch, monkeypatch, depth):
    reloads = []
    orig = off.OffloadEngine.reload

    def spy(self, handle):
        reloads.append(handle.prefetched is not None)
        return orig(self, handle)

    monkeypatch.setattr(off.OffloadEngine, "reload", spy)
    blocks = _blocks(torch, "mlp")
    x = torch.randn(4, 64, 32, requires_grad=True)
    with off.offload_saved_tensors(min_bytes=1024, prefetch=depth):
        h = x
        for blk in blocks:
            h = blk(h)
    h.sum().backward()
    # 3 per block (inputs of both linears and of gelu); the weights (views of
    # parameters) stay where they are
    assert len(reloads) == 9
    if depth:
        assert not reloads[0] and all(reloads[1:])
    else:
        assert not any(reloads)


def test_offload_saved_tensors_arguments(off, torch):
    with pytest.raises(ValueError, match="min_bytes"):
        with off.offload_saved_tensors(min_bytes=-1):
            pass
    with pytest.raises(ValueError, match="compress"):
        with off.offload_saved_tensors(compress="zip"):
            pass


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_offload_saved_tensors_min_bytes_is_inclusive_and_in_bytes(off, torch, dtype):
    """The saved-tensor hooks apply min_bytes as the engine does: a saved
    tensor of exactly min_bytes bytes is offloaded, one byte/element less is
    kept, and the count is in bytes (sin saves its input, here a leaf)."""
    dt = getattr(torch, dtype)
    eng = off.get_engine("cpu")
    nbytes = _N * torch.empty(0, dtype=dt).element_size()
    cases = [(_N, nbytes - 1, True), (_N, nbytes, True), (_N, nbytes + 1, False), (_N - 1, nbytes, False),
             (_N, _N + 1, True)]  # the last: bytes, not elements
    for n, min_bytes, copied in cases:
        x = torch.linspace(-1, 1, n, dtype=dt).requires_grad_(True)
        gc.collect()
        before = eng.stats()
        with off.offload_saved_tensors(min_bytes=min_bytes):
            y = x.sin()
        mid = eng.stats()
        assert (mid["acquires"] - before["acquires"], mid["requested"] - before["requested"]) == \
            ((1, nbytes) if copied else (0, 0)), (n, min_bytes)
        y.sum().backward()
        assert torch.equal(x.grad, x.detach().cos())
        del y
        assert eng.stats()["requested"] == before["requested"]


def test_engine_max_inflight_argument(off, torch):
    eng = off.OffloadEngine("cpu")
    assert eng.max_inflight == off.DEFAULT_MAX_INFLIGHT and off.DEFAULT_MAX_INFLIGHT > 0
    assert off.OffloadEngine("cpu", max_inflight=None).max_inflight is None
    for bad in (-1, 1.5, "1", True):
        with pytest.raises(ValueError, match="max_inflight"):
            off.OffloadEngine("cpu", max_inflight=bad)
    h = eng.offload(torch.ones(1 << 16))
    assert eng.stats()["inflight_waits"] == 0  # the CPU engine's copy is done when offload returns
    h.release()


def _cuda_or_skip(torch):
    if not (mlutils.cuda_available() and torch.cuda.is_available()):
        pytest.skip("needs a CUDA device")


def test_cuda_window_bounds_copies_in_flight(off, torch):
    """With the compute stream busy, copies queue up; past max_inflight the
    compute stream is made to wait for the oldest, and every reload is exact."""
    _cuda_or_skip(torch)
    dev = torch.device("cuda", torch.cuda.current_device())
    eng = off.OffloadEngine(dev, max_inflight=8 << 20)
    assert eng._cuda.window() == {"max_inflight": 8 << 20, "waits": 0}
    a = torch.randn(4096, 4096, device=dev)
    handles, refs = [], []
    for i in range(24):
        x = (a @ a)[: 256] + i  # 4 MiB made by a kernel still running when the copy is queued
        handles.append(eng.offload(x))
        refs.append(x.clone())
        del x
    waits = eng.stats()["inflight_waits"]
    assert waits > 0
    for h, r in zip(handles, refs):
        assert torch.equal(h.reload(), r)
        h.release()
    unbounded = off.OffloadEngine(dev, max_inflight=None)
    assert unbounded._cuda.window()["max_inflight"] is None
    for i in range(8):
        unbounded.offload((a @ a)[: 256]).release()
    assert unbounded.stats()["inflight_waits"] == 0
    with pytest.raises(ValueError, match="max_inflight"):
        eng._cuda.window(max_inflight=-1)


# ---------------------------------------------------------------------------
# CUDA entry points on a machine without a GPU (or a build without CUDA)


def test_cuda_engine_fails_politely(off, torch):
    if mlutils.cuda_available():
        pytest.skip("a GPU is present: bench/offload_gpu.py checks the CUDA engine")
    with pytest.raises(RuntimeError, match="without CUDA|cudaGetDeviceCount|no CUDA device"):
        off.OffloadEngine(torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="without CUDA|cudaGetDeviceCount|no CUDA device"):
        _core.CudaOffloadEngine(0)


def test_import_without_torch():
    code = ("import mlutils.offload as o, mlutils.unsloth as u\n"
            "try:\n    o.offload_checkpoint(print, 1)\nexcept ImportError as e:\n    print('ok', e)\n")
    env = dict(os.environ, MLUTILS_NO_TORCH="1")
    out = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + code],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok") and "PyTorch" in out.stdout


def test_gpu_bench_exits_cleanly_without_gpu(torch):
    if mlutils.cuda_available():
        pytest.skip("a GPU is present")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(here, "bench", "offload_gpu.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no GPU" in out.stdout


def test_pool_fuzz_corpus_replays_clean_under_sanitizers():
    import shutil

    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.skip("make and gcc are needed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    r = subprocess.run(["make", "-s", "fuzz-replay-offload_pool"], cwd=root, capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "replayed 6 inputs" in r.stdout + r.stderr
