"""Devices and where a model's modules go on them: get_devices,
get_device_properties, get_model_offload_policy and offload_model."""
from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Union

from .._torch import optional_torch, require_torch
from .mappings import passes_policy
from .modules import get_module_size
from .tensors import tree_map

if TYPE_CHECKING:
    import torch

__all__ = ["get_devices", "get_device_properties", "get_model_offload_policy", "offload_model"]

# the logger these helpers have always used, whichever module they live in
log = logging.getLogger(__package__)


def get_devices() -> List[str]:
    """Usable device names: ``cuda:0`` .. ``cuda:N-1`` then ``cpu`` (just ``cpu`` without torch or CUDA)."""
    torch = optional_torch()
    if torch is None:
        return ["cpu"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] + ["cpu"]


def _cpu_memory() -> Tuple[int, int]:
    """(available, total) bytes of host memory."""
    try:
        info: Dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        total = info["MemTotal"]
        return info.get("MemAvailable", info.get("MemFree", total)), total
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        raise OSError("get_device_properties: cannot read the host's memory size") from None


def get_device_properties(device: Union[str, torch.device]) -> Dict[str, Any]:
    """``{"name", "total", "free", "props"}`` for a device name: bytes of memory in all and free now."""
    name = str(device)
    if name.startswith("cuda"):
        torch = require_torch("get_device_properties")
        if not torch.cuda.is_available():
            raise ValueError(f"get_device_properties: {name} requested but CUDA is not available")
        props = torch.cuda.get_device_properties(name)
        free, total = torch.cuda.mem_get_info(name)
        return {"name": name, "total": int(total), "free": int(free), "props": props}
    if name == "cpu" or name.startswith("cpu:"):
        free, total = _cpu_memory()
        return {"name": name, "total": total, "free": free, "props": None}
    raise ValueError(f"get_device_properties: unsupported device {name!r} (cuda:N or cpu)")


def _device_entry(spec: Any) -> Dict[str, Any]:
    """A policy device (a name, or a dict with "name" and optionally "free"/"total") as a working dict."""
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"offload policy: device entry {dict(spec)!r} has no 'name'")
        entry = dict(spec)
        entry["name"] = str(entry["name"])
        if "free" not in entry:
            entry.update({k: v for k, v in get_device_properties(entry["name"]).items() if k not in entry})
        entry.setdefault("total", entry["free"])
        entry.setdefault("props", None)
    else:
        entry = get_device_properties(spec)
    if isinstance(entry["free"], bool) or not isinstance(entry["free"], int) or entry["free"] < 0:
        raise ValueError(f"offload policy: free memory of {entry['name']} must be an int >= 0, got {entry['free']!r}")
    entry["modules"] = []
    return entry


