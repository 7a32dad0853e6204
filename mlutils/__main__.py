"""Command line: ``python -m mlutils`` (or ``mlutils``).

    mlutils inspect FILE [--json]   names, dtypes, shapes, sizes and metadata
    mlutils convert IN OUT          .pt <-> .safetensors (by suffix) [--module-key K] [--drop K]
                                    [--flatten] [--keep-optimizer]
    mlutils verify FILE             full validation of an untrusted file
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, cast

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


def _is_optimizer_state(v: Any) -> bool:
    """Whether v looks like torch's ``Optimizer.state_dict()``: ``{"state": {...},
    "param_groups": [{"params": [...], ...}, ...]}``."""
    from collections.abc import Mapping

    if not isinstance(v, Mapping) or not isinstance(v.get("state"), Mapping):
        return False
    groups = v.get("param_groups")
    return isinstance(groups, (list, tuple)) and all(isinstance(g, Mapping) and "params" in g for g in groups)


def _where(path: Sequence[Any]) -> str:
    """A key path as the checkpoint's indexing: 'model'['enc']['w']."""
    return repr(path[0]) + "".join(f"[{k!r}]" for k in path[1:])


def _first_problem(value: Any, keys: bool = True) -> Optional[Tuple[str, Tuple[Any, ...]]]:
    """("tensor", path) for a tensor inside value, else (with keys) ("key",
    path) for a dict key that is not a str, else None.  Iterative: any depth."""
    from collections.abc import Mapping

    from .io import _is_tensor

    bad_key: Optional[Tuple[str, Tuple[Any, ...]]] = None
    todo: List[Tuple[Any, Tuple[Any, ...]]] = [(value, ())]
    while todo:
        x, path = todo.pop()
        if _is_tensor(x):
            return "tensor", path
        if isinstance(x, Mapping):
            for k, y in x.items():
                if keys and bad_key is None and not isinstance(k, str):
                    bad_key = "key", path + (k,)
                todo.append((y, path + (k,)))
        elif isinstance(x, (list, tuple)):
            todo.extend((y, path + (i,)) for i, y in enumerate(x))
    return bad_key


def _json_text(key: str, value: Any, flatten: bool) -> str:
    """A checkpoint entry as JSON text that torch_load parses back, or a ValueError naming the entry."""
    from .io import json_parse

    problem = _first_problem(value)
    if problem is not None:
        kind, path = problem
        if kind == "tensor":
            in_dicts = all(isinstance(k, str) for k in path)  # else a list holds it: --flatten cannot
            hint = "--flatten writes nested dicts of tensors as dotted names, " if in_dicts and not flatten else ""
            raise ValueError(f"convert: checkpoint entry {key!r} holds a tensor at {_where((key,) + path)} and "
                             f"safetensors metadata is JSON text: {hint}--drop {key} leaves the entry out")
        raise ValueError(f"convert: checkpoint entry {key!r} has the key {path[-1]!r} ({type(path[-1]).__name__}) "
                         f"at {_where((key,) + path[:-1])}: JSON keys are strings (--drop {key} leaves the entry out)")
    try:
        text = cast(str, json_stringify(value))
        json_parse(text)  # what torch_load reads back: nesting depth, 64-bit integers
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise ValueError(f"convert: checkpoint entry {key!r} ({type(value).__name__}) cannot be safetensors "
                         f"metadata, which holds JSON text: {exc} (--drop {key} leaves the entry out)") from exc
    return text


