"""Configuration-driven swaps of building blocks (the original ``utils/wrapper.py``).

An :class:`Optimizations` value says which ``Linear``, ``Embedding`` and
optimizer classes to use (bitsandbytes 8-bit, BitNet, transformer_engine fp8,
D-Adaptation), whether to inject them into ``torch.nn`` / ``torch.optim``
globally or replace modules in place, whether to compile, offload the model
across devices, and turn on activation offload.  :func:`apply_optimizations`
ties it together.  The module attributes ``Linear``, ``Embedding``, ``Adam``,
``AdamW``, ``SGD`` and ``Adagrad`` are the classes the current configuration
(:func:`configure`) selects.

A missing optional package gives one ``RuntimeWarning`` per package and
torch's own class instead.  Nothing imports torch until it is needed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from ._torch import require_torch
from .utils import coerce_dtype, offload_model, prune_missing

if TYPE_CHECKING:
    import torch

__all__ = [
    "Optimizations",
    "Selection",
    "configure",
    "current",
    "select",
    "inject",
    "uninject",
    "Injection",
    "replace_linear",
    "replace_embedding",
    "replace_attention",
    "autocast",
    "available_backends",
    "compile_model",
    "enable_activation_offload",
    "apply_optimizations",
]
# Linear, Embedding, Adam, AdamW, SGD and Adagrad are resolved on access (module
# __getattr__) and left out of __all__ so that `import *` works without torch.

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Optimizations:
    """The original ``cfg.optimizations`` switches.

    Features are off by default.  ``linear``, ``embedding`` and ``optimizers``
    say which kinds of class an enabled feature swaps, and default to on as
    in the original (so ``bitsandbytes=True`` alone swaps all three).
    """

    injects: bool = False  # overwrite torch.nn.Linear/Embedding and torch.optim.* globally
    replace: bool = False  # replace matching modules in place, keeping their weights
    compile: Union[bool, str] = False  # torch.compile the model; a string names the backend
    linear: bool = True  # swap Linear when a feature provides one
    embedding: bool = True  # swap Embedding when a feature provides one
    optimizers: bool = True  # swap Adam/AdamW/SGD/Adagrad when a feature provides them
    bitsandbytes: bool = False  # 8-bit Linear, Embedding and optimizers
    dadaptation: bool = False  # D-Adaptation optimizers (when bitsandbytes gives none)
    bitnet: bool = False  # BitNet's BitLinear
    fp8: bool = False  # transformer_engine Linear and fp8 autocast
    model_offloading: Optional[Dict[str, Any]] = None  # a policy for mlutils.utils.offload_model
    tensorrt: bool = False  # compile with the torch_tensorrt backend
    unsloth: bool = False  # offload checkpointed activations to CPU (mlutils.offload)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "compile":
                ok = isinstance(value, (bool, str))
            elif f.name == "model_offloading":
                ok = value is None or isinstance(value, Mapping)
            else:
                ok = isinstance(value, bool)
            if not ok:
                raise TypeError(f"Optimizations.{f.name}: unexpected {type(value).__name__} {value!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Optimizations":
        """Build from a config mapping; unknown keys raise ValueError naming them."""
        kept, missing = prune_missing(cls(), d, recurse=False)
        if missing:
            raise ValueError(f"Optimizations: unknown option(s) {', '.join(sorted(missing))}")
        return cls(**kept)


_CURRENT = Optimizations()
_WARNED: set = set()


def configure(opts: Optional[Optimizations] = None, **changes: Any) -> Optimizations:
    """Make ``opts`` (with ``changes`` applied) the configuration behind the module-level names; returns it."""
    global _CURRENT
    base = opts if opts is not None else Optimizations()
    if not isinstance(base, Optimizations):
        raise TypeError(f"configure: expected Optimizations, got {type(base).__name__}")
    _CURRENT = dataclasses.replace(base, **changes) if changes else base
    return _CURRENT


def current() -> Optimizations:
    """The configuration set by :func:`configure` (all features off by default)."""
    return _CURRENT


def _warn_once(package: str, text: str) -> None:
    if package in _WARNED:
        return
    _WARNED.add(package)
    warnings.warn(text, RuntimeWarning, stacklevel=4)


def _optional(module: str, package: str, feature: str, fallback: str = "torch's own classes") -> Any:
    """Import an optional module; None (and one warning per package) when it cannot be imported."""
    try:
        return importlib.import_module(module)
    except (Exception, SystemExit) as e:  # some packages exit or raise RuntimeError on a bad setup
        _warn_once(
            package,
            f"mlutils.wrapper: {feature} needs the optional package {package!r}, which cannot be "
            f"imported ({type(e).__name__}: {e}); using {fallback} instead",
        )
        return None


# ---------------------------------------------------------------------------
# choosing classes

_INJECTABLE = {
    "Linear": ("nn", "Linear"),
    "Embedding": ("nn", "Embedding"),
    "Adam": ("optim", "Adam"),
    "AdamW": ("optim", "AdamW"),
    "SGD": ("optim", "SGD"),
    "Adagrad": ("optim", "Adagrad"),
}
_ORIGINALS: Dict[str, Any] = {}  # torch's own classes, recorded before the first injection


def _torch_class(name: str) -> Any:
    """torch's own class for a selectable name, even while an injection replaces it."""
    if name in _ORIGINALS:
        return _ORIGINALS[name]
    torch = require_torch("mlutils.wrapper")
    owner, attr = _INJECTABLE[name]
    return getattr(getattr(torch, owner), attr)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The classes an :class:`Optimizations` value picks, and whether fp8 autocast is usable."""

    Linear: Any
    Embedding: Any
    Adam: Any
    AdamW: Any
    SGD: Any
    Adagrad: Any
    fp8: bool = False

    def as_dict(self) -> Dict[str, Any]:
        """The selected classes by name (``Linear``, ``Embedding``, ``Adam``, ...)."""
        return {name: getattr(self, name) for name in _INJECTABLE}


@functools.lru_cache(maxsize=None)
def _dadapt_adamw(base: Any) -> Any:
    """DAdaptAdam with decoupled weight decay, so AdamW keeps AdamW's meaning."""

    class DAdaptAdamW(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, decouple: bool = True, **kwargs: Any) -> None:
            super().__init__(*args, decouple=decouple, **kwargs)

    DAdaptAdamW.__qualname__ = DAdaptAdamW.__name__ = "DAdaptAdamW"
    return DAdaptAdamW


