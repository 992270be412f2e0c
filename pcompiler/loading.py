"""Safe loading of model files: `load_model(path)`.

A model file is what `torch.save(model)` writes: a pickle that names the classes to rebuild. A
file from elsewhere is read with PyTorch's weights-only unpickler, which rebuilds only the classes
of `pcompiler.allowlist`: every name the pickle refers to is listed first
(`get_unsafe_globals_in_checkpoint`), a file naming anything else is refused by name, and
`trust=True` (the CLI's `--trust`) reads it with full pickle.

A `torch.export` archive (`.pt2`, what pcompiler's own export writes) holds a graph and weights
and no pickled code: it is read with `torch.export.load` and its `.module()` is the model.

With `arch="module:callable"` the file is a state dict: the callable builds the model and the
file fills it (strictly: missing and unexpected keys are named).

Every failure a user can fix is a `CompileError` with one line that says what and how.
"""

from __future__ import annotations

import importlib
import logging
import operator
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pcompiler.allowlist import (
    OPTIONAL_LIBRARIES,
    allowed_by_name,
    allowlist,
    optional_import_failures,
    refresh_allowlist,
)
from pcompiler.errors import CompileError, one_line
from pcompiler.hf import is_folder, load_folder
from pcompiler.input_checks import check_finite
from pcompiler.memory import page_out

log = logging.getLogger("pcompiler")

__all__ = ["allowlist", "load_model", "optional_import_failures", "refresh_allowlist"]

_TRUST_HINT = "if you trust this file, pass --trust to load it with full pickle, which can run any code"


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
    failures = optional_import_failures()
    broken = [lib for lib in OPTIONAL_LIBRARIES if lib in failures]
    broken = [lib for lib in broken if any(n.startswith(lib + ".") for n in names)]
    if broken:
        why = "; " + "; ".join(f"{lib} is not allowlisted because it failed to import ({failures[lib]})" for lib in broken)
    return CompileError(
        f"'{path}' refers to classes pcompiler does not load without --trust: {shown}{why}",
        hint=_TRUST_HINT,
    )


_RESAVE_HINT = "copy the whole file again, or save it again with torch.save(model, path)"
_REEXPORT_HINT = ("export it again: torch.export.save(torch.export.export(model, example_inputs), path), "
                  "and copy the whole file")
_END_MISSING = "its end (the zip's central directory) is missing or damaged"
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"


def _zip_names(path: Path) -> list[str] | None:
    """The entries of the zip archive `path`; None when it is not one or its directory is unreadable."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def _is_truncated_zip(path: Path) -> bool:
    """Starts like a zip archive, but the directory at its end is missing or damaged (a cut-off
    or corrupted copy)."""
    with path.open("rb") as f:
        return f.read(4).startswith(_ZIP_MAGIC) and _zip_names(path) is None


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
    names = _zip_names(path)
    if names is not None:
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
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
        needed = list(allowed_by_name().values())
    else:  # name every global before unpickling anything
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # beyond torch's defaults
        except Exception as e:  # noqa: BLE001 - any failure to parse means a broken file
            raise _not_a_checkpoint(path, e) from e
        allowed = allowed_by_name(names)
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
        if _zip_names(path) is not None:  # a sound archive: the failure came from the code it ran
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
    names = _zip_names(path) if path.is_file() else None
    return names is not None and any(n.endswith("/archive_format") for n in names)


def _not_an_export_archive(path: Path) -> CompileError | None:
    """Why a `.pt2` file is not a torch.export archive; None when it is a torch.save file after all."""
    with path.open("rb") as f:
        head = f.read(4)
    names = _zip_names(path)
    if names is not None:
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
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
    page_out(model)  # a memory-mapped checkpoint's pages, read while loading and checking (pcompiler/memory.py)
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
