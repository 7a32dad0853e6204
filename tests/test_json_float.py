"""json_stringify writes floats exactly as repr(float) does (csrc/core/dtoa.c):
the shortest digits that read back, repr's layout.  Compared with Python's
own repr on millions of doubles: random bit patterns (every exponent),
"nice" decimals (few digits, what training logs hold) and edge cases."""
import json
import math
import os
import struct
import sys

import numpy as np
import pytest

from mlutils.io import json_stringify


def ours_vs_repr(values):
    """Asserts json_stringify(list) == '[' + repr(v), ... + ']' and says where not."""
    values = [v for v in values if math.isfinite(v)]
    got = json_stringify(values)
    want = "[" + ", ".join(map(float.__repr__, values)) + "]"
    if got != want:
        g = got[1:-1].split(", ")
        bad = [(float.hex(v), x, y) for v, x, y in zip(values, g, map(repr, values)) if x != y]
        pytest.fail(f"{len(bad)} doubles differ from repr, e.g. {bad[:5]}")
    assert json_stringify(values) == json.dumps(values, ensure_ascii=False)


def random_bits(rng, n):
    return rng.integers(0, 2**64, size=n, dtype=np.uint64).view(np.float64).tolist()


def nice_decimals(rng, n):
    """Numbers with 1..9 significant digits at any decimal exponent."""
    digits = rng.integers(1, 10**9, size=n).astype(np.float64)
    digits //= 10.0 ** rng.integers(0, 9, size=n)
    exp = rng.integers(-320, 300, size=n)
    return [float(f"{int(d)}e{int(e)}") for d, e in zip(digits, exp)]


def everyday(rng, n):
    """What a training loop logs: losses, learning rates, step times."""
    return np.concatenate([
        rng.random(n // 4), rng.random(n // 4) * 5, 3e-4 * rng.random(n // 4),
        rng.standard_normal(n - 3 * (n // 4)) * 10.0 ** rng.integers(-8, 12, size=n - 3 * (n // 4)),
    ]).tolist()


def edge_cases():
    out = [0.0, -0.0, 5e-324, 1e-323, 2.225073858507201e-308, sys.float_info.min, sys.float_info.max,
           9007199254740993.0, 9007199254740992.0, 0.1, 0.2, 0.3, 0.1 + 0.2, 1 / 3, 2 / 3,
           1e-5, 1e-4, 1e15, 1e16, 1234567890123456.0, 12345678901234567.0, 1e22, 1e23]
    for e in range(-323, 309):
        out.append(float(f"1e{e}"))
    for e in range(-1074, 1024):
        out.append(math.ldexp(1.0, e))
    for c in range(1, 3000):  # smallest subnormals
        out.append(struct.unpack("<d", struct.pack("<Q", c))[0])
    for be in range(1, 2047):  # each binade's ends
        for d in (-1, 0, 1):
            out.append(struct.unpack("<d", struct.pack("<Q", (be << 52) + d))[0])
    more = []
    for v in out:  # neighbours, two each way
        a = b = v
        for _ in range(2):
            a, b = math.nextafter(a, math.inf), math.nextafter(b, -math.inf)
            more += [a, b]
    out += more
    return out + [-v for v in out]


def test_edge_cases_match_repr():
    ours_vs_repr(edge_cases())


def test_exponent_switch_and_layout():
    assert json_stringify([1e16, 1234567890123456.0, 0.0001, 0.00001, 1.5e300, -0.0, 5e-324, 100.0]) == \
        "[1e+16, 1234567890123456.0, 0.0001, 1e-05, 1.5e+300, -0.0, 5e-324, 100.0]"
    assert json_stringify({1e16: 0.1, -0.0: 1e-7}) == '{"1e+16": 0.1, "-0.0": 1e-07}'
    assert json_stringify([math.nan, math.inf, -math.inf]) == "[NaN, Infinity, -Infinity]"


@pytest.mark.parametrize("seed", [0, 1])
def test_random_doubles_match_repr(seed):
    # about 3.6 million doubles over both seeds: random bits are the slow
    # part (repr of extreme exponents takes microseconds)
    rng = np.random.default_rng(seed)
    ours_vs_repr(random_bits(rng, 600_000))
    ours_vs_repr(nice_decimals(rng, 400_000))
    ours_vs_repr(everyday(rng, 800_000))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MLUTILS_SLOW_TESTS") != "1",
                    reason="50 million doubles (minutes): set MLUTILS_SLOW_TESTS=1")
def test_fifty_million_doubles_match_repr():
    rng = np.random.default_rng(12345)
    for _ in range(25):
        ours_vs_repr(random_bits(rng, 1_000_000))
        ours_vs_repr(nice_decimals(rng, 500_000))
        ours_vs_repr(everyday(rng, 500_000))


def test_truncate_uses_the_same_digits():
    # truncate=True rounds to 4 only numbers whose repr has 8+ fractional digits
    vals = [0.1, 0.12345678, 0.1234567, 1 / 3, 1e-05, 123.456789012, 1e16 / 3]
    assert json_stringify(vals, truncate=True) == \
        "[0.1, 0.1235, 0.1234567, 0.3333, 1e-05, 123.4568, 3333333333333333.5]"
