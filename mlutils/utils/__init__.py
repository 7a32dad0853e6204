"""Helpers that need no dedicated module (same names as the original utils).

Every name is importable from ``mlutils.utils`` as before; each lives in the
module of its concern:

* :mod:`.values`: ``clamp``, ``coalese``/``coalesce``, ``truncate_json``
* :mod:`.hashing`: ``md5_hash``
* :mod:`.timing`: ``timer``
* :mod:`.mappings`: ``flatten_dict``, ``prune_missing``, ``passes_policy``, ``convert_kwargs``
* :mod:`.rng`: ``set_seed``
* :mod:`.tensors`: ``coerce_dtype``, ``tree_map``, ``to_device``, ``resize_weight``
* :mod:`.modules`: ``StateDictReport``, ``load_state_dict_non_strict``,
  ``gather_attribute``, ``dispatch_attribute``, ``get_module_size``
* :mod:`.placement`: ``get_devices``, ``get_device_properties``,
  ``get_model_offload_policy``, ``offload_model``

Nothing here imports torch at import time: functions that need it import it
when called (through :mod:`mlutils._torch`) and raise
:class:`~mlutils.TorchNotInstalledError` (an ImportError) saying so when it is
missing.  ``MLUTILS_NO_TORCH=1`` makes them behave as if torch were not installed.
They log on the ``mlutils.utils`` logger.
"""
from .._torch import require_torch
from .hashing import md5_hash
from .mappings import convert_kwargs, flatten_dict, passes_policy, prune_missing
from .modules import StateDictReport, dispatch_attribute, gather_attribute, get_module_size, load_state_dict_non_strict
from .placement import get_device_properties, get_devices, get_model_offload_policy, offload_model
from .rng import set_seed
from .tensors import coerce_dtype, resize_weight, to_device, tree_map
from .timing import timer
from .values import clamp, coalesce, coalese, truncate_json

__all__ = [
    "truncate_json",
    "md5_hash",
    "prune_missing",
    "clamp",
    "timer",
    "flatten_dict",
    "set_seed",
    "coerce_dtype",
    "tree_map",
    "to_device",
    "coalese",
    "coalesce",
    "passes_policy",
    "convert_kwargs",
    "StateDictReport",
    "load_state_dict_non_strict",
    "gather_attribute",
    "dispatch_attribute",
    "resize_weight",
    "get_devices",
    "get_device_properties",
    "get_module_size",
    "get_model_offload_policy",
    "offload_model",
]

# mlutils.offload and mlutils.unsloth import this name from here.
_torch = require_torch
