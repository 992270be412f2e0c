"""Safe loading of model files: `load_model(path)`.

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

A `torch.export` archive (`.pt2`, what pcompiler's own export writes) holds a graph and weights
and no pickled code: it is read with `torch.export.load` and its `.module()` is the model.

With `arch="module:callable"` the file is a state dict: the callable builds the model and the
file fills it (strictly: missing and unexpected keys are named).

Every failure a user can fix is a `CompileError` with one line that says what and how.
"""

from __future__ import annotations

import enum
import functools
import importlib
import inspect
import logging
import operator
import os
import pickle
import pkgutil
import re
import sys
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pcompiler.errors import CompileError, one_line
from pcompiler.hf import is_folder, load_folder
from pcompiler.input_checks import check_finite

log = logging.getLogger("pcompiler")

__all__ = ["allowlist", "load_model", "optional_import_failures", "refresh_allowlist"]

# Libraries whose model classes are allowlisted when they import: (package, subpackages walked).
_OPTIONAL_LIBRARIES = {
    "torchvision": ("torchvision.models", "torchvision.ops"),
    "timm": ("timm.models", "timm.layers"),
}
_optional_failures: dict[str, str] = {}

_TRUST_HINT = "if you trust this file, pass --trust to load it with full pickle, which can run any code"


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
    for sub in _OPTIONAL_LIBRARIES[library]:
        package = _import_optional(sub)
        for module in _walk(package) if package is not None else ():
            found.extend(_classes_defined_in(module, library + "."))
    if library == "timm":
        found.extend(_timm_extras())
    return _names(found)


def _allowed_by_name(names: Iterable[str] | None = None) -> dict[str, Any]:
    """The allowlist as a name -> object map. With `names`, only the libraries those names come
    from are imported (a plain torch.nn pickle never imports torchvision or timm)."""
    names = None if names is None else list(names)
    allowed = dict(_torch_allowed())
    for library in _OPTIONAL_LIBRARIES:
        if names is None or any(n.startswith(library + ".") for n in names):
            allowed.update(_library_allowed(library))
    return allowed


def allowlist() -> tuple[Any, ...]:
    """Everything a model pickle may name without --trust (computed once, on first use)."""
    return tuple(_allowed_by_name().values())


def refresh_allowlist() -> None:
    """Forget the computed allowlist (after torchvision or timm became importable in this process)."""
    _torch_allowed.cache_clear()
    _library_allowed.cache_clear()
    _optional_failures.clear()


def optional_import_failures() -> dict[str, str]:
    """Optional libraries whose classes are not allowlisted because they failed to import."""
    allowlist()
    return dict(_optional_failures)


# ---------------------------------------------------------------------------------------------
# Reading a file


def _check_path(path: Path) -> None:
    if not path.exists():
        raise CompileError(f"model file '{path}' does not exist")
    if path.is_dir():
        raise CompileError(f"'{path}' is a directory, not a model file")
    if path.stat().st_size == 0:
        raise CompileError(f"model file '{path}' is empty")


def _refusal(path: Path, names: Sequence[str]) -> CompileError:
    names = sorted(set(names))
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    why = ""
    broken = [lib for lib in _OPTIONAL_LIBRARIES if lib in _optional_failures]
    broken = [lib for lib in broken if any(n.startswith(lib + ".") for n in names)]
    if broken:
        why = "; " + "; ".join(f"{lib} is not allowlisted because it failed to import ({_optional_failures[lib]})" for lib in broken)
    return CompileError(
        f"'{path}' refers to classes pcompiler does not load without --trust: {shown}{why}",
        hint=_TRUST_HINT,
    )


_RESAVE_HINT = "copy the whole file again, or save it again with torch.save(model, path)"
_REEXPORT_HINT = ("export it again: torch.export.save(torch.export.export(model, example_inputs), path), "
                  "and copy the whole file")
_END_MISSING = "its end (the zip's central directory) is missing"
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"


def _is_truncated_zip(path: Path) -> bool:
    """Starts like a zip archive, but the directory at its end is missing (a cut-off copy)."""
    with path.open("rb") as f:
        return f.read(4).startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path)


def _first_sentence(e: BaseException) -> str:
    text = one_line(e)
    cut = text.find(". ")
    return text if cut < 0 else text[: cut + 1]


