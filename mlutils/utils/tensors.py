"""Helpers on torch tensors and dtypes: coerce_dtype, tree_map, to_device and resize_weight."""
from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Callable, Union

from .._torch import loaded_torch, require_torch

if TYPE_CHECKING:
    import torch

__all__ = ["coerce_dtype", "tree_map", "to_device", "resize_weight"]


_DTYPE_ALIASES = {
    "half": "float16",
    "fp16": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "float": "float32",
    "fp32": "float32",
    "f32": "float32",
    "single": "float32",
    "double": "float64",
    "fp64": "float64",
    "f64": "float64",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "float8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "i8": "int8",
    "u8": "uint8",
    "i16": "int16",
    "short": "int16",
    "i32": "int32",
    "int": "int32",
    "i64": "int64",
    "long": "int64",
}


def coerce_dtype(s: Union[str, torch.dtype]) -> torch.dtype:
    """A torch dtype from a name ("float16", "bf16", "fp32", "int8", "torch.half", ...); dtypes pass through.

    Unknown names raise ValueError naming them (the original quietly gave
    float32); anything else that is not a dtype raises TypeError.
    """
    torch = require_torch("coerce_dtype")
    if isinstance(s, torch.dtype):
        return s
    if not isinstance(s, str):
        raise TypeError(f"coerce_dtype: expected a dtype or its name, got {type(s).__name__}")
    name = s.strip().lower()
    if name.startswith("torch."):
        name = name[len("torch."):]
    name = _DTYPE_ALIASES.get(name, name)
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"coerce_dtype: unknown dtype name {s!r}")
    return dtype


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def tree_map(fn: Callable[[torch.Tensor], Any], x: Any) -> Any:
    """Apply ``fn`` to every tensor in nested lists, tuples and dicts; other leaves are kept.

    Containers keep their type: tuples stay tuples (the original returned a
    generator), namedtuples stay the same namedtuple, OrderedDict and
    defaultdict stay what they were.  Without torch nothing is a tensor.
    """
    torch = loaded_torch()
    tensor_type = torch.Tensor if torch is not None else None

    def walk(v: Any) -> Any:
        if tensor_type is not None and isinstance(v, tensor_type):
            return fn(v)
        if isinstance(v, list):
            return type(v)(walk(i) for i in v) if type(v) is not list else [walk(i) for i in v]
        if _is_namedtuple(v):
            return type(v)(*(walk(i) for i in v))
        if isinstance(v, tuple):
            return type(v)(walk(i) for i in v)
        if isinstance(v, dict):
            items = [(k, walk(i)) for k, i in v.items()]
            if type(v) is dict:
                return dict(items)
            if isinstance(v, collections.defaultdict):
                return type(v)(v.default_factory, items)
            return type(v)(items)
        return v

    return walk(x)


def to_device(x: Any, *args: Any, **kwargs: Any) -> Any:
    """Every tensor in nested lists, tuples and dicts moved with ``tensor.to(*args, **kwargs)``."""
    return tree_map(lambda t: t.to(*args, **kwargs), x)


def resize_weight(weight: torch.Tensor, target: int, dim: int = 0, random: bool = True) -> torch.Tensor:
    """``weight`` trimmed or extended to ``target`` entries along ``dim`` (a new tensor when it changes).

    New entries are drawn from a normal distribution with the mean and standard
    deviation of the existing weight when ``random`` (zeros for integer
    weights and weights of fewer than two elements), else zeros; same dtype
    and device.  (The
    original drew from uniform [0, 1), whose mean is 0.5, and ignored ``dim``.)
    """
    torch = require_torch("resize_weight")
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValueError(f"resize_weight: target must be an int >= 0, got {target!r}")
    if not -weight.dim() <= dim < weight.dim():
        raise ValueError(f"resize_weight: dim {dim} out of range for a {weight.dim()}-d weight")
    current = weight.shape[dim]
    if target == current:
        return weight
    if target < current:
        return weight.narrow(dim, 0, target).clone()
    shape = list(weight.shape)
    shape[dim] = target - current
    extra = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
    if random and weight.numel() > 1 and weight.is_floating_point():
        w = weight.detach().float()
        std, mean = torch.std_mean(w)
        extra.copy_(torch.randn(shape, device=weight.device, dtype=w.dtype) * std + mean)
    return torch.cat([weight.detach(), extra], dim=dim)
