"""JSON helpers against the standard library's json (and orjson when installed),
all measured in the same run.  Prints a markdown table of times and ratios.

    python3 bench/bench_json.py [--quick]
"""
import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import timeit

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

from mlutils import _core  # noqa: E402
from mlutils.io import json_parse, json_read, json_stringify  # noqa: E402

try:
    import orjson
except ImportError:  # pragma: no cover
    orjson = None


def corpus(n_steps):
    """A training run's metrics log plus its configuration: what these helpers serialise."""
    rng = random.Random(0)
    steps = []
    for i in range(n_steps):
        steps.append({
            "step": i, "epoch": i // 1000, "elapsed": rng.random() * 1e4,
            "loss": rng.random() * 5, "acc": rng.random(), "lr": 3e-4 * rng.random(),
            "grad_norm": rng.random() * 10, "tokens": rng.randrange(10**6, 10**9),
            "engine": {"ar": {"loss.nll": rng.random(), "acc.nll": rng.random(), "ppl": 1 + rng.random()}},
            "tag": "run-é-%d" % (i % 7), "ok": i % 3 == 0, "note": None,
        })
    config = {
        "model": {"name": "ar+nar", "size": "full", "layers": 12, "dims": [1024] * 12, "dropout": 0.1},
        "dataset": {"paths": ["/data/speech/%05d.flac" % i for i in range(2000)], "sample_rate": 24000},
        "trainer": {"iterations": 1_000_000, "save_frequency": 250, "gradient_accumulation_steps": 4},
    }
    return {"config": config, "history": steps}


def original_truncate(data):
    """The original approach: json.dumps, then a regex pass over the text."""
    return re.sub(r"\d+\.\d{8,}", lambda m: "{:.4f}".format(float(m.group())), json.dumps(data))


def best(fn, number, repeat):
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def metrics_line():
    """One training step's log line: 10 floats."""
    rng = random.Random(1)
    names = ["loss", "acc", "lr", "grad_norm", "elapsed", "tokens_per_s", "ppl", "loss.nll", "acc.nll", "scale"]
    return {k: rng.random() * 10.0 ** rng.randint(-5, 3) for k in names}


def small_files(folder, n):
    """n JSON files of about 500 bytes (per-sample metadata, one file each)."""
    rng = random.Random(2)
    paths = []
    for i in range(n):
        obj = {"id": "utt-%06d" % i, "speaker": "spk-%03d" % rng.randrange(500), "duration": rng.random() * 20,
               "sample_rate": 24000, "lang": "fr", "text": "le chat est sur le tapis %d" % i,
               "phonemes": [rng.randrange(80) for _ in range(50)], "snr": rng.random() * 40,
               "stats": {"rms": rng.random(), "peak": rng.random(), "clipped": i % 50 == 0}, "note": None}
        p = os.path.join(folder, "%06d.json" % i)
        with open(p, "w") as f:
            json.dump(obj, f, ensure_ascii=False)
        paths.append(p)
    return paths


def interleaved(fns, number, repeat):
    """Each fn timed `repeat` times, the repeats interleaved: {name: [seconds per call]}."""
    times = {name: [] for name, _ in fns}
    for _ in range(repeat):
        for name, fn in fns:
            times[name].append(timeit.timeit(fn, number=number) / number)
    return times