class _Split:
    """A checkpoint split for safetensors: tensors by name, the other entries
    as JSON text, the optimizer states left out, the dicts --flatten
    flattened (``tree``, with each name's key path in ``paths``)."""

    def __init__(self) -> None:
        self.tensors: Dict[str, Any] = {}
        self.values: Dict[str, str] = {}
        self.optimizers: Dict[str, Any] = {}
        self.tree: Dict[str, Any] = {}
        self.paths: Dict[str, Tuple[str, ...]] = {}  # name -> full key path in the checkpoint
        self.source = ""

    def flatten(self, root: Any, path: Tuple[str, ...], skip: int) -> None:
        """Add every tensor under the dict at path by dotted name (its key path
        less the first skip keys); each dict met goes into the tree.  A
        non-tensor leaf or two paths giving one name is a ValueError."""
        from collections.abc import Mapping

        from .io import _is_tensor

        sub = self.tree
        for k in path[skip:]:
            sub = sub.setdefault(k, {})
        todo = [(root, path, sub)]
        while todo:  # iterative: any depth
            node, path, sub = todo.pop()
            for k, v in node.items():
                p = path + (k,)
                if not isinstance(k, str):
                    raise ValueError(f"convert --flatten: {_where(path)} has the key {k!r} ({type(k).__name__}): "
                                     "tensor names are strings")
                if _is_tensor(v):
                    self.add(".".join(p[skip:]), v, p)
                elif isinstance(v, Mapping):
                    sub[k] = {}
                    todo.append((v, p, sub[k]))
                else:
                    raise ValueError(f"convert --flatten: {_where(p)} is a {type(v).__name__} among tensors: only "
                                     f"dicts of tensors are flattened (--drop {p[0]} leaves the entry out)")

    def add(self, name: str, tensor: Any, path: Tuple[str, ...]) -> None:
        if name in self.tensors:
            raise ValueError(f"convert --flatten: {_where(path)} and {_where(self.paths[name])} would both be "
                             f"the tensor {name!r}")
        self.tensors[name], self.paths[name] = tensor, path

    def check_names(self, skip: int) -> None:
        """torch_load(unflatten=True) must split each name back into its key path."""
        from .io import _split_name

        lengths: Dict[int, Any] = {}
        for name, path in self.paths.items():
            back = tuple(_split_name(name, self.tree, lengths))
            if back != path[skip:]:
                raise ValueError(f"convert --flatten: the tensor {_where(path)}, named {name!r}, would come back "
                                 f"as {_where(path[:skip] + back)}: a key holding a dot clashes with a nested "
                                 "dict; rename it, or convert without --flatten")


def _split_for_flat(data: Any, module_key: Optional[str], flatten: bool) -> _Split:
    """The tensors, JSON values and optimizer states of a checkpoint for safetensors.

    Tensors: with --module-key K, entry K; else the top-level tensors, or else
    the first dict of tensors.  With --flatten, every tensor in nested dicts
    under K (names relative to K) or under the top level, by dotted name.
    Every other entry becomes JSON text; an entry like torch's
    Optimizer.state_dict() is set apart (not with --module-key naming it)."""
    from collections.abc import Mapping

    from .io import DEFAULT_MODULE_KEY, _is_tensor, _is_tensor_dict

    out = _Split()
    for k in data:
        if not isinstance(k, str):
            raise ValueError(f"convert: checkpoint key {k!r} ({type(k).__name__}) is not a str: safetensors "
                             "names and metadata keys are strings")
        if k.startswith("mlutils."):
            raise ValueError(f"convert: checkpoint entry {k!r}: metadata keys starting with 'mlutils.' are "
                             f"reserved for the file's own bookkeeping (--drop {k} leaves the entry out)")
    rest: Dict[str, Any] = {}
    for k, v in data.items():
        if k != module_key and _is_optimizer_state(v):
            out.optimizers[k] = v
        else:
            rest[k] = v
    if module_key is not None and module_key not in rest:
        raise ValueError(f"convert: --module-key {module_key!r} is not in the checkpoint "
                         f"(keys: {', '.join(sorted(data))})")
    used: List[str] = []  # the entries that hold the tensors
    if module_key is not None:
        used = [module_key]
        v = rest[module_key]
        if flatten and isinstance(v, Mapping):
            out.flatten(v, (module_key,), 1)
            out.check_names(1)
            out.source = f"checkpoint entry {module_key!r}, flattened"
        elif not _is_tensor_dict(v):
            hint = " (nested dicts of tensors: add --flatten)" if isinstance(v, Mapping) and not flatten else ""
            raise ValueError(f"convert: --module-key {module_key!r} is not a dict of tensors{hint}")
        else:
            out.tensors = dict(v)
            out.source = f"checkpoint entry {module_key!r}"
    elif flatten:
        for k, v in rest.items():
            if _is_tensor(v):
                out.add(k, v, (k,))
            elif isinstance(v, Mapping) and _first_problem(v, keys=False) is not None:
                out.flatten(v, (k,), 0)
            else:
                continue
            used.append(k)
        out.check_names(0)
        out.source = f"{', '.join(map(repr, used))}, flattened"
    elif any(_is_tensor(v) for v in rest.values()):
        used = [k for k, v in rest.items() if _is_tensor(v)]
        out.tensors = {k: rest[k] for k in used}
        out.source = "the checkpoint's top-level tensors"
    else:
        used = [k for k, v in rest.items() if _is_tensor_dict(v)][:1]
        if used:
            out.tensors = dict(rest[used[0]])
            out.source = f"checkpoint entry {used[0]!r}"
    if not out.tensors:
        raise ValueError("convert: no tensors found in the checkpoint to write as safetensors (nested dicts of "
                         "tensors need --flatten; --module-key KEY names the entry holding them)")
    for k, v in rest.items():
        if k in used:
            continue
        if k == DEFAULT_MODULE_KEY:
            raise ValueError(f"convert: checkpoint entry {k!r} would be metadata named like the tensors, which "
                             f"torch_load returns under {k!r}: --drop {k} leaves the entry out")
        out.values[k] = _json_text(k, v, flatten)
    return out


