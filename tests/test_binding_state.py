"""The binding layer's module state: every type and exception it owns is
visited by the module's GC traverse (so none can leak or dangle)."""
import gc

from mlutils import _core

OWNED = [
    "MlutilsError", "JSONDecodeError", "SafetensorsError", "TorchFormatError",
    "UnsafePickleError", "SamplerStateError", "PatternError",
    "SafetensorsMap", "SamplerCursor", "PatternTable", "NcclComm",
]


def test_module_state_traverse_visits_every_owned_object():
    referents = gc.get_referents(_core)
    ids = {id(o) for o in referents}
    missing = [name for name in OWNED if id(getattr(_core, name)) not in ids]
    assert missing == []
