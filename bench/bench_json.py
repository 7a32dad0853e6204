"""JSON helpers against the standard library's json (and orjson when installed),
all measured in the same run.  Prints a markdown table of times and ratios.

    python3 bench/bench_json.py [--quick]
"""
import argparse
import json
import random
import re
import sys
import timeit

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

from mlutils.io import json_parse, json_stringify  # noqa: E402

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

    print(f"corpus: {len(text) / 1e6:.1f} MB of JSON text ({len(data['history'])} metric steps + config)")
    print("ratio = peer time / mlutils time (above 1: mlutils is faster)\n")
    print("| operation | mlutils | peers (ratio) |")
    print("| --- | --- | --- |")
    for r in rows:
        print("| %s | %s | %s |" % r)


if __name__ == "__main__":
    main()