def _cap(limit: Any, total_size: int, index: int) -> Optional[int]:
    """A device's budget from a policy limit: ints are bytes, floats a fraction of the model; <= 0 / None: none."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise ValueError(f"offload policy: limits[{index}] must be a number of bytes or a fraction, got {limit!r}")
    if isinstance(limit, float) and not math.isfinite(limit):
        raise ValueError(f"offload policy: limits[{index}] is {limit!r}")
    if limit <= 0:
        return None
    if isinstance(limit, float):
        return int(math.floor(total_size * limit))
    return int(limit)


def _fmt_bytes(n: int) -> str:
    return f"{n} bytes ({n / (1 << 20):.2f} MiB)"


def _placement_units(module: torch.nn.Module, policy: Mapping[str, Any]) -> List[Tuple[str, int]]:
    """(name, bytes) of the modules to place, in model order.

    A unit is a leaf module, or a parent's own parameters and buffers (moved
    without its children).  Units holding nothing and names the policy
    filters out are left alone.
    """
    units = []
    for name, m in module.named_modules():
        leaf = not any(True for _ in m.children())
        size = get_module_size(m, recurse=leaf)
        if size and passes_policy(policy, name):
            units.append((name, size))
    return units


def get_model_offload_policy(module: torch.nn.Module, policy: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
    """Assign a model's leaf modules to devices within memory budgets; the devices that got modules.

    ``policy`` keys (all optional):

    * ``devices`` (or ``device``): device names, or dicts ``{"name", "free"}``
      giving the free bytes (no query, handy for planning); default
      :func:`get_devices` (CUDA devices, then ``cpu``).
    * ``limits``: one per device: an ``int`` is bytes, a ``float`` a fraction
      of the size of the modules being placed; 0, negative or None is no cap.
      A cap never raises a device above its free memory.
    * ``assign``: one list of name substrings per device; matching modules go
      to that device first while they fit, the rest join the others.
    * ``include`` / ``exclude``: which module names take part
      (:func:`passes_policy`; default every module).

    Remaining modules fill the devices in model order, moving to the next
    device when one is full (so the default device list spills onto ``cpu``).
    A module that fits nowhere raises ValueError naming it, its size and each
    device's budget (the original asserted).  Returns a list of dicts
    ``{"name", "free" (left), "total", "modules": [names]}``.
    """
    if policy is None:
        policy = {}
    elif not isinstance(policy, Mapping):
        raise TypeError(f"offload policy must be a dict or None, got {type(policy).__name__}")
    if "devices" in policy and "device" in policy:
        raise ValueError("offload policy: give 'devices' or 'device', not both")
    specs = policy.get("devices", policy.get("device"))
    if specs is None:
        specs = get_devices()
    elif isinstance(specs, (str, Mapping)):
        specs = [specs]
    devices = [_device_entry(s) for s in specs]
    if not devices:
        raise ValueError("offload policy: no devices")
    limits = list(policy.get("limits") or [])
    assign = list(policy.get("assign") or [])
    for key, values in (("limits", limits), ("assign", assign)):
        if len(values) > len(devices):
            raise ValueError(f"offload policy: {len(values)} {key} for {len(devices)} devices")

    units = _placement_units(module, policy)
    total_size = sum(size for _, size in units)

    for i, limit in enumerate(limits):
        cap = _cap(limit, total_size, i)
        if cap is not None and cap < devices[i]["free"]:
            devices[i]["free"] = cap
    budgets = [d["free"] for d in devices]

    placed = set()
    for i, patterns in enumerate(assign):
        if not patterns:
            continue
        if isinstance(patterns, str):
            patterns = [patterns]
        device = devices[i]
        for name, size in units:
            if name in placed or not passes_policy({"include": list(patterns)}, name):
                continue
            if size <= device["free"]:
                device["modules"].append(name)
                device["free"] -= size
                placed.add(name)
            else:
                log.info("offload: %s (%s) assigned to %s does not fit there; placing it with the rest",
                         name, _fmt_bytes(size), device["name"])

    d = 0
    for name, size in units:
        if name in placed:
            continue
        while d < len(devices) and size > devices[d]["free"]:
            log.info("offload: %s is full, moving on from %s (%s)", devices[d]["name"], name, _fmt_bytes(size))
            d += 1
        if d == len(devices):
            budget = ", ".join(
                f"{dev['name']}: {_fmt_bytes(b)} budget, {_fmt_bytes(dev['free'])} left" for dev, b in zip(devices, budgets)
            )
            raise ValueError(
                f"offload policy cannot place module {name!r} of {_fmt_bytes(size)} "
                f"(model part being placed: {_fmt_bytes(total_size)}); devices: {budget}. "
                "Raise the limits or add a device such as 'cpu'."
            )
        devices[d]["modules"].append(name)
        devices[d]["free"] -= size
        placed.add(name)

    return [dev for dev in devices if dev["modules"]]


def _move_tensors(x: Any, device: Union[str, torch.device]) -> Any:
    return tree_map(lambda t: t.to(device), x)


def _first_tensor_device(x: Any) -> Optional[torch.device]:
    found: List[torch.device] = []

    def grab(t: torch.Tensor) -> torch.Tensor:
        if not found:
            found.append(t.device)
        return t

    tree_map(grab, x)
    return found[0] if found else None


def offload_model(model: torch.nn.Module, policy: Optional[Mapping[str, Any]] = None) -> torch.nn.Module:
    """Move a model's modules to the devices :func:`get_model_offload_policy` picks; returns the model.

    Each placed module gets hooks that move its tensor inputs to its device
    and its outputs back to the device its first tensor input came from, so
    parents that mix the outputs of children on different devices keep
    working.  A parent placed for its own parameters moves only those (its
    children go where they were placed, with their own hooks).  The
    plan is kept in ``model.offload_plan`` as ``{module name: device}``.
    """
    plan = get_model_offload_policy(model, policy=policy)
    for handle in getattr(model, "_mlutils_offload_hooks", ()):  # offloading again replaces the hooks
        handle.remove()
    handles: List[Any] = []
    where: Dict[str, str] = {}
    for device in plan:
        for name in device["modules"]:
            where[name] = device["name"]
    for name, device in where.items():
        m = model.get_submodule(name)
        leaf = not any(True for _ in m.children())
        if leaf:
            m.to(device)
        else:
            m._apply(lambda t, device=device: t.to(device), recurse=False)

        def pre_hook(mod: torch.nn.Module, args: Any, kwargs: Any, device: str = device) -> Any:
            mod._mlutils_input_device = _first_tensor_device((args, kwargs))
            return _move_tensors(args, device), _move_tensors(kwargs, device)

        def post_hook(mod: torch.nn.Module, args: Any, output: Any) -> Any:
            back = getattr(mod, "_mlutils_input_device", None)
            return output if back is None else _move_tensors(output, back)

        handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(post_hook))
    model._mlutils_offload_hooks = handles
    model.offload_plan = where
    return model
