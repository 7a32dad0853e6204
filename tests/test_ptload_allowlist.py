"""The .pt reader's GLOBAL allowlist is exactly torch.load(weights_only=True)'s, compared both
ways with torch's own table (torch._weights_only_unpickler._get_allowed_globals, which holds the
rebuild functions of _tensor_rebuild_functions, the dtypes, storage and tensor classes)."""
import importlib
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _pthelpers as H  # noqa: E402

from mlutils import TorchFormatError, UnsafePickleError, _core, _ptload  # noqa: E402

# Globals torch allows that this reader refuses as unsafe, with the reason.  None today: every
# entry of torch's table is either built here or refused as "allowed by torch but not supported".
EXCEPTIONS: dict = {}


def torch_table(torch):
    from torch import _weights_only_unpickler as W

    table = set(W._get_allowed_globals())
    assert {f"torch._utils.{f.__name__}" for f in W._tensor_rebuild_functions()} <= table
    return table


def ours():
    return {f"{m}.{n}": supported for m, n, supported in _core._pk_allowlist()}


def probe(path, full):
    """What loading `GLOBAL full; STOP` gives: "ok" (built), "unsupported" or "unsafe"."""
    module, name = full.rsplit(".", 1)
    path.write_bytes(H.pt_file(H.proto() + H.glob(module, name) + H.STOP))
    try:
        _ptload.load(path, framework="np")
    except UnsafePickleError as e:
        assert "not on the weights-only allowlist" in str(e)
        return "unsafe"
    except TorchFormatError as e:
        if "allowed by torch but not supported" in str(e):
            return "unsupported"
        assert "cannot be returned as a value" in str(e), str(e)
    return "ok"


def test_table_equals_torch_both_ways(torch):
    table, mine = torch_table(torch), ours()
    assert len(mine) == len(_core._pk_allowlist())  # no entry listed twice
    missing = table - set(mine) - set(EXCEPTIONS)
    assert not missing, f"allowed by torch, refused as unsafe here: {sorted(missing)}"
    extra = set(mine) - table
    assert not extra, f"accepted here, refused by torch: {sorted(extra)}"


def test_every_torch_global_behaves_as_listed(torch, tmp_path):
    mine = ours()
    for full in sorted(torch_table(torch)):
        got = probe(tmp_path / "g.pt", full)
        if full in EXCEPTIONS:
            assert got == "unsafe", full
        else:
            assert got == ("ok" if mine[full] else "unsupported"), full


def candidates():
    """Names an allowlist could wrongly accept: everything these modules hold, dtype aliases,
    Python 2 spellings."""
    out = set()
    for mod in ("torch", "torch.nn", "torch.nn.parameter", "torch._utils", "torch._tensor", "torch.storage",
                "torch.serialization", "torch.cuda", "torch.sparse", "collections", "builtins", "_codecs",
                "copyreg", "os", "numpy"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        out |= {f"{mod}.{n}" for n in dir(m) if n.isidentifier()}
    out |= {"torch.float", "torch.half", "torch.double", "torch.long", "torch.int", "torch.short", "torch.cfloat",
            "torch.cdouble", "torch.chalf", "torch.ComplexFloatTensor", "torch.QInt8Tensor", "torch.FooStorage",
            "torch.xTensor", "__builtin__.dict", "__builtin__.eval", "torch.nn.Parameter"}
    return out


def test_nothing_outside_torchs_table_is_accepted(torch, tmp_path):
    table = torch_table(torch)
    wrong = []
    p = tmp_path / "c.pt"
    for full in sorted(candidates() - table):
        if full.startswith("__builtin__.") and "builtins." + full.split(".", 1)[1] in table:
            continue  # protocol 2's spelling of an allowed builtin (torch maps it too)
        if probe(p, full) != "unsafe":
            wrong.append(full)
    assert not wrong, f"accepted here, refused by torch.load(weights_only=True): {wrong}"


@pytest.mark.parametrize("full", ["torch.float", "torch.half", "torch.long", "torch.cfloat"])
def test_dtype_aliases_refused_like_torch(torch, tmp_path, full):
    module, name = full.rsplit(".", 1)
    p = tmp_path / "a.pt"
    p.write_bytes(H.pt_file(H.proto() + b"}" + H.ustr("d") + H.glob(module, name) + b"s" + H.STOP))
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(p, weights_only=True)
    for fn in (lambda: _ptload.load(p), lambda: _ptload.verify(p), lambda: _ptload.read_index(p)):
        with pytest.raises(UnsafePickleError, match=f"GLOBAL {full} at byte"):
            fn()