def select(opts: Optional[Optimizations] = None) -> Selection:
    """The classes ``opts`` picks (default: the current configuration).

    Linear: transformer_engine's when ``fp8``, else BitNet's when ``bitnet``,
    else bitsandbytes' ``Linear8bitLt`` when ``bitsandbytes`` (the original
    only used BitNet together with bitsandbytes).  Embedding: bitsandbytes'.
    Optimizers: bitsandbytes' 8-bit ones, else D-Adaptation's (AdamW with
    decoupled weight decay).  Anything not enabled, not in scope or not
    installed is torch's own.
    """
    opts = current() if opts is None else opts
    chosen = {name: _torch_class(name) for name in _INJECTABLE}
    fp8 = False
    optimizers_done = False
    if opts.bitsandbytes and (opts.linear or opts.embedding or opts.optimizers):
        bnb = _optional("bitsandbytes", "bitsandbytes", "bitsandbytes=True (8-bit layers and optimizers)")
        if bnb is not None:
            if opts.linear:
                chosen["Linear"] = bnb.nn.Linear8bitLt
            if opts.embedding:
                chosen["Embedding"] = bnb.nn.Embedding
            if opts.optimizers:
                chosen.update(Adam=bnb.optim.Adam8bit, AdamW=bnb.optim.AdamW8bit,
                              SGD=bnb.optim.SGD8bit, Adagrad=bnb.optim.Adagrad8bit)
                optimizers_done = True
    if opts.dadaptation and opts.optimizers and not optimizers_done:
        da = _optional("dadaptation", "dadaptation", "dadaptation=True (D-Adaptation optimizers)")
        if da is not None:
            chosen.update(Adam=da.DAdaptAdam, AdamW=_dadapt_adamw(da.DAdaptAdam),
                          SGD=da.DAdaptSGD, Adagrad=da.DAdaptAdaGrad)
    if opts.bitnet and opts.linear:
        bitnet = _optional("bitnet", "bitnet", "bitnet=True (BitLinear)")
        if bitnet is not None:
            chosen["Linear"] = bitnet.BitLinear
    if opts.fp8:
        te = _optional("transformer_engine.pytorch", "transformer_engine", "fp8=True (fp8 Linear and autocast)",
                       "torch's Linear and torch.autocast")
        if te is not None:
            fp8 = True
            if opts.linear:
                chosen["Linear"] = te.Linear
    return Selection(fp8=fp8, **chosen)