def _not_a_checkpoint(path: Path, e: BaseException) -> CompileError:
    if "torchscript" in str(e).lower():
        return CompileError(
            f"'{path}' is a TorchScript archive, not a torch.save file",
            hint="save the nn.Module itself with torch.save(model, path), or its state dict and use --arch",
        )
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()):
                return CompileError(
                    f"'{path}' is a zip archive but not a torch.save file (a torch.export .pt2?)",
                    hint="pcompiler reads files written by torch.save(model), or a state dict with --arch",
                )
    if _is_truncated_zip(path):
        return CompileError(f"'{path}' is truncated or corrupt: it starts as a torch.save zip archive but {_END_MISSING}",
                            hint=_RESAVE_HINT)
    return CompileError(f"cannot read '{path}': not a complete torch.save file (truncated or corrupt?): "
                        f"{_first_sentence(e)}", hint=_RESAVE_HINT)


def _read_safely(path: Path) -> Any:
    """torch.load with the weights-only unpickler and the allowlist; refuse unknown names."""
    with path.open("rb") as f:
        head = f.read(4)
    legacy = not head.startswith(_ZIP_MAGIC)
    if legacy and not head.startswith(_PICKLE_PROTO):
        raise CompileError(f"'{path}' is not a torch.save file (neither a zip archive nor a pickle): corrupt, or "
                           "another format", hint=_RESAVE_HINT)
    if legacy:  # no way to list the globals first: the unpickler checks each as it goes
        needed = list(_allowed_by_name().values())
    else:  # name every global before unpickling anything
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # beyond torch's defaults
        except Exception as e:  # noqa: BLE001 - any failure to parse means a broken file
            raise _not_a_checkpoint(path, e) from e
        allowed = _allowed_by_name(names)
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise _refusal(path, unknown)
        needed = [allowed[n] for n in names]  # a short list keeps the unpickler's lookups cheap
    with torch.serialization.safe_globals(needed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            names = _UNSAFE_GLOBAL.findall(str(e))
            if names:
                raise _refusal(path, names) from e
            if legacy and "persistent_load" in str(e):
                raise CompileError(
                    f"'{path}' is a whole model in torch's legacy (pre-1.6) format, which the safe loader cannot read",
                    hint=_TRUST_HINT + ", or re-save it with a current torch",
                ) from e
            raise _not_a_checkpoint(path, e) from e
        except Exception as e:  # noqa: BLE001
            raise _not_a_checkpoint(path, e) from e


def _read_trusted(path: Path) -> Any:
    """Full pickle: the file may import and run code (the user said --trust)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, ImportError) as e:
        raise CompileError(
            f"'{path}' needs a module that cannot be imported: {one_line(e)}",
            hint="run pcompile where the model's code is importable (PYTHONPATH), or save a state dict and use --arch",
        ) from e
    except AttributeError as e:
        where = " (the model class was defined in a script's __main__)" if "__main__" in str(e) else ""
        raise CompileError(
            f"'{path}' names a class that cannot be found{where}: {one_line(e)}",
            hint="define the model in an importable module, or save a state dict and use --arch module:callable",
        ) from e
    except Exception as e:  # noqa: BLE001
        if zipfile.is_zipfile(path):  # a sound archive: the failure came from the code it ran
            raise CompileError(f"loading '{path}' with full pickle failed: {_first_sentence(e)}") from e
        raise _not_a_checkpoint(path, e) from e


def _read(path: Path, trust: bool) -> Any:
    _check_path(path)
    return _read_trusted(path) if trust else _read_safely(path)


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        n = sum(isinstance(v, torch.Tensor) for v in obj.values())
        return f"a dict of {len(obj)} entries ({n} tensors)"
    return f"a {type(obj).__name__}"


# ---------------------------------------------------------------------------------------------
# --arch


def _build_from_arch(spec: str) -> nn.Module:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CompileError(f"--arch '{spec}' is not of the form module:callable (e.g. torchvision.models:resnet18)")
    added = os.getcwd() not in sys.path  # let --arch name a module in the current folder
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"--arch: cannot import module '{module_name}': {one_line(e)}") from e
    finally:
        if added:
            sys.path.remove(os.getcwd())
    try:
        factory = operator.attrgetter(attr)(module)
    except AttributeError as e:
        raise CompileError(f"--arch: module '{module_name}' has no attribute '{attr}'") from e
    if not callable(factory):
        raise CompileError(f"--arch: '{spec}' is not callable")
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"--arch: calling {spec}() failed: {one_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise CompileError(f"--arch: {spec}() returned {_describe(model)}, not an nn.Module")
    return model


def _state_dict_of(obj: Any, path: Path) -> Mapping[str, Any]:
    if isinstance(obj, nn.Module):
        raise CompileError(
            f"'{path}' holds a whole model (torch.save(model)), not a state dict", hint="drop --arch to load it"
        )
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model_state_dict", "model"):  # common training checkpoints
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                log.info("using the '%s' entry of %s as the state dict", key, path)
                return inner
    raise CompileError(f"'{path}' holds {_describe(obj)}, not a state dict of tensors (needed with --arch)")


def _fill(model: nn.Module, state: Mapping[str, Any], path: Path, spec: str) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        detail = "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")
        raise CompileError(f"the state dict in '{path}' does not fit {spec}(): {detail or one_line(e)}") from e
    problems = []
    for label, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{label} keys {', '.join(keys[:5])}{more}")
    if problems:
        raise CompileError(
            f"the state dict in '{path}' does not fit {spec}(): {'; '.join(problems)}",
            hint="check that --arch builds the same architecture the weights were saved from",
        )


def _is_export_archive(path: Path) -> bool:
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/archive_format") for n in z.namelist())


def _not_an_export_archive(path: Path) -> CompileError | None:
    """Why a `.pt2` file is not a torch.export archive; None when it is a torch.save file after all."""
    with path.open("rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()):
                return None  # torch.save under a .pt2 name
        what = "a zip archive without the entries torch.export.save writes"
    elif _is_truncated_zip(path):
        what = f"truncated or corrupt: it starts as a zip archive but {_END_MISSING}"
    elif head.startswith(_PICKLE_PROTO):
        return None  # a legacy torch.save pickle under a .pt2 name
    else:
        what = "not a zip archive at all (corrupt, or another format)"
    return CompileError(f"'{path}' is not a readable torch.export archive: {what}", hint=_REEXPORT_HINT)


def _read_export_archive(path: Path) -> nn.Module:
    try:
        return torch.export.load(path).module()
    except Exception as e:
        with zipfile.ZipFile(path) as z:
            try:
                bad = z.testzip()  # the first entry whose bytes fail their CRC check
            except Exception:  # noqa: BLE001 - unreadable entries: corrupt all the same
                bad = "?"
        if bad is not None:
            raise CompileError(f"'{path}' is a corrupt torch.export archive: its entry '{bad}' does not match its "
                               "checksum", hint=_REEXPORT_HINT) from e
        raise CompileError(f"cannot read the torch.export archive '{path}': {_first_sentence(e)}",
                           hint="it was probably written by another torch version; export it again") from e


# ---------------------------------------------------------------------------------------------
# Public API


def load_model(path: str | os.PathLike[str], *, trust: bool = False, arch: str | None = None) -> nn.Module:
    """Read a model file into an `nn.Module` on the CPU (or the meta device, if it was saved there).

    A torch.export archive (.pt2) gives its `.module()`; a Hugging Face `save_pretrained` folder
    its transformers model, from config.json and safetensors (pcompiler.hf). Otherwise, without `arch` the file is a
    `torch.save(model)` pickle; with `arch="module:callable"` it is a
    state dict for the model that `callable()` builds. Only allowlisted classes are rebuilt unless
    `trust` is set; a model whose weights or buffers hold NaN or inf is refused. Raises
    `CompileError` with a one-line reason on any problem."""
    model = _load(Path(path), trust, arch)
    check_finite(model, path)
    return model


def _load(path: Path, trust: bool, arch: str | None) -> nn.Module:
    if arch is None and is_folder(path):
        return load_folder(path)
    if arch is None and _is_export_archive(path):
        return _read_export_archive(path)
    if arch is None and path.suffix == ".pt2":
        _check_path(path)
        refusal = _not_an_export_archive(path)
        if refusal is not None:
            raise refusal
    if arch is not None:
        model = _build_from_arch(arch)
        _fill(model, _state_dict_of(_read(path, trust), path), path, arch)
        return model
    obj = _read(path, trust)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CompileError(
            f"'{path}' holds a state dict ({len(obj)} tensors), not a model",
            hint="pass --arch module:callable to build the model it belongs to, e.g. --arch torchvision.models:resnet18",
        )
    raise CompileError(f"'{path}' holds {_describe(obj)}, not an nn.Module", hint="save the model with torch.save(model, path)")
