"""The output folder of a run (OUT): claiming it for one run, and writing files into it whole.

`claim_out_dir(out)` is called once, before any slow work. It creates OUT when missing. When
OUT holds files a pcompiler run writes (the exports, the reports, plots/, checkpoints/, or a
temporary file a killed write left), it refuses, so two runs never mix their files, unless
`overwrite` (those files are removed first; nothing else in OUT is touched) or `resume` (a
`--resume` run continues its own checkpoints: OUT's run record must then name the same model
and settings). Files in OUT that pcompiler does not write are left alone and are no reason to
refuse. The claim leaves a small run record, `.pcompile-run.json`: the model file's size and a
hash of its first and last MiB, and the settings the caller passes.

`atomic_write(path)` yields a temporary path beside `path` (same folder, same suffix); when
the block ends the file is fsynced and renamed onto `path`, so `path` is either the old file
or the complete new one. An exception inside the block removes the temporary file.
`atomic_files(path)` does the same for a writer that also writes companion files beside its
output (ONNX's external data `model.onnx.data`): it yields `path`'s name inside a temporary
folder beside it and moves every file of that folder out, companions first, `path` last.

Under torchrun only rank 0 writes OUT, so only rank 0 claims it (other ranks read the rank as
`pcompiler.distributed.world` does). A leaf of the core: it imports nothing from pcompiler but errors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pcompiler.errors import CompileError

__all__ = ["RUN_FILES", "RUN_FOLDERS", "RUN_RECORD", "atomic_files", "atomic_write", "claim_out_dir", "run_files"]

RUN_RECORD = ".pcompile-run.json"
# What a run writes at OUT's top level, and in which subfolders.
RUN_FILES = ("report.json", "report.md", "model.pt", "state_dict.pt", "model.pt2", "model.onnx", "model.onnx.data",
             "model_eager.pt", "hf")
RUN_FOLDERS = {
    "plots": ("widths.png", "importance.png", "curve.png", "latency.png"),
    "checkpoints": ("regularization.pt", "finetune.pt", "regularization.pt.tmp", "finetune.pt.tmp"),
}
# A temporary file or folder of atomic_write / atomic_files: .<name>.<8 hex>.tmp[<suffix>]
_TEMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp(\.\w+)?$")
_HASHED = 1 << 20  # bytes hashed at each end of the model file


# ---------------------------------------------------------------------------------------------
# Writing whole files


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every system can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; then fsync it and rename it onto `path`.
    On an exception the temporary file is removed and `path` keeps what it held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


@contextlib.contextmanager
def atomic_files(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield `path`'s name inside a temporary folder beside it; the writer may add companion
    files there. Then each file is fsynced and moved beside `path`, companions first and `path`
    last. On an exception the folder is removed and the files beside `path` are untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    folder.mkdir()
    try:
        yield folder / path.name
        written = sorted((f for f in folder.iterdir() if f.is_file()), key=lambda f: f.name == path.name)
        if not any(f.name == path.name for f in written):
            raise FileNotFoundError(f"the writer did not write {path.name}")
        for f in written:
            _fsync(f)
        for f in written:
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _fsync_folder(path.parent)


# ---------------------------------------------------------------------------------------------
# Claiming OUT


def _is_ours(entry: Path, names: tuple[str, ...]) -> bool:
    temp = _TEMP.match(entry.name)
    return entry.name in names or (temp is not None and temp.group("name") in names)


def run_files(out: Path) -> list[Path]:
    """The files and temporary folders in `out` that a pcompiler run writes (not its run record)."""
    if not out.is_dir():
        return []
    found = _ours_in(out, RUN_FILES)
    for sub, names in RUN_FOLDERS.items():
        if (out / sub).is_dir():
            found += _ours_in(out / sub, names)
    return found


def _ours_in(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Entries of `folder` named in `names` (in that order), then temporary ones of those names."""
    present = {e.name: e for e in folder.iterdir()}
    temps = sorted(e for e in present.values() if e.name not in names and _is_ours(e, names))
    return [present[n] for n in names if n in present] + temps


