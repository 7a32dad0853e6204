"""mlutils.pattern against the reference's documented behaviour
(reference/ref_pattern.py) over a grid of providers, arguments and dtypes."""
import itertools

import numpy as np
import pytest

from mlutils import _core
from mlutils import pattern as P

pytestmark = pytest.mark.torch


@pytest.fixture
def ref(torch):
    from reference import ref_pattern

    return ref_pattern


def provider_pairs(ref):
    """(ours, reference) for every provider and a spread of arguments."""
    pairs = []
    for K in (1, 2, 4):
        pairs.append((P.DelayedPatternProvider(K), ref.RefDelayed(K)))
        pairs.append((P.ParallelPatternProvider(K), ref.RefParallel(K)))
        pairs.append((P.UnrolledPatternProvider(K), ref.RefUnrolled(K)))
        pairs.append((P.MusicLMPattern(K, 1), ref.RefMusicLM(K, 1)))
    for delays, ff, ei in itertools.product(([0, 1, 1, 3], [0, 0, 0, 0], [-1, 0, 2, 2], [0, 2, 5, 6]),
                                            (0, 1, 3), (-1, 0, 2)):
        pairs.append((P.DelayedPatternProvider(4, delays, ff, ei), ref.RefDelayed(4, delays, ff, ei)))
    for ei in (-1, 0, 1, 3):
        pairs.append((P.ParallelPatternProvider(3, ei), ref.RefParallel(3, ei)))
    for flat, delays in [([0, 1, 1], [0, 3, 3]), ([0, 0, 1], None), ([0, 2, 2], [0, 1, 1]),
                         ([0, 1, 2], [-2, 0, 1]), ([0, 1, 4], [1, 1, 3]), ([-1, 0, 0], [0, 2, 2]),
                         ([0, 0, 0], [2, 2, 2]), ([-2, -1, -1], None)]:
        pairs.append((P.UnrolledPatternProvider(3, flat, delays), ref.RefUnrolled(3, flat, delays)))
    for delays in ([0, 0], [0, 1], [1, 3], [-1, 2]):
        pairs.append((P.CoarseFirstPattern(3, delays), ref.RefCoarseFirst(3, delays)))
    for g in (-1, 1, 2, 4):
        pairs.append((P.MusicLMPattern(4, g), ref.RefMusicLM(4, g)))
    return pairs


def plain(layout):
    return [[(c.t, c.q) for c in step] for step in layout]


def test_layouts_and_properties_match_reference(ref):
    for ours, theirs in provider_pairs(ref):
        for T in (0, 1, 2, 5, 11):
            try:
                b = theirs.get_pattern(T)
            except Exception as exc:  # the reference refuses: so must we, with a ValueError
                with pytest.raises(ValueError):
                    ours.get_pattern(T)
                assert isinstance(exc, (AssertionError, KeyError, ValueError))
                continue
            a = ours.get_pattern(T)
            assert plain(a.layout) == plain(b.layout), (ours, T)
            assert plain(a.valid_layout) == plain(b.valid_layout)
            # the providers' layouts pass the full check of a hand-made Pattern too
            again = P.Pattern(a.layout, timesteps=T, n_q=ours.n_q)
            assert again == a and again.max_delay == a.max_delay
            assert (a.max_delay, a.num_sequence_steps, a.starts_with_special_token()) == \
                (b.max_delay, b.num_sequence_steps, b.starts_with_special_token())
            for t in range(T + 1):
                for q in (None, 0, ours.n_q - 1, ours.n_q):
                    assert a.get_sequence_coords_with_timestep(t, q) == \
                        [(s, P.LayoutCoord(*c)) for s, c in b.get_sequence_coords_with_timestep(t, q)]
                    assert a.get_first_step_with_timesteps(t, q) == b.get_first_step_with_timesteps(t, q)


def check_same(torch, got, want):
    (va, ia, ma), (vb, ib, mb) = got, want
    assert va.dtype == vb.dtype and va.shape == vb.shape and va.device == vb.device
    assert torch.equal(va.view(-1).view(torch.uint8) if va.dtype.is_floating_point else va,
                       vb.view(-1).view(torch.uint8) if vb.dtype.is_floating_point else vb)
    assert ia.dtype == torch.long and torch.equal(ia, ib)
    assert ma.dtype == torch.bool and torch.equal(ma, mb)