def _copy_shared(tensors: Dict[str, Any]) -> List[str]:
    """Make tensors that share memory separate copies (safetensors has no
    shared storage); one line per group of names for stderr."""
    import numpy as np

    from ._safetensors import _shared_groups

    notes = []
    for group in _shared_groups(tensors):
        names = sorted(a.name for a in group)
        keep = next((n for n in names if any(a.name == n and a.complete for a in group)), None)
        for n in names:
            if n != keep:
                tensors[n] = np.array(tensors[n], copy=True, order="C")
        notes.append(f"{', '.join(map(repr, names))} share memory: each is written as its own copy "
                     "(safetensors has no shared storage)")
    return notes


def _note(text: str) -> None:
    print(f"mlutils convert: {text}", file=sys.stderr)


def cmd_convert(args: argparse.Namespace) -> int:
    from collections.abc import Mapping

    from ._safetensors import save_file
    from .io import DEFAULT_MODULE_KEY, NESTED_KEY, VALUES_KEY, torch_load, torch_save

    src, dst = args.input, args.output
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("convert: input and output are the same file")
    src_fmt, dst_fmt = format_for(src), format_for(dst)
    if src_fmt is dst_fmt:
        raise ValueError("convert: one side must be .pt/.pth and the other .safetensors/.sft")
    if not dst_fmt.flat:
        for flag, on in (("--flatten", args.flatten), ("--keep-optimizer", args.keep_optimizer)):
            if on:
                raise ValueError(f"convert: {flag} applies when writing safetensors, not {dst_fmt.name}")
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
    if not dst_fmt.flat:
        with _WriteProgress(dst, total):
            torch_save(data, dst)
        print(f"wrote {dst} ({_human(os.path.getsize(dst))})")
        return 0
    if not isinstance(data, Mapping):
        raise ValueError(f"convert: {src} holds a {type(data).__name__}, not a dict: it cannot be safetensors")
    split = _split_for_flat(data, args.module_key, args.flatten)
    opt_path = os.path.splitext(dst)[0] + ".optimizer.pt"
    if args.keep_optimizer:
        if not split.optimizers:
            raise ValueError("convert: --keep-optimizer: no optimizer state in the checkpoint (an entry like "
                             "torch's Optimizer.state_dict(): 'state' and 'param_groups')")
        if os.path.exists(opt_path) and os.path.samefile(opt_path, src):
            raise ValueError(f"convert: --keep-optimizer would write {opt_path}, the input file")
    for note in _copy_shared(split.tensors):
        _note(note)
    metadata = dict(split.values)
    metadata.setdefault("format", "pt")
    metadata[VALUES_KEY] = cast(str, json_stringify(list(split.values)))
    if args.flatten:
        metadata[NESTED_KEY] = cast(str, json_stringify(split.tree))
    print(f"tensors: {split.source}; metadata: {', '.join(sorted(split.values)) or 'none'}")
    for k in split.optimizers:
        if args.keep_optimizer:
            _note(f"optimizer state {k!r} goes to {opt_path}")
        else:
            _note(f"left out {k!r}, an optimizer state (--keep-optimizer writes it to {opt_path})")
    with _WriteProgress(dst, total):
        save_file(split.tensors, dst, metadata=metadata)
    print(f"wrote {dst} ({_human(os.path.getsize(dst))})")
    if args.keep_optimizer:
        torch_save(split.optimizers, opt_path)
        print(f"wrote {opt_path} ({_human(os.path.getsize(opt_path))})")
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
                   help="leave this checkpoint entry out (repeatable)")
    p.add_argument("--flatten", action="store_true",
                   help="to safetensors: write the tensors of nested dicts under dotted names (model.encoder.w); "
                        "torch_load(..., unflatten=True) nests them again")
    p.add_argument("--keep-optimizer", action="store_true",
                   help="to safetensors: write the optimizer state (left out otherwise) to OUT's stem + "
                        "'.optimizer.pt'")
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