def spread(ts, unit, scale):
    return f"{statistics.median(ts) * scale:.2f} {unit} ({min(ts) * scale:.2f}-{max(ts) * scale:.2f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    data = corpus(2000 if args.quick else 20000)
    text = json.dumps(data)
    number, repeat = (3, 3) if args.quick else (5, 7)
    rows = []

    def row(what, ours, peers):
        base = ours()
        t_ours = best(ours, number, repeat)
        cells = []
        for name, fn in peers:
            t = best(fn, number, repeat)
            cells.append(f"{name} {t * 1e3:.1f} ms ({t / t_ours:.2f}x)")
        rows.append((what, f"{t_ours * 1e3:.1f} ms", "; ".join(cells)))
        return base

    row("stringify", lambda: json_stringify(data), [
        ("json.dumps", lambda: json.dumps(data)),
        ("json.dumps(ensure_ascii=False)", lambda: json.dumps(data, ensure_ascii=False)),
    ] + ([("orjson.dumps", lambda: orjson.dumps(data))] if orjson else []))
    row("stringify pretty", lambda: json_stringify(data, pretty=True), [
        ("json.dumps(indent=4)", lambda: json.dumps(data, indent=4)),
    ] + ([("orjson INDENT_2", lambda: orjson.dumps(data, option=orjson.OPT_INDENT_2))] if orjson else []))
    row("stringify truncate=True", lambda: json_stringify(data, truncate=True), [
        ("original dumps+regex", lambda: original_truncate(data)),
    ])
    row("parse str", lambda: json_parse(text), [
        ("json.loads", lambda: json.loads(text)),
    ] + ([("orjson.loads", lambda: orjson.loads(text))] if orjson else []))
    btext = text.encode()
    row("parse bytes", lambda: json_parse(btext), [
        ("json.loads", lambda: json.loads(btext)),
    ] + ([("orjson.loads", lambda: orjson.loads(btext))] if orjson else []))

    def per_call_row(what, fns, number, repeat, unit, scale):
        """Median of interleaved repeats (min-max); ratios of the medians."""
        times = interleaved(fns, number, repeat)
        ours_name = fns[0][0]
        t_ours = statistics.median(times[ours_name])
        cells = [f"{name} {spread(times[name], unit, scale)} ({statistics.median(times[name]) / t_ours:.2f}x)"
                 for name, _ in fns[1:]]
        rows.append((what, spread(times[ours_name], unit, scale), "; ".join(cells)))

    line = metrics_line()
    assert json_stringify(line) == json.dumps(line, ensure_ascii=False)
    per_call_row("per call: 10-float metrics dict", [
        ("mlutils", lambda: json_stringify(line)),
        ("json.dumps", lambda: json.dumps(line)),
    ] + ([("orjson.dumps", lambda: orjson.dumps(line))] if orjson else []),
        number=2000 if args.quick else 20000, repeat=7, unit="us", scale=1e6)

    n_files = 2000 if args.quick else 10000
    with tempfile.TemporaryDirectory() as folder:
        paths = small_files(folder, n_files)
        blobs = [open(p, "rb").read() for p in paths]
        assert all(json_read(p) == json.load(open(p, encoding="utf-8")) for p in paths[:100])

        def ours():
            for p in paths:
                json_read(p)

        def std():
            for p in paths:
                with open(p, encoding="utf-8") as f:
                    json.load(f)

        def oj():
            for p in paths:
                with open(p, "rb") as f:
                    orjson.loads(f.read())

        def floor():  # jansson's parse alone, from memory: no open, no Python objects
            for b in blobs:
                _core._json_parse_only(b)

        per_call_row(f"json_read of {n_files} files of ~{sum(map(len, blobs)) // len(blobs)} B (per file)", [
            ("mlutils", ours), ("json.load(open())", std),
        ] + ([("orjson.loads(read())", oj)] if orjson else []) + [
            ("floor: jansson parse only, in memory", floor),
        ], number=1, repeat=5, unit="us", scale=1e6 / n_files)

    print(f"corpus: {len(text) / 1e6:.1f} MB of JSON text ({len(data['history'])} metric steps + config)")
    print("ratio = peer time / mlutils time (above 1: mlutils is faster); per-call rows: median "
          "of interleaved repeats (min-max)\n")
    print("| operation | mlutils | peers (ratio) |")
    print("| --- | --- | --- |")
    for r in rows:
        print("| %s | %s | %s |" % r)


if __name__ == "__main__":
    main()
