"""The .pt writer writes nothing our .pt reader refuses, and says why in the reader's words.

torch.save writes each object here; our reader is the judge of its file.
Where the reader refuses it, our writer (byte for byte torch.save
otherwise) must refuse the object too, its message the reader's rule
without the reader's location ("'path': tensor at byte N: "), followed by
where in the object the problem is.  Where the reader accepts it, our
writer writes the same bytes as torch.save."""
import re
import sys

import pytest

from mlutils import TorchFormatError, _ptload, _ptsave

pytestmark = pytest.mark.timeout(300)

# The reader's location before a rule: the file, then the pickle offset when a tensor is at fault.
LOCATION = re.compile(r"^'[^']*': (?:tensor (?:rebuild )?at byte \d+: )?")


def _reader_verdict(torch, make, tmp_path):
    """None when our reader loads torch.save's file of make(), else its rule (location stripped)."""
    p = tmp_path / "torch.pt"
    torch.save(make(), p)
    try:
        _ptload.load(p)
        _ptload.verify(p)
    except TorchFormatError as e:
        return LOCATION.sub("", str(e)), p.read_bytes()
    return None, p.read_bytes()


def _writer_verdict(make, tmp_path):
    p = tmp_path / "ours" / "torch.pt"  # the same archive name as torch's file
    p.parent.mkdir(exist_ok=True)
    p.unlink(missing_ok=True)
    try:
        _ptsave.save(make(), p)
    except ValueError as e:
        assert not p.exists()
        return str(e), None
    return None, p.read_bytes()


def _agree(torch, make, tmp_path, where):
    """make: makes the object (a failing test then never prints it: a tensor whose storage
    was cut would be read out of bounds by its repr)."""
    rule, theirs = _reader_verdict(torch, make, tmp_path)
    msg, ours = _writer_verdict(make, tmp_path)
    if rule is None:
        assert msg is None, msg
        assert len(ours) == len(theirs)  # the same layout (the serialization id aside)
        return None
    assert msg is not None, f"our writer wrote what our reader refuses: {rule}"
    assert msg == f"{rule}{where}", (msg, rule)
    return rule


def test_more_dimensions_than_the_reader_takes(torch, tmp_path):
    assert _agree(torch, lambda: {"t": torch.zeros((1,) * 64)}, tmp_path, "") is None
    rule = _agree(torch, lambda: {"t": torch.zeros((1,) * 65)}, tmp_path, " at obj['t']")
    assert "(<= 64)" in rule
    # a NumPy array cannot have more than 64: nothing to refuse there


@pytest.mark.parametrize("keep", [0, 4, 12])
def test_view_outside_its_storage(torch, tmp_path, keep):
    """A storage resized after its tensor was made: the view reaches past its bytes."""
    t = torch.arange(4, dtype=torch.float32)
    t.untyped_storage().resize_(keep)
    rule = _agree(torch, lambda: {"a": [t]}, tmp_path, " at obj['a'][0]")
    assert "out of bounds" in rule and f"which holds {keep}" in rule
    # the same tensor as a Parameter's data
    p = torch.nn.Parameter(torch.arange(4, dtype=torch.float32))
    p.untyped_storage().resize_(keep)
    assert _agree(torch, lambda: {"p": p}, tmp_path, " at obj['p']") == rule


def test_view_inside_a_shrunk_storage_is_fine(torch, tmp_path):
    t = torch.arange(8, dtype=torch.float32)[:2]
    t.untyped_storage().resize_(8)
    assert _agree(torch, lambda: {"t": t}, tmp_path, "") is None


NO_LEAF = object()


def _nested(depth, leaf=NO_LEAF):
    """`depth` nested lists, the innermost holding leaf (when given)."""
    obj = [] if leaf is NO_LEAF else [leaf]
    for _ in range(depth - 1):
        obj = [obj]
    return obj


@pytest.fixture
def deep_recursion():
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20000))
    yield
    sys.setrecursionlimit(old)


@pytest.mark.parametrize("depth,leaf,ok", [
    (1000, 7, True),        # the int is at depth 1000: the reader's deepest
    (1001, NO_LEAF, True),  # the innermost list at depth 1000
    (1001, 7, False),       # the int one deeper
    (1002, NO_LEAF, False),
    (1500, NO_LEAF, False),
])
def test_nesting_deeper_than_the_reader_converts(torch, tmp_path, deep_recursion, depth, leaf, ok):
    rule = _agree(torch, lambda: _nested(depth, leaf), tmp_path, "")
    assert (rule is None) == ok, rule
    if not ok:
        assert rule == "objects in the pickle are nested deeper than 1000 levels"


@pytest.mark.parametrize("leaf", ["s", (), None, True, False])
def test_deep_repeats_of_what_the_reader_has_met_are_fine(torch, tmp_path, deep_recursion, leaf):
    """The reader converts a memoized object (and None, True, False, (), which its VM shares)
    once, where it first meets it: met shallow, it may sit deeper than the limit too."""
    if leaf == "s":
        leaf = "a string object"
    deep = _nested(1000, leaf)  # the innermost list at depth 1000, leaf at 1001
    assert _agree(torch, lambda: [leaf, deep], tmp_path, "") is None
    # met there first: refused
    assert _agree(torch, lambda: [deep, leaf], tmp_path, "") is not None


def test_deep_repeat_of_a_container_is_fine(torch, tmp_path, deep_recursion):
    shared = {"k": [1, 2]}
    deep = _nested(1000, shared)
    assert _agree(torch, lambda: [shared, deep], tmp_path, "") is None
    assert _agree(torch, lambda: [deep, shared], tmp_path, "") is not None
