"""Statistical quality of the keyed bijection: uniform positions, no correlation.

Thresholds are chi-square quantiles at p = 1e-6 (Wilson-Hilferty), so a
correct generator fails about once in a million runs; the seeds are fixed,
so the runs are reproducible."""
import math

import numpy as np
import pytest

from mlutils import _core
from mlutils.sampler import PoolSampler, RandomSampler

Z = 4.753  # standard normal quantile at 1 - 1e-6


def chi2_limit(df):
    """Upper 1e-6 quantile of chi-square with df degrees of freedom (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + Z * math.sqrt(2 / (9 * df))) ** 3


def orders(n, seeds, epoch=0, stream=1):
    """Matrix [seed, position] -> item of the epoch order for many seeds."""
    out = np.empty((len(seeds), n), dtype=np.int64)
    xs = np.arange(n, dtype=np.int64)
    for i, s in enumerate(seeds):
        out[i] = _core.perm_apply(n, s, stream, epoch, xs)
    return out


def chi2(counts, expected):
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("n", [2, 3, 5, 8, 10, 16, 37])
def test_every_position_equally_likely_for_every_item(n):
    seeds = range(6000)
    o = orders(n, seeds)
    counts = np.zeros((n, n))
    for pos in range(n):
        counts[:, pos] = np.bincount(o[:, pos], minlength=n)
    exp = len(seeds) / n
    # per item, over positions
    for item in range(n):
        assert chi2(counts[item], exp) < chi2_limit(n - 1), (n, item)
    # the whole table
    assert chi2(counts, exp) < chi2_limit((n - 1) ** 2)


def test_public_samplers_are_uniform_too():
    n, trials = 6, 4000
    counts = np.zeros((n, n))
    for seed in range(trials):
        order = RandomSampler(n, seed=seed).take(n)
        counts[order, np.arange(n)] += 1
    assert chi2(counts, trials / n) < chi2_limit((n - 1) ** 2)
    # pool rounds: the rounds of one sampler, one after another
    p = PoolSampler(range(n), seed=1)
    draws = p.take(n * trials).reshape(trials, n)
    counts = np.zeros((n, n))
    for pos in range(n):
        counts[:, pos] = np.bincount(draws[:, pos], minlength=n)
    assert chi2(counts, trials / n) < chi2_limit((n - 1) ** 2)


@pytest.mark.parametrize("n", [5, 9])
def test_consecutive_pairs_are_uniform(n):
    """(item at position j, item at j + 1) is uniform over the n(n-1) ordered pairs."""
    seeds = range(8000)
    o = orders(n, seeds)
    for j in (0, n // 2):
        pair = o[:, j] * n + o[:, j + 1]
        counts = np.bincount(pair, minlength=n * n).reshape(n, n)
        off = counts[~np.eye(n, dtype=bool)]
        assert np.all(np.diag(counts) == 0)
        assert chi2(off, len(seeds) / (n * (n - 1))) < chi2_limit(n * (n - 1) - 1)


@pytest.mark.parametrize("n", [10**5, 3 * 10**5 + 7, 2**20])
def test_no_serial_correlation_in_a_long_order(n):
    x = RandomSampler(n, seed=12345).take(n).astype(np.float64)
    assert sorted(x.astype(np.int64).tolist()) == list(range(n))
    for lag in (1, 2, 7):
        r = np.corrcoef(x[:-lag], x[lag:])[0, 1]
        assert abs(r) < 5 / math.sqrt(n), (lag, r)
    # position vs item: no drift
    r = np.corrcoef(np.arange(n), x)[0, 1]
    assert abs(r) < 5 / math.sqrt(n)
    # successive differences look like those of a uniform permutation: the
    # mean |x[i+1] - x[i]| of a random permutation is (n + 1) / 3
    d = np.abs(np.diff(x)).mean()
    assert abs(d - (n + 1) / 3) < 5 * (n / math.sqrt(18)) / math.sqrt(n)


def test_epochs_and_seeds_are_unrelated():
    n = 10**5
    a, b = RandomSampler(n, seed=1), RandomSampler(n, seed=1)
    b.set_epoch(1)
    c = RandomSampler(n, seed=2)
    x = a.take(n).astype(np.float64)
    for other in (b.take(n), c.take(n)):
        r = np.corrcoef(x, other.astype(np.float64))[0, 1]
        assert abs(r) < 5 / math.sqrt(n)
    # the position of each item in two epochs: unrelated
    pa = np.empty(n)
    pb = np.empty(n)
    pa[RandomSampler(n, seed=1).take(n)] = np.arange(n)
    e1 = RandomSampler(n, seed=1)
    e1.set_epoch(1)
    pb[e1.take(n)] = np.arange(n)
    assert abs(np.corrcoef(pa, pb)[0, 1]) < 5 / math.sqrt(n)
