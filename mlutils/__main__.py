"""Command line: ``python -m mlutils`` (or ``mlutils``).

    mlutils inspect FILE [--json]   names, dtypes, shapes, sizes and metadata
    mlutils convert IN OUT          .pt <-> .safetensors (by suffix) [--module-key K] [--drop K]
    mlutils verify FILE             full validation of an untrusted file
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from . import __version__
from .io import format_for, json_stringify


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe(path: str) -> dict:
    """{"format", "tensors": [{name, dtype, shape, nbytes}], "metadata"} for a file (validated)."""
    return format_for(path).describe(path)


def cmd_inspect(args: argparse.Namespace) -> int:
    info = describe(args.file)
    info["file"] = args.file
    info["file_size"] = os.path.getsize(args.file)
    if args.json:
        print(json_stringify(info, pretty=True))
        return 0
    rows = [(t["name"], t["dtype"], "[" + ", ".join(map(str, t["shape"])) + "]", _human(t["nbytes"]))
            for t in info["tensors"]]
    head = ("name", "dtype", "shape", "size")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(f"{args.file}: {info['format']}, {len(rows)} tensors, "
          f"{_human(sum(t['nbytes'] for t in info['tensors']))} of tensor data, file {_human(info['file_size'])}")
    print(line.format(*head))
    for r in rows:
        print(line.format(*r))
    if info["metadata"]:
        print("metadata:")
        for k in sorted(info["metadata"]):
            print(f"  {k}: {info['metadata'][k]}")
    return 0


class _WriteProgress:
    """A progress bar for a large atomic write: a thread follows the size of the
    temporary file the writer fills beside the target (the writers release the
    GIL while they copy tensor data)."""

    def __init__(self, target: str, total: int) -> None:
        import threading

        self.target, self.total = target, total
        self.bar = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _size(self) -> int:
        folder = os.path.dirname(os.path.abspath(self.target))
        prefix = "." + os.path.basename(self.target) + "."
        best = 0
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if e.name.startswith(prefix) and e.name.endswith(".tmp"):
                        best = max(best, e.stat().st_size)
        except OSError:
            pass
        return best

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            self.bar.update(max(0, min(self._size(), self.total) - self.bar.n))

    def __enter__(self) -> "_WriteProgress":
        if self.total >= (64 << 20) and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=os.path.basename(self.target))
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.stop.set()
            self.thread.join()
            if exc[0] is None:
                self.bar.update(self.total - self.bar.n)
            self.bar.close()


def cmd_convert(args: argparse.Namespace) -> int:
    from collections.abc import Mapping

    from .io import DEFAULT_MODULE_KEY, _split_checkpoint, torch_load, torch_save

    src, dst = args.input, args.output
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("convert: input and output are the same file")
    src_fmt, dst_fmt = format_for(src), format_for(dst)
    if src_fmt is dst_fmt:
        raise ValueError("convert: one side must be .pt/.pth and the other .safetensors/.sft")
    total = sum(t["nbytes"] for t in src_fmt.describe(src)["tensors"])
    load_key = args.module_key or DEFAULT_MODULE_KEY
    # numpy arrays over a private mapping of the input: tensors stream from the
    # page cache into the output file, never all in memory at once.
    data: Any = torch_load(src, framework="np", module_key=load_key)
    if src_fmt.flat and len(data) == 1:
        data = data[load_key]  # plain tensors, no checkpoint metadata
    elif not src_fmt.flat and dst_fmt.flat and not isinstance(data, Mapping):
        data = {"tensor": data}  # torch.save of one tensor: safetensors holds named tensors
    if args.drop:
        if not isinstance(data, Mapping):
            raise ValueError(f"convert: --drop needs a checkpoint dict, {src} holds a {type(data).__name__}")
        missing = [k for k in args.drop if k not in data]
        if missing:
            raise ValueError(f"convert: --drop {', '.join(missing)}: not in the checkpoint "
                             f"(keys: {', '.join(sorted(map(str, data)))})")
        data = {k: v for k, v in data.items() if k not in args.drop}
    save_key = args.module_key if dst_fmt.flat else None
    if dst_fmt.flat:
        if not isinstance(data, Mapping):
            raise ValueError(f"convert: {src} holds a {type(data).__name__}, not a dict: it cannot be safetensors")
        try:
            key, _tensors, metadata = _split_checkpoint(data, save_key)
        except ValueError as exc:
            if "holds tensors" in str(exc):
                raise ValueError(f"{exc}; with convert, --drop KEY leaves an entry out") from exc
            raise
        if key is not None:
            print(f"tensors: checkpoint entry {key!r}; metadata: "
                  f"{', '.join(sorted(metadata)) if metadata else 'none'}")
    with _WriteProgress(dst, total):
        torch_save(data, dst, module_key=save_key)
    print(f"wrote {dst} ({_human(os.path.getsize(dst))})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    fmt = format_for(args.file)
    fmt.verify(args.file)
    info = fmt.describe(args.file)
    print(f"{args.file}: OK ({info['format']}, {len(info['tensors'])} tensors)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mlutils", description="Inspect, convert and verify state-dict files.")
    ap.add_argument("--version", action="version", version=f"mlutils {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list tensors and metadata")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("convert", help=".pt <-> .safetensors")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--module-key", default=None,
                   help="checkpoint entry holding the tensors (default: .pt -> safetensors, the first dict "
                        "of tensors; safetensors -> .pt, 'module')")
    p.add_argument("--drop", action="append", default=[], metavar="KEY",
                   help="leave this checkpoint entry out (repeatable), e.g. an optimizer state")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("verify", help="fully validate an untrusted file")
    p.add_argument("file")
    p.set_defaults(func=cmd_verify)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, TypeError) as exc:
        print(f"mlutils {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