def __getattr__(name: str) -> Any:
    if name in _INJECTABLE:
        return getattr(select(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_INJECTABLE))


# ---------------------------------------------------------------------------
# injection into torch.nn / torch.optim


class Injection:
    """What :func:`inject` changed; ``undo()`` (or leaving a ``with`` block) restores torch's classes."""

    def __init__(self, names: List[str]) -> None:
        self.names = names

    def undo(self) -> None:
        """Put torch's own classes back for the names this injection changed."""
        uninject(self.names)

    def __enter__(self) -> "Injection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()


def inject(opts: Optional[Optimizations] = None) -> Injection:
    """Overwrite ``torch.nn.Linear``/``Embedding`` and ``torch.optim.Adam``/``AdamW``/``SGD``/``Adagrad``
    with the classes ``opts`` selects (only the kinds in scope, only where they differ)."""
    opts = current() if opts is None else opts
    torch = require_torch("inject")
    sel = select(opts)
    scope = {"Linear": opts.linear, "Embedding": opts.embedding}
    changed = []
    for name, (owner, attr) in _INJECTABLE.items():
        if not scope.get(name, opts.optimizers):
            continue
        klass = getattr(sel, name)
        if klass is _torch_class(name):
            continue
        _ORIGINALS.setdefault(name, getattr(getattr(torch, owner), attr))
        setattr(getattr(torch, owner), attr, klass)
        changed.append(name)
    if changed:
        log.info("mlutils.wrapper: injected %s into torch", ", ".join(changed))
    return Injection(changed)


def uninject(names: Optional[List[str]] = None) -> None:
    """Restore torch's own classes (all injected ones, or just ``names``)."""
    if not _ORIGINALS:
        return
    torch = require_torch("uninject")
    for name in list(_ORIGINALS if names is None else names):
        if name in _ORIGINALS:
            owner, attr = _INJECTABLE[name]
            setattr(getattr(torch, owner), attr, _ORIGINALS.pop(name))


# ---------------------------------------------------------------------------
# replacing modules in place


def _placement(module: torch.nn.Module) -> Tuple[Optional[torch.device], Optional[torch.dtype]]:
    """(device, floating dtype or None) of a module's tensors."""
    device = dtype = None
    for t in list(module.parameters(recurse=True)) + list(module.buffers(recurse=True)):
        if device is None:
            device = t.device
        if dtype is None and t.is_floating_point():
            dtype = t.dtype
    return device, dtype


def _copy_into(old: torch.nn.Module, new: torch.nn.Module, name: str) -> torch.nn.Module:
    """new with old's weights, trainability, mode, device and dtype."""
    device, dtype = _placement(old)
    if dtype is not None:
        new.to(dtype=dtype)
    result = new.load_state_dict(old.state_dict(), strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"replace: {type(new).__name__} has no place for {sorted(result.unexpected_keys)} "
            f"of {name or '<model>'} ({type(old).__name__})"
        )
    if result.missing_keys:
        log.debug("replace: %s of %s keeps its own %s", type(new).__name__, name, result.missing_keys)
    frozen = {n for n, p in old.named_parameters() if not p.requires_grad}
    for n, p in new.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    new.train(old.training)
    if device is not None:
        new.to(device)
    return new


