"""What the safe loader rebuilds without --trust: the allowlist of classes and functions.

A model file is what `torch.save(model)` writes: a pickle that names the classes to rebuild. A
plain `pickle.load` of it runs whatever those names point to, so a file from elsewhere is read
with PyTorch's weights-only unpickler instead, which rebuilds only allowlisted classes. The
allowlist (`allowlist()`) holds what the supported libraries' own models pickle:

- every `nn.Module` subclass defined in `torch.nn.modules`;
- torchvision's model classes and the `torchvision.ops` blocks they use (Conv2dNormActivation,
  SqueezeExcitation, StochasticDepth, Permute, MLP, ...), when torchvision imports;
- timm's model and layer classes, and what its models keep besides modules (the `Format` enum,
  `FeatureInfo`, the activation functions of `timm.layers.activations`), when timm imports;
- `functools.partial`, which models keep for norm/activation factories (harmless: what it wraps
  must be allowlisted too).

Before loading, `get_unsafe_globals_in_checkpoint` lists every name the pickle refers to; a
file naming anything else is refused by name, and `trust=True` (the CLI's `--trust`) reads it
with full pickle. Not allowlisted on purpose: `builtins.getattr` (which reaches anything from
anything; timm's fasternet pickles a bound method with it, so it needs --trust) and every
function that is not pure tensor math.

torchvision and timm are imported lazily, only when a file names one of their classes: where
one is missing or fails to import, its classes are simply not allowlisted, and the refusal says
why.
"""

from __future__ import annotations

import enum
import functools
import importlib
import inspect
import logging
import pkgutil
import sys
import warnings
from collections.abc import Iterable
from types import ModuleType
from typing import Any

from torch import nn

from pcompiler.errors import one_line

log = logging.getLogger("pcompiler")

__all__ = ["OPTIONAL_LIBRARIES", "allowed_by_name", "allowlist", "optional_import_failures", "refresh_allowlist"]

# Libraries whose model classes are allowlisted when they import: (package, subpackages walked).
OPTIONAL_LIBRARIES = {
    "torchvision": ("torchvision.models", "torchvision.ops"),
    "timm": ("timm.models", "timm.layers"),
}
_optional_failures: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------
# The allowlist


def _walk(package: ModuleType) -> Iterable[ModuleType]:
    """The package and every submodule that imports (one that does not is skipped and logged)."""
    yield package
    for info in pkgutil.walk_packages(getattr(package, "__path__", []), package.__name__ + "."):
        try:
            with warnings.catch_warnings():  # deprecated alias modules warn on import
                warnings.simplefilter("ignore")
                module = importlib.import_module(info.name)
        except Exception as e:  # noqa: BLE001 - an optional submodule that fails is just not walked
            log.debug("allowlist: skipping %s (%s)", info.name, one_line(e))
            continue
        yield module


def _classes_defined_in(module: ModuleType, prefix: str) -> Iterable[type]:
    """nn.Module subclasses defined under `prefix` (timm: also the enums its layers keep)."""
    for obj in vars(module).values():
        if inspect.isclass(obj) and obj.__module__.startswith(prefix):
            if issubclass(obj, nn.Module) or (prefix == "timm." and issubclass(obj, enum.Enum)):
                yield obj


# Beyond modules: plain functions some timm models keep as their activation (pure tensor math),
# and the record of feature stages hybrid models keep.
_TIMM_FUNCTION_MODULES = ("timm.layers.activations",)
_TIMM_EXTRA = ("timm.models._features.FeatureInfo",)


def _timm_extras() -> Iterable[Any]:
    for name in _TIMM_FUNCTION_MODULES:
        module = sys.modules.get(name)
        for obj in vars(module).values() if module else ():
            if inspect.isfunction(obj) and obj.__module__ == name:
                yield obj
    for qualified in _TIMM_EXTRA:
        module_name, _, attr = qualified.rpartition(".")
        obj = getattr(sys.modules.get(module_name), attr, None)
        if obj is not None:
            yield obj


def _import_optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - absent or broken: its classes are not allowlisted
        _optional_failures[name] = one_line(e)
        log.debug("allowlist: %s is not importable (%s)", name, one_line(e))
        return None


def _names(objects: Iterable[Any]) -> dict[str, Any]:
    """Pickle name (module.qualname, as the unpickler spells it) -> object."""
    return {f"{obj.__module__}.{obj.__qualname__}": obj for obj in objects}


@functools.cache
def _torch_allowed() -> dict[str, Any]:
    import torch.nn.modules

    import pcompiler.example_models

    found = [functools.partial]
    for module in _walk(torch.nn.modules):
        found.extend(_classes_defined_in(module, "torch.nn"))
    # The bundled example model is pcompiler's own code, as safe to name as torch's.
    found.extend(_classes_defined_in(pcompiler.example_models, "pcompiler.example_models"))
    return _names(found)


@functools.cache
def _library_allowed(library: str) -> dict[str, Any]:
    """The allowlist part of one optional library; empty (and the reason kept) if it fails to import."""
    _optional_failures.pop(library, None)
    if _import_optional(library) is None:
        return {}
    found: list[Any] = []
    for sub in OPTIONAL_LIBRARIES[library]:
        package = _import_optional(sub)
        for module in _walk(package) if package is not None else ():
            found.extend(_classes_defined_in(module, library + "."))
    if library == "timm":
        found.extend(_timm_extras())
    return _names(found)


def allowed_by_name(names: Iterable[str] | None = None) -> dict[str, Any]:
    """The allowlist as a name -> object map. With `names`, only the libraries those names come
    from are imported (a plain torch.nn pickle never imports torchvision or timm)."""
    names = None if names is None else list(names)
    allowed = dict(_torch_allowed())
    for library in OPTIONAL_LIBRARIES:
        if names is None or any(n.startswith(library + ".") for n in names):
            allowed.update(_library_allowed(library))
    return allowed


def allowlist() -> tuple[Any, ...]:
    """Everything a model pickle may name without --trust (computed once, on first use)."""
    return tuple(allowed_by_name().values())


def refresh_allowlist() -> None:
    """Forget the computed allowlist (after torchvision or timm became importable in this process)."""
    _torch_allowed.cache_clear()
    _library_allowed.cache_clear()
    _optional_failures.clear()


def optional_import_failures() -> dict[str, str]:
    """Optional libraries whose classes are not allowlisted because they failed to import."""
    allowlist()
    return dict(_optional_failures)