def test_build_revert_logits_match_reference(torch, ref):
    g = torch.Generator().manual_seed(0)
    for ours, theirs in provider_pairs(ref):
        for T in (1, 3, 6):
            try:
                b = theirs.get_pattern(T)
            except (AssertionError, KeyError, ValueError):  # the reference refuses: so must we
                with pytest.raises(ValueError):
                    ours.get_pattern(T)
                continue
            a = ours.get_pattern(T)
            K = ours.n_q
            for valid in (False, True):
                # T of the input may be shorter than the pattern's (the reference
                # fails on an empty input, so T_in >= 1 here)
                for t_in in sorted({1, T}):
                    z = torch.randint(0, 1000, (2, K, t_in), generator=g)
                    check_same(torch, a.build_pattern_sequence(z, 1024, valid),
                               b.build_pattern_sequence(z, 1024, valid))
                L = len(b.valid_layout if valid else b.layout)
                for S in sorted({s for s in (1, L // 2, L) if 0 < s <= L}):
                    s = torch.randint(0, 1000, (3, K, S), generator=g)
                    check_same(torch, a.revert_pattern_sequence(s, -1, valid),
                               b.revert_pattern_sequence(s, -1, valid))
                    logits = torch.randn(2, 5, K, S, generator=g)
                    check_same(torch, a.revert_pattern_logits(logits, float("nan"), valid),
                               b.revert_pattern_logits(logits, float("nan"), valid))


def test_random_custom_layouts_match_reference(torch, ref):
    rng = np.random.default_rng(1)
    for _ in range(60):
        K, T = int(rng.integers(1, 4)), int(rng.integers(1, 6))
        last = [0] * K
        layout = [] if rng.random() < 0.2 else [[]]
        for _ in range(int(rng.integers(1, 12))):
            qs = rng.permutation(K)[: int(rng.integers(0, K + 1))]
            step = []
            for q in qs:
                last[q] += int(rng.integers(0, 2))
                step.append((last[q], int(q)))
            layout.append(step)
        ours = P.Pattern([[P.LayoutCoord(*c) for c in s] for s in layout], timesteps=T, n_q=K)
        theirs = ref.RefPattern([[ref.RefCoord(*c) for c in s] for s in layout], timesteps=T, n_q=K)
        assert (ours.max_delay, plain(ours.valid_layout)) == (theirs.max_delay, plain(theirs.valid_layout))
        z = torch.randint(0, 50, (2, K, T))
        for valid in (False, True):
            check_same(torch, ours.build_pattern_sequence(z, 99, valid), theirs.build_pattern_sequence(z, 99, valid))
        for valid in (False, True):
            L = len(theirs.valid_layout if valid else theirs.layout)
            if L == 0:
                continue
            s = torch.randint(0, 50, (2, K, L))
            check_same(torch, ours.revert_pattern_sequence(s, 99, valid),
                       theirs.revert_pattern_sequence(s, 99, valid))
            lg = torch.randn(1, 3, K, L)
            check_same(torch, ours.revert_pattern_logits(lg, 0.0, valid),
                       theirs.revert_pattern_logits(lg, 0.0, valid))


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "int32", "int64", "float16", "bfloat16",
                                   "float32", "float64", "bool", "complex128"])
@pytest.mark.parametrize("special", [3, -1.5, 1000, True, 0.0, -0.0])
def test_torch_dtypes_and_special_promotion(torch, ref, dtype, special):
    dt = getattr(torch, dtype)
    ours = P.DelayedPatternProvider(3, [0, 1, 3]).get_pattern(5)
    theirs = ref.RefDelayed(3, [0, 1, 3]).get_pattern(5)
    z = torch.randint(0, 2 if dt is torch.bool else 100, (2, 3, 5)).to(dt)
    got = ours.build_pattern_sequence(z, special)
    check_same(torch, got, theirs.build_pattern_sequence(z, special))
    seq = got[0]
    check_same(torch, ours.revert_pattern_sequence(seq, special), theirs.revert_pattern_sequence(seq, special))
    lg = torch.randn(2, 4, 3, seq.shape[-1]).to(dt)
    check_same(torch, ours.revert_pattern_logits(lg, special), theirs.revert_pattern_logits(lg, special))


def test_logits_keep_autograd(torch, ref):
    ours = P.DelayedPatternProvider(3).get_pattern(6)
    theirs = ref.RefDelayed(3).get_pattern(6)
    x1 = torch.randn(2, 7, 3, 9, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    v1, _, m1 = ours.revert_pattern_logits(x1, 0.0)
    v2, _, _ = theirs.revert_pattern_logits(x2, 0.0)
    w = torch.randn_like(v1)
    (v1 * w).sum().backward()
    (v2 * w).sum().backward()
    assert torch.equal(v1, v2) and torch.equal(x1.grad, x2.grad)
    with torch.no_grad():  # no graph needed: the C gather serves it
        v3, _, _ = ours.revert_pattern_logits(x1, 0.0)
    assert torch.equal(v3, v2) and not v3.requires_grad


def test_non_contiguous_and_numpy_outputs(torch, ref):
    ours = P.UnrolledPatternProvider(3, [0, 1, 1], [0, 2, 2]).get_pattern(4)
    theirs = ref.RefUnrolled(3, [0, 1, 1], [0, 2, 2]).get_pattern(4)
    z = torch.randint(0, 9, (4, 2, 3)).permute(1, 2, 0)  # [2, 3, 4], not contiguous
    check_same(torch, ours.build_pattern_sequence(z, 7), theirs.build_pattern_sequence(z.contiguous(), 7))
    v, i, m = ours.build_pattern_sequence(z.numpy(), 7)
    vb, ib, mb = theirs.build_pattern_sequence(z.contiguous(), 7)
    assert isinstance(v, np.ndarray) and isinstance(i, np.ndarray) and i.dtype == np.int64 and m.dtype == bool
    assert np.array_equal(v, vb.numpy()) and np.array_equal(i, ib.numpy()) and np.array_equal(m, mb.numpy())


def test_tables_cached_like_reference(torch):
    p = P.DelayedPatternProvider(4).get_pattern(20)
    z = torch.zeros(1, 4, 20, dtype=torch.long)
    _, i1, m1 = p.build_pattern_sequence(z, 0)
    _, i2, m2 = p.build_pattern_sequence(z + 1, 5)
    assert i1 is i2 and m1 is m2


def test_cpu_tensors_never_take_the_cuda_path(torch, monkeypatch):
    calls = []
    monkeypatch.setattr(_core, "cuda_pattern_gather", lambda *a, **k: calls.append(a))
    p = P.DelayedPatternProvider(2).get_pattern(4)
    p.build_pattern_sequence(torch.zeros(1, 2, 4, dtype=torch.long), 0)
    p.revert_pattern_logits(torch.zeros(1, 3, 2, 6), 0.0)
    assert calls == []
    assert P._dispatch(torch.zeros(1)) == "cpu"
    assert P._dispatch(torch.zeros(1, requires_grad=True)) == "torch"
    assert P._dispatch(torch.zeros(1, device="meta")) == "torch"


def test_cuda_tensors_select_the_kernel(torch, monkeypatch):
    class FakeCuda(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    fake = torch.Tensor._make_subclass(FakeCuda, torch.zeros(1))
    monkeypatch.setattr(_core, "cuda_built", lambda: True)
    assert P._dispatch(fake) == "cuda"
    monkeypatch.setattr(_core, "cuda_built", lambda: False)
    assert P._dispatch(fake) == "torch"


@pytest.mark.skipif(not _core.cuda_built(), reason="built without CUDA")
def test_cuda_matches_cpu(torch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    p = P.DelayedPatternProvider(4, [0, 1, 2, 5]).get_pattern(50)
    for dtype in (torch.int64, torch.int32, torch.float16, torch.bfloat16, torch.float32, torch.uint8):
        z = torch.randint(0, 100, (3, 4, 50)).to(dtype)
        cpu = p.build_pattern_sequence(z, 7)
        gpu = p.build_pattern_sequence(z.cuda(), 7)
        assert gpu[0].is_cuda and torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
        back = p.revert_pattern_sequence(gpu[0], 7)
        assert torch.equal(back[0].cpu(), p.revert_pattern_sequence(cpu[0], 7)[0])


def test_cuda_gather_without_a_device_is_a_clean_error():
    if _core.cuda_built() and _core.cuda_device_count().count > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError):
        _core.cuda_pattern_gather(8, 1, 8, 1, 1, b"\0" * 8, 8)
    if _core.cuda_built():  # nothing to do is not an error, even without a device
        _core.cuda_pattern_gather(8, 0, 8, 1, 1, b"\0" * 8, 8)


def test_build_keeps_autograd_and_inference_mode_works(torch, ref):
    ours = P.UnrolledPatternProvider(2, [0, 1], [0, 1]).get_pattern(5)
    theirs = ref.RefUnrolled(2, [0, 1], [0, 1]).get_pattern(5)
    z1 = torch.randn(3, 2, 5, requires_grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    v1 = ours.build_pattern_sequence(z1, 0.0)[0]
    v2 = theirs.build_pattern_sequence(z2, 0.0)[0]
    v1.pow(2).sum().backward()
    v2.pow(2).sum().backward()
    assert torch.equal(z1.grad, z2.grad)
    with torch.inference_mode():
        z = torch.randint(0, 9, (2, 2, 5))
        check_same(torch, ours.build_pattern_sequence(z, 9), theirs.build_pattern_sequence(z, 9))


def test_lazy_conjugate_views_are_resolved(torch, ref):
    ours = P.DelayedPatternProvider(2).get_pattern(3)
    theirs = ref.RefDelayed(2).get_pattern(3)
    z = torch.randn(2, 2, 3, dtype=torch.complex64).conj()
    assert z.is_conj()
    check_same(torch, ours.build_pattern_sequence(z, 0), theirs.build_pattern_sequence(z.resolve_conj(), 0))