def _replace(model: torch.nn.Module, klass: type, target: type,
             build: Callable[[torch.nn.Module], torch.nn.Module], verbose: bool) -> torch.nn.Module:
    """Replace every ``target`` module (that is not already ``klass``) with ``build(old)``."""
    made: Dict[int, Any] = {}  # id(old) -> new, so a module shared under two names stays shared
    found = [
        (name, m)
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, target) and not isinstance(m, klass)
    ]
    for name, old in found:
        new = made.get(id(old))
        if new is None:
            new = made[id(old)] = _copy_into(old, build(old), name)
        if name == "":
            model = new
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
        if verbose:
            log.info("replaced %s (%s) with %s", name or "<model>", type(old).__name__, klass.__name__)
    return model


def _classes(kind: str, klass: Optional[type], target: Optional[type]) -> Tuple[type, type]:
    if klass is None:
        klass = getattr(select(), kind)
    if target is None:
        target = _torch_class(kind)
    return klass, target


def replace_linear(model: torch.nn.Module, klass: Optional[type] = None, target: Optional[type] = None,
                   verbose: bool = False) -> torch.nn.Module:
    """Replace each ``target`` (default torch.nn.Linear) in ``model`` with ``klass`` (default the
    selected Linear), keeping weights, trainability, device and dtype; returns the model.

    ``klass`` is built as ``klass(in_features, out_features, bias=...)``.  (The
    original dropped the weights and moved every new layer to the device and
    dtype of the model's first parameter.)  When the model itself is a
    ``target`` the new module is returned.
    """
    klass, target = _classes("Linear", klass, target)
    if klass is target:
        return model
    return _replace(model, klass, target, lambda m: klass(m.in_features, m.out_features, bias=m.bias is not None), verbose)


def replace_embedding(model: torch.nn.Module, klass: Optional[type] = None, target: Optional[type] = None,
                      verbose: bool = False) -> torch.nn.Module:
    """Replace each ``target`` (default torch.nn.Embedding) with ``klass`` (default the selected
    Embedding), keeping weights and ``padding_idx``/``max_norm``; returns the model."""
    klass, target = _classes("Embedding", klass, target)
    if klass is target:
        return model

    def build(m: torch.nn.Module) -> torch.nn.Module:
        kwargs = {}
        for attr, default in (("padding_idx", None), ("max_norm", None), ("norm_type", 2.0),
                              ("scale_grad_by_freq", False), ("sparse", False)):
            value = getattr(m, attr, default)
            if value != default:
                kwargs[attr] = value
        return klass(m.num_embeddings, m.embedding_dim, **kwargs)

    return _replace(model, klass, target, build, verbose)


def replace_attention(model: torch.nn.Module, klass: type, target: type, mode: str = "math",
                      verbose: bool = False) -> torch.nn.Module:
    """Replace each ``target`` attention module with ``klass(config=m.config, layer_idx=m.layer_idx,
    mode=mode)`` (Hugging Face style), keeping weights; returns the model."""

    def build(m: torch.nn.Module) -> torch.nn.Module:
        if not hasattr(m, "config"):
            raise TypeError(f"replace_attention: {type(m).__name__} has no 'config' to build {klass.__name__} from")
        return klass(config=m.config, layer_idx=getattr(m, "layer_idx", None), mode=mode)

    return _replace(model, klass, target, build, verbose)


# ---------------------------------------------------------------------------
# autocast and compile


@contextlib.contextmanager
def autocast(device_type: Optional[str] = None, dtype: Union[str, torch.dtype, None] = None, enabled: bool = True,
             opts: Optional[Optimizations] = None) -> Iterator[None]:
    """Mixed precision inside the block: transformer_engine's fp8 autocast when ``fp8`` is on and
    installed, else ``torch.autocast(device_type, dtype)``.

    ``device_type`` defaults to ``cuda`` when available, else ``cpu``;
    ``dtype`` may be a name (``"bf16"``).  (The original yielded the autocast
    object without entering it, so nothing was autocast.)
    """
    torch = require_torch("autocast")
    opts = current() if opts is None else opts
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is not None:
        dtype = coerce_dtype(dtype)
    if enabled and opts.fp8 and select(opts).fp8:
        te = importlib.import_module("transformer_engine.pytorch")
        with te.fp8_autocast(enabled=True):
            yield
        return
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        yield