def _model_fingerprint(model: Path) -> dict[str, Any]:
    """Size and a hash of the first and last MiB: cheap for any size, and what changes when the file does."""
    try:
        size = model.stat().st_size
        digest = hashlib.sha256()
        with model.open("rb") as f:
            digest.update(f.read(_HASHED))
            if size > _HASHED:
                f.seek(max(_HASHED, size - _HASHED))
                digest.update(f.read(_HASHED))
    except OSError:
        return {"model": str(model)}
    return {"model": str(model), "model_bytes": size, "model_hash": digest.hexdigest()}


def _differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """'model a.pt -> b.pt', 'ratio 0.5 -> 0.3': what differs among the keys both records hold."""
    if before.get("model_hash", now.get("model_hash")) != now.get("model_hash"):
        changed = [f"model {before.get('model')} -> {now.get('model')} (another file)"]
    else:
        changed = []
    skip = {"model", "model_bytes", "model_hash"}
    return changed + [f"{k} {before[k]} -> {now[k]}" for k in now if k not in skip and k in before and before[k] != now[k]]


def _refuse(out: Path, ours: list[Path]) -> CompileError:
    names = [str(p.relative_to(out)) for p in ours]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    resume = " (or --resume to continue its checkpoints)" if any(p.parent.name == "checkpoints" for p in ours) else ""
    return CompileError(f"output folder '{out}' holds another run's files ({shown})",
                        hint=f"choose an empty folder, or pass --overwrite to replace them{resume}")


def _remove(out: Path, ours: list[Path]) -> None:
    for p in ours:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    for sub in RUN_FOLDERS:
        with contextlib.suppress(OSError):  # kept when it holds files of the user's
            (out / sub).rmdir()


def _check_resume(out: Path, record: dict[str, Any]) -> None:
    try:
        before = json.loads((out / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return  # no record (an older pcompiler): the checkpoints' own settings are checked at resume
    changed = _differences(before, record) if isinstance(before, dict) else []
    if changed:
        raise CompileError(f"--resume: output folder '{out}' holds a run of another model or settings "
                           f"({'; '.join(changed)})",
                           hint="resume with the interrupted run's model and options, or choose another folder")


def claim_out_dir(out: str | os.PathLike[str], *, overwrite: bool = False, resume: bool = False,
                  model: str | os.PathLike[str] | None = None, settings: Mapping[str, Any] | None = None) -> Path:
    """Make `out` this run's output folder (see the module docstring); return it as a Path.

    `model` and `settings` (JSON-able values) are recorded, and on `resume` compared with the
    record of the run that wrote OUT. Raises CompileError (exit 2) when OUT cannot be used."""
    out = Path(out)
    if overwrite and resume:
        raise CompileError("--resume continues the run in the output folder and --overwrite deletes it",
                           hint="pass one of them")
    if int(os.environ.get("RANK", "0")) != 0:
        return out
    if out.exists() and not out.is_dir():
        raise CompileError(f"output folder '{out}' is a file", hint="choose a folder with -o")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompileError(f"cannot create the output folder '{out}': {e.strerror}",
                           hint="choose a folder you can write to") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise CompileError(f"cannot write into the output folder '{out}'", hint="choose a folder you can write to")
    record = {**(_model_fingerprint(Path(model)) if model is not None else {}), **(settings or {})}
    record = json.loads(json.dumps(record, default=str))  # as it reads back (tuples as lists)
    ours = run_files(out)
    if ours and resume:
        _check_resume(out, record)
        _remove(out, [p for p in ours if _TEMP.match(p.name)])  # what a killed run's writes left
    elif ours and overwrite:
        _remove(out, ours)
    elif ours:
        raise _refuse(out, ours)
    with atomic_write(out / RUN_RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return out