@functools.lru_cache(maxsize=None)
def _c_compiler_works() -> bool:
    """Whether a C++ compiler (``$CXX``, c++, g++, clang++) builds a trivial program."""
    candidates = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    for cc in candidates:
        path = shutil.which(cc) if cc else None
        if not path:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "t.cpp")
            with open(src, "w") as f:
                f.write("int main() { return 0; }\n")
            try:
                r = subprocess.run([path, src, "-o", os.path.join(tmp, "t")], capture_output=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                continue
            if r.returncode == 0:
                return True
    return False


def available_backends() -> List[str]:
    """Names torch.compile accepts here (debug ones such as ``eager`` included), plus ``tensorrt``
    when torch_tensorrt imports."""
    torch = require_torch("available_backends")
    import torch._dynamo

    names = list(torch._dynamo.list_backends(exclude_tags=()))
    if "tensorrt" not in names and importlib.util.find_spec("torch_tensorrt") is not None:
        names.append("tensorrt")
    return names


def _auto_backend() -> str:
    if _c_compiler_works():
        return "inductor"
    log.info("compile_model: no working C++ compiler, using the eager backend")
    return "eager"


def compile_model(model: torch.nn.Module, backend: Optional[str] = "auto", **kwargs: Any) -> torch.nn.Module:
    """``torch.compile(model, backend=...)``; ``"auto"`` is inductor when a C++ compiler works, else eager.

    ``"tensorrt"`` imports torch_tensorrt first and falls back to ``"auto"``
    with one warning when it is missing.  An unknown backend raises ValueError
    listing the available ones (the original quietly used the default; its
    ``"auto"`` took the alphabetically first backend).
    """
    torch = require_torch("compile_model")
    if backend is None or backend == "auto" or backend is True:
        backend = _auto_backend()
    if backend == "tensorrt" and _optional("torch_tensorrt", "torch_tensorrt", "compiling with tensorrt", "the auto backend") is None:
        backend = _auto_backend()
    if not isinstance(backend, str):
        raise TypeError(f"compile_model: backend must be a name, got {type(backend).__name__}")
    names = available_backends()
    if backend not in names:
        raise ValueError(f"compile_model: unknown backend {backend!r}; available: {', '.join(sorted(names))}")
    return torch.compile(model, backend=backend, **kwargs)


# ---------------------------------------------------------------------------
# tying it together


def enable_activation_offload(model: torch.nn.Module) -> torch.nn.Module:
    """Turn on ``mlutils.offload``'s offloaded gradient checkpointing for ``model``; warns once and
    skips when that module is not available.  Returns the model."""
    try:
        offload = importlib.import_module("mlutils.offload")
        enable = offload.enable_offloaded_gradient_checkpointing
    except (ImportError, AttributeError) as e:
        _warn_once(
            "mlutils.offload",
            f"mlutils.wrapper: unsloth=True needs mlutils.offload.enable_offloaded_gradient_checkpointing, "
            f"which is not available ({type(e).__name__}: {e}); activation offload is off",
        )
        return model
    result = enable(model)
    return model if result is None else result


def apply_optimizations(model: torch.nn.Module, opts: Optional[Optimizations] = None) -> torch.nn.Module:
    """Apply ``opts`` to ``model`` and make it the current configuration; returns the (maybe compiled) model.

    In order: inject classes into torch (``injects``), replace Linear and
    Embedding modules in place (``replace``), activation offload
    (``unsloth``), place modules across devices (``model_offloading``) and
    compile (``compile``; ``tensorrt`` picks that backend when ``compile`` is
    just True).
    """
    opts = current() if opts is None else opts
    if not isinstance(opts, Optimizations):
        raise TypeError(f"apply_optimizations: expected Optimizations, got {type(opts).__name__}")
    configure(opts)
    if opts.injects:
        inject(opts)
    if opts.replace:
        sel = select(opts)
        if opts.linear:
            model = replace_linear(model, sel.Linear)
        if opts.embedding:
            model = replace_embedding(model, sel.Embedding)
    if opts.unsloth:
        model = enable_activation_offload(model)
    if opts.model_offloading:
        model = offload_model(model, opts.model_offloading)
    if opts.compile:
        if isinstance(opts.compile, str):
            backend = opts.compile
        else:
            backend = "tensorrt" if opts.tensorrt else "auto"
        model = compile_model(model, backend)
    return model
